"""LeRobot policies as vla-export architectures (optional extra: `pip install 'vla-export[lerobot]'`).

`vla-export checkpoint --from-lerobot DIR` reads a LeRobot `pretrained_model` folder (config.json, model.safetensors,
policy_preprocessor.json / policy_postprocessor.json + their safetensors stats; JSON and safetensors only, nothing
unpickled) and writes a native checkpoint: the LeRobot config as `model_config`, the weights, and the processors
translated into vla-export steps (`vla_export.processors`). LeRobot itself is imported only to build the network
(checkpoint, export); the exported artifact, the bundle and `Policy` run without it.

Architectures: `lerobot-act` (ACT: the action chunk [B, chunk, action_dim] is the output; chunk execution and
temporal ensembling run in the processor's `action_chunk` step, as `ACTPolicy.select_action` does),
`lerobot-diffusion` (Diffusion Policy: a fixed-step DDIM sampler with the initial noise as an input; the observation
history of `n_obs_steps`, the noise and the action queue run in the processor), `lerobot-smolvla` (SmolVLA: a
fixed-step flow-matching sampler with its noise as an input and the task prompt padded to a fixed length; the
tokenizer travels as a `tokenizers` JSON file in the processor).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from vla_export.errors import BackendUnavailable, UserError

LEROBOT_PIP = "pip install 'vla-export[lerobot]' (LeRobot 0.4; it pins torch<2.11: scripts/lerobot_env.sh)"


def require_lerobot():
    try:
        import lerobot
    except ImportError as e:
        raise BackendUnavailable(f"LeRobot is not installed ({e}); building a LeRobot policy needs it: "
                                 f"{LEROBOT_PIP}") from e
    return lerobot


def lerobot_config(config_json: dict[str, Any]):
    """LeRobot's own config object (`PreTrainedConfig` subclass chosen by `type`) from a config.json dict, parsed
    by LeRobot's loader from a local directory (no hub access), on the CPU, without pretrained backbone weights
    (every weight comes from the checkpoint)."""
    require_lerobot()
    # lerobot.policies imports every policy's config class, which registers its `type` with PreTrainedConfig's
    # parser; without it a fresh process (the CLI) cannot parse any policy type ("Couldn't find a choice class")
    import lerobot.policies  # noqa: F401
    from lerobot.configs.policies import PreTrainedConfig

    data = dict(config_json)
    data["device"] = "cpu"
    if "pretrained_backbone_weights" in data:
        data["pretrained_backbone_weights"] = None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(data))
        try:
            return PreTrainedConfig.from_pretrained(tmp)
        except Exception as e:  # draccus raises its own parsing errors
            raise UserError(f"LeRobot cannot parse this policy config ({str(e).splitlines()[0][:200]})") from e


def build_lerobot_policy(config_json: dict[str, Any]):
    """A LeRobot policy module (random weights) from its config.json dict."""
    cfg = lerobot_config(config_json)
    from lerobot.policies.factory import get_policy_class

    return get_policy_class(cfg.type)(cfg).eval()


def architectures() -> dict[str, Any]:
    from vla_export.lerobot import act, diffusion, smolvla

    return {act.ARCH_NAME: act.ARCHITECTURE, diffusion.ARCH_NAME: diffusion.ARCHITECTURE,
            smolvla.ARCH_NAME: smolvla.ARCHITECTURE}
