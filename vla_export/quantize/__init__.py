"""Quantize stage: fp32 ONNX -> INT8 dynamic, INT8 static QDQ, FP16 ONNX, each gated against PyTorch fp32.

Public API: `quantize(src, mode, ...)` (`vla_export.quantize.stage`), `output_path`, `MODES`; the gate lives in
`vla_export.quantize.gate` (`Budgets`, `load_reference`, `evaluate`).
"""

from vla_export.quantize.stage import MODES, QuantizeResult, output_path, quantize

__all__ = ["MODES", "QuantizeResult", "output_path", "quantize"]
