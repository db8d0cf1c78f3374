"""The export stage: tiny checkpoints of both heads to ONNX, checked, parity-gated, published atomically."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from vla_export import manifest as mf
from vla_export.checkpoint import load_checkpoint, make_config, save_checkpoint
from vla_export.cli import main
from vla_export.export import onnx_export
from vla_export.export.onnx_export import ExportOptions, export_checkpoint
from vla_export.models import build_model
from vla_export.runtime import OrtRunner, TorchRunner, open_runner
from vla_export.validate.metrics import error_metrics

ARCH = "kosmos2-clip-hybrid"
# Few inputs keep the session fast on 2 shared cores; the batch sizes and the rollout are the defaults' kind.
FAST = ["--n-inputs", "4", "--batch-sizes", "1,4", "--rollout-steps", "3", "-q"]


@contextlib.contextmanager
def one_torch_thread():
    """Two threads on a 2-core machine shared with other jobs spin against each other (10x slower tiny forwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_here():
    with one_torch_thread():
        yield


def _checkpoint(tmp_path_factory, arch: str, preset: str | None, overrides: dict, name: str):
    torch.manual_seed(0)
    config = make_config(arch, preset, overrides)
    model, _ = build_model(arch, config["model_config"])
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / name, config)


def _cli(*args: str):
    return CliRunner().invoke(main, ["export", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="session")
def episodes_checkpoint(tmp_path_factory):
    """A tiny lstm checkpoint with the demo tokenizers, and a few small synthetic episodes for it."""
    from vla_export.data.episodes import synth_episodes, synth_instructions
    from vla_export.training import write_tokenizers

    torch.manual_seed(0)
    config = make_config(ARCH, "tiny", {"head": "lstm"})
    model, _ = build_model(ARCH, config["model_config"])
    tok_dir = tmp_path_factory.mktemp("tokenizers")
    extra = {k: str(v) for k, v in write_tokenizers(tok_dir, config, synth_instructions()).items()}
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny-lstm", config, extra_files=extra)
    episodes = synth_episodes(tmp_path_factory.mktemp("episodes"), count=5, frames=6, image_size=64)[0].parent
    return ckpt, episodes


@pytest.fixture(scope="session")
def exported(tmp_path_factory, episodes_checkpoint):
    """One export per head: mlp on example inputs as a single file; lstm on episode frames with external data
    forced on (threshold 0)."""
    ckpt_lstm, episodes = episodes_checkpoint
    out = {}
    with one_torch_thread():
        for head, extra in (("mlp", []), ("lstm", ["--external-data-threshold", "0", "--episodes", str(episodes)])):
            if head == "lstm":
                ckpt = ckpt_lstm
            else:
                ckpt = _checkpoint(tmp_path_factory, ARCH, "tiny", {"head": head}, f"tiny-{head}")
            out_dir = tmp_path_factory.mktemp(f"artifacts-{head}")
            result = _cli(ckpt, "-o", out_dir, *FAST, *extra)
            assert result.exit_code == 0, result.output
            out[head] = (ckpt, out_dir / "model.onnx", extra)
    return out


@pytest.fixture(scope="session")
def small_plugin_checkpoint(tmp_path_factory):
    """A seconds-to-export user architecture (tests/plugin_arch.py), for the failure paths."""
    return _checkpoint(tmp_path_factory, "tests.plugin_arch:build", None, {"width": 4}, "plugin")


@pytest.mark.parametrize("head", ["mlp", "lstm"])
def test_checker_and_io_names(exported, head):
    ckpt, path, _ = exported[head]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    spec = load_checkpoint(ckpt).spec
    assert [i.name for i in graph.input] == spec.input_names
    assert [o.name for o in graph.output] == spec.output_names
    assert {op.domain: op.version for op in model.opset_import}[""] >= 18
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["pixel_values"][0] == "batch"
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["clip_input_ids"] == ["batch", "clip_seq"]


@pytest.mark.parametrize("head", ["mlp", "lstm"])
def test_onnx_matches_pytorch_at_batch_1_and_4_and_another_text_length(exported, head):
    ckpt, path, _ = exported[head]
    loaded = load_checkpoint(ckpt)
    spec = loaded.spec
    torch_runner = TorchRunner(loaded.model, spec).activate()
    alt = {"seq": spec.dims["seq"].opt + 5, "clip_seq": spec.dims["clip_seq"].opt - 3}
    with open_runner(path) as ort_runner:
        for batch, dims in ((1, {}), (4, {}), (3, alt)):
            feeds = spec.example_inputs(batch=batch, seed=42, **dims)
            ref, got = torch_runner.infer(feeds), ort_runner.infer(feeds)
            assert got["actions"].shape == (batch, 2)
            for name in spec.output_names:
                m = error_metrics(ref[name], got[name])
                assert m["mae"] < 1e-5 and m["finite"], (batch, dims, name, m)


def test_lstm_rollout_feeds_state_back(exported):
    ckpt, path, _ = exported["lstm"]
    loaded = load_checkpoint(ckpt)
    spec = loaded.spec
    torch_runner = TorchRunner(loaded.model, spec).activate()
    frames = spec.example_inputs(batch=6, seed=7)
    with open_runner(path) as ort_runner:
        state_t, state_o = spec.initial_state(1), spec.initial_state(1)
        for t in range(6):
            step = {k: v[t:t + 1] for k, v in frames.items() if k not in ("h", "c")}
            ref, got = torch_runner.infer(step | state_t), ort_runner.infer(step | state_o)
            assert np.abs(ref["actions"] - got["actions"]).mean() < 1e-5
            state_t = {"h": ref["h_out"], "c": ref["c_out"]}
            state_o = {"h": got["h_out"], "c": got["c_out"]}
        assert np.abs(state_t["h"]).mean() > 1e-3  # the state really evolved


@pytest.mark.parametrize("head", ["mlp", "lstm"])
def test_manifest_fields(exported, head):
    ckpt, path, extra = exported[head]
    m = mf.read_manifest(path)
    assert (m["stage"], m["backend"], m["precision"], m["variant"], m["status"]) == (
        "export", "onnxruntime", "fp32", "onnx-fp32", "passed")
    assert m["source"]["checkpoint"] == str(ckpt.resolve())
    assert m["source"]["checkpoint_sha256"] == load_checkpoint(ckpt).sha256
    s = m["settings"]
    assert s["opset"] >= 18 and s["exporter_used"] == "dynamo" and s["exporter_fallback_reason"] is None
    assert s["tol"] == 1e-5 and s["n_inputs"] == 4 and s["batch_sizes"] == [1, 4]
    assert all(s["dynamic_dims"][d]["dynamic"] for d in ("batch", "seq", "clip_seq"))
    assert m["io_spec"]["inputs"][0]["name"] == "pixel_values"
    assert {"torch", "onnx", "onnxruntime"} <= set(m["versions"])
    assert m["timing"]["wall_s"] > 0 and m["timing"]["peak_rss_bytes"] > 0
    assert {"load", "export", "save", "check", "ort_load", "parity"} <= set(m["timing"]["phases"])
    parity = m["metrics"]["parity"]
    assert parity["passed"] and parity["max_mae"] <= 1e-5
    assert parity["input_source"] == ("episodes" if head == "lstm" else "examples")
    assert s["episodes"] == (str(Path(extra[-1]).resolve()) if head == "lstm" else None)
    cases = set(parity["cases"])
    assert {"batch 1", "batch 4"} <= cases
    assert any("seq=" in c for c in cases)
    assert any(c.startswith("rollout") for c in cases) == (head == "lstm")
    assert m["total_bytes"] == sum(m["files"].values()) == mf.total_bytes(path)


def test_external_data_counts_both_files_and_is_world_readable(exported):
    _, path, _ = exported["lstm"]
    data = path.with_name("model.onnx.data")
    assert data.exists() and data.stat().st_size > path.stat().st_size
    m = mf.read_manifest(path)
    assert set(m["files"]) == {"model.onnx", "model.onnx.data"}
    assert m["total_bytes"] == path.stat().st_size + data.stat().st_size
    assert m["settings"]["external_data"] is True
    for p in (path, data, mf.manifest_path(path)):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    # mlp stayed under the default 1 GB threshold: one self-contained file
    _, mlp_path, _ = exported["mlp"]
    assert not mlp_path.with_name("model.onnx.data").exists()
    assert set(mf.read_manifest(mlp_path)["files"]) == {"model.onnx"}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".staging")]


