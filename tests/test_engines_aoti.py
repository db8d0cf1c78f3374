"""AOTInductor stage on the tiny preset, CPU: compile once per session, then load, compare with eager, re-run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vla_export.checkpoint import load_checkpoint, make_config, save_checkpoint
from vla_export.cli import main
from vla_export.engines.aoti import AotiRunner, compile_aoti, compile_settings, up_to_date
from vla_export.errors import EXIT_UNAVAILABLE, EXIT_USER_ERROR, UserError
from vla_export.manifest import aoti_weights_path, read_manifest, total_bytes
from vla_export.models import build_model
from vla_export.runtime import TorchRunner, open_runner
from vla_export.runtime.pytorch import load_aoti_package


def _random_checkpoint(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = make_config("kosmos2-clip-hybrid", "tiny", None)
    model, _ = build_model("kosmos2-clip-hybrid", cfg["model_config"])
    return save_checkpoint(model, out, cfg)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return _random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", 0)


@pytest.fixture(scope="session")
def code_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aoti-cache")


@pytest.fixture(scope="session")
def compiled(tiny_checkpoint, code_cache, tmp_path_factory):
    """One CPU fp32 compile for the whole session (~30-90 s on 2 cores)."""
    out = tmp_path_factory.mktemp("aoti")
    path, manifest, built = compile_aoti(tiny_checkpoint, out, device="cpu", dtype="fp32", cache_dir=code_cache)
    assert built and manifest["compiled_code_from_cache"] is None
    return path, manifest


def test_package_and_manifest(compiled, tiny_checkpoint):
    path, manifest = compiled
    assert path.name == "model.cpu.fp32.pt2" and path.exists()
    assert read_manifest(path) == json.loads(json.dumps(manifest))  # returned == written
    assert manifest["backend"] == "aoti" and manifest["variant"] == "aoti-cpu-fp32"
    assert manifest["precision"] == "fp32" and manifest["device"] == "cpu"
    assert manifest["source"]["checkpoint"] == str(tiny_checkpoint.resolve())
    assert manifest["source"]["checkpoint_sha256"] == load_checkpoint(tiny_checkpoint).sha256
    weights = aoti_weights_path(path)
    assert weights.name == "model.cpu.fp32.weights.safetensors" and manifest["settings"]["weights"] == "external"
    assert manifest["files"] == {path.name: path.stat().st_size, weights.name: weights.stat().st_size}
    assert manifest["total_bytes"] == total_bytes(path) == path.stat().st_size + weights.stat().st_size > 2_000_000
    assert manifest["settings"]["dynamic_dims"]["batch"] == [1, 8]
    assert manifest["timing"]["compile_s"] > 0 and manifest["timing"]["peak_rss_bytes"] > 0
    assert not list(path.parent.glob(".staging-*"))
    parity = manifest["compile_check"]["parity_vs_eager_same_dtype"]
    assert set(parity) == {"batch1", "batch3"} and all(m["actions"]["mae"] < 1e-5 for m in parity.values())


def test_runner_matches_eager_at_two_batch_sizes(compiled, tiny_checkpoint):
    path, _ = compiled
    ckpt = load_checkpoint(tiny_checkpoint)
    with open_runner(path) as aoti, TorchRunner(ckpt.model, ckpt.spec) as eager:
        assert isinstance(aoti, AotiRunner) and aoti.device == "cpu"
        for batch in (1, 5):  # neither is the traced batch (2): the dynamic dim really is dynamic
            feeds = ckpt.spec.example_inputs(batch=batch, seed=10 + batch)
            ref, out = eager.infer(feeds), aoti.infer(feeds)
            assert out["actions"].shape == (batch, 2)
            assert float(np.abs(ref["actions"] - out["actions"]).mean()) < 1e-5
        spec = ckpt.spec
        other_lengths = spec.example_inputs(batch=3, seed=4, seq=spec.dims["seq"].opt + 8, clip_seq=8)
        assert float(np.abs(eager.infer(other_lengths)["actions"] - aoti.infer(other_lengths)["actions"]).mean()) < 1e-5
        times = aoti.time_prepared(ckpt.spec.example_inputs(batch=1), warmup=1, iters=3)
        assert len(times) == 3 and all(t > 0 for t in times)


def test_package_takes_keyword_inputs_only(compiled, tiny_checkpoint):
    """Why the runner calls with kwargs: the package was exported from kwargs and rejects positional inputs."""
    path, manifest = compiled
    spec = load_checkpoint(tiny_checkpoint).spec
    package = load_aoti_package(path, aoti_weights_path(path))
    feeds = {k: torch.from_numpy(v) for k, v in spec.example_inputs(batch=2).items()}
    with torch.inference_mode():
        assert package(**feeds).shape == (2, 2)
        with pytest.raises(ValueError, match="kwarg keyword mismatch"):
            package(*[feeds[n] for n in spec.input_names])


def test_runner_rejects_bad_feeds(compiled, tiny_checkpoint):
    path, _ = compiled
    spec = load_checkpoint(tiny_checkpoint).spec
    feeds = spec.example_inputs(batch=1)
    feeds["input_ids"] = feeds["input_ids"].astype(np.int32)
    with open_runner(path) as runner, pytest.raises(UserError, match="input_ids: dtype int32"):
        runner.infer(feeds)


def test_cached_code_runs_another_checkpoints_weights(compiled, code_cache, tmp_path):
    """The compiled code depends on the graph, not the weights: a checkpoint of the same config with other weights
    takes it from the cache, and the package computes with its own weights (not the compiled one's)."""
    path, manifest = compiled
    other = _random_checkpoint(tmp_path / "other", 1)
    other_path, other_manifest, built = compile_aoti(other, tmp_path / "out", device="cpu", dtype="fp32",
                                                     cache_dir=code_cache)
    assert built and other_manifest["compiled_code_from_cache"] == str(
        code_cache / f"{manifest['graph_fingerprint']}.pt2")
    assert other_manifest["graph_fingerprint"] == manifest["graph_fingerprint"]
    assert other_path.read_bytes() == path.read_bytes()  # the same code
    parity = other_manifest["compile_check"]["parity_vs_eager_same_dtype"]
    assert all(m["actions"]["mae"] < 1e-5 for m in parity.values())
    ckpt = load_checkpoint(other)
    feeds = ckpt.spec.example_inputs(batch=2, seed=3)
    with open_runner(other_path) as mine, open_runner(path) as first, TorchRunner(ckpt.model, ckpt.spec) as eager:
        ref = eager.infer(feeds)["actions"]
        assert float(np.abs(mine.infer(feeds)["actions"] - ref).max()) < 1e-5
        assert float(np.abs(first.infer(feeds)["actions"] - ref).max()) > 1e-3  # other weights, other actions


def test_package_without_its_weights_file_is_one_line(compiled, tmp_path):
    path, _ = compiled
    lone = tmp_path / path.name
    lone.write_bytes(path.read_bytes())
    (tmp_path / f"{path.name}.json").write_bytes(Path(f"{path}.json").read_bytes())
    with pytest.raises(UserError, match="compiled without its weights and model.cpu.fp32.weights.safetensors is not"):
        open_runner(lone).activate()


def test_rerun_is_up_to_date(compiled, tiny_checkpoint):
    path, manifest = compiled
    mtime = path.stat().st_mtime_ns
    again, _, built = compile_aoti(tiny_checkpoint, path.parent, device="cpu", dtype="fp32")
    assert not built and again == path and path.stat().st_mtime_ns == mtime
    sha = manifest["source"]["checkpoint_sha256"]
    spec = load_checkpoint(tiny_checkpoint).spec
    assert up_to_date(path, sha, compile_settings("cpu", "fp32", spec))
    assert not up_to_date(path, "0" * 64, compile_settings("cpu", "fp32", spec))
    assert not up_to_date(path, sha, compile_settings("cpu", "bf16", spec))


def test_cli_up_to_date_message(compiled, tiny_checkpoint):
    path, _ = compiled
    result = CliRunner().invoke(main, ["aoti", str(tiny_checkpoint), "-o", str(path.parent)])
    assert result.exit_code == 0 and "up to date" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the missing-GPU path cannot run")
def test_cli_cuda_without_gpu_exits_4(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["aoti", str(tiny_checkpoint), "-o", str(tmp_path), "--device", "cuda"])
    assert result.exit_code == EXIT_UNAVAILABLE and "needs a CUDA GPU" in result.output
    assert not list(tmp_path.iterdir())


def test_cli_bad_checkpoint_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["aoti", str(tmp_path / "nope"), "-o", str(tmp_path)])
    assert result.exit_code == EXIT_USER_ERROR and "does not exist" in result.output
    with pytest.raises(UserError, match="does not exist"):
        AotiRunner(tmp_path / "missing.pt2", None).activate()


def test_cli_unusable_cache_exits_2_before_compiling(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["aoti", str(tiny_checkpoint), "-o", str(tmp_path / "out"),
                                       "--cache", str(blocker / "cache")])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert "cannot create the AOTI cache directory" in result.output and len(result.output.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("*.pt2"))
