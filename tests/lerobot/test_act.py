"""LeRobot ACT through vla-export: a real pretrained_model folder (LeRobot's own save_pretrained of a tiny ACT with
random weights and its processors) -> checkpoint --from-lerobot -> export -> bundle -> Policy.act, equal to LeRobot's
preprocessor + select_action + postprocessor step for step (chunk queue and temporal ensembling), and the bundle
runs with LeRobot unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.lerobot.policies import assert_same_weights, import_export_bundle, random_observations, save_with_processors

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot", reason="needs LeRobot 0.4: scripts/lerobot_env.sh")

STATE_DIM, ACTION_DIM, CHUNK, IMAGE = 5, 4, 6, (3, 64, 64)
CAMS = ("observation.images.top", "observation.images.wrist")


def save_pretrained_act(out: Path, seed: int = 0, **overrides) -> Path:
    """A LeRobot pretrained_model folder written by LeRobot itself: config.json, model.safetensors, processors."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy

    cfg = ACTConfig(
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
                        **{k: PolicyFeature(FeatureType.VISUAL, IMAGE) for k in CAMS}},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        chunk_size=CHUNK, n_action_steps=overrides.pop("n_action_steps", CHUNK), dim_model=32, n_heads=2,
        dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1, n_vae_encoder_layers=1, latent_dim=8,
        pretrained_backbone_weights=None, device="cpu", push_to_hub=False, **overrides)
    torch.manual_seed(seed)
    policy = ACTPolicy(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    stats = {"observation.state": {"mean": torch.randn(STATE_DIM, generator=g),
                                   "std": torch.rand(STATE_DIM, generator=g) + 0.5},
             "action": {"mean": torch.randn(ACTION_DIM, generator=g), "std": torch.rand(ACTION_DIM, generator=g) + 0.5}}
    return save_with_processors(policy, cfg, stats, CAMS, g, out)


def observations(n: int, seed: int = 3) -> list[dict[str, np.ndarray]]:
    return random_observations(n, CAMS, IMAGE, STATE_DIM, seed)


def lerobot_actions(pretrained: Path, obs: list[dict[str, np.ndarray]]) -> np.ndarray:
    """LeRobot's own loop: preprocessor -> ACTPolicy.select_action -> postprocessor, frames as its datasets give
    them (float CHW in [0, 1])."""
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    policy = ACTPolicy.from_pretrained(pretrained).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(pretrained))
    policy.reset()
    out = []
    for o in obs:
        batch = {k: torch.from_numpy(o[k]).permute(2, 0, 1).float() / 255.0 for k in CAMS}
        batch["observation.state"] = torch.from_numpy(o["observation.state"])
        with torch.no_grad():
            out.append(post(policy.select_action(pre(batch))).numpy()[0])
    return np.stack(out)


@pytest.fixture(scope="module")
def act_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("act")
    return import_export_bundle(save_pretrained_act(root / "pretrained_model", n_action_steps=3), root)


def test_checkpoint_holds_config_weights_and_processor_as_data(act_pipeline):
    ckpt = act_pipeline["checkpoint"]
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "processor.json", "processor.safetensors"} <= names
    assert not any(n.endswith((".pth", ".pt", ".bin", ".pkl")) for n in names)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architecture"] == "lerobot-act" and config["model_config"]["action_dim"] == ACTION_DIM
    proc = json.loads((ckpt / "processor.json").read_text())
    assert [s["name"] for s in proc["preprocessor"]] == ["image", "normalize", "stack", "rename"]
    assert [s["name"] for s in proc["postprocessor"]] == ["action_chunk", "unnormalize"]
    assert proc["postprocessor"][0]["config"]["n_action_steps"] == 3
    # the weights are LeRobot's, tensor for tensor
    assert_same_weights(act_pipeline["pretrained"], ckpt)


