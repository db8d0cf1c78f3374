"""`vla-export checkpoint --from-lerobot DIR`: a LeRobot pretrained_model folder -> a native vla-export checkpoint."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vla_export.errors import UserError
from vla_export.manifest import read_json

POLICY_MODULES = {"act": "vla_export.lerobot.act", "diffusion": "vla_export.lerobot.diffusion",
                  "smolvla": "vla_export.lerobot.smolvla"}


def _arch_module(policy_type: str):
    import importlib

    if policy_type not in POLICY_MODULES:
        raise UserError(f"LeRobot policy type {policy_type!r} is not supported yet (supported: "
                        f"{', '.join(sorted(POLICY_MODULES))})")
    return importlib.import_module(POLICY_MODULES[policy_type])


def read_lerobot_config(src: Path) -> dict:
    path = src / "config.json"
    if not src.is_dir():
        raise UserError(f"--from-lerobot {src}: not a directory; pass a LeRobot pretrained_model folder")
    data = read_json(path, missing="pass a LeRobot pretrained_model folder (config.json, model.safetensors, "
                     "policy_preprocessor.json, policy_postprocessor.json)",
                     invalid="re-save the policy with LeRobot's save_pretrained")
    if not isinstance(data, dict) or "type" not in data:
        raise UserError(f"{path} is not a LeRobot policy config (no 'type')")
    return data


def import_lerobot(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Read config.json + model.safetensors + the processor pipelines of `src`, write a native checkpoint.

    The weights are read with safetensors into the network LeRobot builds from the config (strict: every tensor,
    its shape, no NaN); the processors are translated into vla-export steps (`vla_export.lerobot.processor`)."""
    from vla_export.lerobot.processor import processor_from_lerobot

    src = Path(src)
    lr = read_lerobot_config(src)
    module = _arch_module(lr["type"])
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{src} has no model.safetensors; a LeRobot pretrained_model folder holds the weights there")
    model_config = module.resolve_config(None, {"lerobot": lr})
    # a step's files (SmolVLA's tokenizer JSON) are written here and copied into the checkpoint with the processor
    with tempfile.TemporaryDirectory() as files_dir:
        processor = processor_from_lerobot(src, model_config, module, Path(files_dir))
        return _save(src, lr, module, model_config, processor, weights, out_dir)


def _save(src: Path, lr: dict, module, model_config: dict, processor, weights: Path, out_dir) -> Path:
    from vla_export.checkpoint import load_safetensors_into, make_config, read_safetensors_header, save_checkpoint
    from vla_export.models import get_architecture

    action_dim = processor.action_dim
    extra = {k: v for k, v in model_config.items() if k not in ("lerobot", "action_dim", "sampler")}
    config = make_config(module.ARCH_NAME, None, {"lerobot": lr, **extra},
                         action_names=[f"action_{i}" for i in range(action_dim)],
                         action_units=[""] * action_dim, preprocessing={"processor": "processor.json"},
                         training={"imported_from": str(src.resolve()), "lerobot_type": lr["type"]})
    config["preprocessing"] = {"processor": "processor.json"}  # the hybrid's image/tokenizer keys do not apply
    model, _ = get_architecture(module.ARCH_NAME).build(config["model_config"])
    load_safetensors_into(model, weights, read_safetensors_header(weights), src)
    return save_checkpoint(model.eval(), out_dir, config, processor=processor)
