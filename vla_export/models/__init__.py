"""Architectures: each maps a config to (torch module, IO spec). Later stages read only the spec.

Built in: `kosmos2-clip-hybrid`; `lerobot-act` (LeRobot's ACT, with the optional `lerobot` extra). A user
architecture plugs in as `--arch package.module:factory`, where `factory(config: dict) -> (torch.nn.Module,
vla_export.io_spec.IOSpec)` or `(module, spec, processor)`: a `vla_export.processors.Processor` that maps robot
observations to the spec's feeds and outputs to actions, saved as data into the checkpoint and the bundle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vla_export.errors import UserError
from vla_export.io_spec import IOSpec
from vla_export.models import kosmos2_clip


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[dict[str, Any]], tuple[nn.Module, IOSpec]]
    # preset + overrides -> full config; plug-ins without presets get their overrides as the config
    resolve_config: Callable[[str | None, dict | None], dict[str, Any]]
    # config -> spec without building weights (cheap); falls back to build() for plug-ins
    spec: Callable[[dict[str, Any]], IOSpec]
    # config -> the processor written into new checkpoints (None: the checkpoint declares none of its own)
    processor: Callable[[dict[str, Any]], Any] | None = None


BUILTIN = {
    kosmos2_clip.ARCH_NAME: Architecture(
        name=kosmos2_clip.ARCH_NAME,
        build=kosmos2_clip.build,
        resolve_config=lambda preset, overrides: kosmos2_clip.resolve_config(preset or "tiny", overrides),
        spec=kosmos2_clip.io_spec,
    )
}


def _lerobot_architectures() -> dict[str, Architecture]:
    from vla_export.lerobot import architectures

    return architectures()


def get_architecture(name: str) -> Architecture:
    """A built-in name, or `package.module:factory` for a user architecture."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith("lerobot-"):
        archs = _lerobot_architectures()
        if name not in archs:
            raise UserError(f"unknown architecture {name!r}: LeRobot policies here are {sorted(archs)}")
        return archs[name]
    if ":" not in name:
        raise UserError(f"unknown architecture {name!r}: use one of {sorted(BUILTIN)} or package.module:factory")
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load architecture factory {name!r}: {e}; check the module is importable") from e
    def build(cfg):
        made = factory(cfg)
        return made[0], made[1]

    def processor(cfg):
        made = factory(cfg)
        return made[2] if len(made) > 2 else None

    return Architecture(
        name=name,
        build=build,
        resolve_config=lambda preset, overrides: dict(overrides or {}, preset=preset),
        spec=lambda cfg: factory(cfg)[1],
        processor=processor,
    )


def build_model(arch: str, cfg: dict[str, Any]) -> tuple[nn.Module, IOSpec]:
    model, spec = get_architecture(arch).build(cfg)
    return model.eval(), spec
