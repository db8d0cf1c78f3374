"""The fp32 ONNX a quantization starts from: checks on it, and what its manifest says about where it came from.

Every check here turns a problem into one `UserError` line before anything is written: not an ONNX file, external
data missing, an input that is already quantized or half precision, no manifest to take the IO spec from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla_export import manifest as mf
from vla_export.errors import UserError
from vla_export.io_spec import IOSpec

# Ops that only appear in a graph that has been quantized already.
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul",
    "QLinearConv", "QLinearAdd", "QLinearMul", "QGemm", "MatMulNBits", "DynamicQuantizeMatMul", "QAttention",
    "MatMulIntegerToFloat", "GatherBlockQuantized",
}


@dataclass
class SourceModel:
    """An fp32 ONNX artifact with its manifest, checked to be a valid quantization input."""

    path: Path
    manifest: dict[str, Any]
    spec: IOSpec
    files: list[Path]  # the .onnx and its external data
    total_bytes: int
    sha256: str

    @property
    def checkpoint(self) -> str | None:
        return (self.manifest.get("source") or {}).get("checkpoint")

    @property
    def checkpoint_sha256(self) -> str | None:
        return (self.manifest.get("source") or {}).get("checkpoint_sha256")

    def checkpoint_load_kwargs(self) -> dict[str, Any]:
        """How the export loaded the checkpoint (matters for legacy .pth files): arch/preset/overrides/rename/trust."""
        src, settings = self.manifest.get("source") or {}, self.manifest.get("settings") or {}
        kwargs = {k: src.get(k, settings.get(k)) for k in ("arch", "preset", "overrides", "rename")}
        kwargs["trust"] = bool(src.get("trust", settings.get("trust_checkpoint", False)))
        return {k: v for k, v in kwargs.items() if v not in (None, {}, "")}

    def source_record(self) -> dict[str, Any]:
        """The `source` block of an artifact made from this one."""
        src = self.manifest.get("source") or {}
        return {**{k: v for k, v in src.items() if k not in ("artifact", "artifact_sha256")},
                "checkpoint": src.get("checkpoint"), "checkpoint_sha256": src.get("checkpoint_sha256"),
                "artifact": str(self.path.resolve()), "artifact_sha256": self.sha256}


def _load_graph(path: Path):
    """The graph without its weights (cheap even for a 7 GB model)."""
    import onnx

    try:
        # protobuf whatever the file is called (onnx.load would parse a `.json` name as JSON text)
        return onnx.load(str(path), format="protobuf", load_external_data=False)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # protobuf raises DecodeError, RuntimeError, ... on non-ONNX bytes
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__}); pass the .onnx file written by "
                        "`vla-export export`") from e


def quantized_markers(graph_model) -> list[str]:
    """Why a graph looks already quantized or half precision (empty when it is plain fp32)."""
    import onnx

    found = sorted({n.op_type for n in graph_model.graph.node if n.op_type in QUANTIZED_OPS})
    reasons = [f"it has {', '.join(found)} nodes"] if found else []
    low = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16", onnx.TensorProto.INT8: "int8",
           onnx.TensorProto.UINT8: "uint8"}
    kinds = sorted({low[i.data_type] for i in graph_model.graph.initializer if i.data_type in low})
    if kinds:
        reasons.append(f"it has {'/'.join(kinds)} weights")
    return reasons


def open_source(path: str | os.PathLike) -> tuple[SourceModel, Any]:
    """Check `path` is an fp32 ONNX artifact with its data and manifest; returns it and its graph (no weights)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass the fp32 .onnx written by `vla-export export`")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass the fp32 .onnx file inside it (e.g. {path}/model.onnx)")
    graph_model = _load_graph(path)
    if not graph_model.graph.node:
        raise UserError(f"{path} is not an ONNX model (no graph nodes); pass the .onnx written by `vla-export export`")
    external = mf.onnx_external_files(path)
    missing = [p.name for p in external if not p.is_file()]
    if missing:
        raise UserError(f"{path} keeps its weights in {', '.join(missing)}, which is missing beside it; copy the "
                        "external data file next to the .onnx (or re-export)")
    markers = quantized_markers(graph_model)
    manifest = mf.read_manifest(path)
    precision = manifest.get("precision", "fp32")
    if precision != "fp32":
        markers.insert(0, f"its manifest says precision {precision}")
    if markers:
        raise UserError(f"{path} is already quantized or reduced precision ({'; '.join(markers)}); quantize the fp32 "
                        "model.onnx instead")
    if "io_spec" not in manifest:
        raise UserError(f"{mf.manifest_path(path)} has no io_spec; re-export the model with `vla-export export`")
    files = mf.artifact_files(path)
    return SourceModel(path=path, manifest=manifest, spec=IOSpec.from_json(manifest["io_spec"]), files=files,
                       total_bytes=sum(p.stat().st_size for p in files), sha256=mf.sha256_files(files)), graph_model