def test_rerun_is_a_no_op_unless_settings_change(exported):
    ckpt, path, extra = exported["lstm"]
    before = mf.manifest_path(path).read_text()
    mtime = path.stat().st_mtime_ns
    result = _cli(ckpt, "-o", path.parent, *[a for a in FAST if a != "-q"], *extra)
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    assert mf.manifest_path(path).read_text() == before and path.stat().st_mtime_ns == mtime
    # any requested setting or the checkpoint's content changing makes it stale
    requested = ExportOptions(n_inputs=4, rollout_steps=3, external_data_threshold=0, episodes=extra[-1]).requested()
    assert onnx_export._up_to_date(path.parent, ckpt.resolve(), requested) is not None
    assert onnx_export._up_to_date(path.parent, ckpt.resolve(), requested | {"tol": 1e-4}) is None
    assert onnx_export._up_to_date(path.parent, ckpt.parent, requested) is None


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "vla-export export" in result.output


# -- bad input: one line, non-zero exit, nothing left in the output directory ---------------------------------------
def _assert_clean_failure(result, out_dir, code: int, *words: str):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for w in words:
        assert w in lines[0], lines[0]
    assert not (out_dir / "model.onnx").exists() and not (out_dir / "model.onnx.data").exists()
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".staging")] if out_dir.exists() else True


