"""Dynamic INT8 with bounded memory: weights quantized one tensor at a time, streamed from the external data.

`onnxruntime.quantization.quantize_dynamic` loads the whole fp32 model, then (dynamic mode always) deep-copies it
and reloads it with shape inference (`save_and_reload_model_with_shape_infer`) while the first copy is still held,
and adds the INT8 weights beside all of them: ~3 fp32 copies + INT8, measured 20.7 GB peak for the 7.3 GB full
model. Here the graph is loaded without its weights (7.4 MB for full), each fp32 weight is read from the
`.onnx.data` file through a memory map, quantized and appended to the new data file, so the peak is the graph plus
the largest single tensor (the 0.53 GB Kosmos-2 token embedding on full) and its INT8 copy.

The rewrite is the one ORT's dynamic quantizer emits, so ORT runs it with the same kernels:
- MatMul(A, W) with W a 2-D fp32 initializer -> DynamicQuantizeLinear(A) -> MatMulInteger(A_q, W_q, A_zp, W_zp)
  -> Cast(float) -> Mul by (A_scale * W_scale). W is signed INT8, symmetric (zero point 0), per output column
  (per-channel) or per tensor, in the range of `--target-cpu` (targets.py): ORT's 7-bit reduced range [-64, 64]
  for `portable` (no u8*s8 saturation on AVX2 CPUs without VNNI), the full [-127, 127] for `vnni`/`arm64`. One DynamicQuantizeLinear per activation, shared by the MatMuls reading it (Q/K/V).
- Gather(E, ids) with E a 2-D fp32 initializer (token embeddings) -> Gather(E_q, ids) -> DequantizeLinear(scale).
Everything else (Conv, Gemm, LayerNorm, biases) stays fp32 and its bytes are copied through unchanged.
Before that, ORT's Gelu-family fusions run on the weightless graph (they need only biases and scalar constants).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ALIGN = 64
# ORT's ranges: MatMulInteger weights [-64, 64] with reduce_range (7 bits) or [-127, 127] without; gathered tables
# the full signed range (they are dequantized, never an integer GEMM operand).
MATMUL_QMAX_REDUCED = 64
MATMUL_QMAX_FULL = 127
GATHER_QMAX = 127


class _ExternalReader:
    """Reads initializers of the source model, external (memory-mapped) or inline."""

    def __init__(self, base: Path):
        self.base = base

    def array(self, init) -> np.ndarray:
        import onnx
        from onnx import numpy_helper

        if init.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(init)
        info = {kv.key: kv.value for kv in init.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        count = int(np.prod(init.dims)) if init.dims else 1
        return np.memmap(self.base / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                         shape=(count,)).reshape(tuple(init.dims))

    def raw_chunks(self, init, chunk: int = 1 << 24):
        info = {kv.key: kv.value for kv in init.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        with open(self.base / info["location"], "rb") as f:
            f.seek(offset)
            left = length
            while left:
                block = f.read(min(chunk, left))
                if not block:
                    raise OSError(f"external data of {init.name} is truncated")
                left -= len(block)
                yield block


class _ExternalWriter:
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.offset = 0

    def _pad(self):
        pad = (-self.offset) % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad

    def _point(self, tensor, start: int, length: int):
        import onnx

        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for k, v in (("location", self.path.name), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v

    def add_array(self, name: str, array: np.ndarray):
        """A new initializer whose bytes go to the data file.

        The TensorProto never holds the bytes: protobuf keeps a cleared field's memory in the message's arena, so
        building it with `numpy_helper.from_array` and clearing `raw_data` would keep every INT8 weight in RAM."""
        import onnx
        from onnx import numpy_helper

        array = np.ascontiguousarray(array)
        if array.nbytes < 1024:
            return numpy_helper.from_array(array, name)
        self._pad()
        start = self.offset
        self.f.write(memoryview(array).cast("B"))
        self.offset += array.nbytes
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.dims.extend(array.shape)
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        self._point(tensor, start, array.nbytes)
        return tensor

    def move_inline(self, init) -> None:
        """An inline initializer of 1 KiB or more goes to the data file too (sources saved as a single file)."""
        if len(init.raw_data) < 1024:
            return
        self._pad()
        start = self.offset
        self.f.write(init.raw_data)
        self.offset += len(init.raw_data)
        self._point(init, start, len(init.raw_data))

    def copy(self, init, reader: _ExternalReader) -> None:
        """Copy an unchanged external initializer's bytes, chunk by chunk."""
        self._pad()
        start = self.offset
        for block in reader.raw_chunks(init):
            self.f.write(block)
            self.offset += len(block)
        self._point(init, start, self.offset - start)

    def close(self):
        self.f.close()


