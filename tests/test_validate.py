"""`vla-export validate`: passes a clean set, fails corrupted, stale and too-tightly-gated artifacts, skips what
cannot run here. Tiny preset, real ONNX exports (once per module), real ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from vla_export import manifest as mf
from vla_export.cli import main
from vla_export.errors import EXIT_GATE_FAILED, EXIT_USER_ERROR, UserError
from vla_export.validate.validate import find_artifacts, resolve_tolerances, tolerance_for


def export_direct(checkpoint: Path, out_dir: Path, external: bool = True) -> Path:
    """`model.onnx` (+ `.onnx.data`) and its manifest, exported as the export stage does but without its own
    parity passes (seconds instead of tens of seconds); the real stage runs in the slow test below."""
    import torch

    from vla_export.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    spec = ckpt.spec
    out_dir.mkdir(parents=True, exist_ok=True)
    feeds = {k: torch.from_numpy(v) for k, v in spec.example_inputs(batch=2, seed=0).items()}
    with mf.staging_dir(out_dir) as tmp:
        staged = tmp / "model.onnx"
        torch.onnx.export(ckpt.model, (), str(staged), kwargs=feeds, dynamo=True,
                          dynamic_shapes=spec.torch_dynamic_shapes(), input_names=spec.input_names,
                          output_names=spec.output_names, opset_version=18, external_data=external)
        final = mf.publish(mf.artifact_files(staged), out_dir)[0]
    manifest = mf.new_manifest(
        "export", final, backend="onnxruntime", precision="fp32", variant="onnx-fp32", io_spec=spec.to_json(),
        source={"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": ckpt.sha256,
                "artifact": None, "artifact_sha256": None}, status="passed")
    mf.write_manifest(final, manifest)
    return final


def make_tiny_set(root: Path, head: str = "mlp", episodes: bool = True) -> SimpleNamespace:
    from vla_export.data.episodes import synth_episodes
    from vla_export.deploy.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(root / "ckpt", head=head)
    eps = root / "episodes"
    if episodes:
        synth_episodes(eps, count=3, seed=0, frames=5)
    onnx_path = export_direct(ckpt, root / "artifacts")
    return SimpleNamespace(root=root, ckpt=ckpt, episodes=eps, artifacts=root / "artifacts", onnx=onnx_path)


def copy_artifacts(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name not in ("validation.json", "profile.json"):
            shutil.copy2(p, dst / p.name)
    return dst


def invoke(*args: str):
    return CliRunner().invoke(main, ["validate", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_set(tmp_path_factory.mktemp("validate-mlp"))


@pytest.fixture(scope="module")
def tiny_lstm(tmp_path_factory):
    return make_tiny_set(tmp_path_factory.mktemp("validate-lstm"), head="lstm")


def test_clean_set_passes_with_all_numbers(tiny, tmp_path):
    out = tmp_path / "validation.json"
    res = invoke(str(tiny.artifacts), "--episodes", str(tiny.episodes), "--split", "all", "-n", "4",
                 "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "passed" in res.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["counts"] == {"passed": 1, "failed": 0, "skipped": 0}
    (r,) = report["results"]
    assert r["artifact"] == "model.onnx" and r["status"] == "passed" and r["device"] == "cpu"
    for b in ("batch_1", "batch_4"):
        m = r["parity"][b]["actions"]
        assert set(m) >= {"mae", "max_abs", "rel_l2", "cosine"}
        assert m["mae"] < 1e-4 and m["cosine"] > 0.9999
    # task MAE of the artifact equals the reference's to fp32 noise, per episode too
    task = r["task"]
    assert len(task["per_episode_mae"]) == 3
    assert abs(task["increase"]) < 1e-5 and task["mae"] > 0
    ref = report["references"][str(tiny.ckpt.resolve())]
    assert ref["task"]["mae"] == pytest.approx(task["reference_mae"])
    assert ref["inputs"]["task_frames"] == 15 and ref["inputs"]["source"] == "episodes"
    assert report["tolerances"]["precision"]["fp32"]["parity_mae"] == 1e-4
    assert r["tolerance"]["parity_mae"] == 1e-4


def test_tolerance_too_tight_fails(tiny, tmp_path):
    res = invoke(str(tiny.artifacts), "--tol", "1e-12", "-n", "2", "--batch", "1", "-o", str(tmp_path / "v.json"))
    assert res.exit_code == EXIT_GATE_FAILED
    assert "model.onnx" in res.output and "parity MAE" in res.output
    r = json.loads((tmp_path / "v.json").read_text())["results"][0]
    assert r["status"] == "failed" and r["tolerance"]["parity_mae"] == 1e-12


def _corrupt_weights(onnx_path: Path) -> str:
    """Overwrite the largest float weight in the external data (as a bad copy or a stage bug would) with noise.

    Returns the initializer's name."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    floats = [t for t in model.graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(dict((kv.key, kv.value) for kv in t.external_data)["length"]))
    info = {kv.key: kv.value for kv in target.external_data}
    offset, length = int(info.get("offset", 0)), int(info["length"])
    data = onnx_path.parent / info["location"]
    raw = bytearray(data.read_bytes())
    raw[offset:offset + length] = np.random.default_rng(0).standard_normal(length // 4).astype(np.float32).tobytes()
    data.write_bytes(bytes(raw))
    return target.name


def test_corrupted_artifact_fails_and_is_named(tiny, tmp_path):
    art = copy_artifacts(tiny.artifacts, tmp_path / "artifacts")
    _corrupt_weights(art / "model.onnx")
    res = invoke(str(art), "-n", "4")
    assert res.exit_code == EXIT_GATE_FAILED
    assert "model.onnx" in res.output and "modified since built" in res.output
    r = json.loads((art / "validation.json").read_text())["results"][0]
    assert r["status"] == "failed" and r["parity_mae"] > 1e-4


def test_corrupted_weights_with_rewritten_hash_fail_on_parity(tiny, tmp_path):
    # A stage that published wrong weights with a fresh sha256: only the comparison with the reference can tell.
    art = copy_artifacts(tiny.artifacts, tmp_path / "artifacts")
    _corrupt_weights(art / "model.onnx")
    m = mf.read_manifest(art / "model.onnx")
    m["sha256"] = mf.sha256_files(mf.artifact_files(art / "model.onnx"))
    mf.write_manifest(art / "model.onnx", m)
    res = invoke(str(art / "model.onnx"), "-n", "4")
    assert res.exit_code == EXIT_GATE_FAILED
    r = json.loads((art / "validation.json").read_text())["results"][0]
    assert not any("modified" in x for x in r["reasons"])
    assert any(x.startswith("parity MAE") for x in r["reasons"])


def test_artifact_that_crashes_at_inference_fails(tiny, tmp_path):
    # Noise over every weight, integer index tables included: ONNX Runtime raises mid-run; that is this
    # artifact's failure, reported against its name, not a crash of the whole validation.
    art = copy_artifacts(tiny.artifacts, tmp_path / "artifacts")
    (data,) = mf.onnx_external_files(art / "model.onnx")
    data.write_bytes(np.random.default_rng(1).integers(0, 256, data.stat().st_size, dtype=np.uint8).tobytes())
    res = invoke(str(art), "-n", "2", "--batch", "1")
    assert res.exit_code == EXIT_GATE_FAILED
    r = json.loads((art / "validation.json").read_text())["results"][0]
    assert r["artifact"] == "model.onnx" and r["status"] == "failed"
    assert any(x.startswith(("inference failed", "cannot load")) for x in r["reasons"]), r["reasons"]


def test_stale_checkpoint_fails(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    art = copy_artifacts(tiny.artifacts, tmp_path / "artifacts")
    m = mf.read_manifest(art / "model.onnx")
    m["source"]["checkpoint"] = str(ckpt.resolve())
    mf.write_manifest(art / "model.onnx", m)
    config = json.loads((ckpt / "config.json").read_text())
    config["training"] = {"note": "retrained after the export"}
    (ckpt / "config.json").write_text(json.dumps(config))
    res = invoke(str(art), "-n", "2")
    assert res.exit_code == EXIT_GATE_FAILED
    assert "model.onnx" in res.output and "STALE" in res.output
    r = json.loads((art / "validation.json").read_text())["results"][0]
    assert r["status"] == "failed" and r["verdict"].startswith("STALE") and "parity" not in r


def test_lstm_rollout_per_episode(tiny_lstm, tmp_path):
    out = tmp_path / "v.json"
    res = invoke(str(tiny_lstm.artifacts), "--episodes", str(tiny_lstm.episodes), "--split", "all", "-n", "2",
                 "--batch", "1", "-o", str(out))
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())["results"][0]
    roll = r["rollout"]
    assert roll["episodes"] == 3
    assert set(roll) >= {"actions", "h_out", "c_out"}
    assert roll["actions"]["mae"] < 1e-4 and roll["h_out"]["mae"] < 1e-4
    assert len(r["task"]["per_episode_mae"]) == 3


def test_lstm_rollout_without_episodes(tiny_lstm, tmp_path):
    out = tmp_path / "v.json"
    res = invoke(str(tiny_lstm.artifacts), "-n", "3", "--batch", "1", "-o", str(out))
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())["results"][0]
    assert r["rollout"]["episodes"] == 1 and "task" not in r


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed: a placeholder engine would be loaded for real")
def test_unrunnable_backend_is_skipped_not_failed(tiny, tmp_path):
    art = copy_artifacts(tiny.artifacts, tmp_path / "artifacts")
    engine = art / "model.fp16.engine"
    engine.write_bytes(b"serialized engine bytes from another machine")
    onnx_manifest = mf.read_manifest(art / "model.onnx")
    mf.write_manifest(engine, mf.new_manifest(
        "trt", engine, backend="tensorrt", precision="fp16", variant="trt-fp16", io_spec=onnx_manifest["io_spec"],
        source=onnx_manifest["source"], status="passed"))
    res = invoke(str(art), "-n", "2", "--batch", "1")
    assert res.exit_code == 0, res.output
    results = {r["artifact"]: r for r in json.loads((art / "validation.json").read_text())["results"]}
    assert results["model.fp16.engine"]["status"] == "skipped"
    assert results["model.fp16.engine"]["verdict"].startswith("skipped: ")
    assert results["model.onnx"]["status"] == "passed"


