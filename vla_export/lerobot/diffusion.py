"""LeRobot Diffusion Policy (`lerobot.policies.diffusion`) as the architecture `lerobot-diffusion`.

Model config: `{"lerobot": <LeRobot's config.json>, "action_dim": A, "sampler": {"type": "DDIM", "steps": N}}`.
The exported graph is `DiffusionModel.generate_actions` with a fixed-step DDIM sampler unrolled and its initial noise
as an input: normalised `observation_state` [B, n_obs_steps, S], the cameras stacked as `observation_images`
[B, n_obs_steps, n_cam, 3, H, W] and `noise` [B, horizon, A] in, the normalised actions [B, n_action_steps, A] out.

Why it traces: diffusers' schedulers are not traceable as LeRobot drives them (`int(t)` of a timestep tensor inside
the graph is a data-dependent guard torch.export refuses), so the timesteps are read once, as Python ints, when the
module is built; the loop over them is unrolled and diffusers' own `DDIMScheduler.step` then indexes
`alphas_cumprod` with constants. DDIM (eta 0) is deterministic given the initial noise, so the graph equals LeRobot's
`generate_actions(noise=...)`. DDPM is refused: its `DDPMScheduler.step` draws fresh noise at every step but the last
(`randn_tensor` from torch's global generator, no argument to pass it in, unlike DDIM's `variance_noise`), so the
export would need a re-implementation of that step with [steps - 1] noise inputs, and a DDPM policy samples
`num_train_timesteps` (100 by default) steps: 100 unrolled U-Nets per graph.
The image size is static, as for ACT (the crop/resize LeRobot applies is inside the graph, at the config's sizes).
Observation history (`n_obs_steps`), normalisation, the noise, the action queue and unnormalisation are the
processor's (`vla_export.lerobot.processor`), as they are LeRobot's processor pipelines and `select_action`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vla_export.errors import UserError
from vla_export.io_spec import Dim, IOSpec, TensorSpec
from vla_export.lerobot.features import policy_features, random_observation
from vla_export.models import Architecture

ARCH_NAME = "lerobot-diffusion"
STATE_KEY, ACTION_KEY, IMAGES_KEY = "observation.state", "action", "observation.images"
NOISE_KEY = "noise"
MAX_BATCH = 8


def _features(lr: dict[str, Any]) -> tuple[list[str], tuple[int, ...], int, int]:
    """(camera keys, image shape CHW, state width, action width) from a LeRobot Diffusion Policy config dict."""
    return policy_features(lr, "Diffusion Policy")


def sampler_settings(lr: dict[str, Any]) -> dict[str, Any]:
    """{"type": "DDIM", "steps": N}: the sampler the graph unrolls, as LeRobot's DiffusionModel picks it."""
    kind = lr.get("noise_scheduler_type", "DDPM")
    if kind != "DDIM":
        raise UserError(f"Diffusion Policy with noise_scheduler_type {kind!r} is not exported (DDPM draws new noise "
                        "inside every step; see docs/lerobot.md); set \"noise_scheduler_type\": \"DDIM\" and "
                        "\"num_inference_steps\" in config.json to sample the same trained network with DDIM")
    steps = lr.get("num_inference_steps") or lr.get("num_train_timesteps", 100)
    return {"type": "DDIM", "steps": int(steps)}


def resolve_config(preset: str | None, overrides: dict | None) -> dict[str, Any]:
    cfg = dict(overrides or {})
    if "lerobot" not in cfg:
        raise UserError("lerobot-diffusion needs the LeRobot policy config: use vla-export checkpoint --from-lerobot "
                        "DIR")
    cfg["action_dim"] = _features(cfg["lerobot"])[3]
    cfg["sampler"] = sampler_settings(cfg["lerobot"])
    return cfg


def io_spec(cfg: dict[str, Any]) -> IOSpec:
    lr = cfg["lerobot"]
    cams, (c, h, w), state_dim, action_dim = _features(lr)
    n_obs, horizon, n_act = int(lr["n_obs_steps"]), int(lr["horizon"]), int(lr["n_action_steps"])
    steps = sampler_settings(lr)["steps"]
    why = "the image encoder's crop/resize sizes are the config's; the processor resizes frames to this size"
    return IOSpec(
        inputs=[TensorSpec("observation_state", "float32", ("batch", n_obs, state_dim),
                           f"normalised observation.state, the last {n_obs} steps (oldest first)"),
                TensorSpec("observation_images", "float32", ("batch", n_obs, len(cams), c, "height", "width"),
                           f"normalised cameras {cams}, stacked, the last {n_obs} steps (oldest first)"),
                TensorSpec(NOISE_KEY, "float32", ("batch", horizon, action_dim),
                           "the DDIM sampler's initial noise, standard normal")],
        outputs=[TensorSpec("actions", "float32", ("batch", n_act, action_dim),
                            f"normalised actions, {steps} DDIM steps, horizon steps {n_obs - 1}..{n_obs - 2 + n_act}")],
        dims={"batch": Dim("batch", 1, 1, MAX_BATCH),
              "height": Dim("height", h, h, h, dynamic=False, reason=why),
              "width": Dim("width", w, w, w, dynamic=False, reason=why)},
    )


