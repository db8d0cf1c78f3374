"""The quantize stage: fp32 ONNX -> INT8 dynamic / INT8 static QDQ / FP16 ONNX, gated against the PyTorch reference.

`quantize(src, mode, ...)` checks the input, computes the fp32 reference outputs (then frees the torch model, so it
is never resident next to the quantizer's copies), converts into a staging directory, gates the staged artifact,
publishes it and writes its manifest: `passed`, or `failed` with the reason, in which case `GateFailed` (exit 3)
is raised after the artifact and its manifest are on disk for inspection.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla_export import manifest as mf
from vla_export.errors import GateFailed, UserError
from vla_export.quantize import gate as gates
from vla_export.quantize.gate import Budgets, Reference
from vla_export.quantize.source import SourceModel, open_source

# mode -> (file suffix, variant, precision)
MODES: dict[str, tuple[str, str, str]] = {
    "dynamic": ("int8", "ort-int8-dynamic", "int8"),
    "static": ("int8-static", "ort-int8-static", "int8"),
    "fp16": ("fp16", "ort-fp16", "fp16"),
}
ENGINES = ("auto", "ort", "streaming")
# Above this fp32 size `--engine auto` streams weights instead of calling quantize_dynamic, which holds about three
# copies of the model at once (measured 20.7 GB peak RSS for the 7.3 GB full model).
STREAMING_THRESHOLD_BYTES = 2 * 2**30
DEFAULT_CALIB_FRAMES = 32


@dataclass
class QuantizeResult:
    path: Path
    manifest: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.manifest.get("status") == "passed"


def output_path(src: Path, mode: str, out_dir: str | os.PathLike | None = None) -> Path:
    """`model.onnx` -> `model.int8.onnx` / `model.int8-static.onnx` / `model.fp16.onnx`, beside it or in out_dir."""
    suffix = MODES[mode][0]
    return Path(out_dir or src.parent) / f"{src.stem}.{suffix}.onnx"


@contextlib.contextmanager
def _steps(show: bool) -> Iterator[Any]:
    """A spinner per step on stderr (rich); `step(text)` starts the next one."""
    if not show:
        yield lambda text: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as progress:
        current: list[int] = []

        def step(text: str):
            if current:
                progress.update(current[-1], completed=1, total=1)
            current.append(progress.add_task(text, total=None))

        yield step
        if current:
            progress.update(current[-1], completed=1, total=1)


def resolve_engine(engine: str, mode: str, source: SourceModel) -> str:
    if engine not in ENGINES:
        raise UserError(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if mode != "dynamic":
        if engine == "streaming":
            raise UserError("--engine streaming applies to --mode dynamic only")
        return "ort"
    if engine == "auto":
        return "streaming" if source.total_bytes > STREAMING_THRESHOLD_BYTES else "ort"
    return engine


def quantize(src: str | os.PathLike, mode: str, *, out_dir: str | os.PathLike | None = None,
             episodes: str | os.PathLike | None = None, calib: str | os.PathLike | None = None,
             calib_frames: int = DEFAULT_CALIB_FRAMES, calib_method: str = "minmax", per_channel: bool = True,
             fusion: str = "auto", engine: str = "auto", keep_fp32_ops: tuple[str, ...] = (),
             budgets: Budgets | None = None, parity_n: int = gates.DEFAULT_PARITY_N,
             task_frames: int | None = gates.DEFAULT_TASK_FRAMES, threads: int | None = None,
             reference: Reference | None = None, progress: bool = True) -> QuantizeResult:
    """Quantize the fp32 ONNX `src`; returns the published artifact and its manifest (raises GateFailed if failed)."""
    # The whole stage's peak (reference model, quantization, gate session) next to the conversion's own.
    with mf.PeakRSS() as stage_peak:
        return _quantize(src, mode, out_dir=out_dir, episodes=episodes, calib=calib, calib_frames=calib_frames,
                         calib_method=calib_method, per_channel=per_channel, fusion=fusion, engine=engine,
                         keep_fp32_ops=keep_fp32_ops, budgets=budgets, parity_n=parity_n, task_frames=task_frames,
                         threads=threads, reference=reference, progress=progress, stage_peak=stage_peak)


def _quantize(src, mode, *, out_dir, episodes, calib, calib_frames, calib_method, per_channel, fusion, engine,
              keep_fp32_ops, budgets, parity_n, task_frames, threads, reference, progress, stage_peak
              ) -> QuantizeResult:
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "static" and not calib:
        raise UserError("--mode static needs calibration frames: pass --calib DIR (a directory of episodes)")
    if fusion not in ("auto", "on", "off"):
        raise UserError(f"unknown --fusion {fusion!r}; choose auto, on or off")
    from vla_export.quantize.ort_quant import CALIB_METHODS

    if calib_method not in CALIB_METHODS:
        raise UserError(f"unknown --calib-method {calib_method!r}; choose one of {', '.join(CALIB_METHODS)}")
    if calib_frames < 1:
        raise UserError(f"--calib-frames must be at least 1, got {calib_frames}")
    budgets = budgets or Budgets()
    src = Path(src)
    source, _graph = open_source(src)
    del _graph
    engine = resolve_engine(engine, mode, source)
    out = output_path(src, mode, out_dir)
    if out.resolve() == src.resolve():
        raise UserError(f"output {out} would overwrite the input; choose another -o")
    mf.check_writable_dir(out.parent)
    suffix, variant, precision = MODES[mode]

    with _steps(progress) as step:
        calib_feeds = None
        if mode == "static":
            step(f"preprocessing up to {calib_frames} calibration frames from {calib}")
            if not (source.checkpoint and Path(source.checkpoint).exists()):
                raise UserError(f"calibration needs the source checkpoint {source.checkpoint} (its preprocessing); "
                                "restore it or re-export")
            if source.spec.state:
                calib_feeds = _recurrent_calibration(source, calib, calib_frames)
            else:
                calib_feeds = gates.load_calibration(source.checkpoint, calib, calib_frames)
            gates.check_frames_fit(calib_feeds, source.spec, calib, "--calib")
        if reference is None:
            step("fp32 PyTorch reference on parity inputs" + (" and validation frames" if episodes else ""))
            reference = gates.load_reference(source.checkpoint, source.checkpoint_sha256, episodes=episodes,
                                             parity_n=parity_n, task_frames=task_frames,
                                             load_kwargs=source.checkpoint_load_kwargs())
        # Only the reference's outputs are needed from here on; drop the torch weights before quantizing.
        reference.checkpoint.model = None
        gc.collect()

        with mf.staging_dir(out.parent) as stage:
            work = stage / "work"
            work.mkdir()
            staged = stage / out.name
            step("fp16 conversion" if mode == "fp16" else f"{mode} INT8 quantization ({engine} engine)")
            with mf.measured() as timing:
                details = _convert(mode, engine, source, staged, work, calib_feeds=calib_feeds,
                                   calib_method=calib_method, per_channel=per_channel, fusion=fusion,
                                   keep_fp32_ops=keep_fp32_ops, reference=reference)
            shutil.rmtree(work, ignore_errors=True)
            step("accuracy gate: ONNX Runtime vs PyTorch fp32")
            t0 = time.perf_counter()
            result, failures = gates.evaluate(staged, precision, reference, budgets, threads=threads)
            gate_wall = round(time.perf_counter() - t0, 3)
            staged_files = mf.artifact_files(staged)
            # A stale manifest must never describe the new bytes, even for a moment.
            with contextlib.suppress(FileNotFoundError):
                os.remove(mf.manifest_path(out))
            published = mf.publish(staged_files, out.parent)[0]

    total = mf.total_bytes(published)
    settings = {"mode": mode, "engine": engine, "per_channel": per_channel, "fusion_option": fusion,
                "calib": str(Path(calib).resolve()) if calib else None,
                "calib_frames": calib_frames if mode == "static" else None,
                "calib_method": calib_method if mode == "static" else None,
                "calib_state": ("recurrent state of each frame from a rollout of the fp32 ONNX over whole training "
                                "episodes" if mode == "static" and source.spec.state else None),
                "keep_fp32_ops": list(keep_fp32_ops) if mode == "fp16" else None,
                "episodes": str(Path(episodes).resolve()) if episodes else None,
                "parity_n": parity_n, "task_frames": task_frames,
                "budgets": {"tol_fp16": budgets.tol_fp16, "tol_int8": budgets.tol_int8,
                            "max_task_mae_increase": budgets.max_task_mae_increase},
                **details}
    m = mf.new_manifest(
        "quantize", published, backend="onnxruntime", precision=precision, variant=variant,
        io_spec=source.manifest["io_spec"], source=source.source_record(), settings=settings,
        timing={**timing, "gate_wall_s": gate_wall, "stage_peak_rss_bytes": max(stage_peak.peak_bytes,
                                                                             timing["peak_rss_bytes"])},
        sizes={"total_bytes": total, "source_total_bytes": source.total_bytes,
               "ratio_to_fp32": round(total / source.total_bytes, 4),
               "source_files": mf.file_sizes(source.files)},
        metrics=result, status="failed" if failures else "passed",
    )
    if failures:
        m["failure"] = "; ".join(failures)
    mf.write_manifest(published, m)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(gates.gate_table(published.name, result, failures))
        Console(stderr=True).print(f"{published.name}: {total:,} bytes ({total / source.total_bytes:.3f}x fp32 "
                                   f"{source.total_bytes:,}), quantized in {timing['wall_s']:.1f} s, peak RSS "
                                   f"{timing['peak_rss_bytes'] / 2**20:.0f} MiB")
    if failures:
        raise GateFailed(f"{published.name} failed its accuracy gate ({'; '.join(failures)}); it is kept, marked "
                         f"failed in {mf.manifest_path(published).name}: loosen the budget or try another mode")
    return QuantizeResult(published, m)


def _recurrent_calibration(source: SourceModel, calib, calib_frames: int) -> dict:
    """Calibration frames of a recurrent head, each with the state the fp32 model carries into it.

    Zero states alone would calibrate the state inputs' ranges to nothing and clip every real state; so whole
    training episodes (in time order) are rolled out through the fp32 ONNX and each frame is paired with its state."""
    from vla_export.validate.runners import OrtRunner

    data = gates.load_frames(source.checkpoint, calib, "train", calib_frames, "--calib")
    feeds = dict(data.feeds)
    n = len(data.actions)
    gates.check_frames_fit(feeds | source.spec.initial_state(n), source.spec, calib, "--calib")
    with OrtRunner(source.path, source.spec, name="fp32-calibration-rollout") as runner:
        states = gates.rollout_states(runner.infer, feeds, gates.episode_index(list(data.episode)), source.spec)
    return feeds | states


def _convert(mode: str, engine: str, source: SourceModel, staged: Path, work: Path, *, calib_feeds, calib_method,
             per_channel, fusion, keep_fp32_ops, reference: Reference) -> dict[str, Any]:
    from vla_export.quantize import ort_quant

    if mode == "fp16":
        from vla_export.quantize.fp16 import convert_fp16

        return {"engine": "onnxconverter-common", "fp16": convert_fp16(source.path, staged, tuple(keep_fp32_ops))}
    if mode == "static":
        return ort_quant.static_int8(source.path, staged, work, feeds=calib_feeds,
                                     input_names=source.spec.input_names, calib_method=calib_method,
                                     per_channel=per_channel)
    if engine == "streaming":
        from vla_export.quantize.streaming import quantize_dynamic_streaming

        return quantize_dynamic_streaming(source.path, staged, per_channel=per_channel, fusion=fusion)
    return ort_quant.dynamic_int8(source.path, staged, work, per_channel=per_channel, fusion=fusion,
                                  choose_feeds=reference.parity_feeds, choose_ref=reference.parity_out)