def _symmetric_int8(w: np.ndarray, qmax: int, axis: int | None,
                    chunk_bytes: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Signed INT8 with zero point 0: scale = max|w| / qmax per column (axis=1) or per tensor.

    Works through `w` (often a read-only memory map) in row blocks of ~64 MB, so the temporaries of the largest
    tensor (the 0.53 GB token embedding on full) never exist at full size: the peak is the INT8 result plus one
    block."""
    rows = w.shape[0] if w.ndim else 1
    step = max(1, chunk_bytes // max(1, w[:1].nbytes)) if w.ndim else 1
    absmax = np.zeros(w.shape[1], np.float32) if axis == 1 else np.float32(0)
    for r in range(0, rows, step):
        block_max = np.abs(np.asarray(w[r:r + step], dtype=np.float32)).max(axis=0 if axis == 1 else None)
        absmax = np.maximum(absmax, block_max)
    scale = np.where(absmax > 0, absmax / qmax, np.float32(1.0)).astype(np.float32)
    q = np.empty(w.shape, dtype=np.int8)
    for r in range(0, rows, step):
        block = np.asarray(w[r:r + step], dtype=np.float32) / scale
        q[r:r + step] = np.clip(np.rint(block), -qmax, qmax)
    return q, np.asarray(scale, dtype=np.float32)


def _load_small_external(model, base: Path, max_elements: int = 1 << 16) -> None:
    """Bring 0-D/1-D external tensors (biases, norm weights: a few MB on full) into the graph for the fusions."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL and len(init.dims) <= 1 and (
                int(np.prod(init.dims)) if init.dims else 1) <= max_elements:
            load_external_data_for_tensor(init, str(base))
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]


def fuse_gelu_family(model) -> dict[str, Any]:
    """ORT's Gelu/QuickGelu/BiasGelu fusions, on the graph alone: they read only small constants and biases.

    On small these fusions cut the INT8 model's batch-1 latency by ~17% (unfused 166 ms vs fused 137 ms, ORT engine's
    own comparison); attention fusion does not apply to this export (see ort_quant.try_fusion)."""
    import contextlib
    import io
    import logging

    import onnxruntime.transformers  # noqa: F401 - puts the fusion modules on sys.path
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    before = {n.op_type for n in model.graph.node}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            om = BertOnnxModel(model)
            om.fuse_gelu()
            om.fuse_bias_gelu(is_fastgelu=False)
    except Exception as e:  # a fusion pass choking on this graph must not stop quantization
        return {"applied": False, "reason": f"fusion failed: {type(e).__name__}: {str(e)[:160]}"}
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain == "com.microsoft":
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    if counts and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx_opset("com.microsoft", 1))
    return {"applied": bool(counts), "fused_ops": counts, "graph_only": True,
            "reason": "" if counts else f"no Gelu-family pattern matched (ops: {len(before)} types)"}


def onnx_opset(domain: str, version: int):
    from onnx import helper

    return helper.make_opsetid(domain, version)


