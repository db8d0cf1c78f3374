"""Instruction sensitivity (red <-> blue swap on two-cup episodes): the swap, the episode choice, the figures on a
real runner, and `validate --episodes` reporting them for every artifact beside the task MAE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.test_validate import export_direct
from vla_export.checkpoint import load_checkpoint
from vla_export.cli import main
from vla_export.data.episodes import Episode, load_episode, synth_episodes
from vla_export.data.preprocess import Preprocessor
from vla_export.validate.instruction import (
    SELECTION_NAMED,
    SELECTION_TWO_CUPS,
    build_swap_set,
    colour_swap_set,
    instruction_sensitivity,
    select_swap_episodes,
    swap_colour,
)
from vla_export.validate.runners import TorchRunner

# seed 0: episode 4 is the first two-cup scene (red and blue in view, "track the red cup quickly")
COUNT, FRAMES, TWO_CUP = 5, 4, "episode_0004"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vla_export.deploy.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("instruction")
    ckpt = build_tiny_checkpoint(root / "ckpt", head="mlp")
    synth_episodes(root / "episodes", count=COUNT, seed=0, frames=FRAMES, image_size=32)
    return root, ckpt


def test_swap_colour_exchanges_red_and_blue_only():
    assert swap_colour("track the red cup quickly") == "track the blue cup quickly"
    assert swap_colour("Blue cup, then red") == "Red cup, then blue"
    assert swap_colour("Navigate around obstacles to track the target cup") is None
    assert swap_colour("bored reddish bluebird") is None  # whole words only


def test_two_cup_scenes_are_chosen_when_the_files_say(tiny):
    root, _ = tiny
    episodes = [load_episode(p) for p in sorted((root / "episodes").glob("*.h5"))]
    assert episodes[4].cup_colours == ("red", "blue") and episodes[0].cup_colours == ("blue",)
    chosen, how = select_swap_episodes(episodes)
    assert [e.name for e in chosen] == [TWO_CUP] and how == SELECTION_TWO_CUPS
    # files without the attribute (user recordings): every episode whose instruction names a colour
    plain = [Episode(e.name, e.images, e.actions, e.instruction) for e in episodes]
    chosen, how = select_swap_episodes(plain)
    assert how == SELECTION_NAMED and [e.name for e in chosen] == [e.name for e in episodes
                                                                   if swap_colour(e.instruction)]


def test_figures_on_a_torch_runner(tiny):
    root, ckpt_dir = tiny
    swap = colour_swap_set(ckpt_dir, root / "episodes", split="all")
    assert swap.names == [TWO_CUP] and len(swap.actions) == FRAMES
    assert swap.instructions == [("Navigate around obstacles to track the red cup quickly",
                                  "Navigate around obstacles to track the blue cup quickly")]
    # same frames, other text: only the token inputs differ
    assert np.array_equal(swap.right["pixel_values"], swap.wrong["pixel_values"])
    assert not np.array_equal(swap.right["input_ids"], swap.wrong["input_ids"])
    ckpt = load_checkpoint(ckpt_dir)
    with TorchRunner(ckpt.model, ckpt.spec, name="ref") as runner:
        out = instruction_sensitivity(runner, swap)
        with torch.no_grad():
            right = ckpt.model(**{k: torch.from_numpy(v) for k, v in swap.right.items()}).numpy()
            wrong = ckpt.model(**{k: torch.from_numpy(v) for k, v in swap.wrong.items()}).numpy()
        assert out["task_mae_right"] == pytest.approx(np.abs(right - swap.actions).mean(), rel=1e-5)
        assert out["task_mae_wrong"] == pytest.approx(np.abs(wrong - swap.actions).mean(), rel=1e-5)
        assert out["mean_abs_delta"] == pytest.approx(np.abs(wrong - right).mean(), rel=1e-5)
        assert out["mean_abs_delta"] > 0  # even random weights read the text
        assert out["mean_abs_action"] == pytest.approx(np.abs(swap.actions).mean(), rel=1e-6)
        assert set(out["mean_abs_delta_per_action"]) == {"linear_x", "linear_y"}
        # a policy given the same instruction twice changes nothing: the measure is not a constant
        same = build_swap_set([load_episode(root / "episodes" / f"{TWO_CUP}.h5")],
                              Preprocessor.from_checkpoint(ckpt_dir), 2)
        same.wrong = same.right
        blind = instruction_sensitivity(runner, same)
        assert blind["mean_abs_delta"] == 0 and blind["wrong_to_right"] == pytest.approx(1.0)


def test_validate_reports_the_swap_for_every_artifact(tiny, tmp_path):
    root, ckpt_dir = tiny
    artifacts = tmp_path / "artifacts"
    export_direct(ckpt_dir, artifacts)
    res = CliRunner().invoke(main, ["validate", str(artifacts), "--episodes", str(root / "episodes"), "--split",
                                    "all", "-n", "2", "--batch", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "swap" in res.output
    report = json.loads((artifacts / "validation.json").read_text())
    (result,) = report["results"]
    ref = next(iter(report["references"].values()))
    for entry in (result["instruction_swap"], ref["instruction_swap"]):
        assert entry["episodes"] == 1 and entry["frames"] == FRAMES and entry["selection"] == SELECTION_TWO_CUPS
    # the fp32 ONNX artifact reproduces the reference's figures
    for key in ("task_mae_right", "task_mae_wrong", "mean_abs_delta"):
        assert result["instruction_swap"][key] == pytest.approx(ref["instruction_swap"][key], abs=1e-5), key
    # per-action task MAE, named by the checkpoint's actions, averaging to the task MAE
    per_action = result["task"]["per_action_mae"]
    assert list(per_action) == ["linear_x", "linear_y"]
    assert np.mean(list(per_action.values())) == pytest.approx(result["task"]["mae"], rel=1e-9)
    # report.md: a task-MAE column per action dimension and the swap figure, from this validation.json
    from vla_export.validate.profile import profile
    from vla_export.validate.report import build_report

    profile([artifacts], warmup=1, iters=2, batches=(1,), isolate=False, progress=False)
    rendered = build_report(artifacts)
    md = (artifacts / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| rank |"))
    assert "| task MAE | task MAE linear_x | task MAE linear_y | swap MAE wrong/right |" in header
    row = next(r for r in rendered["rows"] if r["artifact"] == "model.onnx")
    assert row["task_mae_per_action"] == per_action
    assert f"{per_action['linear_y']:.4f}" in next(line for line in md.splitlines() if "| model.onnx |" in line)
    eager = next(r for r in rendered["rows"] if r["status"] == "reference")
    assert eager["task_mae_per_action"] == ref["task"]["per_action_mae"] and eager["instruction_swap"]