def test_tolerances_are_data_with_overrides():
    table = resolve_tolerances(tol=1e-3, tol_int8=0.1, max_task_mae_increase=0.02)
    assert tolerance_for(table, "fp32", "onnx-fp32") == {"parity_mae": 1e-3, "task_mae_increase": 0.02,
                                                         "parity_rel_l2": 1e-3, "task_mae_rel_increase": 0.25}
    assert tolerance_for(table, "int8", "ort-int8-dynamic")["parity_mae"] == 0.1
    assert tolerance_for(table, "fp16", None)["parity_mae"] == 1e-3
    table["variant"]["ort-int8-static"] = {"parity_mae": 0.2}
    assert tolerance_for(table, "int8", "ort-int8-static") == {"parity_mae": 0.2, "task_mae_increase": 0.02,
                                                               "parity_rel_l2": 0.1, "task_mae_rel_increase": 0.25}
    # every absolute budget has a relative twin, overridable per precision
    rel = resolve_tolerances(rtol=2e-3, rtol_int8=0.05, max_task_mae_rel_increase=0.1)
    assert [tolerance_for(rel, p, None)["parity_rel_l2"] for p in ("fp32", "fp16", "int8")] == [2e-3, 1e-2, 0.05]
    assert {t["task_mae_rel_increase"] for t in rel["precision"].values()} == {0.1}
    # a table written before the relative budgets existed still judges both
    old = {"precision": {p: {"parity_mae": 0.05, "task_mae_increase": 0.01} for p in ("fp32", "int8")},
           "variant": {}}
    assert tolerance_for(old, "int8", None)["parity_rel_l2"] == 0.1
    with pytest.raises(UserError):
        resolve_tolerances(tol=0)
    with pytest.raises(UserError):
        resolve_tolerances(rtol_fp16=-1)


