"""Task data for processor checkpoints: named-observation episodes (two cameras + state) through a plug-in's processor,
its chunked outputs back through its postprocessor (first action of the chunk, unnormalised), in validate's task MAE
and in quantize's calibration and task gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.plugin_arch import (
    CHUNK_ACTION_DIM,
    CHUNK_ACTION_MEAN,
    CHUNK_ACTION_STD,
    CHUNK_CAMS,
    CHUNK_STATE_DIM,
)
from vla_export.data.episodes import Episode, write_episode
from vla_export.errors import UserError

PLUGIN = "tests.plugin_arch:build_chunked"
FRAMES = 5


def named_episodes(out: Path, count: int, seed: int = 0, size: int = 40) -> Path:
    """HDF5 episodes in the named layout: both cameras, observation.state, 4 action columns, a task text."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        obs = {k: rng.integers(0, 256, (FRAMES, size, size, 3), dtype=np.uint8) for k in CHUNK_CAMS}
        obs["observation.state"] = rng.standard_normal((FRAMES, CHUNK_STATE_DIM)).astype(np.float32)
        actions = (rng.standard_normal((FRAMES, CHUNK_ACTION_DIM)) * CHUNK_ACTION_STD + CHUNK_ACTION_MEAN)
        write_episode(out / f"episode_{i:04d}.h5", Episode(f"episode_{i:04d}", None, actions.astype(np.float32),
                                                           "pick the cube", observations=obs))
    return out


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    from vla_export.export.onnx_export import ExportOptions, export_checkpoint
    from vla_export.training import TrainSettings, create_checkpoint

    root = tmp_path_factory.mktemp("chunked")
    ckpt = create_checkpoint(root / "ckpt", arch=PLUGIN, preset=None, overrides={"width": 8}, train=False,
                             settings=TrainSettings(progress=False))
    artifact = Path(export_checkpoint(ckpt, root / "artifacts",
                                      ExportOptions(n_inputs=2, batch_sizes=(1, 2), quiet=True)).artifact)
    return {"checkpoint": Path(ckpt), "artifact": artifact, "episodes": named_episodes(root / "eps", count=5)}


def expected_task_mae(checkpoint: Path, episodes: list) -> tuple[float, float]:
    """(MAE of the first chunk action unnormalised, MAE of the raw normalised first action) vs the recorded actions,
    computed by hand from the model and the processor's stats."""
    import torch

    from vla_export.checkpoint import load_checkpoint
    from vla_export.data.episodes import load_episode
    from vla_export.processors import Processor

    model, proc = load_checkpoint(checkpoint).model, Processor.load(checkpoint)
    got, raw, truth = [], [], []
    for path in episodes:
        ep = load_episode(path)
        feeds = proc.preprocess({**{k: ep.observations[k] for k in CHUNK_CAMS},
                                 "observation.state": ep.observations["observation.state"]})
        with torch.no_grad():
            chunk = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy().astype(np.float64)
        got.append(chunk[:, 0] * CHUNK_ACTION_STD + CHUNK_ACTION_MEAN)
        raw.append(chunk[:, 0])
        truth.append(ep.actions)
    truth = np.concatenate(truth)
    return float(np.abs(np.concatenate(got) - truth).mean()), float(np.abs(np.concatenate(raw) - truth).mean())


def test_task_data_feeds_named_observations_through_the_processor(chunked):
    from vla_export.data.task import calibration_frames, load_task_data

    data = load_task_data(chunked["checkpoint"], chunked["episodes"], split="all")
    assert data.feeds["images"].shape == (5 * FRAMES, 2, 3, 32, 32)
    assert data.feeds["state"].shape == (5 * FRAMES, CHUNK_STATE_DIM)
    assert data.actions.shape == (5 * FRAMES, CHUNK_ACTION_DIM)
    calib = calibration_frames(chunked["checkpoint"], chunked["episodes"], n=3)
    assert len(calib) == 3 and sorted(calib[0]) == ["images", "state"] and calib[0]["images"].shape[0] == 1


def test_validate_task_mae_is_the_first_chunk_action_unnormalised(chunked, tmp_path):
    from vla_export.data.task import select_episodes
    from vla_export.validate.validate import validate

    report = validate([chunked["artifact"].parent], episodes_dir=str(chunked["episodes"]), split="all",
                      output=tmp_path / "validation.json", progress=False)
    (row,) = report["results"]
    want, raw = expected_task_mae(chunked["checkpoint"], select_episodes(chunked["checkpoint"],
                                                                         chunked["episodes"], "all"))
    assert row["task"]["reference_mae"] == pytest.approx(want, rel=1e-6)
    assert row["task"]["mae"] == pytest.approx(want, rel=1e-5)  # ORT fp32 vs PyTorch: the same actions
    assert abs(want - raw) > 0.5  # the unnormalise matters: the raw output would be judged very differently
    assert set(row["task"]["per_action_mae"]) == {f"a{i}" for i in range(CHUNK_ACTION_DIM)}
    assert row["status"] == "passed", row["verdict"]


def test_quantize_static_calibrates_and_gates_on_named_episodes(chunked, tmp_path):
    from vla_export.data.task import select_episodes
    from vla_export.quantize.gate import Budgets
    from vla_export.quantize.stage import quantize

    loose = Budgets(tol_int8=10, rtol_int8=10, rtol_int8_static=10, max_task_mae_increase=10,
                    max_task_mae_rel_increase=10)  # the wiring is under test here, not INT8 accuracy
    result = quantize(chunked["artifact"], "static", out_dir=tmp_path, episodes=chunked["episodes"],
                      calib=chunked["episodes"], calib_frames=4, budgets=loose, progress=False)
    task = result.manifest["metrics"]["task"]
    want, _ = expected_task_mae(chunked["checkpoint"], select_episodes(chunked["checkpoint"], chunked["episodes"],
                                                                       "val"))
    assert task["reference_mae"] == pytest.approx(want, rel=1e-6)
    assert np.isfinite(task["artifact_mae"])