def test_checkpoint_declares_a_joint_output_that_holds_without_names(act_pipeline):
    """--from-lerobot writes processor.json's `output`: joint targets as Float64MultiArray, hold on bad input, and no
    joint names, because LeRobot's config carries none (asserted on the config LeRobot wrote, so a LeRobot that
    starts saving names shows up here)."""
    from vla_export.deploy import Policy
    from vla_export.deploy.ros2_node import resolve_output
    from vla_export.errors import UserError

    lerobot_config = json.loads((act_pipeline["pretrained"] / "config.json").read_text())
    assert {k: sorted(f) for k, f in lerobot_config["output_features"].items()} == {"action": ["shape", "type"]}
    want = {"kind": "joint", "msg_type": "std_msgs/msg/Float64MultiArray", "fail_safe": "hold", "joint_names": [],
            "time_from_start_s": 0.1}
    assert json.loads((act_pipeline["checkpoint"] / "processor.json").read_text())["output"] == want
    with Policy.load(act_pipeline["bundle"], backend="onnxruntime") as policy:
        declared = policy.processor.output
        action_names = policy.action_names
    assert declared == want  # travelled into the bundle
    # what the ROS 2 node makes of it: Float64MultiArray on joint_commands, holding; JointTrajectory needs names
    out = resolve_output(declared, action_names, {})
    assert (out.kind, out.msg_type, out.fail_safe, out.topic) == ("joint", want["msg_type"], "hold", "joint_commands")
    with pytest.raises(UserError, match="needs joint names"):
        resolve_output(declared, action_names, {}, output_type="trajectory_msgs/msg/JointTrajectory")


def test_exported_spec_is_the_chunk_with_a_static_image_size(act_pipeline):
    manifest = json.loads(Path(str(act_pipeline["artifact"]) + ".json").read_text())
    spec = manifest["io_spec"]
    assert [o["shape"] for o in spec["outputs"]] == [["batch", CHUNK, ACTION_DIM]]
    assert spec["dims"]["height"]["dynamic"] is False and spec["dims"]["width"]["dynamic"] is False
    assert manifest["status"] == "passed"


def test_policy_act_matches_lerobot_select_action_with_an_action_queue(act_pipeline):
    from vla_export.deploy import Policy

    obs = observations(8)  # n_action_steps 3: the model runs at steps 0, 3, 6
    want = lerobot_actions(act_pipeline["pretrained"], obs)
    with Policy.load(act_pipeline["bundle"], backend="onnxruntime") as policy:
        got = np.stack([policy.act(o) for o in obs])
        assert got.shape == (8, ACTION_DIM)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        policy.reset()  # a new episode: the queue is dropped, the same observations give the same actions
        again = np.stack([policy.act(o) for o in obs])
        np.testing.assert_allclose(again, got, atol=1e-6, rtol=0)


