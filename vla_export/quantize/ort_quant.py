"""INT8 with ONNX Runtime's quantization tools: dynamic (MatMulInteger, CPU) and static QDQ (TensorRT's input).

Dynamic: `quant_pre_process` first (shape inference + ORT basic optimisation). Its symbolic shape inference fails on
the dynamo export of this model (`_infer_Expand`: `TypeError: object of type 'NoneType' has no len()`), so the
pre-processing falls back step by step and records what ran. Then transformer fusion
(`onnxruntime.transformers.optimizer`) is tried; the fused and unfused graphs are both quantized and the faster one
kept when its accuracy is no worse. Weights are signed INT8 (QInt8), per output channel by default: on tiny the
per-tensor variant's parity MAE is 2.5x worse (0.0019 vs 0.00077) at the same size. Only MatMul and Gather are
quantized (see DYNAMIC_OP_TYPES).

Both take the weight range of `--target-cpu` (targets.py: 7-bit `reduce_range` weights by default, which no CPU's
U8S8 kernel saturates).

Static: QDQ with symmetric INT8 activations and weights (zero points 0, as TensorRT requires), calibrated on
preprocessed training frames; only MatMul/Conv/Gemm inputs get Q/DQ pairs, which is what TensorRT's explicit
quantization fuses into INT8 kernels. No DynamicQuantizeLinear/MatMulInteger appears in it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from vla_export.errors import UserError

CALIB_METHODS = ("minmax", "entropy", "percentile")
STATIC_OP_TYPES = ("MatMul", "Conv", "Gemm")
# Not Conv: ORT's CPU ConvInteger is slow (tiny, batch 1: 18.5 ms with ConvInteger vs 1.6 ms without, fp32 6.3 ms),
# and on small/full the convolutions (patch embeddings) hold under 1% of the weights.
DYNAMIC_OP_TYPES = ("MatMul", "Gather")
# Fused ops the transformer optimizer can produce; Gelu-family fusions alone barely change CPU time.
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu",
             "FastGelu", "Gelu", "QuickGelu", "BiasSoftmax", "GemmFastGelu")


def _quiet_ort_logs():
    # ORT's quantizer logs a "consider pre-processing" warning per call and the optimizer a line per fusion.
    for name in ("root", "onnxruntime", "onnxruntime.transformers", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def pre_process(src: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """`quant_pre_process` with fallbacks; returns the model to quantize and what was done."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _quiet_ort_logs()
    attempts = []
    tries = [
        ("symbolic shape inference + ORT basic optimisation + ONNX shape inference", {}),
        ("ORT basic optimisation + ONNX shape inference (symbolic shape inference skipped)",
         {"skip_symbolic_shape": True}),
        ("ONNX shape inference only", {"skip_symbolic_shape": True, "skip_optimization": True}),
    ]
    for i, (label, kwargs) in enumerate(tries):
        out = work / f"pre{i}.onnx"
        try:
            quant_pre_process(str(src), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                              external_data_location=f"{out.name}.data", **kwargs)
            if not out.exists():
                raise RuntimeError("quant_pre_process wrote no model")
            return out, {"used": label, "failed": attempts}
        except Exception as e:  # ORT raises TypeError/ValidationError/RuntimeError from deep inside
            attempts.append({"step": label, "error": _first_line(e)})
    return src, {"used": "none (every pre-processing variant failed; quantizing the exported graph)",
                 "failed": attempts}


