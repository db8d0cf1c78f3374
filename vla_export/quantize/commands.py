"""`vla-export quantize`: INT8 (dynamic or static QDQ) and FP16 ONNX from the fp32 export, each gated."""

from __future__ import annotations

import click

from vla_export.quantize import gate as gates
from vla_export.quantize.ort_quant import CALIB_METHODS
from vla_export.quantize.stage import DEFAULT_CALIB_FRAMES, ENGINES, MODES, parse_modes, quantize_modes
from vla_export.quantize.targets import DEFAULT_TARGET_CPU, TARGET_CPUS


@click.command("quantize")
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(dir_okay=True, path_type=str))
@click.option("--mode", "modes", multiple=True, required=True, metavar="|".join(MODES),
              help="dynamic: INT8 weights, activations quantized at run time (ORT CPU). static: QDQ INT8 calibrated "
                   "on frames (TensorRT INT8 input). fp16: FP16 weights and compute, FP32 inputs/outputs. Several "
                   "modes (repeat --mode, or a comma list: --mode dynamic,fp16,static) run one after another "
                   "against one fp32 reference, built once.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: beside MODEL.onnx).")
@click.option("--episodes", type=click.Path(file_okay=False), default=None,
              help="Episodes directory: gate on the task action MAE of its validation split too.")
@click.option("--calib", type=click.Path(file_okay=False), default=None,
              help="Episodes directory whose training-split frames calibrate --mode static.")
@click.option("--calib-frames", type=int, default=DEFAULT_CALIB_FRAMES, show_default=True,
              help="Calibration frames (static).")
@click.option("--calib-method", type=click.Choice(list(CALIB_METHODS)), default="minmax", show_default=True,
              help="Activation range estimator (static).")
@click.option("--per-channel/--per-tensor", default=True, show_default=True,
              help="INT8 weight scales per output channel or one per tensor.")
@click.option("--fusion", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="dynamic: try ORT transformer fusion and keep the faster graph at equal accuracy (auto).")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="auto", show_default=True,
              help="dynamic: ort = onnxruntime quantize_dynamic; streaming = weights quantized one tensor at a time "
                   "from the external data (low memory); auto = streaming above 2 GiB of fp32.")
@click.option("--target-cpu", default=DEFAULT_TARGET_CPU, show_default=True, metavar="|".join(TARGET_CPUS),
              help="INT8 (dynamic, static): the CPU the weights are ranged for. portable: 7-bit MatMul weights "
                   "(ORT reduce_range), exact on every CPU; vnni: full 8-bit range, for x86 with AVX512-VNNI/AVX-VNNI/"
                   "AMX; arm64: full range, for ARM64. Full range saturates ORT's U8S8 kernel on x86 without VNNI.")
@click.option("--keep-fp32-ops", default="", help="fp16: extra op types kept in fp32, comma separated "
                                                   "(e.g. LayerNormalization,Softmax).")
@click.option("--tol-fp16", type=float, default=gates.DEFAULT_TOL_FP16, show_default=True,
              help="Budget: FP16 parity MAE vs PyTorch fp32.")
@click.option("--tol-int8", type=float, default=gates.DEFAULT_TOL_INT8, show_default=True,
              help="Budget: INT8 parity MAE vs PyTorch fp32.")
@click.option("--max-task-mae-increase", type=float, default=gates.DEFAULT_MAX_TASK_MAE_INCREASE,
              show_default=True, help="Budget: rise of the validation action MAE vs ground truth (with --episodes).")
@click.option("--rtol-fp16", type=float, default=gates.DEFAULT_RTOL_FP16, show_default=True,
              help="Budget relative to the reference's scale: FP16 relative L2 error of each output.")
@click.option("--rtol-int8", type=float, default=None, show_default=f"{gates.DEFAULT_RTOL_INT8:g}",
              help="Budget relative to the reference's scale: INT8 relative L2 error of each output.")
