"""TensorRT runner: a serialized engine run on the GPU it was built for, plus what loading one needs (the lazy
`tensorrt` import, the engine-vs-this-machine compatibility check, a logger that keeps errors). The engine
builder (`vla_export.engines.tensorrt`) sits above this module and uses the same pieces.

`tensorrt` is imported lazily: importing this module works on a machine without it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vla_export.errors import BackendUnavailable, UserError
from vla_export.io_spec import IOSpec
from vla_export.manifest import read_manifest
from vla_export.runtime.base import Runner, cuda_event_times

INSTALL_HINT = ("on the target device with a CUDA GPU run `pip install 'vla-export[trt]'` "
                "(TensorRT engines must be built on the device that runs them)")

# Names of TensorRT DataType members -> torch dtype names (NVIDIA demo/Diffusion engine.py). FP8/INT4/FP4 unmapped.
TRT2TORCH_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                   "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


# -- TensorRT availability -------------------------------------------------------------------------------------------
def import_tensorrt():
    """The `tensorrt` module, or BackendUnavailable naming what is missing (TensorRT, a CUDA GPU, or both)."""
    missing = []
    trt = None
    try:
        import tensorrt as trt  # noqa: F811
    except ImportError as e:
        missing.append(f"TensorRT is not installed ({e})")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if not has_cuda:
        missing.append("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)")
    if missing:
        raise BackendUnavailable(f"{' and '.join(missing)}: {INSTALL_HINT}")
    return trt


def trt_version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in str(version).split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return tuple(parts)


# -- engine compatibility (pure) -------------------------------------------------------------------------------------
def check_engine_compatible(sidecar: dict[str, Any], trt_version: str, gpu_name: str,
                            compute_capability: str) -> list[str]:
    """Raise UserError if the engine cannot load here (other TensorRT version or GPU architecture); return warnings.

    A plan runs only with the TensorRT version that built it and on the same compute capability; a same-CC
    different GPU model loads but TensorRT advises against it (a warning). Checked before deserializing, because
    `deserialize_cuda_engine` only returns None and logs the reason."""
    built = sidecar.get("tensorrt") or {}
    built_version = str(built.get("version") or "")
    built_gpu = built.get("gpu") or {}
    built_cc = str(built_gpu.get("compute_capability") or "")
    rebuild = f"rebuild it here with `vla-export trt {sidecar.get('source', {}).get('artifact') or 'model.onnx'} " \
              f"--precision {sidecar.get('precision', 'fp16')}`"
    name = sidecar.get("artifact", "engine")
    if not built_version or not built_cc:
        raise UserError(f"{name}: its sidecar does not record the TensorRT version and GPU it was built with; {rebuild}")
    version_compatible = bool(built.get("version_compatible"))
    have, want = trt_version_tuple(trt_version), trt_version_tuple(built_version)
    if version_compatible:
        if have[0] < want[0] or (have[0] == want[0] and have < want):
            raise UserError(f"{name} was built (version-compatible) with TensorRT {built_version}; this TensorRT "
                            f"{trt_version} is older and cannot load it; {rebuild}")
    elif have[:3] != want[:3]:
        raise UserError(f"{name} was built with TensorRT {built_version} but this is TensorRT {trt_version}; "
                        f"engines do not move between TensorRT versions: {rebuild}")
    if built_cc != str(compute_capability) and not built.get("hardware_compatibility_level"):
        raise UserError(f"{name} was built for compute capability {built_cc} ({built_gpu.get('name')}) but this GPU "
                        f"({gpu_name}) is {compute_capability}; engines do not move between GPU architectures: {rebuild}")
    warnings = []
    if built_gpu.get("name") and built_gpu.get("name") != gpu_name:
        warnings.append(f"{name} was built on {built_gpu.get('name')} and runs on {gpu_name} (same compute capability "
                        f"{compute_capability}); TensorRT does not recommend moving plans between GPU models")
    return warnings


class CapturingLogger:
    """A TensorRT ILogger that keeps warnings/errors, so a failed build or load can say why in one line."""

    def __new__(cls, trt, min_severity=None):
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.min_severity = min_severity if min_severity is not None else trt.ILogger.Severity.WARNING
                self.messages: list[tuple[Any, str]] = []

            def log(self, severity, msg):
                if int(severity) <= int(self.min_severity):
                    self.messages.append((severity, msg))

            def errors(self) -> list[str]:
                return [m for s, m in self.messages if int(s) <= int(trt.ILogger.Severity.ERROR)]

        return _Logger()


def gpu_info() -> dict[str, str]:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


# -- running an engine -----------------------------------------------------------------------------------------------
def trt_to_torch_dtype(trt, trt_dtype):
    """torch dtype for a TensorRT DataType (TRT never converts I/O dtypes); TypeError for FP8/INT4/FP4."""
    import torch

    for name, torch_name in TRT2TORCH_NAMES.items():
        member = getattr(trt.DataType, name, None)
        if member is not None and member == trt_dtype:
            return getattr(torch, torch_name)
    raise TypeError(f"TensorRT dtype {trt_dtype} has no torch equivalent for an I/O tensor")


class TensorRTRunner(Runner):
    """A serialized engine run with torch CUDA tensors bound by name, `execute_async_v3` on its own stream."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, spec: IOSpec, manifest: dict[str, Any] | None = None,
                 name: str | None = None):
        path = Path(path)
        precision = (manifest or {}).get("precision", "fp32")
        super().__init__(name or path.name, spec, "cuda", precision)
        self.path = path
        self.manifest = manifest
        self.warnings: list[str] = []

    def _activate(self):
        if not self.path.exists():
            raise UserError(f"engine {self.path} does not exist; build it with `vla-export trt`")
        if self.manifest is None:
            self.manifest = read_manifest(self.path)
        trt = import_tensorrt()
        import torch

        gpu = gpu_info()
        self.warnings = check_engine_compatible(self.manifest, str(trt.__version__), gpu["name"],
                                                gpu["compute_capability"])
        self.trt, self.torch = trt, torch
        self.logger = CapturingLogger(trt)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self.logger, "")
        try:
            self.runtime = trt.Runtime(self.logger)
        except TypeError as e:  # "factory function returned nullptr": CUDA could not initialise
            raise BackendUnavailable(f"TensorRT {trt.__version__} cannot initialise CUDA ({e}); {INSTALL_HINT}") from e
        engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            reason = "; ".join(self.logger.errors())[:400] or "TensorRT logged no reason"
            raise UserError(f"TensorRT could not deserialize {self.path.name}: {reason}; rebuild it with `vla-export trt`")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: trt_to_torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream()
        self._outputs: dict[tuple, dict[str, Any]] = {}

    def _deactivate(self):
        self._outputs = {}
        self.context = None
        self.engine = None
        self.runtime = None

    def prepare(self, feeds):
        torch = self.torch
        out = {}
        for name in self.input_names:
            if name not in feeds:
                raise UserError(f"{self.name}: engine input {name!r} missing from the feeds")
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(device="cuda", dtype=self.dtypes[name])
            out[name] = t.contiguous()
        return out

    def _output_buffers(self, prepared) -> dict[str, Any]:
        """One set of output tensors per input-shape signature, reused across calls (`infer` copies them out)."""
        key = tuple(tuple(prepared[n].shape) for n in self.input_names)
        if key not in self._outputs:
            self._outputs[key] = {
                n: self.torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device="cuda")
                for n in self.output_names}
        return self._outputs[key]

    def run_prepared(self, prepared):
        ctx = self.context
        for name in self.input_names:
            if not ctx.set_input_shape(name, tuple(prepared[name].shape)):
                raise UserError(f"{self.name}: input {name} shape {tuple(prepared[name].shape)} is outside the "
                                "engine's optimization profile; rebuild with a wider --batch/--seq range")
        outputs = self._output_buffers(prepared)
        for name, t in {**prepared, **outputs}.items():
            ctx.set_tensor_address(name, t.data_ptr())
        current = self.torch.cuda.current_stream()
        # Own stream: on the default stream TensorRT adds a device-wide sync per call.
        self.stream.wait_stream(current)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed: {'; '.join(self.logger.errors())[:300]}")
        current.wait_stream(self.stream)
        return outputs

    def to_numpy(self, outputs):
        return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                for k, v in outputs.items()}

    def synchronize(self):
        self.stream.synchronize()
        self.torch.cuda.synchronize()

    def time_prepared(self, feeds, warmup, iters):
        prepared = self.prepare(feeds)
        # Events are recorded on the current stream, which waits on the engine's stream after each call.
        return cuda_event_times(lambda: self.run_prepared(prepared), warmup, iters)

    def describe(self):
        built = (self.manifest or {}).get("tensorrt", {})
        return super().describe() | {"tensorrt": built.get("version"), "gpu": (built.get("gpu") or {}).get("name")}
