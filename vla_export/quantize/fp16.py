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

A third repair keeps a constant in fp32 where the graph itself asks for more than fp32: a float32 initializer,
Constant or graph input that reaches a `Cast(to=DOUBLE)` through data-movement ops only (Expand, Unsqueeze,
Reshape, ...). The converter rounds every float initializer to fp16 and inserts a Cast to float16 before the graph's
own Cast to float64, so the upcast starts from the rounded value. SmolVLA's flow-matching time t (1, 2/3, 1/3: one
constant per unrolled Euler step) is such a value: fp16 stores 2/3 as 0.66650, and LeRobot's sinusoidal time
embedding multiplies it by up to 2 pi / min_period = 1571 in float64, so its high-frequency features were off by up
to 0.26 rad (parity MAE 0.0083 > 1e-3). Each such path is rebuilt beside the converted graph from the source's fp32
protos (a fp32 copy of the constant and of the data-movement nodes) and the Cast to DOUBLE reads it; the fp16 copy
stays for the constant's other readers and is pruned when it has none. Only data movement is followed: a value
computed by arithmetic before the upcast is computed in fp16 like the rest of the graph.
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
    double_paths = _double_cast_paths(model)  # copies of the fp32 protos: the converter edits `model` in place
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
    kept_double = _restore_double_paths(model16, double_paths)

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
            "double_cast_inputs_kept_fp32": kept_double,
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


# Ops that only move or select values: a float32 value passed through them reaches the Cast unchanged, so an fp32
# copy of the path computes exactly what the fp32 graph does. Their float data is input 0; every other input (shape,
# axes, indices, starts) is an integer tensor that the converter leaves as it is.
_DATA_MOVEMENT = frozenset({"Identity", "Expand", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Tile",
                            "Slice", "Gather"})


def _double_cast_paths(model) -> list[tuple[str, tuple[str, Any], list]]:
    """Every Cast(to=DOUBLE) whose input is a float32 initializer, Constant or graph input, reached through
    data-movement ops only: (the Cast's output name, the source, copies of the path's nodes from source to Cast).

    The Cast is found again after conversion by its output name (the converter renames the outputs only of the
    nodes it keeps in fp32, and a Cast to DOUBLE writes no float tensor); copies, because the converter edits the
    model it is given."""
    import onnx

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    float_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    paths = []
    for cast in graph.node:
        if cast.op_type != "Cast" or not any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE
                                             for a in cast.attribute):
            continue
        name, chain, source = cast.input[0], [], None
        while source is None:
            if name in inits:
                if inits[name].data_type != onnx.TensorProto.FLOAT:
                    break
                init = onnx.TensorProto()
                init.CopyFrom(inits[name])
                source = ("initializer", init)
            elif name in float_inputs:
                source = ("input", name)
            elif (node := producers.get(name)) is None:
                break
            elif node.op_type == "Constant":
                attr = {a.name: a for a in node.attribute}
                if "value" not in attr or attr["value"].t.data_type != onnx.TensorProto.FLOAT:
                    break
                const = onnx.NodeProto()
                const.CopyFrom(node)
                source = ("constant", const)
            elif node.op_type in _DATA_MOVEMENT and node.input:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                chain.append(copy)
                name = node.input[0]
            else:
                break  # computed by arithmetic (or a type change): fp16 like the rest of the graph
        if source is not None:
            paths.append((cast.output[0], source, chain[::-1]))
    return paths


def _restore_double_paths(model16, paths) -> int:
    """Rebuild each path in fp32 right before its Cast(to=DOUBLE) (same constant, same data-movement nodes, fresh
    names) and point the Cast at it; then prune the fp16 path when nothing else reads it. Returns how many Casts
    now read an fp32 value."""
    graph = model16.graph
    casts = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and n.output}
    before: dict[str, list] = {}  # Cast output -> the nodes to insert right before that Cast
    dropped: list[str] = []
    for k, (cast_out, (kind, source), chain) in enumerate(paths):
        cast = casts.get(cast_out)
        if cast is None:
            continue
        suffix = f"__fp32_{k}"
        nodes = []
        if kind == "initializer":
            init = graph.initializer.add()
            init.CopyFrom(source)
            init.name = source.name + suffix
            name = init.name
        elif kind == "constant":
            const = source
            const.name = (const.name or "Constant") + suffix
            const.output[0] = const.output[0] + suffix
            nodes.append(const)
            name = const.output[0]
        else:  # a graph input: keep_io_types leaves it float32
            name = source
        for node in chain:
            node.name = (node.name or node.op_type) + suffix
            node.input[0] = name
            node.output[:] = [o + suffix for o in node.output]
            nodes.append(node)
            name = node.output[0]
        dropped.append(cast.input[0])
        cast.input[0] = name
        before[cast_out] = nodes
    if before:  # the path's other inputs (shapes, axes) come before the old path, so before the Cast too
        ordered = []
        for node in graph.node:
            ordered.extend(before.get(node.output[0], []) if node.op_type == "Cast" and node.output else [])
            ordered.append(node)
        del graph.node[:]
        graph.node.extend(ordered)
        _prune_unread(graph, dropped)
    return len(before)


def _prune_unread(graph, names: list[str]) -> None:
    """Remove the producers (and initializers) of `names` that nothing reads any more, and upstream of them: the
    fp16 path a restored Cast no longer reads, when the constant has no other reader."""
    outputs = {o.name for o in graph.output}
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in outputs or any(name in n.input for n in graph.node):
            continue
        for i, init in enumerate(graph.initializer):
            if init.name == name:
                del graph.initializer[i]
                break
        for i, node in enumerate(graph.node):
            if name in node.output:
                if not any(o in outputs or any(o in n.input for n in graph.node) for o in node.output if o != name):
                    upstream = [x for x in node.input if x]  # read before the node leaves the graph
                    del graph.node[i]
                    pending.extend(upstream)
                break
        for i, vi in enumerate(graph.value_info):
            if vi.name == name:
                del graph.value_info[i]
                break
