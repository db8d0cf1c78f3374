"""Quantize stage: fp32 ONNX -> INT8 dynamic, INT8 static QDQ, FP16 ONNX, each gated against PyTorch fp32.

Public API: `quantize(src, mode, ...)` and `quantize_modes(src, modes, ...)` (several modes against one fp32
reference built once; `vla_export.quantize.stage`), `output_path`, `MODES`; the gate lives in
`vla_export.quantize.gate` (`Budgets`, `load_reference`, `evaluate`).
"""

from vla_export.quantize.stage import MODES, QuantizeResult, output_path, quantize, quantize_modes

__all__ = ["MODES", "QuantizeResult", "output_path", "quantize", "quantize_modes"]
