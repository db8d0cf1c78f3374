"""The runner interface for every backend (after Polygraphy's runners).

A runner is built cheaply, `activate()`d (loads the artifact: session, engine, package), then called with numpy
feeds named as in the IO spec. Validation and profiling see every artifact only through this interface.

Timing lives here too, because only the runner knows how its device must be synchronised: `time_prepared` stages
inputs on the device once, warms up, then times each call with CUDA events (GPU) or `perf_counter` around a
synchronous call (CPU). Never host time around asynchronous GPU work: that was the original report's 0.375 ms.
"""

from __future__ import annotations

import time
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
