"""The targets file: which devices a bundle goes to, how Ray finds them, and what to do there.

YAML or JSON (by suffix; `.yaml`/`.yml` need PyYAML, which Ray itself depends on):

    targets:
      workstation:                      # a name of your choosing: one section of fleet.md
        resource: target:rtx-a5000      # the custom resource its Ray node advertises (ray start --resources)
        trt: {precision: int8}          # optional; default fp16, as `vla-export trt`
      jetson:
        resource: target:orin-nx
        aoti: {device: cuda, dtype: fp16}   # from the bundle's weights (bundle --with-weights), or
                                                # checkpoint: DIR here, shipped to the target
      robot-pc: target:avx2             # shorthand: only the resource, every step with its defaults

Per target, `steps` (default all of them, in this order) picks from trt, aoti, verify, profile; `profile`
({warmup, iters, batches}) takes its stage's settings. A step that
does not apply there (no TensorRT or GPU, no ONNX TensorRT can build from, no weights for AOTInductor) is reported
as skipped with its reason; it does not fail the target. `verify` takes `vla-export verify`'s settings (`rate_hz`,
`backend`, `tol`, `tol_fp16`, `tol_int8`, `warmup`, `iters`); its budgets default to the bundle's own.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vla_export.errors import UserError

STEPS = ("trt", "aoti", "verify", "profile")
SETTING_KEYS = {"trt": {"precision", "workspace_gb"},
                "aoti": {"checkpoint", "device", "dtype"},
                "verify": {"rate_hz", "backend", "tol", "tol_fp16", "tol_int8", "warmup", "iters"},
                "profile": {"warmup", "iters", "batches"}}
DEFAULT_PROFILE = {"warmup": 10, "iters": 50, "batches": [1]}
DEFAULT_VERIFY = {"rate_hz": 10.0, "backend": "auto"}


@dataclass
class Target:
    name: str
    resource: str
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    trt: dict[str, Any] = field(default_factory=dict)
    aoti: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_VERIFY))
    profile: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PROFILE))

    def settings(self) -> dict[str, Any]:
        """Everything that shapes this target's results (part of its work key). The AOTI checkpoint enters by
        content (its sha256, added by the caller), not by its path on this machine."""
        s = asdict(self)
        s.pop("resource")  # where Ray finds it, not what is done there
        s["aoti"] = {k: v for k, v in s["aoti"].items() if k != "checkpoint"}
        return s


def _load(path: Path) -> Any:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise UserError(f"{path} is YAML, which needs PyYAML (pip install pyyaml); or write it as JSON") from e
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix it") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix it, or name it .yaml for YAML") from e


def _settings(path: Path, name: str, step: str, value: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return dict(defaults)
    if not isinstance(value, dict):
        raise UserError(f"{path}: targets.{name}.{step} must be a mapping like {{{', '.join(SETTING_KEYS[step])}}}")
    unknown = sorted(set(value) - SETTING_KEYS[step])
    if unknown:
        raise UserError(f"{path}: targets.{name}.{step} has unknown key {unknown[0]!r}; known: "
                        f"{', '.join(sorted(SETTING_KEYS[step]))}")
    return dict(defaults) | value


def parse_targets(data: Any, path: str | os.PathLike = "targets") -> list[Target]:
    """Targets from the file's content; UserError (exit 2) naming the first wrong entry."""
    path = Path(path)
    if not isinstance(data, dict) or not isinstance(data.get("targets"), dict) or not data["targets"]:
        raise UserError(f"{path} needs a non-empty `targets:` mapping of name -> {{resource: ...}} (see "
                        "`vla-export fleet --help`)")
    out = []
    for name, entry in data["targets"].items():
        name = str(name)
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"{path}: target name {name!r} must be a plain name (it names a report section)")
        if isinstance(entry, str):
            entry = {"resource": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), str) or not entry["resource"]:
            raise UserError(f"{path}: targets.{name} needs `resource: NAME`, the custom resource its Ray node "
                            "advertises (ray start --resources '{\"NAME\": 1}')")
        unknown = sorted(set(entry) - {"resource", "steps", *STEPS})
        if unknown:
            raise UserError(f"{path}: targets.{name} has unknown key {unknown[0]!r}; known: resource, steps, "
                            f"{', '.join(STEPS)}")
        steps = entry.get("steps", list(STEPS))
        if not isinstance(steps, list) or not steps or any(s not in STEPS for s in steps):
            raise UserError(f"{path}: targets.{name}.steps must be a list drawn from {', '.join(STEPS)}, got "
                            f"{steps!r}")
        profile = _settings(path, name, "profile", entry.get("profile"), DEFAULT_PROFILE)
        batches = profile.get("batches")
        if not isinstance(batches, list) or not batches or not all(isinstance(b, int) and b >= 1 for b in batches):
            raise UserError(f"{path}: targets.{name}.profile.batches must be a list of positive integers")
        if int(profile["iters"]) < 2 or int(profile["warmup"]) < 0:
            raise UserError(f"{path}: targets.{name}.profile needs iters >= 2 and warmup >= 0")
        verify = _settings(path, name, "verify", entry.get("verify"), DEFAULT_VERIFY)
        if float(verify["rate_hz"]) <= 0:
            raise UserError(f"{path}: targets.{name}.verify.rate_hz must be > 0")
        out.append(Target(name=name, resource=entry["resource"], steps=[s for s in STEPS if s in steps],
                          trt=_settings(path, name, "trt", entry.get("trt"), {}),
                          aoti=_settings(path, name, "aoti", entry.get("aoti"), {}),
                          verify=verify, profile=profile))
    return out


def load_targets(path: str | os.PathLike) -> list[Target]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"targets file {path} does not exist; write one (YAML or JSON, see `vla-export fleet --help`)")
    targets = parse_targets(_load(path), path)
    for t in targets:  # a relative checkpoint path is relative to the targets file, as a reader expects
        ckpt = t.aoti.get("checkpoint")
        if ckpt and not Path(ckpt).is_absolute():
            t.aoti["checkpoint"] = str((path.parent / ckpt).resolve())
    return targets
