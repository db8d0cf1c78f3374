"""Which CPU an INT8 artifact is quantized for (`--target-cpu`), and what that choice means for its weights.

ONNX Runtime's CPU integer GEMM multiplies uint8 activations by int8 weights (U8S8; dynamic INT8 always, static QDQ
after ORT turns int8 activations into uint8 on x86). The kernel that runs depends on the CPU:
- x86 with AVX2 or AVX-512 but no VNNI: `vpmaddubsw`, which adds each pair of u8*s8 products into a signed 16-bit
  lane and saturates. Full-range weights overflow it: 2 * 255 * 127 = 64770 > 32767. With 7-bit weights (ORT's
  `reduce_range`, int8 weights in [-64, 64]) the largest pair is 2 * 255 * 64 = 32640, which fits.
- x86 with AVX512-VNNI, AVX-VNNI or AMX: `vpdpbusd(s)` / tile ops accumulate each product in 32 bits: no overflow.
- ARM64: NEON/UDOT/SDOT/I8MM kernels widen before they accumulate: no overflow.
ORT's quantization guide says the same ("Reduce-range ... is designed for the U8S8 format on AVX2 and AVX512
(non-VNNI) machines to mitigate saturation issues. This is not needed on machines supporting VNNI"; "There is no such
issue on other CPU architectures (x64 with VNNI and ARM)"). Reproduced here: a MatMulInteger of 64 activations of 255
by weights of 127 returns 2,072,640 natively (AVX-512 VNNI) and 1,048,544 (= 32 pairs * 32767) under
`qemu-x86_64 -cpu Haswell`; with weights of 64 both return the exact 1,044,480 (docs/benchmarks.md, issue 11).

So `portable` (the default) quantizes MatMul weights to 7 bits: the artifact computes the same numbers on every CPU,
at the cost of one bit of weight precision. `vnni` and `arm64` keep the full symmetric range [-127, 127] and are
only right on such machines. Gathered tables (token embeddings) are dequantized, never multiplied in integer, so they
keep the full range everywhere. Static QDQ keeps symmetric int8 weights with zero point 0 either way (TensorRT's
requirement); a 7-bit weight is still an int8 tensor with a scale to TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vla_export.errors import UserError

DEFAULT_TARGET_CPU = "portable"


@dataclass(frozen=True)
class Int8Target:
    name: str
    reduce_range: bool
    runs_exactly_on: str
    saturates_on: str

    @property
    def matmul_weight_qmax(self) -> int:
        """Largest |int8| of a MatMul weight: ORT's ranges (quant_utils ONNX_INT_TYPE_REDUCED/SYMMETRIC_RANGE)."""
        return 64 if self.reduce_range else 127

    def record(self, mode: str) -> dict[str, Any]:
        """What the choice means, for the artifact's manifest (`settings.target_cpu`)."""
        q = self.matmul_weight_qmax
        activation = ("uint8, asymmetric, scale and zero point computed per call (DynamicQuantizeLinear)"
                      if mode == "dynamic" else
                      "int8, symmetric (zero point 0), scale calibrated; ORT's x86 kernels run it as uint8")
        return {
            "name": self.name,
            "reduce_range": self.reduce_range,
            "matmul_weight_bits": 7 if self.reduce_range else 8,
            "matmul_weight_range": [-q, q],
            "matmul_weight_type": "int8, symmetric (zero point 0)",
            "gather_table_range": "full int8/uint8 range (dequantized, never an integer GEMM operand)",
            "activation_type": activation,
            "largest_u8s8_pair_sum": 2 * 255 * q,
            "runs_exactly_on": self.runs_exactly_on,
            "saturates_on": self.saturates_on,
        }


TARGET_CPUS: dict[str, Int8Target] = {
    "portable": Int8Target(
        "portable", reduce_range=True,
        runs_exactly_on="every CPU: x86 AVX2 / AVX-512 without VNNI, x86 with VNNI or AMX, ARM64",
        saturates_on="none (2*255*64 = 32640 fits the 16-bit pair sum of vpmaddubsw)"),
    "vnni": Int8Target(
        "vnni", reduce_range=False,
        runs_exactly_on="x86 with AVX512-VNNI, AVX-VNNI or AMX-INT8 (32-bit accumulation)",
        saturates_on="x86 with AVX2 or AVX-512 but no VNNI (vpmaddubsw pairs exceed int16: 2*255*127 = 64770)"),
    "arm64": Int8Target(
        "arm64", reduce_range=False,
        runs_exactly_on="ARM64 (NEON, UDOT/SDOT, I8MM kernels widen before accumulating)",
        saturates_on="x86 with AVX2 or AVX-512 but no VNNI (vpmaddubsw pairs exceed int16: 2*255*127 = 64770)"),
}


def resolve_target_cpu(name: str | None) -> Int8Target:
    """The target for `--target-cpu NAME` (None: the default); an unknown name is bad input (exit 2)."""
    key = DEFAULT_TARGET_CPU if name is None else str(name).strip().lower()
    if key not in TARGET_CPUS:
        raise UserError(f"unknown --target-cpu {name!r}; choose one of {', '.join(TARGET_CPUS)} (portable: 7-bit "
                        "weights that no CPU's INT8 kernel saturates; vnni/arm64: full 8-bit range for those CPUs)")
    return TARGET_CPUS[key]


def host_note(target: Int8Target, host_int8_kernels: str) -> str:
    """One line on whether the gate that judges the artifact here sees the numbers its target CPU will compute."""
    if target.reduce_range:
        return f"gated on a host with {host_int8_kernels} int8 kernels; 7-bit weights compute the same on every CPU"
    if host_int8_kernels == "avx2":
        return (f"gated on an AVX2-only host, whose U8S8 kernel saturates full-range weights: the {target.name} "
                "target will compute better numbers than this gate measured")
    return (f"gated on a host with {host_int8_kernels} int8 kernels; full-range weights are exact here and on {target.name} CPUs, "
            "but saturate on x86 without VNNI")
