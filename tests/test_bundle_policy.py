"""Bundle (self-contained, hashed, atomically written, refusing bad artifacts) and the Policy runtime (same numbers as
validate, LSTM state carried, clear errors on bad images, backend choice)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vla_export.errors import BackendUnavailable, UserError

INSTRUCTION = "Navigate around obstacles to track the red cup"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """checkpoint -> export (the export stage) -> episodes -> validate -> profile -> bundle, tiny preset, LSTM head."""
    from vla_export.data.episodes import synth_episodes
    from vla_export.deploy.bundle import make_bundle
    from vla_export.deploy.tiny import build_tiny_checkpoint, export_tiny_onnx
    from vla_export.validate.profile import profile
    from vla_export.validate.validate import validate

    root = tmp_path_factory.mktemp("deploy")
    ckpt = build_tiny_checkpoint(root / "checkpoint", head="lstm")
    artifact = export_tiny_onnx(ckpt, root / "artifacts")
    episodes = root / "episodes"
    synth_episodes(episodes, count=2, seed=3, frames=4, image_size=64)
    report = validate([artifact.parent], n=2, batch_sizes=(1,), episodes_dir=str(episodes), split="all",
                      progress=False)
    profile([artifact.parent], warmup=1, iters=3, batches=(1,), isolate=False, include_eager=False, progress=False)
    bundle = root / "bundle"
    make_bundle(artifact, bundle)
    return {"root": root, "checkpoint": ckpt, "artifact": artifact, "episodes": episodes, "bundle": bundle,
            "validation": report}


def _copy_bundle(pipeline, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(pipeline["bundle"], dst)
    return dst


def _copy_artifacts(pipeline, tmp_path) -> Path:
    dst = tmp_path / "artifacts"
    shutil.copytree(pipeline["artifact"].parent, dst)
    return dst / pipeline["artifact"].name


# -- bundle --------------------------------------------------------------------------------------------------------------
def test_bundle_is_self_contained_and_hashed(pipeline):
    from vla_export.data.preprocess import Preprocessor
    from vla_export.deploy.bundle import verify_bundle
    from vla_export.manifest import sha256_file

    bundle = pipeline["bundle"]
    info = verify_bundle(bundle)
    names = sorted(p.name for p in bundle.iterdir())
    assert set(names) == {"bundle.json", "config.json", "kosmos_tokenizer.json", "clip_tokenizer.json",
                          "model.onnx.json", "selftest.npz", "selftest.json", *info["artifact_files"]}
    assert not any(n.endswith((".safetensors", ".pth", ".h5")) for n in names)  # nothing from training
    for name, meta in info["files"].items():
        assert sha256_file(bundle / name) == meta["sha256"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["training"] == {}
    assert info["actions"] == {"names": ["linear_x", "linear_y"], "units": ["m/s", "m/s"],
                               "twist": {"linear_x": "linear.x", "linear_y": "linear.y"}}
    pre = info["preprocessing"]
    assert (pre["latent_query_num"], pre["text_len"], pre["clip_text_len"], pre["head"], pre["head_dim"],
            pre["image_size"]) == (8, 16, 16, "lstm", 64, 224)
    # validation and profile rows of this artifact, as validate/profile wrote them
    val_rows = info["validation"]["rows"]
    assert val_rows and all(r["status"] == "passed" for r in val_rows)
    assert info["profile"]["rows"][0]["batches"]["1"]["p50_ms"] > 0
    # the preprocessing works from the bundle alone: same feeds as from the checkpoint
    frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    a = Preprocessor.from_checkpoint(bundle)(frame, INSTRUCTION)
    b = Preprocessor.from_checkpoint(pipeline["checkpoint"])(frame, INSTRUCTION)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_verify_refuses_tampered_incomplete_or_padded_bundle(pipeline, tmp_path):
    from vla_export.cli import main
    from vla_export.deploy.bundle import verify_bundle

    bundle = _copy_bundle(pipeline, tmp_path)
    verify_bundle(bundle)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.onnx does not match its sha256"):
        verify_bundle(bundle)
    result = CliRunner().invoke(main, ["bundle", "--verify", str(bundle)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "model.onnx" in result.output

    bundle = _copy_bundle(pipeline, tmp_path / "b")
    (bundle / "clip_tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"clip_tokenizer\.json is missing"):
        verify_bundle(bundle)

    bundle = _copy_bundle(pipeline, tmp_path / "c")
    (bundle / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(UserError, match=r"model\.safetensors is not part of the bundle"):
        verify_bundle(bundle)

    bundle = _copy_bundle(pipeline, tmp_path / "d")
    info = json.loads((bundle / "bundle.json").read_text())
    info["validation"] = "passed"
    (bundle / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"bundle\.json was edited"):
        verify_bundle(bundle)

    with pytest.raises(UserError, match="not a bundle"):
        verify_bundle(tmp_path)


def test_bundle_refuses_failed_stale_or_modified_artifact_unless_forced(pipeline, tmp_path):
    from vla_export.deploy.bundle import make_bundle
    from vla_export.manifest import manifest_path

    artifact = _copy_artifacts(pipeline, tmp_path)
    val_path = artifact.parent / "validation.json"
    report = json.loads(val_path.read_text())

    # a failed validation row
    failed = json.loads(json.dumps(report))
    for row in failed["results"]:
        row["path"] = str(artifact)
        row["status"], row["verdict"] = "failed", "FAILED: parity MAE 0.5 > tol 0.0001 (fp32)"
    val_path.write_text(json.dumps(failed))
    with pytest.raises(UserError, match=r"refusing to bundle model\.onnx: validation .* failed"):
        make_bundle(artifact, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    info = make_bundle(artifact, tmp_path / "out", force=True)
    assert info["forced"] and "failed" in info["forced"][0]

    # validation written before the artifact was (re)built
    stale = json.loads(json.dumps(report))
    for row in stale["results"]:
        row["path"] = str(artifact)
    stale["created"] = "2000-01-01T00:00:00+00:00"
    val_path.write_text(json.dumps(stale))
    with pytest.raises(UserError, match="validation is stale"):
        make_bundle(artifact, tmp_path / "out2")

    # artifact bytes changed after its manifest was written
    val_path.unlink()
    data = bytearray(artifact.read_bytes())
    data[-10] ^= 0x01
    artifact.write_bytes(bytes(data))
    with pytest.raises(UserError, match="modified since built"):
        make_bundle(artifact, tmp_path / "out3")

    # manifest says failed
    artifact = _copy_artifacts(pipeline, tmp_path / "fresh")
    (artifact.parent / "validation.json").unlink()
    m = json.loads(manifest_path(artifact).read_text())
    m["status"], m["failure"] = "failed", "parity gate"
    manifest_path(artifact).write_text(json.dumps(m))
    with pytest.raises(UserError, match="manifest says failed"):
        make_bundle(artifact, tmp_path / "out4")


def test_unvalidated_bundle_says_so_and_cli_replaces_atomically(pipeline, tmp_path):
    from vla_export.cli import main
    from vla_export.deploy.bundle import verify_bundle

    artifact = _copy_artifacts(pipeline, tmp_path)
    (artifact.parent / "validation.json").unlink()
    (artifact.parent / "profile.json").unlink()
    out = tmp_path / "dist" / "policy"
    runner = CliRunner()
    result = runner.invoke(main, ["bundle", "--artifact", str(artifact), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "not validated" in result.output
    info = json.loads((out / "bundle.json").read_text())
    assert info["validation"] == "not validated" and info["profile"] == "not profiled"
    # re-bundling over an existing bundle replaces it; no staging directories are left behind
    result = runner.invoke(main, ["bundle", "--artifact", str(artifact), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy"]
    verify_bundle(out)
    # a non-empty directory that is not a bundle is not clobbered
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    result = runner.invoke(main, ["bundle", "--artifact", str(artifact), "-o", str(other)])
    assert result.exit_code == 2 and "not a bundle" in result.output
    assert (other / "notes.txt").read_text() == "keep me"
    # rows that validation skipped (a backend this machine lacks) do not count as validated
    skipped = json.loads(json.dumps(pipeline["validation"]))
    for row in skipped["results"]:
        row["path"], row["status"], row["verdict"] = str(artifact), "skipped", "skipped: no CUDA GPU"
    (artifact.parent / "validation.json").write_text(json.dumps(skipped))
    result = runner.invoke(main, ["bundle", "--artifact", str(artifact), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "bundle.json").read_text())["validation"] == "not validated"


# -- policy -------------------------------------------------------------------------------------------------------------
def test_policy_equals_validate_on_the_same_frames(pipeline):
    """Policy.act over each episode (state carried, reset between episodes) reproduces validate's rollout of the
    artifact through its runner, and the task MAE validate recorded for it."""
    from vla_export.data.episodes import list_episodes, load_episode
    from vla_export.data.task import load_task_data
    from vla_export.deploy import Policy
    from vla_export.runtime import open_runner
    from vla_export.validate.validate import cast_feeds, episode_index, rollout

    bundle = pipeline["bundle"]
    task = load_task_data(bundle, pipeline["episodes"], split="all")
    with open_runner(bundle / "model.onnx") as runner:
        ref = rollout(lambda f: runner.infer(cast_feeds(f, runner.spec)), task.feeds, episode_index(task.episode),
                      runner.spec)["actions"]

    policy = Policy.load(bundle, backend="onnxruntime")
    acts = []
    for path in list_episodes(pipeline["episodes"]):
        ep = load_episode(path)
        policy.reset()
        acts += [policy.act(frame, ep.instruction) for frame in ep.images]
    acts = np.stack(acts)
    assert acts.shape == ref.shape == (8, 2) and acts.dtype == np.float32
    np.testing.assert_allclose(acts, ref, rtol=0, atol=1e-6)

    row = next(r for r in pipeline["validation"]["results"] if r["status"] == "passed")
    mae = float(np.abs(acts.astype(np.float64) - task.actions).mean())
    assert abs(mae - row["task"]["mae"]) < 1e-6
    # the state is carried: the second frame's action differs from the same frame fed after a reset
    policy.reset()
    ep = load_episode(list_episodes(pipeline["episodes"])[0])
    first = policy.act(ep.images[0], ep.instruction)
    again = policy.act(ep.images[0], ep.instruction)
    assert np.abs(first - again).max() > 1e-6
    policy.reset()
    np.testing.assert_array_equal(policy.act(ep.images[0], ep.instruction), first)


def test_policy_batch_matches_single_frames(pipeline):
    from vla_export.deploy import Policy

    policy = Policy.load(pipeline["bundle"])
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in range(3)]
    batch = policy.act(frames, INSTRUCTION)
    assert batch.shape == (3, 2)
    singles = []
    for f in frames:
        policy.reset()
        singles.append(policy.act(f, INSTRUCTION))
    np.testing.assert_allclose(batch, np.stack(singles), rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="call reset"):
        policy.act(frames[:2], INSTRUCTION)  # state held for batch 1


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    (np.zeros((32, 32), np.uint8), "HxWx3"),
    (np.zeros((32, 32, 4), np.uint8), "HxWx3"),
    (np.zeros((0, 32, 3), np.uint8), "empty"),
    ([[1, 2, 3]], "HxWx3|numpy"),
    ("frame.png", "numpy"),
    ([], "empty list"),
])
def test_bad_images_raise_one_clear_error(pipeline, image, message):
    from vla_export.deploy import Policy

    policy = Policy.load(pipeline["bundle"], verify=False)
    with pytest.raises(UserError, match=message) as err:
        policy.act(image, INSTRUCTION)
    assert "\n" not in str(err.value)


def test_backend_choice(pipeline, tmp_path, caplog):
    from vla_export.deploy import Policy
    from vla_export.deploy.policy import backend_candidates

    with caplog.at_level(logging.INFO, logger="vla_export.deploy"):
        policy = Policy.load(pipeline["bundle"], backend="auto")
    assert policy.backend == "onnxruntime" and policy.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    # the bundle carries profile numbers for this machine's provider, so auto picks by them and says so
    assert "profile" in policy.backend_reason
    assert any("backend onnxruntime" in r.getMessage() for r in caplog.records)

    info = json.loads((pipeline["bundle"] / "bundle.json").read_text())
    with pytest.raises(UserError, match="AOTInductor"):
        backend_candidates(info, "torch")
    with pytest.raises(UserError, match="unknown backend"):
        backend_candidates(info, "tflite")
    import onnxruntime

    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
            Policy.load(pipeline["bundle"], backend="tensorrt")
    # a TensorRT-engine bundle needs TensorRT and a GPU: refused with exit code 4 where they are missing
    engine_info = dict(info, backend="tensorrt", artifact="model.fp16.engine")
    try:
        import tensorrt  # noqa: F401
        import torch

        have_trt = torch.cuda.is_available()
    except ImportError:
        have_trt = False
    if not have_trt:
        with pytest.raises(BackendUnavailable) as err:
            backend_candidates(engine_info, "auto")
        assert err.value.exit_code == 4
    with pytest.raises(UserError, match="TensorRT engine"):
        backend_candidates(engine_info, "onnxruntime")
    # an AOTInductor bundle: aoti/torch/auto
    aoti_info = dict(info, backend="aoti", artifact="model.cpu.fp32.pt2", device="cpu")
    assert [c.backend for c in backend_candidates(aoti_info, "torch")] == ["torch"]
    assert [c.backend for c in backend_candidates(aoti_info, "auto")] == ["aoti"]
    with pytest.raises(UserError, match="AOTInductor package"):
        backend_candidates(aoti_info, "onnxruntime")
