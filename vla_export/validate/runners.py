"""One runner interface for every backend (after Polygraphy's runners).

A runner is built cheaply, `activate()`d (loads the artifact: session, engine, package), then called with numpy
feeds named as in the IO spec. Validation and profiling see every artifact only through this interface.

Timing lives here too, because only the runner knows how its device must be synchronised: `time_prepared` stages
inputs on the device once, warms up, then times each call with CUDA events (GPU) or `perf_counter` around a
synchronous call (CPU). Never host time around asynchronous GPU work: that was the original report's 0.375 ms.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vla_export.errors import UserError
from vla_export.io_spec import IOSpec


class Runner:
    """Base runner. Subclasses implement `_activate`, `prepare`, `run_prepared`, `to_numpy`."""

    backend = "base"

    def __init__(self, name: str, spec: IOSpec, device: str = "cpu", precision: str = "fp32"):
        self.name = name
        self.spec = spec
        self.device = device
        self.precision = precision
        self.active = False
        self.load_time_s: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self.active:
            t0 = time.perf_counter()
            self._activate()
            self.load_time_s = time.perf_counter() - t0
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass

    # -- inference ---------------------------------------------------------------------------------------------
    def prepare(self, feeds: dict[str, np.ndarray]) -> Any:
        """Backend-native inputs (device tensors, OrtValues); staged once before timing."""
        return feeds

    def run_prepared(self, prepared: Any) -> Any:
        raise NotImplementedError

    def to_numpy(self, outputs: Any) -> dict[str, np.ndarray]:
        return outputs

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on CPU)."""

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            raise RuntimeError(f"runner {self.name} used before activate()")
        try:
            self.spec.check_feeds(feeds)
        except ValueError as e:
            raise UserError(f"{self.name}: inputs do not match the IO spec: {e}") from e
        return {k: np.array(v, copy=True) for k, v in self.to_numpy(self.run_prepared(self.prepare(feeds))).items()}

    def time_prepared(self, feeds: dict[str, np.ndarray], warmup: int, iters: int) -> list[float]:
        """Milliseconds per call after `warmup` calls. CPU default: synchronous call timed with perf_counter."""
        prepared = self.prepare(feeds)
        for _ in range(warmup):
            self.run_prepared(prepared)
        self.synchronize()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.run_prepared(prepared)
            self.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "device": self.device, "precision": self.precision}


def cuda_event_times(run, warmup: int, iters: int) -> list[float]:
    """Per-call milliseconds of `run()` on the current CUDA stream, measured with CUDA events after warm-up."""
    import torch

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


# -- PyTorch (eager and AOTInductor) -------------------------------------------------------------------------------
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


# -- ONNX Runtime ------------------------------------------------------------------------------------------------------
ORT_PROVIDER_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
                       "TensorrtExecutionProvider": "cuda"}


def available_ort_providers() -> list[str]:
    import onnxruntime as ort

    return [p for p in ort.get_available_providers() if p in ORT_PROVIDER_DEVICE]


class OrtRunner(Runner):
    """An ONNX file in ONNX Runtime with one execution provider."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, spec: IOSpec, name: str | None = None,
                 provider: str = "CPUExecutionProvider", precision: str = "fp32", threads: int | None = None):
        path = Path(path)
        super().__init__(name or path.name, spec, ORT_PROVIDER_DEVICE.get(provider, "cpu"), precision)
        self.path = path
        self.provider = provider
        self.threads = threads

    def _activate(self):
        import onnxruntime as ort

        if not self.path.exists():
            raise UserError(f"ONNX file {self.path} does not exist")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        try:
            # By path, so ORT finds external data (.onnx.data) beside the model.
            self.session = ort.InferenceSession(str(self.path), opts, providers=[self.provider])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types with long messages
            raise UserError(f"ONNX Runtime cannot load {self.path}: {str(e).splitlines()[0][:300]}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = {i.name for i in self.session.get_inputs()}

    def _deactivate(self):
        self.session = None

    def run_prepared(self, prepared):
        feeds = {k: v for k, v in prepared.items() if k in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))

    def to_numpy(self, outputs):
        return {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype == np.float16 else np.asarray(v)
                for k, v in outputs.items()}

    def describe(self):
        return super().describe() | {"provider": self.provider,
                                     "threads": self.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or None}


# -- from an artifact's manifest ----------------------------------------------------------------------------------------
def open_runner(artifact: str | os.PathLike, device: str | None = None, provider: str | None = None) -> Runner:
    """The runner for an artifact, chosen by its manifest's `backend` (not activated).

    Manifest fields every stage writes: `backend` (onnxruntime | tensorrt | aoti), `precision`, `io_spec`."""
    from vla_export.manifest import read_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    spec = IOSpec.from_json(manifest["io_spec"])
    backend, precision = manifest.get("backend"), manifest.get("precision", "fp32")
    if backend == "onnxruntime":
        return OrtRunner(artifact, spec, provider=provider or "CPUExecutionProvider", precision=precision)
    if backend == "tensorrt":
        from vla_export.engines.tensorrt import TensorRTRunner

        return TensorRTRunner(artifact, spec, manifest=manifest)
    if backend == "aoti":
        from vla_export.engines.aoti import AotiRunner

        return AotiRunner(artifact, spec, device=device or manifest.get("device", "cpu"), precision=precision)
    raise UserError(f"{artifact}: manifest names unknown backend {backend!r}; rebuild the artifact")