@click.option("--rtol-int8-static", type=float, default=None,
              show_default=f"--rtol-int8 if given, else {gates.DEFAULT_RTOL_INT8_STATIC:g}",
              help="Budget relative to the reference's scale: static INT8 relative L2 error of each output.")
@click.option("--max-task-mae-rel-increase", type=float, default=gates.DEFAULT_MAX_TASK_MAE_REL_INCREASE,
              show_default=True, help="Budget: rise of the validation action MAE as a share of the reference's "
                                      "own task MAE (with --episodes).")
@click.option("--parity-n", type=int, default=gates.DEFAULT_PARITY_N, show_default=True,
              help="Example inputs for the parity check.")
@click.option("--task-frames", type=int, default=gates.DEFAULT_TASK_FRAMES, show_default=True,
              help="Validation frames for the task check (with --episodes).")
def quantize_cmd(onnx_path, modes, out_dir, episodes, calib, calib_frames, calib_method, per_channel, fusion, engine,
                 target_cpu, keep_fp32_ops, tol_fp16, tol_int8, max_task_mae_increase, rtol_fp16, rtol_int8,
                 rtol_int8_static, max_task_mae_rel_increase, parity_n, task_frames):
    """Quantize an fp32 ONNX export to INT8 (dynamic or static QDQ) or FP16, and gate it against PyTorch fp32.

    Writes MODEL.int8.onnx / MODEL.int8-static.onnx / MODEL.fp16.onnx (plus .onnx.data) and a manifest
    beside each. The artifact is compared with the fp32 PyTorch checkpoint the export came from (parity MAE on
    example inputs; with --episodes, the action MAE against ground truth on validation frames). Missing a budget
    exits 3 and leaves the artifact marked "failed" in its manifest. With several modes every one is produced and
    judged, each with its own manifest, and the exit is 3 if any of them failed (the error line names which). Every
    absolute budget (--tol-*, --max-task-mae-increase) has a twin relative to the reference's scale (--rtol-*,
    --max-task-mae-rel-increase); both must hold.

    \b
    Example:
      vla-export quantize artifacts/model.onnx --mode dynamic --episodes data/episodes
      vla-export quantize artifacts/model.onnx --mode dynamic --target-cpu vnni --episodes data/episodes
      vla-export quantize artifacts/model.onnx --mode static --calib data/episodes --calib-method percentile
      vla-export quantize artifacts/model.onnx --mode fp16 --tol-fp16 2e-3
      vla-export quantize artifacts/model.onnx --mode dynamic,fp16,static --calib data/episodes --episodes data/episodes
    """
    # An explicit --rtol-int8 covers static INT8 too, unless --rtol-int8-static says otherwise (as in validate).
    rtol_int8_static = rtol_int8_static if rtol_int8_static is not None else (
        rtol_int8 if rtol_int8 is not None else gates.DEFAULT_RTOL_INT8_STATIC)
    rtol_int8 = rtol_int8 if rtol_int8 is not None else gates.DEFAULT_RTOL_INT8
    quantize_modes(onnx_path, parse_modes(modes), out_dir=out_dir, episodes=episodes, calib=calib,
                   calib_frames=calib_frames, calib_method=calib_method, per_channel=per_channel, fusion=fusion,
                   engine=engine, target_cpu=target_cpu, keep_fp32_ops=tuple(x.strip() for x in keep_fp32_ops.split(",") if x.strip()),
                   budgets=gates.Budgets(tol_fp16=tol_fp16, tol_int8=tol_int8,
                                         max_task_mae_increase=max_task_mae_increase, rtol_fp16=rtol_fp16,
                                         rtol_int8=rtol_int8, rtol_int8_static=rtol_int8_static,
                                         max_task_mae_rel_increase=max_task_mae_rel_increase),
                   parity_n=parity_n, task_frames=task_frames)


COMMANDS = [quantize_cmd]