def quantize_dynamic_streaming(src: Path, out_path: Path, per_channel: bool = True, fusion: str = "auto",
                               reduce_range: bool = True) -> dict[str, Any]:
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    if fusion != "off":
        _load_small_external(model, src.parent)
        fusion_info = fuse_gelu_family(model)
    else:
        fusion_info = {"applied": False, "reason": "--fusion off"}
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def fp32_2d(name):
        i = inits.get(name)
        return i is not None and i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2

    def only_used_as(name, op, index):
        return all(n.op_type == op and list(n.input).index(name) == index and list(n.input).count(name) == 1
                   for n in consumers.get(name, []))

    matmul_w = {n.input[1] for n in graph.node if n.op_type == "MatMul" and fp32_2d(n.input[1])
                and only_used_as(n.input[1], "MatMul", 1)}
    gather_w = {n.input[0] for n in graph.node if n.op_type == "Gather" and fp32_2d(n.input[0])
                and only_used_as(n.input[0], "Gather", 0)}

    matmul_qmax = MATMUL_QMAX_REDUCED if reduce_range else MATMUL_QMAX_FULL
    reader = _ExternalReader(src.parent)
    data_path = out_path.with_name(out_path.name + ".data")
    writer = _ExternalWriter(data_path)
    new_inits, quantized = [], {}
    counts = {"matmul_weights": 0, "gather_tables": 0, "fp32_bytes_quantized": 0, "copied_initializers": 0}
    try:
        for init in graph.initializer:
            name = init.name
            if name in matmul_w or name in gather_w:
                w = reader.array(init)
                is_mm = name in matmul_w
                q, scale = _symmetric_int8(w, matmul_qmax if is_mm else GATHER_QMAX,
                                           1 if (is_mm and per_channel) else None)
                counts["fp32_bytes_quantized"] += int(w.nbytes)
                counts["matmul_weights" if is_mm else "gather_tables"] += 1
                del w
                new_inits.append(writer.add_array(f"{name}_quantized", q))
                new_inits.append(writer.add_array(f"{name}_scale", scale))
                new_inits.append(writer.add_array(f"{name}_zero_point", np.zeros(scale.shape, dtype=np.int8)))
                quantized[name] = (f"{name}_quantized", f"{name}_scale", f"{name}_zero_point")
                del q
            else:
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    writer.copy(init, reader)
                    counts["copied_initializers"] += 1
                else:
                    writer.move_inline(init)
                new_inits.append(init)
    finally:
        writer.close()

    nodes, activation_q = [], {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in quantized:
            a = node.input[0]
            if a not in activation_q:
                q_names = (f"{a}_quantized", f"{a}_scale", f"{a}_zero_point")
                nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(q_names), f"{a}_DynamicQuantize"))
                activation_q[a] = q_names
            aq, a_scale, a_zp = activation_q[a]
            wq, w_scale, w_zp = quantized[node.input[1]]
            base = node.name or node.output[0]
            y_int, y_float, scales = f"{base}_int32", f"{base}_int32_float", f"{base}_scales"
            nodes += [
                helper.make_node("MatMulInteger", [aq, wq, a_zp, w_zp], [y_int], f"{base}_quant"),
                helper.make_node("Cast", [y_int], [y_float], f"{base}_cast", to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [a_scale, w_scale], [scales], f"{base}_scales_mul"),
                helper.make_node("Mul", [y_float, scales], [node.output[0]], f"{base}_output_mul"),
            ]
        elif node.op_type == "Gather" and node.input[0] in quantized:
            eq, e_scale, e_zp = quantized[node.input[0]]
            base = node.name or node.output[0]
            gathered = f"{base}_gathered_int8"
            axis = [a for a in node.attribute if a.name == "axis"]
            g = helper.make_node("Gather", [eq, node.input[1]], [gathered], f"{base}_quant")
            g.attribute.extend(axis)
            nodes += [g, helper.make_node("DequantizeLinear", [gathered, e_scale, e_zp], [node.output[0]],
                                          f"{base}_dequantize")]
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    # Rewritten nodes keep the original output names and float types, so the graph's value_info stays valid.
    onnx.save_model(model, str(out_path))
    return {"engine": "streaming", "weight_type": "QInt8 symmetric", "per_channel": per_channel,
            "reduce_range": reduce_range,
            "matmul_weight_range": f"+-{matmul_qmax}" + (" (ORT reduce_range)" if reduce_range else " (full)"),
            "gather_range": f"+-{GATHER_QMAX}",
            **counts, "pre_process": {"used": "none (no shape inference needed: only constant-weight MatMul and "
                                              "Gather are rewritten)"},
            "fusion": fusion_info}