def test_policy_act_matches_lerobot_temporal_ensembling(act_pipeline, tmp_path):
    """The same weights saved with temporal_ensemble_coeff 0.01 (the model runs every step, chunks are averaged).

    Only the processor differs from the exported policy's (the weights are asserted equal), so the exported graph is
    reused with the imported ensembling processor instead of exporting the same network a second time."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from vla_export.cli import main
    from vla_export.deploy import Policy
    from vla_export.processors import Processor

    pretrained = save_pretrained_act(tmp_path / "pretrained_model", n_action_steps=1, temporal_ensemble_coeff=0.01)
    assert CliRunner().invoke(main, ["checkpoint", "--from-lerobot", str(pretrained), "-o",
                                     str(tmp_path / "ckpt")]).exit_code == 0
    same, exported = load_file(str(tmp_path / "ckpt" / "model.safetensors")), load_file(
        str(act_pipeline["checkpoint"] / "model.safetensors"))
    assert set(same) == set(exported) and all(torch.equal(same[k], exported[k]) for k in same)
    processor = Processor.load(tmp_path / "ckpt")
    assert processor.postprocessor[0].cfg["temporal_ensemble_coeff"] == 0.01
    obs = observations(CHUNK + 3, seed=5)  # past one chunk: every step averages up to CHUNK predictions
    want = lerobot_actions(pretrained, obs)
    with Policy.load(act_pipeline["bundle"], backend="onnxruntime") as policy:
        policy.processor = processor
        got = np.stack([policy.act(o) for o in obs])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_bundle_runs_without_lerobot(act_pipeline):
    """Policy.load + act in a fresh interpreter in which `import lerobot` fails: the robot needs no LeRobot."""
    from vla_export.deploy import Policy

    obs = observations(4, seed=9)
    with Policy.load(act_pipeline["bundle"], backend="onnxruntime") as policy:
        want = np.stack([policy.act(o) for o in obs])
    np.savez(act_pipeline["root"] / "obs.npz", **{f"{i}|{k}": v for i, o in enumerate(obs) for k, v in o.items()})
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "lerobot" or name.startswith("lerobot."):
                    raise ImportError("lerobot is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from vla_export.deploy import Policy
        data = np.load({str(act_pipeline["root"] / "obs.npz")!r})
        obs = [{{k.split("|")[1]: data[k] for k in data.files if k.startswith(f"{{i}}|")}} for i in range(4)]
        policy = Policy.load({str(act_pipeline["bundle"])!r}, backend="onnxruntime")
        np.save({str(act_pipeline["root"] / "got.npy")!r}, np.stack([policy.act(o) for o in obs]))
        assert not any(m == "lerobot" or m.startswith("lerobot.") for m in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[2], timeout=300)
    np.testing.assert_allclose(np.load(act_pipeline["root"] / "got.npy"), want, atol=1e-6, rtol=0)


def test_from_lerobot_refuses_a_folder_without_processors(act_pipeline, tmp_path):
    import shutil

    from click.testing import CliRunner

    from vla_export.cli import main

    broken = tmp_path / "pm"
    shutil.copytree(act_pipeline["pretrained"], broken)
    (broken / "policy_preprocessor.json").unlink()
    result = CliRunner().invoke(main, ["checkpoint", "--from-lerobot", str(broken), "-o", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "policy_preprocessor.json does not exist" in result.output
    assert not (tmp_path / "c").exists()


def lerobot_first_actions(pretrained: Path, root: Path, episodes: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """LeRobot's own task actions: `LeRobotDataset[i]` items of `episodes` -> preprocessor -> predict_action_chunk
    -> the chunk's first action -> postprocessor; and the recorded actions."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    from tests.lerobot.datasets import REPO_ID

    policy = ACTPolicy.from_pretrained(pretrained).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(pretrained))
    dataset = LeRobotDataset(REPO_ID, root=root, video_backend="pyav")
    got, truth = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if int(item["episode_index"]) not in episodes:
            continue
        with torch.no_grad():
            chunk = policy.predict_action_chunk(pre({k: item[k] for k in (*CAMS, "observation.state")}))
            got.append(post(chunk[:, 0]).numpy()[0])
        truth.append(item["action"].numpy())
    return np.stack(got), np.stack(truth)


def test_validate_and_quantize_take_a_lerobot_dataset(act_pipeline, tmp_path):
    """`validate --episodes DIR` and `quantize --calib DIR` with a LeRobot v3 dataset (written by LeRobot, video):
    the reference's task MAE is LeRobot's own policy on LeRobot's own dataset items (first chunk action,
    unnormalised, vs the recorded action)."""
    from click.testing import CliRunner

    from tests.lerobot.datasets import write_dataset
    from vla_export.cli import main
    from vla_export.data.task import select_episodes

    data = write_dataset(tmp_path / "ds", cams=CAMS, image_hw=IMAGE[1:], state_dim=STATE_DIM, action_dim=ACTION_DIM,
                         lengths=(4, 3, 4, 3, 4), use_videos=True)
    val = {ref.index for ref in select_episodes(act_pipeline["checkpoint"], data, "val")}
    got, truth = lerobot_first_actions(act_pipeline["pretrained"], data, val)
    want = float(np.abs(got.astype(np.float64) - truth).mean())

    out = tmp_path / "validation.json"
    result = CliRunner().invoke(main, ["validate", str(act_pipeline["artifact"].parent), "--episodes", str(data),
                                       "-o", str(out), "--batch", "1,2"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["results"]
    assert row["task"]["reference_mae"] == pytest.approx(want, abs=1e-6)
    assert row["task"]["mae"] == pytest.approx(want, abs=1e-5)  # ORT fp32: the same actions
    assert len(row["task"]["per_episode_mae"]) == len(val)

    result = CliRunner().invoke(main, ["quantize", str(act_pipeline["artifact"]), "--mode", "static", "--calib",
                                       str(data), "--calib-frames", "4", "--episodes", str(data),
                                       "-o", str(tmp_path / "q")])
    assert result.exit_code in (0, 3), result.output  # 3: INT8 missed a budget; the gate still ran on the dataset
    manifest = json.loads((tmp_path / "q" / "model.int8-static.onnx.json").read_text())
    assert manifest["metrics"]["task"]["reference_mae"] == pytest.approx(want, abs=1e-6)
    assert manifest["metrics"]["task"]["frames"] == len(truth)
