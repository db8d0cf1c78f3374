"""Checkpoints: the native directory format and the original training scripts' `.pth` files.

Native: a directory with `config.json` and `model.safetensors` (plus tokenizer files the preprocessing names).
`config.json` holds the architecture, preset, overrides and resolved model config, action names and units, the
preprocessing (image size/mean/std, tokenizer files) and training metrics. Save/load round-trips bit-exactly.

Legacy: a `.pth` dict `{epoch, model_state_dict, optimizer_state_dict, val_mae, args}` (or `state_dict`/`model`
keys, or a bare state dict). Loaded with `torch.load(weights_only=True)`, allowing only `argparse.Namespace`
(which those files pickle under `args`); anything else needs `trust=True` (`--trust-checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_export.errors import UserError
from vla_export.io_spec import IOSpec
from vla_export.manifest import sha256_files, staging_dir
from vla_export.models import get_architecture

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_FORMAT = "vla-export-checkpoint"
LEGACY_STATE_KEYS = ("model_state_dict", "state_dict", "model")

DEFAULT_PREPROCESSING = {
    "image_size": 224,
    # CLIP's normalisation, which both towers of the reference model were trained with.
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "kosmos_tokenizer": "kosmos_tokenizer.json",
    "clip_tokenizer": "clip_tokenizer.json",
}


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]  # the whole config.json
    model: nn.Module
    spec: IOSpec
    sha256: str

    @property
    def arch(self) -> str:
        return self.config["architecture"]

    @property
    def model_config(self) -> dict[str, Any]:
        return self.config["model_config"]

    @property
    def action_names(self) -> list[str]:
        return self.config["action_names"]


def make_config(arch: str, preset: str | None, overrides: dict | None, action_names: list[str] | None = None,
                action_units: list[str] | None = None, preprocessing: dict | None = None,
                training: dict | None = None) -> dict[str, Any]:
    model_config = get_architecture(arch).resolve_config(preset, overrides)
    n = int(model_config.get("action_dim", 2))
    names = list(action_names or ["linear_x", "linear_y", "angular_z"][:n] + [f"a{i}" for i in range(3, n)])
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": 1,
        "architecture": arch,
        "preset": preset,
        "overrides": overrides or {},
        "model_config": model_config,
        "action_names": names,
        "action_units": list(action_units or ["m/s" if nm.startswith("linear") else "rad/s" if nm.startswith(
            "angular") else "" for nm in names]),
        "preprocessing": {**DEFAULT_PREPROCESSING, "image_size": int(model_config.get("image_size", 224)),
                          **(preprocessing or {})},
        "training": training or {},
    }


def checkpoint_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith("."))


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Digest of a checkpoint: every file of a directory, or the one `.pth` file."""
    path = Path(path)
    return sha256_files(checkpoint_files(path) if path.is_dir() else [path])


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, config: dict[str, Any],
                    extra_files: dict[str, str | os.PathLike] | None = None, processor: Any = None) -> Path:
    """Write a native checkpoint directory atomically (staged beside it, renamed when complete).

    `processor` (a `vla_export.processors.Processor`; default: the one the architecture declares, if any) is
    written beside the weights as processor.json + processor.safetensors + the files its steps name."""
    from safetensors.torch import save_file

    if processor is None:
        make_processor = get_architecture(config["architecture"]).processor
        processor = make_processor(config["model_config"]) if make_processor else None
    out_dir = Path(out_dir)
    with staging_dir(out_dir.parent if out_dir.parent != Path("") else Path(".")) as tmp:
        stage = tmp / out_dir.name
        stage.mkdir()
        # contiguous clones: safetensors refuses shared or non-contiguous storage (tied embeddings, views)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(stage / WEIGHTS_NAME), metadata={"format": "pt"})
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, stage / name)
        if processor is not None:
            processor.save(stage)
        (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for p in stage.iterdir():
            os.chmod(p, 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(stage, out_dir)
    return out_dir


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; create one with `vla-export checkpoint` or check the path")
    if not path.is_dir() or not cfg_path.exists():
        raise UserError(f"{path} is not a vla-export checkpoint directory (no {CONFIG_NAME}); "
                        "for a legacy .pth file pass the file itself with --preset/--arch")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path} is not valid JSON: {e}") from e
    if config.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{cfg_path} is not a vla-export checkpoint config (format={config.get('format')!r})")
    return config


def load_spec(path: str | os.PathLike) -> tuple[IOSpec, dict[str, Any]]:
    """The IO spec of a native checkpoint, without building or loading weights."""
    config = read_config(path)
    return get_architecture(config["architecture"]).spec(config["model_config"]), config


def _torch_file_kind(path: Path) -> str | None:
    """"zip" (torch.save's format since 1.6), "pickle" (the legacy format), or None: not something torch.save wrote."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; check the path") from None
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path} ({e.strerror})") from e
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode + protocol 2..5
        return "pickle"
    return None


def _legacy_state_dict(path: Path, trust: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if _torch_file_kind(path) is None:
        # Checked before torch.load, whose weights_only error would blame "objects other than tensors" for any file
        raise UserError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle); pass "
                        "the .pth/.pt file the training script saved, or a native checkpoint directory")
    try:
        if trust:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; check the path") from None
    except Exception as e:  # torch raises UnpicklingError/RuntimeError with multi-line text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path} pickles objects other than tensors and argparse.Namespace ({first[:160]}); "
                            "if you trust its source, pass --trust-checkpoint") from e
        raise UserError(f"{path} is not a PyTorch checkpoint ({first[:160]})") from e
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key in LEGACY_STATE_KEYS:
            if key in obj and isinstance(obj[key], dict):
                meta = {k: v for k, v in obj.items() if k not in ("model_state_dict", "state_dict", "model",
                                                                 "optimizer_state_dict")}
                obj = obj[key]
                break
    elif isinstance(obj, nn.Module) and trust:
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict (expected model_state_dict/state_dict/model keys or a bare "
                        "state dict of tensors)")
    if isinstance(meta.get("args"), argparse.Namespace):
        meta["args"] = vars(meta["args"])
    return obj, meta


def apply_renames(state: dict[str, torch.Tensor], rename: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Rename state-dict keys by prefix (`{"module.": "", "backbone.kosmos.": "kosmos."}`), longest prefix first."""
    if not rename:
        return state
    prefixes = sorted(rename, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                key = rename[p] + key[len(p):]
                break
        out[key] = value
    return out


def check_state_layout(own: dict[str, torch.Tensor], given: dict[str, tuple[int, ...]], source: Path) -> None:
    """One-line errors for missing/unexpected keys (count and first names) and the first shape mismatch."""
    # Non-persistent or derived buffers transformers recreates (e.g. position_ids) may be absent from old files.
    missing = [k for k in own if k not in given and not k.endswith("position_ids")]
    unexpected = [k for k in given if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        raise UserError(f"{source}: state dict does not match the architecture: {'; '.join(parts)}; "
                        "check --preset/--arch or map names with --rename OLD=NEW")
    for k, shape in given.items():
        if shape != tuple(own[k].shape):
            raise UserError(f"{source}: tensor {k} has shape {shape} but the architecture expects "
                            f"{tuple(own[k].shape)}; check --preset/overrides")


def check_and_load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with one-line errors: missing/unexpected keys, shape mismatches, NaN/Inf."""
    check_state_layout(model.state_dict(), {k: tuple(v.shape) for k, v in state.items()}, source)
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{source}: tensor {k} contains NaN or Inf; the checkpoint is corrupt or training diverged")
    model.load_state_dict(state, strict=False)


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False, arch: str | None = None,
                    preset: str | None = None, overrides: dict | None = None,
                    rename: dict[str, str] | None = None, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a native checkpoint directory, or a legacy `.pth` file (then `arch`/`preset`/`overrides` say what it is)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; create one with `vla-export checkpoint` or check the path")
    if path.is_dir():
        config = read_config(path)
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            raise UserError(f"checkpoint {path} has no {WEIGHTS_NAME}; the directory is incomplete")
        # Read straight into the built model's parameters, one tensor at a time: a whole state dict beside the
        # model would double peak memory (2 x 7.3 GB for the full preset).
        header = read_safetensors_header(weights)
        state = None
    else:
        state, meta = _legacy_state_dict(path, trust)
        state = apply_renames(state, rename)
        if (arch or "kosmos2-clip-hybrid") == "kosmos2-clip-hybrid":
            from vla_export.models.kosmos2_clip import legacy_overrides

            # the original scripts' files have no spatial branch and no normalisation buffers: build that layout
            overrides = legacy_overrides(state, overrides)
        config = make_config(arch or "kosmos2-clip-hybrid", preset or "full", overrides,
                             training={"legacy": {k: v for k, v in meta.items() if _jsonable(v)}})
    try:
        # Every weight is overwritten from the file next, so skip random init (46 s for the full preset).
        with _no_weight_init():
            model, spec = get_architecture(config["architecture"]).build(config["model_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot build architecture {config['architecture']!r} from its config: {e}") from e
    if state is None:
        load_safetensors_into(model, weights, header, path, rename)
    else:
        check_and_load_state(model, state, path)
    return Checkpoint(path=path, config=config, model=model.to(device).eval(), spec=spec,
                      sha256=checkpoint_sha256(path))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(weights: Path) -> dict[str, Any]:
    """`{name: {"dtype", "shape", "data_offsets"}, "__data_start__": int}` of a safetensors file, checked."""
    import struct

    try:
        size = weights.stat().st_size
        with open(weights, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            nbytes = math.prod(entry["shape"]) * torch.empty((), dtype=dtype).element_size()
            if end - start != nbytes or 8 + n + end > size:
                raise ValueError(f"tensor {name} has inconsistent offsets")
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({e})") from e
    header["__data_start__"] = 8 + n
    return header


@torch.no_grad()
def load_safetensors_into(model: nn.Module, weights: Path, header: dict[str, Any], source: Path,
                          rename: dict[str, str] | None = None) -> None:
    """`check_and_load_state(model, load_file(weights))` with one tensor in memory at a time: same checks, same
    errors, each tensor read from the file directly into its parameter."""
    base = header["__data_start__"]
    names = {new: old for new, old in apply_renames({k: k for k in header if k != "__data_start__"}, rename).items()}
    own = model.state_dict()
    check_state_layout(own, {k: tuple(header[old]["shape"]) for k, old in names.items()}, source)
    with open(weights, "rb") as f:
        for k, old in names.items():
            entry, dst = header[old], own[k]
            start, end = entry["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            target = dst if dst.dtype == dtype and dst.is_contiguous() else torch.empty(dst.shape, dtype=dtype)
            f.seek(base + start)
            if end > start and f.readinto(target.reshape(-1).view(torch.uint8).numpy()) != end - start:
                raise UserError(f"{weights} is truncated at tensor {old}; the checkpoint is incomplete")
            if target.is_floating_point() and not bool(torch.isfinite(target).all()):
                raise UserError(f"{source}: tensor {k} contains NaN or Inf; the checkpoint is corrupt or training "
                                "diverged")
            if target is not dst:
                dst.copy_(target)


def _no_weight_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return not (isinstance(v, float) and not math.isfinite(v))
    except TypeError:
        return False
