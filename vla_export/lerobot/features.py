"""What a LeRobot policy config says about its inputs and outputs, shared by every exported LeRobot family."""

from __future__ import annotations

from typing import Any

import numpy as np

from vla_export.errors import UserError

STATE_KEY, ACTION_KEY = "observation.state", "action"


def policy_features(lr: dict[str, Any], policy: str) -> tuple[list[str], tuple[int, ...], int, int]:
    """(camera keys, image shape CHW, state width, action width) from a LeRobot config dict; `policy` names the
    family in the one-line refusals (vla-export exports these policies with cameras and a state, as LeRobot runs
    them at inference)."""
    inputs = lr.get("input_features") or {}
    if "observation.environment_state" in inputs:
        raise UserError(f"{policy} with observation.environment_state is not supported by the export yet")
    cams = [k for k, f in inputs.items() if f["type"] == "VISUAL"]
    if not cams:
        raise UserError(f"this {policy} config has no camera (VISUAL) input; vla-export exports {policy} with images")
    shapes = {tuple(inputs[k]["shape"]) for k in cams}
    if len(shapes) > 1:
        raise UserError(f"{policy} cameras must share one shape, got {sorted(shapes)}")
    state = inputs.get(STATE_KEY)
    if state is None:
        raise UserError(f"this {policy} config has no observation.state input; LeRobot's {policy} needs it at "
                        "inference")
    action = (lr.get("output_features") or {}).get(ACTION_KEY)
    if action is None:
        raise UserError(f"this {policy} config has no 'action' output feature")
    return cams, shapes.pop(), int(state["shape"][0]), int(action["shape"][0])


def random_observation(lr: dict[str, Any], policy: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A random camera frame per camera (uint8 HxWx3) and a state vector: what a robot gives `Policy.act`."""
    cams, (_, h, w), state_dim, _ = policy_features(lr, policy)
    rng = np.random.default_rng(seed)
    obs = {k: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for k in cams}
    obs[STATE_KEY] = rng.standard_normal(state_dim).astype(np.float32)
    return obs
