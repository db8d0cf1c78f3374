"""PyTorch runners: eager modules (the fp32 reference) and AOTInductor `.pt2` packages, both called with torch
tensors as keyword inputs named as in the IO spec."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vla_export.errors import BackendUnavailable, UserError
from vla_export.io_spec import IOSpec
from vla_export.runtime.base import Runner, cuda_event_times

DEVICES = ("cpu", "cuda")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def to_device_feeds(feeds: dict[str, np.ndarray], device: str, dtype) -> dict[str, Any]:
    """numpy feeds -> torch tensors on `device`, floating ones cast to the model's dtype."""
    import torch

    out = {}
    for k, v in feeds.items():
        t = torch.from_numpy(np.ascontiguousarray(v)).to(device)
        out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def outputs_as_dict(out: Any, output_names: list[str]) -> dict[str, Any]:
    """A module's tensor / tuple / dict result keyed by the IO spec's output names."""
    if isinstance(out, dict):
        return out
    if not isinstance(out, (tuple, list)):
        out = (out,)
    if len(out) != len(output_names):
        raise UserError(f"the model returned {len(out)} outputs but its IO spec names {len(output_names)} "
                        f"({output_names}); the artifact does not match the spec")
    return dict(zip(output_names, out, strict=True))


class TorchCallableRunner(Runner):
    """Something called with torch tensors as keyword inputs: eager modules and AOTInductor packages.

    Subclasses set `self.fn` in `_activate`. CUDA rows are timed with CUDA events, CPU rows synchronously."""

    def _activate_torch(self):
        import torch

        self.torch = torch
        self.dtype = getattr(torch, TORCH_DTYPES[self.precision])

    def prepare(self, feeds):
        return to_device_feeds({n: feeds[n] for n in self.spec.input_names if n in feeds}, self.device, self.dtype)

    def run_prepared(self, prepared):
        with self.torch.inference_mode():
            return outputs_as_dict(self.fn(**prepared), self.spec.output_names)

    def to_numpy(self, outputs):
        return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
                for k, v in outputs.items()}

    def synchronize(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def time_prepared(self, feeds, warmup, iters):
        if self.device.startswith("cuda"):
            prepared = self.prepare(feeds)
            return cuda_event_times(lambda: self.run_prepared(prepared), warmup, iters)
        return super().time_prepared(feeds, warmup, iters)


class TorchRunner(TorchCallableRunner):
    """Eager PyTorch: the reference (fp32 on CPU) and the eager baseline in benchmarks."""

    backend = "torch"

    def __init__(self, model, spec: IOSpec, name: str = "torch-eager", device: str = "cpu", precision: str = "fp32"):
        super().__init__(name, spec, device, precision)
        self.model = model

    def _activate(self):
        self._activate_torch()
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()
        self.fn = self.model


def check_device(device: str) -> None:
    """BackendUnavailable (exit 4) for `cuda` on a machine without a CUDA GPU."""
    import torch

    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda needs a CUDA GPU and a CUDA build of PyTorch, and this machine has "
                                 "neither; compile with --device cpu here, or run this on the GPU machine")


def load_aoti_package(package: str | os.PathLike, weights: str | os.PathLike | None = None, device: str = "cpu"):
    """`torch._inductor.aoti_load_package`, then, for a package compiled without its weights, the weights from
    their safetensors file (tensors only: nothing is unpickled). Constants the package folds at load
    (`_FOLDED_CONST_*`, from `use_runtime_constant_folding`) are derived from these; every other one must be there."""
    import torch

    loaded = torch._inductor.aoti_load_package(str(package))
    if weights is None:
        return loaded
    from safetensors.torch import load_file

    tensors = load_file(str(weights), device=device)
    needed = [n for n in loaded.get_constant_fqns() if not n.startswith("_FOLDED_CONST_")]
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise UserError(f"{Path(weights).name} lacks {len(missing)} of the constants {Path(package).name} needs "
                        f"(e.g. {missing[0]!r}); the two files come from different compiles: rebuild with "
                        "`vla-export aoti --force`")
    loaded.load_constants({n: tensors[n] for n in needed}, check_full_update=False)
    return loaded


class AotiRunner(TorchCallableRunner):
    """An AOTInductor `.pt2` package, called with the spec's inputs as keyword arguments. `weights`: the safetensors
    file of a package compiled without its weights (`vla-export aoti` writes them beside it), else None."""

    backend = "aoti"

    def __init__(self, path: str | os.PathLike, spec: IOSpec, device: str = "cpu", precision: str = "fp32",
                 name: str | None = None, weights: str | os.PathLike | None = None):
        path = Path(path)
        super().__init__(name or path.name, spec, device, precision)
        self.path = path
        self.weights = Path(weights) if weights is not None else None

    def _activate(self):

        if not self.path.exists():
            raise UserError(f"AOTInductor package {self.path} does not exist; build it with `vla-export aoti`")
        check_device(self.device.split(":")[0])
        self._activate_torch()
        if self.weights is not None and not self.weights.exists():
            raise UserError(f"{self.path.name} was compiled without its weights and {self.weights.name} is not beside "
                            "it; copy both files (or rebuild with `vla-export aoti`)")
        try:
            self.package = self.fn = load_aoti_package(self.path, self.weights, self.device)
        except UserError:
            raise
        except Exception as e:  # torch raises RuntimeError with a C++ trace for a foreign/corrupt package
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load AOTInductor package {self.path.name} ({first}); packages are tied to the "
                            "torch version and device they were compiled for: rebuild with `vla-export aoti`") from e

    def _deactivate(self):
        self.package = None