def try_fusion(model_path: Path, work: Path) -> tuple[Path | None, dict[str, Any]]:
    """Transformer fusion with ORT's optimizer (`bert`, which covers CLIP/ViT/decoder blocks); None if nothing fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    _quiet_ort_logs()
    try:
        # The optimizer prints its shape-inference failure to stdout; it is recorded in the manifest instead.
        with contextlib.redirect_stdout(io.StringIO()):
            opt = optimize_model(str(model_path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                                 use_gpu=False)
    except Exception as e:
        return None, {"applied": False, "reason": f"optimizer failed: {_first_line(e)}"}
    stats = {k: v for k, v in (opt.get_fused_operator_statistics() or {}).items() if k in FUSED_OPS and v}
    if not stats:
        return None, {"applied": False, "fused_ops": {},
                      "reason": "the optimizer matched no transformer pattern in this graph"}
    out = work / "fused.onnx"
    opt.save_model_to_file(str(out), use_external_data_format=True, all_tensors_to_one_file=True)
    reason = "" if "Attention" in stats or "MultiHeadAttention" in stats else (
        "no Attention fusion: the optimizer matched no attention subgraph in the dynamo export (scaled-dot-product "
        "attention decomposed into MatMul/Mul/Softmax/MatMul) and its symbolic shape inference failed on this graph")
    return out, {"applied": True, "fused_ops": stats, "note": reason}


def quantize_dynamic_ort(model_path: Path, out_path: Path, per_channel: bool, reduce_range: bool) -> dict[str, Any]:
    """`quantize_dynamic`; `reduce_range` (targets.py) gives MatMul weights 7 bits, Gather tables keep 8 (ORT applies
    it to MatMul/Conv weights only: operators/matmul.py passes reduce_range=True, Gather quantizes as activation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet_ort_logs()
    settings = {"weight_type": "QInt8", "per_channel": per_channel, "reduce_range": reduce_range,
                "MatMulConstBOnly": True, "op_types": list(DYNAMIC_OP_TYPES)}
    quantize_dynamic(str(model_path), str(out_path), weight_type=QuantType.QInt8, per_channel=per_channel,
                     reduce_range=reduce_range, op_types_to_quantize=list(DYNAMIC_OP_TYPES),
                     use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    return settings


class FrameReader:
    """`CalibrationDataReader` over preprocessed frames, one frame (batch 1) per call."""

    def __init__(self, feeds: dict[str, np.ndarray], input_names: list[str]):
        self.feeds = {k: v for k, v in feeds.items() if k in input_names}
        self.n = len(next(iter(self.feeds.values())))
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.n:
            return None
        item = {k: v[self.i:self.i + 1] for k, v in self.feeds.items()}
        self.i += 1
        return item

    def rewind(self) -> None:
        self.i = 0


def quantize_static_qdq(model_path: Path, out_path: Path, feeds: dict[str, np.ndarray], input_names: list[str],
                        calib_method: str, per_channel: bool, reduce_range: bool = True,
                        op_types: tuple[str, ...] = STATIC_OP_TYPES) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    _quiet_ort_logs()
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calib_method]

    class _Reader(FrameReader, CalibrationDataReader):
        pass

    reader = _Reader(feeds, input_names)
    excluded = activation_matmuls(model_path)
    extra = {
        # Zero points 0 for both: TensorRT only takes symmetric INT8.
        "ActivationSymmetric": True, "WeightSymmetric": True,
        # TensorRT folds a float bias into its INT8 kernels; an int32-quantized bias only adds DQ nodes.
        "QuantizeBias": False,
    }
    # reduce_range narrows the weights only (qdq_quantizer: activations take reduce_range from overrides alone);
    # symmetric [-64, 64] keeps zero point 0, so the result stays TensorRT's symmetric int8.
    quantize_static(str(model_path), str(out_path), reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                    reduce_range=reduce_range, op_types_to_quantize=list(op_types), calibrate_method=method,
                    use_external_data_format=True, nodes_to_exclude=excluded, extra_options=extra)
    return {"format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8", "symmetric": True,
            "reduce_range": reduce_range, "per_channel": per_channel, "calib_method": calib_method,
            "calib_frames": reader.n,
            "op_types": list(op_types), "quantize_bias": False,
            "excluded_activation_matmuls": len(excluded)}


def activation_matmuls(model_path: Path) -> list[str]:
    """MatMul nodes whose both inputs are activations (attention scores, softmax x V), kept in float.

    One per-tensor INT8 scale cannot hold softmax probabilities and the attention logits at once: on the demo
    checkpoint quantizing them raised the task action MAE by 0.024 (budget 0.01) whatever the calibration
    method (minmax, entropy, percentile; 32 or 128 frames), and keeping them in float brought the rise to -0.003
    (frame parity MAE 0.030 -> 0.004). Weight MatMuls, Gemms and Convs, which hold the bytes, stay INT8."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] not in constants]


def time_model(path: Path, feeds: dict[str, np.ndarray], iters: int = 10, warmup: int = 2) -> float:
    """p50 ms of one ORT CPU call on `feeds` (for choosing between graph variants, not for reports)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def parity_mae(path: Path, feeds: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    values = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    outs = dict(zip([o.name for o in sess.get_outputs()], values, strict=True))
    return float(max(np.abs(outs[k].astype(np.float64) - ref[k]).mean() for k in ref if k in outs))


def dynamic_int8(src: Path, out_path: Path, work: Path, *, per_channel: bool, fusion: str, reduce_range: bool,
                 choose_feeds: dict[str, np.ndarray], choose_ref: dict[str, np.ndarray]) -> dict[str, Any]:
    """Pre-process, try fusion, quantize; keeps the faster graph at equal accuracy. Returns the settings used."""
    pre_path, pre_info = pre_process(src, work)
    details: dict[str, Any] = {"engine": "ort", "pre_process": pre_info}
    fused_path, fusion_info = (None, {"applied": False, "reason": "--fusion off"}) if fusion == "off" else \
        try_fusion(pre_path, work)
    candidates = {"unfused": pre_path}
    if fused_path is not None:
        candidates["fused"] = fused_path
    results = {}
    for name, path in candidates.items():
        q = work / f"q-{name}.onnx"
        details["quantize"] = quantize_dynamic_ort(path, q, per_channel, reduce_range)
        results[name] = {"path": q}
    if len(results) > 1 or fusion == "on":
        # Batch 1 is the deployment case; the choice is made on the same inputs the gate uses.
        one = {k: v[:1] for k, v in choose_feeds.items()}
        for r in results.values():
            r["p50_ms"] = round(time_model(r["path"], one), 3)
            r["parity_mae"] = parity_mae(r["path"], choose_feeds, choose_ref)
    chosen = "unfused"
    if "fused" in results:
        f, u = results["fused"], results["unfused"]
        equal_accuracy = f["parity_mae"] <= 1.1 * u["parity_mae"] + 1e-5
        if fusion == "on" or (f["p50_ms"] < u["p50_ms"] and equal_accuracy):
            chosen = "fused"
    fusion_info["candidates"] = {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in results.items()}
    fusion_info["kept"] = chosen
    details["fusion"] = fusion_info
    _move_onnx(results[chosen]["path"], out_path)
    return details


def _move_onnx(src: Path, dst: Path) -> None:
    """Rename an ONNX written with external data `<name>.data` to `dst` (+ `dst.data`), rewriting the location."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    new_loc = dst.name + ".data"
    old = None
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for kv in init.external_data:
                if kv.key == "location":
                    old, kv.value = kv.value, new_loc
    if old is not None:
        shutil.move(str(src.parent / old), str(dst.parent / new_loc))
    onnx.save_model(model, str(dst))
    if src != dst:
        src.unlink()


def static_int8(src: Path, out_path: Path, work: Path, *, feeds: dict[str, np.ndarray], input_names: list[str],
                calib_method: str, per_channel: bool, reduce_range: bool) -> dict[str, Any]:
    if calib_method not in CALIB_METHODS:
        raise UserError(f"unknown --calib-method {calib_method!r}; choose one of {', '.join(CALIB_METHODS)}")
    pre_path, pre_info = pre_process(src, work)
    q = work / "q-static.onnx"
    settings = quantize_static_qdq(pre_path, q, feeds, input_names, calib_method, per_channel, reduce_range)
    _move_onnx(q, out_path)
    return {"engine": "ort", "pre_process": pre_info, "quantize": settings}