def test_relative_budget_fails_what_the_absolute_one_passes(tiny, tmp_path):
    # The fp32 export is within its absolute MAE budget; an impossible relative budget fails it on that check
    # alone, the one-line reason names the relative measure, and the table prints both.
    res = invoke(str(tiny.artifacts), "--rtol", "1e-12", "-n", "2", "--batch", "1", "-o", str(tmp_path / "v.json"))
    assert res.exit_code == EXIT_GATE_FAILED, res.output
    assert "rel L2" in res.output and "rtol" in res.output
    r = json.loads((tmp_path / "v.json").read_text())["results"][0]
    assert r["status"] == "failed" and r["parity_mae"] <= r["tolerance"]["parity_mae"]
    assert len(r["reasons"]) == 1 and r["reasons"][0].startswith("parity rel L2 of actions")
    assert "||out - ref|| / ||ref||" in r["reasons"][0] and r["parity_rel_l2"] > 1e-12


def test_no_artifacts_is_one_line_error(tmp_path):
    res = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert res.exit_code == EXIT_USER_ERROR
    assert res.output.strip().count("\n") == 0 and "no artifacts" in res.output
    with pytest.raises(UserError):
        find_artifacts([tmp_path / "missing"])


@pytest.mark.parametrize("command", ["validate", "profile", "report"])
def test_help_has_examples(command):
    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0 and "Example:" in res.output and f"vla-export {command}" in res.output


@pytest.mark.slow
def test_real_export_and_quantize_stages_validate(tmp_path):
    """The producing stages' own functions, then validate with task data: fp32 and int8 both judged fairly."""
    from vla_export.data.episodes import synth_episodes
    from vla_export.deploy.tiny import build_tiny_checkpoint
    from vla_export.export.onnx_export import ExportOptions, export_checkpoint
    from vla_export.quantize.stage import quantize

    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", head="mlp")
    synth_episodes(tmp_path / "eps", count=3, seed=0, frames=5)
    onnx_path = export_checkpoint(ckpt, tmp_path / "art", ExportOptions(quiet=True, n_inputs=4)).artifact
    quantize(onnx_path, "dynamic", progress=False, parity_n=4, task_frames=8)
    res = invoke(str(tmp_path / "art"), "--episodes", str(tmp_path / "eps"), "--split", "all", "-n", "4")
    assert res.exit_code == 0, res.output
    results = {r["artifact"]: r for r in json.loads((tmp_path / "art" / "validation.json").read_text())["results"]}
    assert results["model.onnx"]["parity_mae"] < 1e-4
    assert results["model.int8.onnx"]["precision"] == "int8"
    assert 0 < results["model.int8.onnx"]["parity_mae"] < 0.05
