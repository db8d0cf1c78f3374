"""The bundle's self-test set and `vla-export verify`: the artifact judged on the machine that runs it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vla_export.errors import BackendUnavailable, UserError


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """tiny checkpoint (mlp head) -> ONNX -> bundle whose self-test frames come from real validation episodes."""
    from vla_export.data.episodes import synth_episodes
    from vla_export.deploy.bundle import make_bundle
    from vla_export.deploy.tiny import build_tiny_checkpoint, export_tiny_onnx

    root = tmp_path_factory.mktemp("verify")
    ckpt = build_tiny_checkpoint(root / "checkpoint", head="mlp")
    artifact = export_tiny_onnx(ckpt, root / "artifacts")
    episodes = root / "episodes"
    synth_episodes(episodes, count=3, seed=3, frames=4, image_size=64)
    make_bundle(artifact, root / "bundle", episodes=episodes)
    return {"root": root, "checkpoint": ckpt, "artifact": artifact, "bundle": root / "bundle", "episodes": episodes}


def _copy(made, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(made["bundle"], dst)
    return dst


def _cli(*args):
    from vla_export.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_bundle_carries_a_hashed_self_test_set_of_real_frames(made):
    from vla_export.deploy.bundle import verify_bundle
    from vla_export.deploy.selftest import SELFTEST_ARRAYS, SELFTEST_INFO, SelfTest

    info = verify_bundle(made["bundle"])
    assert SELFTEST_ARRAYS in info["files"] and SELFTEST_INFO in info["files"]
    test = SelfTest(made["bundle"])
    assert "validation split" in test.info["frames_from"]
    images, texts = test.observations["image"], test.observations["instruction"]
    assert images.dtype == np.uint8 and images.ndim == 4 and len(texts) == len(images) == test.frames
    assert test.ref_actions.shape == (test.frames, 2) and not test.uses_processor
    assert set(test.reference) == {"actions"} and len(test.reference["actions"]) == test.info["feeds"]
    # the reference really is the checkpoint's fp32 model on those inputs
    from vla_export.checkpoint import load_checkpoint
    from vla_export.runtime import TorchRunner

    ckpt = load_checkpoint(made["checkpoint"])
    with TorchRunner(ckpt.model, ckpt.spec) as ref:
        np.testing.assert_allclose(ref.infer(test.feeds)["actions"], test.reference["actions"], rtol=0, atol=1e-6)
    assert test.info["reference"]["machine"]["cpu_features"]["flags"] is not None
    assert test.budgets["precision"]["fp32"]["parity_mae"] == pytest.approx(1e-4)


def test_verify_passes_here_and_writes_its_report(made, tmp_path):
    out = tmp_path / "verify"
    # The latency verdict depends on the machine and its load, so this test gives it a budget no machine misses
    # (0.1 Hz: 10 s a step); the impossible one below fails everywhere. Real rates are measured in benchmarks.
    result = _cli("verify", made["bundle"], "--out", out, "--iters", 5, "--rate-hz", 0.1)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["rate_hz"] == 0.1
    (row,) = report["results"]
    assert row["status"] == "passed" and row["runtime"]["backend"] == "onnxruntime"
    assert row["runtime"]["provider"] == "CPUExecutionProvider" and row["runtime"]["onnxruntime"]
    assert row["parity"]["metrics"]["actions"]["mae"] < 1e-5 and row["end_to_end"]["metrics"]["mae"] < 1e-5
    split = row["latency"]["split"]
    assert set(split) == {"preprocess", "inference", "postprocess", "total"}
    assert all(split[p]["p99_ms"] >= split[p]["p50_ms"] > 0 for p in split)
    assert row["latency"]["budget_ms"] == pytest.approx(10000.0)
    md = (out / "verify.md").read_text()
    flags = report["machine"]["cpu_features"]["flags"]
    assert report["machine"]["cpu"] in md and all(f in md for f in flags)
    assert "against 0.1 Hz" in md and "| model.onnx | inference |" in md


def test_impossible_budget_exits_3_naming_the_check(made, tmp_path):
    result = _cli("verify", made["bundle"], "--out", tmp_path / "v", "--tol", 1e-12, "--iters", 2)
    assert result.exit_code == 3, result.output
    assert "parity mae" in result.output and "> 1e-12" in result.output
    assert not json.loads((tmp_path / "v" / "verify.json").read_text())["passed"]
    # an impossible control rate fails the latency budget, not the accuracy one
    result = _cli("verify", made["bundle"], "--out", tmp_path / "v2", "--rate-hz", 1e9, "--iters", 2)
    assert result.exit_code == 3 and "latency p99" in result.output


def test_bad_bundles_exit_2_with_one_line(made, tmp_path):
    from vla_export.deploy.bundle import BUNDLE_FILE, _self_digest
    from vla_export.deploy.selftest import SELFTEST_ARRAYS, SELFTEST_INFO

    result = _cli("verify", tmp_path / "missing")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "does not exist" in result.output

    tampered = _copy(made, tmp_path / "t")
    with np.load(tampered / SELFTEST_ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["ref.actions"] = arrays["ref.actions"] + 1.0  # a reference that would let a wrong artifact pass
    np.savez_compressed(tampered / SELFTEST_ARRAYS, **arrays)
    result = _cli("verify", tampered)
    assert result.exit_code == 2 and "selftest.npz does not match its sha256" in result.output

    old = _copy(made, tmp_path / "o")  # what an older vla-export wrote: no self-test set, a consistent bundle.json
    info = json.loads((old / BUNDLE_FILE).read_text())
    for name in (SELFTEST_ARRAYS, SELFTEST_INFO):
        (old / name).unlink()
        del info["files"][name]
    info["bundle_sha256"] = _self_digest(info)
    (old / BUNDLE_FILE).write_text(json.dumps(info))
    result = _cli("verify", old)
    assert result.exit_code == 2 and "no self-test set" in result.output and "rebuild it" in result.output
    from vla_export.deploy.policy import Policy

    with Policy.load(old) as policy:  # still runs (hash-verified), said once, not judged
        assert policy.selftest["passed"] is None and "no self-test set" in policy.selftest["skipped"]

    result = _cli("verify", made["bundle"], "--artifact", "model.fp16.engine")
    assert result.exit_code == 2 and "holds no artifact 'model.fp16.engine'" in result.output


def test_an_engine_this_machine_cannot_run_is_exit_4_and_the_rest_still_verified(made, tmp_path):
    """A TensorRT engine added to the bundle on a GPU target, verified on a CPU host."""
    from vla_export import manifest as mf
    from vla_export.deploy.bundle import add_artifact

    pytest.importorskip("onnxruntime")
    try:
        from vla_export.runtime.tensorrt import import_tensorrt

        import_tensorrt()
        pytest.skip("this machine can run TensorRT: the CPU-host behaviour is not what happens here")
    except BackendUnavailable:
        pass
    bundle = _copy(made, tmp_path)
    engine = bundle / "model.fp16.engine"
    engine.write_bytes(b"serialized plan built on the target")  # never parsed: TensorRT is absent here
    source = mf.read_manifest(bundle / "model.onnx")
    manifest = mf.new_manifest("trt", engine, backend="tensorrt", precision="fp16", variant="trt-fp16",
                               io_spec=source["io_spec"], source=source["source"])
    mf.write_manifest(engine, manifest)
    add_artifact(bundle, engine, manifest)

    result = _cli("verify", bundle, "--artifact", "model.fp16.engine", "--out", tmp_path / "v")
    assert result.exit_code == 4, result.output
    assert "TensorRT is not installed" in result.output or "no CUDA GPU" in result.output
    result = _cli("verify", bundle, "--out", tmp_path / "v2", "--iters", 2, "--rate-hz", 0.1)  # all: the ONNX runs, the engine skips
    assert result.exit_code == 0, result.output
    rows = {r["artifact"]: r for r in json.loads((tmp_path / "v2" / "verify.json").read_text())["results"]}
    assert rows["model.onnx"]["status"] == "passed" and rows["model.fp16.engine"]["status"] == "skipped"


def test_policy_load_runs_the_quick_self_test_and_refuses_a_failing_artifact(made, tmp_path):
    import time

    from vla_export.deploy.bundle import make_bundle
    from vla_export.deploy.policy import Policy, SelfTestFailed
    from vla_export.validate.validate import resolve_tolerances

    t0 = time.perf_counter()
    policy = Policy.load(made["bundle"])
    elapsed = time.perf_counter() - t0
    assert policy.selftest["passed"] and policy.selftest["quick"]
    assert policy.selftest["parity"]["inputs"] == 2 and policy.selftest["end_to_end"]["frames"] == 1
    assert elapsed < 30  # generous: a real bound is measured in docs/benchmarks.md, not asserted here
    policy.close()

    strict = tmp_path / "strict"
    make_bundle(made["artifact"], strict, episodes=made["episodes"], budgets=resolve_tolerances(tol=1e-12))
    with pytest.raises(SelfTestFailed, match=r"fails the bundle's self-test on this machine .*parity mae") as err:
        Policy.load(strict)
    assert err.value.exit_code == 3 and "\n" not in str(err.value)
    unchecked = Policy.load(strict, verify=False)  # the caller's explicit choice
    assert unchecked.selftest is None and unchecked.act(np.zeros((64, 64, 3), np.uint8), "go").shape == (2,)


def test_judged_elsewhere_names_the_missing_features():
    from vla_export.manifest import cpu_features
    from vla_export.manifest import isa_difference as judged_elsewhere

    vnni_cpuinfo = "processor : 0\nflags : fpu sse avx2 fma avx512f avx512bw avx512_vnni\n"
    avx2_cpuinfo = "processor : 0\nflags : fpu sse avx2 fma\n"
    there = {"cpu": "Xeon", "cpu_features": cpu_features(vnni_cpuinfo, "x86_64")}
    here = {"cpu": "EPYC", "cpu_features": cpu_features(avx2_cpuinfo, "x86_64")}
    assert there["cpu_features"]["int8_kernels"] == "vnni" and here["cpu_features"]["int8_kernels"] == "avx2"
    note = judged_elsewhere(there, here)
    assert "missing here: avx512f, avx512bw, avx512_vnni" in note and "int8 kernels avx2" in note
    assert judged_elsewhere(there, there) is None
    arm = cpu_features("Features : fp asimd asimddp i8mm\n", "aarch64")
    assert arm == {"arch": "aarch64", "flags": ["asimd", "asimddp", "i8mm"], "int8_kernels": "arm64-dot"}


def test_bundle_into_an_unwritable_place_is_one_line(made, tmp_path):
    result = _cli("bundle", "--artifact", made["artifact"], "-o", "/proc/forbidden")
    assert result.exit_code == 2, result.output
    assert "cannot write into /proc" in result.output and "Traceback" not in result.output


def test_verify_rejects_bad_options_before_work(made):
    from vla_export.deploy.verify import run_verify

    with pytest.raises(UserError, match="rate-hz must be > 0"):
        run_verify(made["bundle"], rate_hz=0)


def test_trt_bundle_picks_a_parseable_onnx_and_leaves_the_bundle_intact(made, tmp_path):
    """`trt --bundle`: input errors exit 2 on every machine; here (no TensorRT) the build itself exits 4."""
    from vla_export.deploy.bundle import verify_bundle

    bundle = _copy(made, tmp_path)
    before = sorted(p.name for p in bundle.iterdir())
    result = _cli("trt", "--bundle", bundle, "--precision", "int8")
    assert result.exit_code == 2 and "--extra artifacts/model.int8-static.onnx" in result.output
    result = _cli("trt", "--bundle", bundle, "--precision", "fp16")
    try:
        from vla_export.runtime.tensorrt import import_tensorrt

        import_tensorrt()
    except BackendUnavailable:
        assert result.exit_code == 4, result.output
    assert sorted(p.name for p in bundle.iterdir()) == before or result.exit_code == 0
    verify_bundle(bundle)
    assert _cli("trt", "--precision", "fp16").exit_code == 2  # neither ONNX_PATH nor --bundle


@pytest.mark.slow
def test_aoti_compiled_on_the_target_joins_the_bundle_and_is_verified(made, tmp_path):
    from vla_export.deploy.bundle import make_bundle, verify_bundle

    bundle = tmp_path / "bundle"
    assert _cli("aoti", "--bundle", made["bundle"]).exit_code == 2  # made without weights: says how to fix
    make_bundle(made["artifact"], bundle, episodes=made["episodes"], with_weights=True)
    result = _cli("aoti", "--bundle", bundle, "--device", "cpu", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    info = verify_bundle(bundle)
    assert "model.cpu.fp32.pt2" in info["files"] and info["artifacts"]["model.cpu.fp32.pt2"]["backend"] == "aoti"
    assert not [p for p in bundle.parent.iterdir() if ".checkpoint-" in p.name]  # the hard-linked view is gone
    result = _cli("verify", bundle, "--out", tmp_path / "v", "--iters", 2, "--rate-hz", 0.1)
    assert result.exit_code == 0, result.output
    rows = {r["artifact"]: r for r in json.loads((tmp_path / "v" / "verify.json").read_text())["results"]}
    assert rows["model.cpu.fp32.pt2"]["status"] == "passed"
    assert rows["model.cpu.fp32.pt2"]["parity"]["metrics"]["actions"]["mae"] < 1e-5
    # a second call is a no-op that keeps the bundle verified
    assert _cli("aoti", "--bundle", bundle).exit_code == 0
    verify_bundle(bundle)


def test_validate_says_when_the_artifact_was_gated_on_another_cpu(made, tmp_path):
    from vla_export import manifest as mf
    from vla_export.validate.validate import validate

    arts = tmp_path / "artifacts"
    shutil.copytree(made["artifact"].parent, arts)
    m = mf.read_manifest(arts / "model.onnx")
    assert m["metrics"] and m["machine"]["cpu_features"] == mf.cpu_features()  # export gated it on this machine
    report = validate([arts], n=2, batch_sizes=(1,), progress=False)
    assert report["results"][0]["judged_elsewhere"] is None
    here = mf.cpu_features()
    # the record of an export on an ARM board (the manifest's own JSON; the artifact files are unchanged)
    m["machine"] = {**m["machine"], "cpu": "Cortex-A78AE", "arch": "aarch64",
                    "cpu_features": {"arch": "aarch64", "flags": ["asimd", "asimddp"], "int8_kernels": "arm64-dot"}}
    (arts / "model.onnx.json").write_text(json.dumps(m))
    report = validate([arts], n=2, batch_sizes=(1,), progress=False)
    (row,) = report["results"]
    assert row["status"] == "passed"  # judged here, with this machine's numbers
    assert "gated by `export` on Cortex-A78AE" in row["judged_elsewhere"]
    assert f"int8 kernels {here['int8_kernels']}" in row["judged_elsewhere"]
    assert report["machine"]["cpu_features"] == here


# -- a processor bundle that observes two cameras + state (LeRobot ACT's shape): real frames, by name -----------------
@pytest.fixture(scope="module")
def chunked_bundle(tmp_path_factory):
    """The ACT-shaped plug-in (two cameras + observation.state -> a chunk) bundled with `--episodes` of named HDF5
    episodes written through the episode API."""
    import torch

    from tests.plugin_arch import CHUNK_ACTION_DIM
    from tests.test_task_data import PLUGIN, named_episodes
    from vla_export.checkpoint import make_config, save_checkpoint
    from vla_export.export.onnx_export import ExportOptions, export_checkpoint
    from vla_export.models import build_model

    root = tmp_path_factory.mktemp("chunked_selftest")
    # a bundle names each action it publishes, so the config names the chunk's four
    names = [f"joint_{i}" for i in range(CHUNK_ACTION_DIM)]
    config = make_config(PLUGIN, None, {"width": 8, "action_dim": CHUNK_ACTION_DIM}, action_names=names,
                         action_units=["rad"] * CHUNK_ACTION_DIM)
    torch.manual_seed(0)
    model, _ = build_model(PLUGIN, config["model_config"])
    ckpt = Path(save_checkpoint(model, root / "ckpt", config))
    artifact = Path(export_checkpoint(ckpt, root / "artifacts",
                                      ExportOptions(n_inputs=2, batch_sizes=(1, 2), quiet=True)).artifact)
    episodes = named_episodes(root / "eps", count=5, seed=9, size=40)
    result = _cli("bundle", "--artifact", artifact, "-o", root / "bundle", "--episodes", episodes)
    assert result.exit_code == 0, result.output
    return {"root": root, "checkpoint": ckpt, "artifact": artifact, "episodes": episodes, "bundle": root / "bundle"}


def test_processor_bundle_self_test_holds_the_episodes_frames_by_name(chunked_bundle, tmp_path):
    import torch

    from tests.plugin_arch import CHUNK_ACTION_MEAN, CHUNK_ACTION_STD, CHUNK_CAMS
    from vla_export.checkpoint import load_checkpoint
    from vla_export.data.episodes import load_episode
    from vla_export.data.task import select_episodes
    from vla_export.deploy.selftest import SELFTEST_ARRAYS, SelfTest
    from vla_export.processors import Processor

    test = SelfTest(chunked_bundle["bundle"])
    assert test.uses_processor and set(test.observations) == {*CHUNK_CAMS, "observation.state"}
    assert "validation split" in test.info["frames_from"] and "synthetic" not in test.info["frames_from"]
    at = test.info["frames_at"]
    assert len(at) == test.frames == test.ref_actions.shape[0] > 1
    val = {p.stem for p in select_episodes(chunked_bundle["checkpoint"], chunked_bundle["episodes"], "val")}
    assert {name for name, _ in at} <= val  # never a training frame
    model, proc = load_checkpoint(chunked_bundle["checkpoint"]).model, Processor.load(chunked_bundle["checkpoint"])
    for i, (name, t) in enumerate(at):
        ep = load_episode(chunked_bundle["episodes"] / f"{name}.h5")
        for key in (*CHUNK_CAMS, "observation.state"):
            np.testing.assert_array_equal(test.observations[key][i], ep.observations[key][t])
        # the reference by hand: preprocess -> fp32 model -> the chunk's first action, unnormalised
        feeds = proc.preprocess({k: ep.observations[k][t:t + 1] for k in (*CHUNK_CAMS, "observation.state")})
        with torch.no_grad():
            chunk = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        want = chunk[0, 0] * np.asarray(CHUNK_ACTION_STD) + np.asarray(CHUNK_ACTION_MEAN)
        np.testing.assert_allclose(test.ref_actions[i], want, rtol=1e-5, atol=1e-5)

    result = _cli("verify", chunked_bundle["bundle"], "--out", tmp_path / "v", "--iters", 2, "--rate-hz", 0.1)
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "v" / "verify.json").read_text())["results"]
    assert row["end_to_end"]["frames"] == test.frames and row["end_to_end"]["metrics"]["mae"] < 1e-4

    tampered = tmp_path / "tampered"
    shutil.copytree(chunked_bundle["bundle"], tampered)
    with np.load(tampered / SELFTEST_ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[f"obs.{CHUNK_CAMS[0]}"][0, 0, 0] ^= 0xFF  # one pixel of one stored frame
    np.savez_compressed(tampered / SELFTEST_ARRAYS, **arrays)
    result = _cli("verify", tampered)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "selftest.npz does not match its sha256" in result.output


def test_processor_bundle_refuses_episodes_without_its_observations(chunked_bundle, tmp_path):
    from vla_export.data.episodes import synth_episodes

    synth_episodes(tmp_path / "one_camera", count=2, seed=1, frames=3, image_size=32)  # the hybrid's layout
    result = _cli("bundle", "--artifact", chunked_bundle["artifact"], "-o", tmp_path / "b", "--episodes",
                  tmp_path / "one_camera")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output  # after the progress lines, one error line
    assert "observation.images.top" in errors[0] and not (tmp_path / "b").exists()  # nothing half-made is left
