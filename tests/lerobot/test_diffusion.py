"""LeRobot Diffusion Policy through vla-export: a real pretrained_model folder (LeRobot's own save_pretrained of a small
Diffusion Policy with random weights and its processors) -> checkpoint --from-lerobot -> export (a fixed-step DDIM
sampler, noise as an input; parity gate) -> bundle -> Policy.act, equal to LeRobot's preprocessor + select_action +
postprocessor step for step given the same noise (observation history of n_obs_steps, action queue), the noise
Policy draws itself, and the bundle running with LeRobot unimportable.

The config is the smallest that is still a real Diffusion Policy (resnet18 image encoder with spatial softmax,
a two-level conditional U-Net, DDIM, clip_sample), so the export fits a unit test: its time is printed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.lerobot.policies import (
    assert_same_weights,
    import_export_bundle,
    load_with_processors,
    random_observations,
    save_with_processors,
)

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot", reason="needs LeRobot 0.4: scripts/lerobot_env.sh")

STATE_DIM, ACTION_DIM, IMAGE = 5, 4, (3, 48, 48)
N_OBS, HORIZON, N_ACTION, DDIM_STEPS = 2, 8, 3, 2
CAMS = ("observation.images.top",)


def save_pretrained_diffusion(out: Path, seed: int = 0, **overrides) -> Path:
    """A LeRobot pretrained_model folder written by LeRobot itself: config.json, model.safetensors, processors."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    settings = dict(n_obs_steps=N_OBS, horizon=HORIZON, n_action_steps=N_ACTION, crop_shape=(40, 40),
                    down_dims=(8, 16), kernel_size=3, n_groups=4, diffusion_step_embed_dim=8,
                    spatial_softmax_num_keypoints=4, noise_scheduler_type="DDIM", num_inference_steps=DDIM_STEPS)
    settings.update(overrides)
    cfg = DiffusionConfig(
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
                        **{k: PolicyFeature(FeatureType.VISUAL, IMAGE) for k in CAMS}},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        pretrained_backbone_weights=None, device="cpu", push_to_hub=False, **settings)
    torch.manual_seed(seed)
    policy = DiffusionPolicy(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    # Diffusion's default normalisation: MIN_MAX for state and action, MEAN_STD for cameras
    low_s, low_a = torch.randn(STATE_DIM, generator=g), torch.randn(ACTION_DIM, generator=g)
    stats = {"observation.state": {"min": low_s, "max": low_s + torch.rand(STATE_DIM, generator=g) + 0.5},
             "action": {"min": low_a, "max": low_a + torch.rand(ACTION_DIM, generator=g) + 0.5}}
    return save_with_processors(policy, cfg, stats, CAMS, g, out)


def observations(n: int, seed: int = 3) -> list[dict[str, np.ndarray]]:
    return random_observations(n, CAMS, IMAGE, STATE_DIM, seed)


def model_call_noise(n_steps: int, seed: int = 11) -> dict[int, np.ndarray]:
    """{control step: initial noise [1, horizon, action_dim]} for every step at which the model runs (the action
    queue is empty: steps 0, N_ACTION, 2 N_ACTION, ...)."""
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal((1, HORIZON, ACTION_DIM)).astype(np.float32) for i in range(0, n_steps, N_ACTION)}


def lerobot_actions(lerobot_policy, obs: list[dict[str, np.ndarray]], noise: dict[int, np.ndarray]) -> np.ndarray:
    """LeRobot's own loop from a new episode: preprocessor -> DiffusionPolicy.select_action(batch, noise=...) ->
    postprocessor, frames as its datasets give them (float CHW in [0, 1]); the noise is given at the steps at which
    the model runs."""
    policy, pre, post = lerobot_policy
    policy.reset()
    out = []
    for i, o in enumerate(obs):
        batch = {k: torch.from_numpy(o[k]).permute(2, 0, 1).float() / 255.0 for k in CAMS}
        batch["observation.state"] = torch.from_numpy(o["observation.state"])
        given = torch.from_numpy(noise[i]) if i in noise else None
        with torch.no_grad():
            out.append(post(policy.select_action(pre(batch), noise=given)).numpy()[0])
    return np.stack(out)


def policy_actions(policy, obs: list[dict[str, np.ndarray]], noise: dict[int, np.ndarray] | None) -> np.ndarray:
    """Policy.act step by step from a new episode; `noise` (when given) is handed to the processor's noise step
    before the steps at which the model runs, as LeRobot's select_action is given it."""
    from vla_export.lerobot.diffusion import noise_step

    policy.reset()
    out = []
    for i, o in enumerate(obs):
        if noise is not None and i in noise:
            assert not policy.processor.pending()  # the model runs at exactly these steps
            noise_step(policy.processor).give(noise[i])
        out.append(policy.act(o))
    return np.stack(out)


@pytest.fixture(scope="module")
def diffusion_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    start = time.perf_counter()
    paths = import_export_bundle(save_pretrained_diffusion(root / "pretrained_model"), root)
    print(f"\ndiffusion import + export ({DDIM_STEPS} DDIM steps, parity gate) + bundle: "
          f"{time.perf_counter() - start:.1f} s")
    return paths


@pytest.fixture(scope="module")
def lerobot_policy(diffusion_pipeline):
    """LeRobot's DiffusionPolicy and its processors, loaded from the pretrained_model folder by LeRobot."""
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    return load_with_processors(DiffusionPolicy, diffusion_pipeline["pretrained"])