class DiffusionSampler(nn.Module):
    """`DiffusionModel.generate_actions(batch, noise)` with the DDIM loop unrolled over constant timesteps; its state
    dict keys are the LeRobot file's (`diffusion.*`). Every step's arithmetic is diffusers' `DDIMScheduler.step`."""

    def __init__(self, policy):
        super().__init__()
        self.diffusion = policy.diffusion
        scheduler = self.diffusion.noise_scheduler
        scheduler.set_timesteps(self.diffusion.num_inference_steps)
        # Python ints, read here and not in forward: a timestep tensor turned into an index inside the traced graph
        # is a data-dependent guard torch.export refuses
        self.timesteps = [int(t) for t in scheduler.timesteps]
        n_obs = policy.config.n_obs_steps
        self.start, self.end = n_obs - 1, n_obs - 1 + policy.config.n_action_steps

    def forward(self, observation_state, observation_images, noise):
        cond = self.diffusion._prepare_global_conditioning({STATE_KEY: observation_state,
                                                            IMAGES_KEY: observation_images})
        sample = noise
        scheduler = self.diffusion.noise_scheduler
        for t in self.timesteps:
            eps = self.diffusion.unet(sample, torch.full(sample.shape[:1], t, dtype=torch.long), global_cond=cond)
            sample = scheduler.step(eps, t, sample).prev_sample
        return sample[:, self.start:self.end]


def build(cfg: dict[str, Any]) -> tuple[nn.Module, IOSpec]:
    from vla_export.lerobot import build_lerobot_policy

    sampler_settings(cfg["lerobot"])  # refuses DDPM before LeRobot builds anything
    policy = build_lerobot_policy(cfg["lerobot"])
    if policy.config.type != "diffusion":
        raise UserError(f"lerobot-diffusion got a {policy.config.type!r} policy config")
    return DiffusionSampler(policy).eval(), io_spec(cfg)


def processor_steps(cfg: dict[str, Any]):
    """Observation schema plus the steps around normalisation: frames -> float CHW at the config's size; then the
    cameras stacked ([B, n_cam, 3, H, W], LeRobot's `torch.stack(..., dim=-4)`), the observation history of
    `n_obs_steps` (LeRobot's queues, after stacking as in `select_action`), the sampler's noise, the IO-spec names."""
    from vla_export.processors.steps import ImageStep, NoiseStep, ObservationHistoryStep, RenameStep, StackStep

    lr = cfg["lerobot"]
    cams, (_, h, w), state_dim, action_dim = _features(lr)
    observation = {k: {"type": "image", "shape": [3, h, w]} for k in cams}
    observation[STATE_KEY] = {"type": "state", "shape": [state_dim]}
    before = [ImageStep(cams, size=[h, w])]
    after = [StackStep(cams, out=IMAGES_KEY),
             ObservationHistoryStep([STATE_KEY, IMAGES_KEY], n_obs_steps=int(lr["n_obs_steps"])),
             NoiseStep(NOISE_KEY, shape=[int(lr["horizon"]), action_dim], seed=0),
             RenameStep({STATE_KEY: "observation_state", IMAGES_KEY: "observation_images", NOISE_KEY: NOISE_KEY})]
    return observation, before, after


def chunk_step(cfg: dict[str, Any]):
    """The graph already returns only the `n_action_steps` actions LeRobot executes: queue them all."""
    from vla_export.processors import ActionChunkStep

    n_act = int(cfg["lerobot"]["n_action_steps"])
    return ActionChunkStep(ACTION_KEY, chunk_size=n_act, n_action_steps=n_act)


def noise_step(processor):
    """The processor's `noise` step: `noise_step(policy.processor).give(noise)` sets the next model call's noise."""
    from vla_export.processors.steps import NoiseStep

    for step in processor.preprocessor:
        if isinstance(step, NoiseStep):
            return step
    raise UserError("this processor has no noise step; it is not a Diffusion Policy's")


def example_observation(cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """A random camera frame per camera (uint8 HxWx3) and a state vector: what a robot gives `Policy.act`."""
    return random_observation(cfg["lerobot"], "Diffusion Policy", seed)


ARCHITECTURE = Architecture(name=ARCH_NAME, build=build, resolve_config=resolve_config, spec=io_spec)
