"""ONNX Runtime runner: an ONNX file (with its external data) in one execution provider."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vla_export.errors import UserError
from vla_export.io_spec import IOSpec
from vla_export.runtime.base import Runner

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