@pytest.fixture(scope="module")
def bundle_policy(diffusion_pipeline):
    from vla_export.deploy import Policy

    with Policy.load(diffusion_pipeline["bundle"], backend="onnxruntime") as policy:
        yield policy


def test_checkpoint_holds_config_weights_and_processor_as_data(diffusion_pipeline):
    ckpt = diffusion_pipeline["checkpoint"]
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "processor.json", "processor.safetensors"} <= names
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architecture"] == "lerobot-diffusion"
    assert config["model_config"]["sampler"] == {"type": "DDIM", "steps": DDIM_STEPS}
    proc = json.loads((ckpt / "processor.json").read_text())
    assert [s["name"] for s in proc["preprocessor"]] == ["image", "normalize", "stack", "observation_history",
                                                          "noise", "rename"]
    assert proc["preprocessor"][3]["config"]["n_obs_steps"] == N_OBS
    assert proc["preprocessor"][4]["config"]["shape"] == [HORIZON, ACTION_DIM]
    assert [s["name"] for s in proc["postprocessor"]] == ["action_chunk", "unnormalize"]
    assert_same_weights(diffusion_pipeline["pretrained"], ckpt)


def test_exported_graph_takes_history_and_noise_and_passed_its_gate(diffusion_pipeline):
    manifest = json.loads(Path(str(diffusion_pipeline["artifact"]) + ".json").read_text())
    spec = manifest["io_spec"]
    shapes = {t["name"]: t["shape"] for t in spec["inputs"]}
    assert shapes == {"observation_state": ["batch", N_OBS, STATE_DIM],
                      "observation_images": ["batch", N_OBS, len(CAMS), 3, "height", "width"],
                      "noise": ["batch", HORIZON, ACTION_DIM]}
    assert [o["shape"] for o in spec["outputs"]] == [["batch", N_ACTION, ACTION_DIM]]
    assert manifest["status"] == "passed"


def test_policy_act_matches_lerobot_select_action_given_the_same_noise(lerobot_policy, bundle_policy):
    obs = observations(8)  # n_action_steps 3: the model runs at steps 0, 3, 6; the history sees all 8
    noise = model_call_noise(len(obs))
    want = lerobot_actions(lerobot_policy, obs, noise)
    got = policy_actions(bundle_policy, obs, noise)
    assert got.shape == (8, ACTION_DIM)
    print(f"\nPolicy.act vs LeRobot select_action, same noise: max abs {np.abs(got - want).max():.3g}")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # a new episode (policy_actions resets): history and queue dropped, the same inputs give the same actions
    np.testing.assert_allclose(policy_actions(bundle_policy, obs, noise), got, atol=1e-6, rtol=0)


def test_policy_draws_its_own_noise_from_a_seeded_generator(lerobot_policy, bundle_policy):
    """Without given noise the processor draws it (numpy PCG64, seed 0, re-seeded on reset): the same draws given to
    LeRobot give LeRobot's actions, so Policy feeds the noise it draws, one draw per model call."""
    obs = observations(7, seed=4)
    rng = np.random.default_rng(0)
    drawn = {i: rng.standard_normal((1, HORIZON, ACTION_DIM), dtype=np.float32) for i in range(0, 7, N_ACTION)}
    want = lerobot_actions(lerobot_policy, obs, drawn)
    got = policy_actions(bundle_policy, obs, None)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(policy_actions(bundle_policy, obs, None), got, atol=1e-6, rtol=0)


def test_bundle_runs_without_lerobot(diffusion_pipeline, bundle_policy):
    """Policy.load + act in a fresh interpreter in which `import lerobot` fails: the robot needs no LeRobot."""
    root = diffusion_pipeline["root"]
    obs = observations(5, seed=9)
    want = policy_actions(bundle_policy, obs, None)
    np.savez(root / "obs.npz", **{f"{i}|{k}": v for i, o in enumerate(obs) for k, v in o.items()})
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "lerobot" or name.startswith("lerobot."):
                    raise ImportError("lerobot is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from vla_export.deploy import Policy
        data = np.load({str(root / "obs.npz")!r})
        obs = [{{k.split("|")[1]: data[k] for k in data.files if k.startswith(f"{{i}}|")}} for i in range(5)]
        policy = Policy.load({str(diffusion_pipeline["bundle"])!r}, backend="onnxruntime")
        np.save({str(root / "got.npy")!r}, np.stack([policy.act(o) for o in obs]))
        assert not any(m == "lerobot" or m.startswith("lerobot.") for m in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[2], timeout=300)
    np.testing.assert_allclose(np.load(root / "got.npy"), want, atol=1e-6, rtol=0)


def test_ddpm_is_refused_with_the_way_out(diffusion_pipeline, tmp_path):
    """DDPM draws new noise inside every scheduler step; the import refuses it in one line naming the DDIM switch."""
    import shutil

    from click.testing import CliRunner

    from vla_export.cli import main

    ddpm = tmp_path / "pm"
    shutil.copytree(diffusion_pipeline["pretrained"], ddpm)
    config = json.loads((ddpm / "config.json").read_text())
    config["noise_scheduler_type"] = "DDPM"
    (ddpm / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["checkpoint", "--from-lerobot", str(ddpm), "-o", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "noise_scheduler_type 'DDPM' is not exported" in result.output and '"DDIM"' in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()
