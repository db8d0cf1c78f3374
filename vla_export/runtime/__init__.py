"""The runtime layer: one runner per backend (after Polygraphy's runners), below every stage that uses one.

A runner is built cheaply, `activate()`d (loads the artifact: session, engine, package), then called with numpy
feeds named as in the IO spec. export, quantize, validate, profile, `Policy` and `verify` all open artifacts
through it, and nothing here imports a stage: `engines/` (which builds TensorRT engines and AOTI packages) and
`validate/` sit above this package.

| module | runners |
|---|---|
| `base` | `Runner` (activate/infer/deactivate, `time_prepared` with the device's synchronisation), `cuda_event_times` |
| `pytorch` | `TorchRunner` (eager), `AotiRunner` (AOTInductor `.pt2`) |
| `ort` | `OrtRunner` (ONNX Runtime, one execution provider) |
| `tensorrt` | `TensorRTRunner` (serialized engine; `tensorrt` imported lazily) |
"""

from __future__ import annotations

import os
from pathlib import Path

from vla_export.errors import UserError
from vla_export.io_spec import IOSpec
from vla_export.runtime.base import Runner, cuda_event_times
from vla_export.runtime.ort import ORT_PROVIDER_DEVICE, OrtRunner, available_ort_providers
from vla_export.runtime.pytorch import (
    TORCH_DTYPES,
    AotiRunner,
    TorchCallableRunner,
    TorchRunner,
    outputs_as_dict,
    to_device_feeds,
)

__all__ = ["ORT_PROVIDER_DEVICE", "TORCH_DTYPES", "AotiRunner", "OrtRunner", "Runner", "TorchCallableRunner",
           "TorchRunner", "available_ort_providers", "cuda_event_times", "open_runner", "outputs_as_dict",
           "to_device_feeds"]


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
        from vla_export.runtime.tensorrt import TensorRTRunner

        return TensorRTRunner(artifact, spec, manifest=manifest)
    if backend == "aoti":
        from vla_export.manifest import aoti_weights_path

        weights = aoti_weights_path(artifact) if manifest.get("settings", {}).get("weights") == "external" else None
        return AotiRunner(artifact, spec, device=device or manifest.get("device", "cpu"), precision=precision,
                          weights=weights)
    raise UserError(f"{artifact}: manifest names unknown backend {backend!r}; rebuild the artifact")
