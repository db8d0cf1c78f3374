"""`vla-export checkpoint`: --random, --from a legacy .pth written as the original scripts did, bad options."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vla_export.checkpoint import load_checkpoint
from vla_export.cli import main
from vla_export.data.preprocess import Preprocessor
from vla_export.models import build_model
from vla_export.models.kosmos2_clip import resolve_config


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _forward(ckpt_dir):
    ckpt = load_checkpoint(ckpt_dir)
    pre = Preprocessor.from_checkpoint(ckpt_dir)
    feeds = pre(np.full((96, 96, 3), 100, np.uint8), "Navigate around obstacles to track the red cup")
    feeds.update(ckpt.spec.initial_state(1))
    ckpt.spec.check_feeds(feeds)
    with torch.no_grad():
        out = ckpt.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return ckpt, out


def test_random_checkpoint_is_loadable_and_runs(tmp_path):
    out = tmp_path / "rand"
    res = _run("checkpoint", "--preset", "tiny", "--random", "--head", "lstm", "-o", str(out))
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["clip_tokenizer.json", "config.json", "kosmos_tokenizer.json", "model.safetensors"]
    ckpt, out_tensors = _forward(out)
    assert ckpt.config["training"]["trained"] is False
    assert ckpt.model_config["head"] == "lstm" and len(out_tensors) == 3
    assert torch.isfinite(out_tensors[0]).all()


def test_set_overrides_and_seed_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert _run("checkpoint", "--random", "--set", "text_len=12", "--set", "action_dim=3", "--seed", "5",
                    "-o", str(d)).exit_code == 0
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_config"]["text_len"] == 12 and cfg["action_names"] == ["linear_x", "linear_y", "angular_z"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_from_legacy_pth_as_the_original_scripts_wrote_it(tmp_path):
    model, _ = build_model("kosmos2-clip-hybrid", resolve_config("tiny", {}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    pth = tmp_path / "best_model.pth"
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "val_mae": 0.2, "args": argparse.Namespace(lr=1e-4, batch_size=8, epochs=20, use_lstm=False)}, pth)
    out = tmp_path / "imported"
    res = _run("checkpoint", "--from", str(pth), "--preset", "tiny", "-o", str(out))
    assert res.exit_code == 0, res.output
    ckpt, _ = _forward(out)
    legacy = ckpt.config["training"]["legacy"]
    assert legacy["epoch"] == 3 and legacy["val_mae"] == 0.2 and legacy["args"]["batch_size"] == 8
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[k], v), k


def test_from_legacy_with_prefix_rename(tmp_path):
    model, _ = build_model("kosmos2-clip-hybrid", resolve_config("tiny", {}))
    pth = tmp_path / "dp.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pth)
    res = CliRunner().invoke(main, ["checkpoint", "--from", str(pth), "--preset", "tiny", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--rename" in res.output
    assert not (tmp_path / "x").exists()
    res = _run("checkpoint", "--from", str(pth), "--preset", "tiny", "--rename", "module.=", "-o",
               str(tmp_path / "y"))
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args, message", [
    (["--random", "--train", "x"], "exactly one of"),
    ([], "exactly one of"),
    (["--random", "--set", "head"], "KEY=VALUE"),
    (["--random", "--preset", "huge"], "unknown preset"),
    (["--train", "/nonexistent/episodes"], "does not exist"),
    (["--random", "--epochs", "0"], "--epochs must be at least 1"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, args, message):
    res = CliRunner().invoke(main, ["checkpoint", "-o", str(tmp_path / "c"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("\n") <= 1
    assert not (tmp_path / "c").exists()


def test_episodes_synth_and_info_commands(tmp_path):
    res = _run("episodes", "synth", "-o", str(tmp_path), "--count", "3", "--frames", "4", "--image-size", "32")
    assert res.exit_code == 0, res.output
    assert (tmp_path / ".complete").exists()
    res = _run("episodes", "info", str(tmp_path), "--json")
    info = json.loads(res.output)
    assert info["episodes"] == 3 and info["frames"] == 12 and info["image_sizes"] == ["32x32"]


def test_phase_log_records_each_command_with_its_exit_code(tmp_path, monkeypatch):
    # scripts/time_demo.py times `make demo`'s phases from these records
    log = tmp_path / "phases.jsonl"
    monkeypatch.setenv("VLA_EXPORT_PHASE_LOG", str(log))
    assert _run("episodes", "synth", "-o", str(tmp_path / "e"), "--count", "1", "--frames", "2",
                "--image-size", "16").exit_code == 0
    assert CliRunner().invoke(main, ["checkpoint", "-o", str(tmp_path / "c")]).exit_code == 2
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert first["argv"][:2] == ["episodes", "synth"] and first["exit"] == 0
    assert second["command"] == "checkpoint" and second["exit"] == 2
    assert first["start"] <= first["end"] and second["wall_s"] >= 0


def test_seed_changes_the_weights_but_not_the_held_out_episodes(tmp_path):
    # runs with different --seed are compared on the same validation episodes; --split-seed picks another split
    eps = tmp_path / "eps"
    assert _run("episodes", "synth", "-o", str(eps), "--count", "5", "--frames", "4", "--image-size", "32").exit_code == 0

    def train(name, *args):
        res = _run("checkpoint", "--preset", "tiny", "--train", str(eps), "--epochs", "1", "--no-progress",
                   "--val-fraction", "0.4", "-o", str(tmp_path / name), *args)
        assert res.exit_code == 0, res.output
        return json.loads((tmp_path / name / "config.json").read_text())["training"]

    a, b = train("a", "--seed", "1"), train("b", "--seed", "2")
    assert a["val_episodes"] == b["val_episodes"] and a["split_seed"] == b["split_seed"] == 0
    assert a["val_mae"] != b["val_mae"]  # different weights
    splits = {tuple(train(f"s{k}", "--split-seed", str(k))["val_episodes"]) for k in range(4)}
    assert len(splits) > 1