def test_episodes_without_the_processors_observations_are_refused(chunked, tmp_path):
    from vla_export.data.episodes import synth_episodes
    from vla_export.data.task import load_task_data

    synth_episodes(tmp_path / "one_camera", count=2, frames=2, image_size=32)
    with pytest.raises(UserError, match=r"has cameras \['observation.image'\] but this checkpoint's processor"):
        load_task_data(chunked["checkpoint"], tmp_path / "one_camera", split="all")
    import h5py

    eps = named_episodes(tmp_path / "no_state", count=2)
    for path in sorted(eps.iterdir()):
        with h5py.File(path, "a") as f:
            del f["observation.state"]
    with pytest.raises(UserError, match="has no observation.state"):
        load_task_data(chunked["checkpoint"], eps, split="all")


def _history_noise_checkpoint(chunked, tmp_path, n: int, lengths: tuple[int, ...]):
    """The chunked checkpoint with a state-only processor: an `n`-frame observation history and a sampler noise
    step (Diffusion Policy's and SmolVLA's layout); episodes whose state is 100 * episode + frame."""
    import shutil

    from vla_export.processors import Processor
    from vla_export.processors.steps import NoiseStep, ObservationHistoryStep

    ckpt = tmp_path / "ckpt"
    shutil.copytree(chunked["checkpoint"], ckpt)
    for f in ("processor.json", "processor.safetensors"):
        (ckpt / f).unlink(missing_ok=True)
    Processor({"observation.state": {"type": "state", "shape": [CHUNK_STATE_DIM]}},
              [ObservationHistoryStep(["observation.state"], n_obs_steps=n), NoiseStep("noise", shape=[2], seed=0)],
              action_dim=CHUNK_ACTION_DIM).save(ckpt)
    eps = tmp_path / "eps"
    eps.mkdir()
    for i, length in enumerate(lengths):
        state = (100 * i + np.arange(length, dtype=np.float32))[:, None].repeat(CHUNK_STATE_DIM, axis=1)
        write_episode(eps / f"episode_{i:04d}.h5", Episode(
            f"episode_{i:04d}", None, np.zeros((length, CHUNK_ACTION_DIM), np.float32), "pick the cube",
            observations={"observation.state": state}))
    return ckpt, eps


def test_calibration_frames_draw_the_sampler_noise_afresh_for_each_frame(chunked, tmp_path):
    """INT8 calibration must see the noise input's distribution, not one vector: each calibration frame is
    preprocessed from a reset processor, whose noise step alone would give every frame the same first draw (the
    calibrated noise range was then one draw's, and SmolVLA's static INT8 missed its parity budget: docs/lerobot.md).
    Each frame gets its own standard-normal draw, the same for the same seed."""
    from vla_export.data.task import calibration_frames

    ckpt, eps = _history_noise_checkpoint(chunked, tmp_path, 2, (20, 20, 20))
    noise = np.concatenate([f["noise"] for f in calibration_frames(ckpt, eps, n=24)])
    assert noise.shape == (24, 2)
    assert len(np.unique(noise[:, 0])) == 24  # a draw per frame, not one repeated
    assert abs(noise.mean()) < 0.5 and 0.6 < noise.std() < 1.4  # standard normal (48 values: loose bounds)
    again = np.concatenate([f["noise"] for f in calibration_frames(ckpt, eps, n=24)])
    np.testing.assert_array_equal(again, noise)  # reproducible: the same artifact from the same command
    other = np.concatenate([f["noise"] for f in calibration_frames(ckpt, eps, n=24, seed=1)])
    assert not np.array_equal(other, noise)


def test_an_observation_history_gives_each_frame_its_own_episodes_past(chunked, tmp_path):
    """A processor with an observation history (Diffusion Policy's n_obs_steps): each task frame is fed frames
    t-n+1 .. t of its own episode, the first frame repeated before the start (LeRobot's queues on the robot, its
    dataset's padding in training); episodes of different lengths in one split; a calibration frame alone gets its
    history too. (Before: the batch of an episode's frames was one step of a history of copies, and the next
    episode, of another length, was refused: "call reset() before changing the batch size".)"""
    from vla_export.data.task import calibration_frames, load_task_data

    n, lengths = 3, (4, 6, 5)
    ckpt, eps = _history_noise_checkpoint(chunked, tmp_path, n, lengths)
    data = load_task_data(ckpt, eps, split="all")
    history = data.feeds["observation.state"][:, :, 0]  # [frames, n]: each entry is 100 * episode + frame
    want = np.concatenate([100 * i + np.maximum(np.arange(length)[:, None] - np.arange(n - 1, -1, -1), 0)
                           for i, length in enumerate(lengths)])
    np.testing.assert_array_equal(history, want)
    # the sampler's noise: one draw per episode's frames, the same for every run
    again = load_task_data(ckpt, eps, split="all")
    np.testing.assert_array_equal(again.feeds["noise"], data.feeds["noise"])
    for feeds in calibration_frames(ckpt, eps, n=4):
        (row,) = feeds["observation.state"][:, :, 0]
        assert row[-1] % 100 == 0 or list(np.diff(row)) in ([1, 1], [0, 1]), row  # consecutive, its episode's
        assert len({int(v) // 100 for v in row}) == 1