def test_unknown_architecture(tmp_path, small_plugin_checkpoint):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = json.loads((small_plugin_checkpoint / "config.json").read_text()) | {"architecture": "no-such-arch"}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes((small_plugin_checkpoint / "model.safetensors").read_bytes())
    out = tmp_path / "out"
    _assert_clean_failure(_cli(ckpt, "-o", out, "-q"), out, 2, "unknown architecture", "no-such-arch")


def test_checkpoint_that_does_not_load(tmp_path, small_plugin_checkpoint):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((small_plugin_checkpoint / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    _assert_clean_failure(_cli(ckpt, "-o", out, "-q"), out, 2, "model.safetensors")
    garbage = tmp_path / "run.pth"
    garbage.write_bytes(b"\x00garbage")
    _assert_clean_failure(_cli(garbage, "-o", out, "-q"), out, 2, "run.pth")


def test_output_directory_not_writable(tmp_path, small_plugin_checkpoint):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _cli(small_plugin_checkpoint, "-o", blocker / "out", "-q")
    assert result.exit_code == 2 and "output directory" in result.output
    if os.geteuid() != 0:  # root writes anywhere: the mode check only means something for other users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        result = _cli(small_plugin_checkpoint, "-o", ro, "-q")
        assert result.exit_code == 2 and "not writable" in result.output


def test_disk_full_during_save_leaves_nothing(tmp_path, small_plugin_checkpoint, monkeypatch):
    import onnx_ir

    def full_disk(model, path, *args, **kwargs):
        with open(path, "wb") as f:  # a partial file, as a real ENOSPC leaves
            f.write(b"\x08\x09partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx_ir, "save", full_disk)
    out = tmp_path / "out"
    _assert_clean_failure(_cli(small_plugin_checkpoint, "-o", out, "-q"), out, 2, "disk full")
    assert list(out.iterdir()) == []


def test_operator_without_onnx_lowering_names_module_and_op(tmp_path_factory, tmp_path):
    ckpt = _checkpoint(tmp_path_factory, "tests.export_plugins:build", None, {"width": 4}, "qr")
    out = tmp_path / "out"
    result = _cli(ckpt, "-o", out, "-q")
    _assert_clean_failure(result, out, 2, "aten.linalg_qr", "QROrthonormalizer", "basis", "TorchScript")
    assert list(out.iterdir()) == []


def test_parity_gate_failure_publishes_nothing(tmp_path, small_plugin_checkpoint):
    out = tmp_path / "out"
    # fp32 ONNX Runtime differs from PyTorch by ~1e-8 on this model: a 1e-12 budget must fail the gate
    result = _cli(small_plugin_checkpoint, "-o", out, "--tol", "1e-12", "-q")
    _assert_clean_failure(result, out, 3, "parity gate failed", "MAE")
    assert "FAIL" in result.output  # the table is shown even with -q
    report = json.loads((out / "model.onnx.failed.json").read_text())
    assert report["status"] == "failed" and not report["metrics"]["parity"]["passed"]


def test_torchscript_fallback_when_dynamo_cannot_trace(tmp_path_factory, tmp_path):
    ckpt = _checkpoint(tmp_path_factory, "tests.export_plugins:build_gated", None, {"width": 4}, "gated")
    out = tmp_path / "out"
    result = export_checkpoint(ckpt, out, ExportOptions(quiet=True))
    s = result.manifest["settings"]
    assert s["exporter_used"] == "torchscript"
    assert "data-dependent" in s["exporter_fallback_reason"]
    assert s["dynamic_dims"]["batch"]["dynamic"]
    assert result.manifest["metrics"]["parity"]["passed"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.json"]


def test_streaming_checkpoint_load_keeps_checks_and_converts_dtypes(tmp_path, small_plugin_checkpoint):
    """load_checkpoint reads native weights tensor by tensor into the model (no second copy of the weights, which
    the full preset cannot afford during export): same values, same NaN and truncation errors, dtype conversion."""
    from safetensors.torch import load_file, save_file

    from vla_export.errors import UserError

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((small_plugin_checkpoint / "config.json").read_text())
    state = load_file(str(small_plugin_checkpoint / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(ckpt / "model.safetensors"))
    loaded = load_checkpoint(ckpt).model.state_dict()
    for k, v in state.items():
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.to(torch.bfloat16).float()), k
    bad = dict(state)
    bad["net.0.weight"] = bad["net.0.weight"].clone()
    bad["net.0.weight"][0, 0] = float("nan")
    save_file(bad, str(ckpt / "model.safetensors"))
    with pytest.raises(UserError, match="net.0.weight contains NaN"):
        load_checkpoint(ckpt)
    raw = (small_plugin_checkpoint / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(raw[:-8])
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_checkpoint(ckpt)


# -- reference sharing, weight release, threads ---------------------------------------------------------------------
def test_shared_reference_matches_each_batch_size_own_forwards(episodes_checkpoint):
    """The smaller batches' cases (and rollouts) take their reference from the rows of the largest batch's eager
    outputs: the rows must be the right ones, and eager batch 1 vs batch 4 must agree far below the 1e-5 gate."""
    ckpt, episodes = episodes_checkpoint
    loaded = load_checkpoint(ckpt)
    opts = ExportOptions(n_inputs=5, batch_sizes=(1, 3, 4), rollout_steps=3)  # 5 rows: the batch-3/4 calls wrap
    feeds, _ = onnx_export.parity_inputs(loaded.spec, ckpt, opts)
    cases = onnx_export.parity_cases(loaded.spec, feeds, opts)
    shared = [c for c in cases if c.reference is not None]
    assert {c.name for c in shared} == {"batch 1", "batch 3", "rollout batch 1 x 3 steps", "rollout batch 3 x 3 steps"}
    with TorchRunner(loaded.model, loaded.spec) as runner:
        refs = onnx_export.reference_outputs(runner.infer, loaded.spec, cases)
        for case, ref in zip(cases, refs, strict=True):
            own = onnx_export.run_case(runner.infer, loaded.spec, case)
            assert set(own) == set(ref)
            for name in own:
                assert own[name].shape == ref[name].shape, (case.name, name)
                assert np.abs(own[name] - ref[name]).max() < 1e-6, (case.name, name)


def test_release_weights_frees_the_torch_weights_the_export_graph_still_holds(tmp_path, episodes_checkpoint):
    """After `del model` and `del exported` the weights stay alive (onnxscript's rewrite rules keep the last graph
    they matched, which wraps the parameters): ONNX Runtime's load came on top of them, 2x the weights in all."""
    import gc

    ckpt, _ = episodes_checkpoint
    loaded = load_checkpoint(ckpt)
    model, spec = loaded.model, loaded.spec
    weights = onnx_export.weight_tensors(model)
    pointers = {t.untyped_storage().data_ptr() for t in weights}
    nbytes = sum(t.untyped_storage().nbytes() for t in weights)
    exported = onnx_export.export_model(model, spec, ExportOptions(), ARCH, tmp_path)
    del model, loaded
    onnx_export.optimize_onnx(exported.ir_model)
    onnx_export.save_onnx(exported.ir_model, tmp_path / "model.onnx", external=True)
    assert onnx_export.release_weights(exported.ir_model, weights) == nbytes
    assert all(v.const_value is None for v in exported.ir_model.graph.initializers.values())
    del exported, weights
    gc.collect()
    assert [shape for shape, ptr in _live_real_tensors() if ptr in pointers] == []
    # the saved file still holds them
    feeds = spec.example_inputs(batch=2, seed=0)
    with OrtRunner(tmp_path / "model.onnx", spec, threads=1) as ort_runner:
        out = ort_runner.infer(feeds)
    ref = TorchRunner(load_checkpoint(ckpt).model, spec).activate().infer(feeds)
    assert error_metrics(ref["actions"], out["actions"])["mae"] < 1e-5


def _live_real_tensors() -> list[tuple[tuple, int]]:
    """(shape, storage pointer) of the tensors the garbage collector sees that own memory (the exporter leaves
    FakeTensors about too)."""
    import gc

    out = []
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and not o.is_meta:
            with contextlib.suppress(RuntimeError):  # FakeTensor / FunctionalTensor: no data pointer
                storage = o.untyped_storage()
                if storage.nbytes():
                    out.append((tuple(o.shape), storage.data_ptr()))
    return out


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # this process alone
    assert onnx_export.auto_threads() == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.0, 1.0, 1.0))  # every core taken by other jobs
    assert onnx_export.auto_threads() == 1
    before = torch.get_num_threads()
    with onnx_export.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
