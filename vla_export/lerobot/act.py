"""LeRobot ACT (`lerobot.policies.act`) as the architecture `lerobot-act`.

Model config: `{"lerobot": <LeRobot's config.json>, "action_dim": A}`. The exported graph is `ACT.forward` in eval
mode, the network LeRobot's `predict_action_chunk` runs: normalised `observation_state` [B, S] and the cameras
stacked as `observation_images` [B, n_cam, 3, H, W] in, the normalised chunk `actions` [B, chunk_size, A] out. The
image size is static: an ACT graph exported with a dynamic image size was silently wrong at another size (0.146 max
error), so the spec fixes H and W at the config's and the processor resizes camera frames to them.
Normalisation, chunk execution (queue of `n_action_steps`, or temporal ensembling) and unnormalisation are the
processor's (`vla_export.lerobot.processor`), as they are LeRobot's processor pipelines and `select_action`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from vla_export.errors import UserError
from vla_export.io_spec import Dim, IOSpec, TensorSpec
from vla_export.lerobot.features import policy_features, random_observation
from vla_export.models import Architecture

ARCH_NAME = "lerobot-act"
STATE_KEY, ACTION_KEY, IMAGES_PREFIX = "observation.state", "action", "observation.images"
MAX_BATCH = 8


def _features(lr: dict[str, Any]) -> tuple[list[str], tuple[int, ...], int, int]:
    """(camera keys, image shape CHW, state width, action width) from a LeRobot ACT config dict."""
    return policy_features(lr, "ACT")


def resolve_config(preset: str | None, overrides: dict | None) -> dict[str, Any]:
    cfg = dict(overrides or {})
    if "lerobot" not in cfg:
        raise UserError("lerobot-act needs the LeRobot policy config: use vla-export checkpoint --from-lerobot DIR")
    cfg["action_dim"] = _features(cfg["lerobot"])[3]
    return cfg


def io_spec(cfg: dict[str, Any]) -> IOSpec:
    lr = cfg["lerobot"]
    cams, (c, h, w), state_dim, action_dim = _features(lr)
    chunk = int(lr["chunk_size"])
    why = "ACT exported with a dynamic image size is wrong at other sizes; the processor resizes to this size"
    return IOSpec(
        inputs=[TensorSpec("observation_state", "float32", ("batch", state_dim), "normalised observation.state"),
                TensorSpec("observation_images", "float32", ("batch", len(cams), c, "height", "width"),
                           f"normalised cameras {cams}, stacked")],
        outputs=[TensorSpec("actions", "float32", ("batch", chunk, action_dim), "normalised action chunk")],
        dims={"batch": Dim("batch", 1, 1, MAX_BATCH),
              "height": Dim("height", h, h, h, dynamic=False, reason=why),
              "width": Dim("width", w, w, w, dynamic=False, reason=why)},
    )


class ACTChunk(nn.Module):
    """`ACTPolicy.model` with named tensor inputs; its state dict keys are the LeRobot file's (`model.*`)."""

    def __init__(self, policy):
        super().__init__()
        self.model = policy.model

    def forward(self, observation_state, observation_images):
        batch = {STATE_KEY: observation_state, IMAGES_PREFIX: list(observation_images.unbind(1))}
        return self.model(batch)[0]


def build(cfg: dict[str, Any]) -> tuple[nn.Module, IOSpec]:
    from vla_export.lerobot import build_lerobot_policy

    policy = build_lerobot_policy(cfg["lerobot"])
    if policy.config.type != "act":
        raise UserError(f"lerobot-act got a {policy.config.type!r} policy config")
    return ACTChunk(policy).eval(), io_spec(cfg)


def processor_steps(cfg: dict[str, Any]):
    """Observation schema plus the steps around the graph: frames -> float CHW at the config's size, stack."""
    from vla_export.processors import ImageStep, RenameStep, StackStep

    lr = cfg["lerobot"]
    cams, (_, h, w), state_dim, _ = _features(lr)
    observation = {k: {"type": "image", "shape": [3, h, w]} for k in cams}
    observation[STATE_KEY] = {"type": "state", "shape": [state_dim]}
    before = [ImageStep(cams, size=[h, w])]
    after = [StackStep(cams, out="observation_images"),
             RenameStep({STATE_KEY: "observation_state", "observation_images": "observation_images"})]
    return observation, before, after


def chunk_step(cfg: dict[str, Any]):
    from vla_export.processors import ActionChunkStep

    lr = cfg["lerobot"]
    return ActionChunkStep(ACTION_KEY, chunk_size=int(lr["chunk_size"]), n_action_steps=int(lr["n_action_steps"]),
                           temporal_ensemble_coeff=lr.get("temporal_ensemble_coeff"))


def example_observation(cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """A random camera frame per camera (uint8 HxWx3) and a state vector: what a robot gives `Policy.act`."""
    return random_observation(cfg["lerobot"], "ACT", seed)


ARCHITECTURE = Architecture(name=ARCH_NAME, build=build, resolve_config=resolve_config, spec=io_spec)
