"""FP16 weights and compute with FP32 model inputs and outputs.

Road taken: onnxconverter-common's `convert_float_to_float16(keep_io_types=True)`, then a repair. The converter
retypes every float tensor inside the graph to float16 but leaves the `to` attribute of the exporter's own `Cast`
nodes at FLOAT (the dynamo exporter casts masks to float: `_to_copy` nodes), so ONNX Runtime refuses the model
("Type (tensor(float16)) of output arg (_to_copy_3) ... does not match expected type (tensor(float))"). Those
original Casts to FLOAT are rewritten to cast to FLOAT16; the Casts the converter itself inserts (around the graph
inputs/outputs and ops it keeps in fp32) are left alone. A second converter slip: a graph output that is also read
inside the graph (the LSTM head's `c_out`) is read as its fp32 copy by float16 nodes; those reads are rewired to the
float16 value. Ops in the converter's default block list, plus any in
`keep_fp32_ops`, stay in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

REPAIR_NOTE = ("onnxconverter-common convert_float_to_float16(keep_io_types=True) + exporter Cast(to=FLOAT) nodes "
               "inside the graph rewritten to FLOAT16")


def convert_fp16(src: Path, out_path: Path, keep_fp32_ops: tuple[str, ...] = ()) -> dict[str, Any]:
    """Convert the graph without its weights, then stream each weight through fp16 into the new `.onnx.data`.

    The converter runs `onnx.shape_inference.infer_shapes` on an in-memory model, which protobuf cannot serialise
    above 2 GB (the full model is 7.3 GB), and it would hold every weight in RAM. On the weightless graph (7.4 MB for
    full) shape inference works, and the converter only flips an external initializer's data_type to FLOAT16; the
    bytes are then converted tensor by tensor with the converter's own clamping (`convert_np_to_float16`)."""
    import warnings

    import onnx
    from onnxconverter_common import float16

    from vla_export.quantize.streaming import _ExternalReader, _ExternalWriter

    model = onnx.load(str(src), load_external_data=False)
    was_external_fp32 = {i.name for i in model.graph.initializer
                         if i.data_location == onnx.TensorProto.EXTERNAL and i.data_type == onnx.TensorProto.FLOAT}
    original_casts = {n.name for n in model.graph.node if n.op_type == "Cast"}
    block = list(dict.fromkeys([*float16.DEFAULT_OP_BLOCK_LIST, *keep_fp32_ops]))
    with warnings.catch_warnings():
        # The converter warns about every fp32 value it clamps into fp16 range; the gate measures the effect.
        warnings.simplefilter("ignore")
        model16 = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    del model
    # The converter typed these Casts' outputs float16 (and casts back in front of blocked ops itself).
    repaired = 0
    for node in model16.graph.node:
        if node.op_type == "Cast" and node.name in original_casts:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
                    repaired += 1
    rewired = _rewire_output_consumers(model16, original_casts, set(block))

    reader = _ExternalReader(src.parent)
    data_path = out_path.with_name(out_path.name + ".data")
    writer = _ExternalWriter(data_path)
    converted = kept_fp32 = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for init in model16.graph.initializer:
                if init.name in was_external_fp32 and init.data_type == onnx.TensorProto.FLOAT16:
                    # data_type already says FLOAT16 while the external bytes are still the source's fp32 ones
                    init.data_type = onnx.TensorProto.FLOAT
                    w = reader.array(init)
                    half = np.empty(w.shape, np.float16)
                    flat_in, flat_out = w.reshape(-1), half.reshape(-1)
                    step = 1 << 24
                    for i in range(0, flat_in.size, step):
                        flat_out[i:i + step] = float16.convert_np_to_float16(np.asarray(flat_in[i:i + step]))
                    del w, flat_in
                    fresh = writer.add_array(init.name, half)
                    init.CopyFrom(fresh)
                    del half, flat_out, fresh
                    converted += 1
                elif init.data_location == onnx.TensorProto.EXTERNAL:
                    writer.copy(init, reader)
                    kept_fp32 += 1
                else:
                    writer.move_inline(init)
    finally:
        writer.close()
    onnx.save_model(model16, str(out_path))
    return {"road": REPAIR_NOTE, "keep_io_types": True, "casts_repaired": repaired,
            "output_reads_rewired": rewired, "weights_streamed_to_fp16": converted,
            "external_weights_kept_fp32": kept_fp32, "op_block_list": block, "keep_fp32_ops": list(keep_fp32_ops)}


def _rewire_output_consumers(model, original_casts: set[str], blocked: set[str]) -> int:
    """Inside-graph readers of a graph output read its float16 value, not the fp32 copy made for the caller.

    With keep_io_types the converter renames an output's producer to write float16 and adds a Cast to FLOAT that
    writes the output name; nodes inside the graph that also read that name (the LSTM cell reads `c_out` for
    `h_out = o * tanh(c_out)`) keep reading the fp32 copy while typed float16, which ORT refuses."""
    import onnx

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for out in graph.output:
        cast = producers.get(out.name)
        if cast is None or cast.op_type != "Cast" or cast.name in original_casts:
            continue
        if not any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in cast.attribute):
            continue
        half = cast.input[0]
        for node in graph.node:
            if node is cast or node.op_type in blocked:
                continue
            for i, name in enumerate(node.input):
                if name == out.name:
                    node.input[i] = half
                    rewired += 1
    return rewired
