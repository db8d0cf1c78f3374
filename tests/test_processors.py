"""Processors (vla_export.processors): steps stored as data round-trip exactly, normalisation and action chunks do
LeRobot's arithmetic, the built-in hybrid is one user of the contract (same feeds as its Preprocessor), and a plug-in
with its own processor goes checkpoint -> export -> bundle -> Policy.act (and the ROS 2 node) without the hybrid's
preprocessing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from vla_export.errors import UserError
from vla_export.processors import (
    PROCESSOR_FILE,
    STATE_FILE,
    ActionChunkStep,
    ImageStep,
    NormalizeStep,
    Processor,
    ProcessorStep,
    RenameStep,
    TokenizeStep,
    UnnormalizeStep,
    hybrid_processor,
    processor_for_checkpoint,
    register_step,
)

DATA = Path(__file__).parent / "data"
INSTRUCTION = "Navigate around obstacles to track the red cup"


def _arm_processor(coeff=None, n_action_steps=1, chunk=4):
    """Two cameras (one resized), a state vector, text; min-max state, mean-std images and actions."""
    rng = np.random.default_rng(0)
    stats = {"observation.state": {"min": np.array([-1.0, 0.0, 2.0]), "max": np.array([1.0, 4.0, 2.0])},
             "observation.images.top": {"mean": rng.uniform(0.3, 0.6, (3, 1, 1)), "std": rng.uniform(0.2, 0.3, (3, 1, 1))},
             "action": {"mean": np.array([0.5, -1.0]), "std": np.array([2.0, 0.25])}}
    return Processor(
        {"observation.images.top": {"type": "image"}, "observation.images.wrist": {"type": "image"},
         "observation.state": {"type": "state", "shape": [3]}, "task": {"type": "text"}},
        [ImageStep(["observation.images.top"]), ImageStep(["observation.images.wrist"], size=[16, 16]),
         NormalizeStep.with_stats({"observation.state": "min_max", "observation.images.top": "mean_std"}, stats),
         TokenizeStep("task", "plugin_tokenizer.json", max_length=6),
         RenameStep({"observation.images.top": "top", "observation.images.wrist": "wrist",
                     "observation.state": "state", "input_ids": "ids", "attention_mask": "mask"})],
        [ActionChunkStep("action", chunk_size=chunk, n_action_steps=n_action_steps, temporal_ensemble_coeff=coeff),
         UnnormalizeStep.with_stats({"action": "mean_std"}, stats)],
        action_dim=2, base_dir=DATA)


def _observation(rng, batch=None):
    lead = () if batch is None else (batch,)
    return {"observation.images.top": rng.integers(0, 256, (*lead, 12, 10, 3), dtype=np.uint8),
            "observation.images.wrist": rng.integers(0, 256, (*lead, 20, 24, 3), dtype=np.uint8),
            "observation.state": rng.standard_normal((*lead, 3)).astype(np.float32),
            "task": INSTRUCTION if batch is None else [INSTRUCTION] * batch}


def test_round_trip_is_exact_and_stored_as_data(tmp_path):
    proc = _arm_processor(coeff=0.01)
    obs = _observation(np.random.default_rng(1), batch=2)
    feeds = proc.preprocess(obs)
    assert sorted(feeds) == ["ids", "mask", "state", "top", "wrist"]
    assert feeds["top"].shape == (2, 3, 12, 10) and feeds["wrist"].shape == (2, 3, 16, 16)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (2, 6)
    written = proc.save(tmp_path)
    assert sorted(written) == sorted([PROCESSOR_FILE, STATE_FILE, "plugin_tokenizer.json"])
    data = json.loads((tmp_path / PROCESSOR_FILE).read_text())  # plain JSON: names and configs, no code paths
    assert [s["name"] for s in data["preprocessor"]] == ["image", "image", "normalize", "tokenize", "rename"]
    assert [s["name"] for s in data["postprocessor"]] == ["action_chunk", "unnormalize"]
    from safetensors.numpy import load_file

    state = load_file(str(tmp_path / STATE_FILE))
    assert set(state) == {"preprocessor.2.observation.state.min", "preprocessor.2.observation.state.max",
                          "preprocessor.2.observation.images.top.mean", "preprocessor.2.observation.images.top.std",
                          "postprocessor.1.action.mean", "postprocessor.1.action.std"}
    loaded = Processor.load(tmp_path)
    again = loaded.preprocess(obs)
    for k in feeds:
        np.testing.assert_array_equal(again[k], feeds[k])
    chunks = np.random.default_rng(2).standard_normal((5, 2, 4, 2)).astype(np.float32)
    a = [proc.postprocess({"actions": c}) for c in chunks]
    b = [loaded.postprocess({"actions": c}) for c in chunks]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_normalisation_matches_lerobot_arithmetic():
    proc = _arm_processor()
    state = np.array([[-1.0, 2.0, 2.0], [1.0, 4.0, 2.0]], dtype=np.float32)
    obs = {**_observation(np.random.default_rng(3), batch=2), "observation.state": state}
    feeds = proc.preprocess(obs)
    # min-max to [-1, 1]; a zero range (the third column) divides by eps as LeRobot does: 2 * 0 / eps - 1 = -1
    np.testing.assert_allclose(feeds["state"], [[-1.0, 0.0, -1.0], [1.0, 1.0, -1.0]], atol=1e-6)
    top = obs["observation.images.top"].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    st = proc.preprocessor[2].stats["observation.images.top"]
    np.testing.assert_allclose(feeds["top"], (top - st["mean"]) / (st["std"] + 1e-8), rtol=1e-6, atol=1e-6)
    unnorm = UnnormalizeStep.with_stats({"action": "min_max"}, {"action": {"min": [0.0, -2.0], "max": [1.0, 2.0]}})
    norm = NormalizeStep.with_stats({"action": "min_max"}, {"action": {"min": [0.0, -2.0], "max": [1.0, 2.0]}})
    x = np.array([[0.25, 1.5]], dtype=np.float32)
    np.testing.assert_allclose(unnorm(norm({"action": x}))["action"], x, atol=1e-6)
    np.testing.assert_allclose(norm({"action": x})["action"], [[-0.5, 0.75]], atol=1e-6)


def test_tokenize_suffix_is_appended_only_where_missing():
    """LeRobot's SmolVLA newline step appends "\\n" to a task that lacks it and leaves one ending with it alone: the
    `tokenize` suffix does the same, so a task given with and without its newline tokenises alike."""
    from tokenizers import Tokenizer

    step = TokenizeStep("task", "plugin_tokenizer.json", max_length=12, suffix="!")
    step.bind(DATA)
    tok = Tokenizer.from_file(str(DATA / "plugin_tokenizer.json"))
    out = step({"task": ["go left", "go left!"]})
    np.testing.assert_array_equal(out["input_ids"][0], out["input_ids"][1])
    want = tok.encode("go left!").ids
    assert list(out["input_ids"][0][:len(want)]) == want and out["attention_mask"][0].sum() == len(want)
    assert want != tok.encode("go left").ids  # the suffix is a token here, so the check above can fail


def test_single_frame_and_batch_give_the_same_feeds():
    proc = _arm_processor()
    rng = np.random.default_rng(4)
    batch = _observation(rng, batch=3)
    one = {k: (v[1] if not isinstance(v, list) else v[1]) for k, v in batch.items()}
    fb, f1 = proc.preprocess(batch), proc.preprocess(one)
    for k in fb:
        np.testing.assert_array_equal(f1[k][0], fb[k][1])
    with pytest.raises(UserError, match="lacks"):
        proc.preprocess({"observation.state": np.zeros(3)})
    with pytest.raises(UserError, match="rank"):
        proc.preprocess({**one, "observation.state": np.zeros((1, 1, 3))})


def test_action_queue_runs_the_model_every_n_steps():
    proc = _arm_processor(n_action_steps=3, chunk=4)
    calls = []
    chunks = np.random.default_rng(5).standard_normal((3, 1, 4, 2)).astype(np.float32)

    def infer(feeds):
        calls.append(len(calls))
        return {"actions": chunks[len(calls) - 1]}

    obs = _observation(np.random.default_rng(6))
    got = [proc.step(obs, infer) for _ in range(6)]
    assert len(calls) == 2  # steps 0 and 3
    mean, std = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    want = [chunks[i // 3][0, i % 3] * std + mean for i in range(6)]
    np.testing.assert_allclose(np.concatenate(got), np.stack(want), rtol=1e-6, atol=1e-6)
    proc.reset()
    proc.step(obs, infer)
    assert len(calls) == 3  # reset drops the queue: the model runs again


def test_temporal_ensemble_is_the_exponentially_weighted_average_of_every_prediction():
    coeff, chunk, steps = 0.3, 4, 7
    step = ActionChunkStep("action", chunk_size=chunk, temporal_ensemble_coeff=coeff)
    preds = np.random.default_rng(7).standard_normal((steps, 2, chunk, 3)).astype(np.float32)
    for t in range(steps):
        got = step({"action": preds[t]})["action"]
        # offline form (ACT Algorithm 2): every chunk s <= t predicted step t at index t - s; weight exp(-coeff*i)
        # with i = 0 for the oldest prediction still covering step t
        sources = [s for s in range(t + 1) if t - s < chunk]
        w = np.exp(-coeff * np.arange(len(sources)))
        want = sum(wi * preds[s][:, t - s] for wi, s in zip(w, sources, strict=True)) / w.sum()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_step_is_refused_and_a_python_step_registers(tmp_path):
    proc = Processor({"observation.state": {"type": "state"}},
                     [RenameStep({"observation.state": "x"})], [])
    proc.save(tmp_path)
    data = json.loads((tmp_path / PROCESSOR_FILE).read_text())
    data["preprocessor"].insert(0, {"name": "clip_state", "config": {"limit": 0.5}})
    (tmp_path / PROCESSOR_FILE).write_text(json.dumps(data))
    with pytest.raises(UserError, match="'clip_state', which is not a registered processor step"):
        Processor.load(tmp_path)

    @register_step("clip_state")
    class ClipState(ProcessorStep):  # the documented hook: a step written in Python, registered by name
        def __init__(self, limit: float):
            super().__init__(limit=limit)

        def __call__(self, d):
            return {**d, "observation.state": np.clip(d["observation.state"], -self.cfg["limit"], self.cfg["limit"])}

    loaded = Processor.load(tmp_path)
    out = loaded.preprocess({"observation.state": np.array([2.0, -0.25, -3.0], dtype=np.float32)})
    np.testing.assert_array_equal(out["x"], [[0.5, -0.25, -0.5]])


# -- the built-in hybrid through the processor ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from vla_export.deploy.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("hybrid") / "ckpt", head="mlp")


def test_hybrid_processor_gives_the_preprocessor_feeds(tiny_checkpoint):
    from vla_export.checkpoint import read_config
    from vla_export.data.episodes import synth_episode
    from vla_export.data.preprocess import Preprocessor

    frames = synth_episode(0, seed=2, frames=3, image_size=64).images
    pre = Preprocessor.from_checkpoint(tiny_checkpoint)
    proc = processor_for_checkpoint(tiny_checkpoint)  # no processor.json: built from config.json
    assert proc is not None and [type(s).__name__ for s in proc.preprocessor][:2] == ["ImageStep",
                                                                                      "Kosmos2ClipTextStep"]
    want = pre(frames, INSTRUCTION)
    got = proc.preprocess({"observation.image": frames, "task": INSTRUCTION})
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # and it round-trips as data like any other processor
    out = tiny_checkpoint.parent / "hybrid_processor"
    out.mkdir()
    hybrid_processor(read_config(tiny_checkpoint), tiny_checkpoint).save(out)
    again = Processor.load(out).preprocess({"observation.image": frames[1], "task": INSTRUCTION})
    for k in want:
        np.testing.assert_array_equal(again[k][0], want[k][1], err_msg=k)


# -- a plug-in architecture with its own processor --------------------------------------------------------------------
PLUGIN = "tests.plugin_arch:build_vision_text"


@pytest.fixture(scope="module")
def plugin_pipeline(tmp_path_factory):
    from vla_export.deploy.bundle import make_bundle
    from vla_export.export.onnx_export import ExportOptions, export_checkpoint
    from vla_export.training import TrainSettings, create_checkpoint

    root = tmp_path_factory.mktemp("plugin")
    ckpt = create_checkpoint(root / "ckpt", arch=PLUGIN, preset=None, overrides={"width": 8}, train=False,
                             settings=TrainSettings(progress=False))
    artifact = Path(export_checkpoint(ckpt, root / "artifacts",
                                      ExportOptions(n_inputs=2, batch_sizes=(1, 2), quiet=True)).artifact)
    make_bundle(artifact, root / "bundle")
    return {"checkpoint": ckpt, "artifact": artifact, "bundle": root / "bundle"}


def test_plugin_checkpoint_and_bundle_carry_its_processor_only(plugin_pipeline):
    ckpt, bundle = plugin_pipeline["checkpoint"], plugin_pipeline["bundle"]
    for d in (ckpt, bundle):
        assert {PROCESSOR_FILE, STATE_FILE, "plugin_tokenizer.json"} <= {p.name for p in d.iterdir()}
    names = {p.name for p in bundle.iterdir()} - {"selftest.npz", "selftest.json"}
    assert not names & {"kosmos_tokenizer.json", "clip_tokenizer.json"}  # the hybrid's files stay behind
    config = json.loads((bundle / "config.json").read_text())
    assert config["preprocessing"] == {"processor": PROCESSOR_FILE}


def test_plugin_policy_act_equals_the_model_on_processor_feeds(plugin_pipeline):
    import torch

    from vla_export.checkpoint import load_checkpoint
    from vla_export.deploy import Policy

    ckpt = load_checkpoint(plugin_pipeline["checkpoint"])
    proc = Processor.load(plugin_pipeline["checkpoint"])
    rng = np.random.default_rng(8)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)  # any camera size: the processor resizes to 96
    feeds = proc.preprocess({"observation.image": image, "task": "track the blue cup slowly"})
    assert feeds["pixels"].shape == (1, 3, 96, 96)
    with torch.no_grad():
        normed = ckpt.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    want = normed[0] * np.array([0.3, 0.2]) + np.array([0.1, -0.05])  # the processor's unnormalize step
    with Policy.load(plugin_pipeline["bundle"], backend="onnxruntime") as policy:
        assert policy.processor is not None and policy.preprocessor is None
        got = policy.act(image, "track the blue cup slowly")
        np.testing.assert_allclose(got, want, atol=1e-5)
        got_dict = policy.act({"observation.image": image, "task": "track the blue cup slowly"})
        np.testing.assert_allclose(got_dict, want, atol=1e-5)
        batch = policy.act(np.stack([image, image[::-1].copy()]), "track the blue cup slowly")
        assert batch.shape == (2, 2)
        np.testing.assert_allclose(batch[0], want, atol=1e-5)
        with pytest.raises(UserError, match="uint8"):
            policy.act(image.astype(np.float32), "track the blue cup")


def test_plugin_task_data_goes_through_its_processor(plugin_pipeline, tmp_path):
    from vla_export.data.episodes import synth_episodes
    from vla_export.data.task import calibration_frames, load_task_data

    synth_episodes(tmp_path / "eps", count=3, seed=0, frames=3, image_size=64)
    data = load_task_data(plugin_pipeline["checkpoint"], tmp_path / "eps", split="all")
    assert data.feeds["pixels"].shape == (9, 3, 96, 96) and data.actions.shape == (9, 2)
    calib = calibration_frames(plugin_pipeline["checkpoint"], tmp_path / "eps", n=2)
    assert sorted(calib[0]) == ["pixels", "token_ids", "token_mask"]


def test_plugin_ros2_node_publishes_policy_act(plugin_pipeline, monkeypatch):
    pytest.importorskip("rclpy", reason="the ROS 2 node needs rclpy: pip install 'vla-export[ros]'")
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.delenv("ROS_LOCALHOST_ONLY", raising=False)
    monkeypatch.delenv("ROS_STATIC_PEERS", raising=False)
    from tests.test_ros2_node import Harness, image_msg, wait_for
    from vla_export.deploy import Policy

    image = np.random.default_rng(9).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    want = Policy.load(plugin_pipeline["bundle"], backend="onnxruntime").act(image, INSTRUCTION)
    h = Harness(plugin_pipeline["bundle"], max_image_age_ms=5000)
    try:
        wait_for(lambda: h.node.instruction == INSTRUCTION, "the latched instruction")
        mark = h.mark()
        h.image_pub.publish(image_msg(image))
        got = h.next_action(mark)
        np.testing.assert_allclose(got[:2], want, atol=1e-5)  # linear.x, linear.y
    finally:
        h.close()
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"


def test_plugin_bundle_verifies_end_to_end_through_its_processor(plugin_pipeline, tmp_path):
    """verify on a processor bundle: the self-test's raw observations go through its processor.json."""
    from vla_export.deploy.selftest import SelfTest
    from vla_export.deploy.verify import run_verify

    test = SelfTest(plugin_pipeline["bundle"])
    assert test.uses_processor and set(test.observations) == {"observation.image", "task"}
    report = run_verify(plugin_pipeline["bundle"], tmp_path, rate_hz=0.1, iters=3)
    (row,) = report["results"]
    assert row["status"] == "passed", row.get("failures")
    assert row["end_to_end"]["metrics"]["mae"] < 1e-5 and row["end_to_end"]["frames"] == test.frames
