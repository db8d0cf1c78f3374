"""The quantize stage: fp32 ONNX -> INT8 dynamic / INT8 static QDQ / FP16 ONNX, gated against the PyTorch reference.

`quantize_modes(src, modes, ...)` checks every input first, builds the fp32 reference once (outputs on the parity
inputs and validation frames; then it frees the torch model, so it is never resident next to the quantizer's copies)
and, one mode after another, converts into a staging directory, gates the staged artifact, publishes it and writes
its manifest: `passed`, or `failed` with the reason. If any mode failed, `GateFailed` (exit 3) is raised after every
artifact and its manifest are on disk for inspection. `quantize(src, mode, ...)` is the one-mode form.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla_export import manifest as mf
from vla_export.errors import GateFailed, UserError
from vla_export.export.onnx_export import release_memory
from vla_export.quantize import gate as gates
from vla_export.quantize.gate import Budgets, Reference
from vla_export.quantize.source import SourceModel, open_source
from vla_export.quantize.targets import DEFAULT_TARGET_CPU, Int8Target, host_note, resolve_target_cpu

log = logging.getLogger(__name__)

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


def parse_modes(values: str | Sequence[str]) -> tuple[str, ...]:
    """`--mode` values, each one mode or a comma list (`dynamic,fp16`), as modes in the given order without repeats."""
    if isinstance(values, str):
        values = (values,)
    modes: list[str] = []
    for value in values:
        for mode in (m.strip() for m in str(value).split(",")):
            if mode not in MODES:
                raise UserError(f"unknown --mode {mode!r}; choose one or more of {', '.join(MODES)} (repeat --mode "
                                "or separate them with commas)")
            if mode not in modes:
                modes.append(mode)
    if not modes:
        raise UserError(f"no --mode given; choose one or more of {', '.join(MODES)}")
    return tuple(modes)


def quantize(src: str | os.PathLike, mode: str, *, out_dir: str | os.PathLike | None = None,
             episodes: str | os.PathLike | None = None, calib: str | os.PathLike | None = None,
             calib_frames: int = DEFAULT_CALIB_FRAMES, calib_method: str = "minmax", per_channel: bool = True,
             fusion: str = "auto", engine: str = "auto", keep_fp32_ops: tuple[str, ...] = (),
             budgets: Budgets | None = None, parity_n: int = gates.DEFAULT_PARITY_N,
             task_frames: int | None = gates.DEFAULT_TASK_FRAMES, threads: int | None = None,
             reference: Reference | None = None, progress: bool = True,
             target_cpu: str = DEFAULT_TARGET_CPU) -> QuantizeResult:
    """Quantize the fp32 ONNX `src`; returns the published artifact and its manifest (raises GateFailed if failed)."""
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    return quantize_modes(src, (mode,), out_dir=out_dir, episodes=episodes, calib=calib, calib_frames=calib_frames,
                          calib_method=calib_method, per_channel=per_channel, fusion=fusion, engine=engine,
                          keep_fp32_ops=keep_fp32_ops, budgets=budgets, parity_n=parity_n, task_frames=task_frames,
                          threads=threads, reference=reference, progress=progress, target_cpu=target_cpu)[0]


def quantize_modes(src: str | os.PathLike, modes: str | Sequence[str], *, out_dir: str | os.PathLike | None = None,
                   episodes: str | os.PathLike | None = None, calib: str | os.PathLike | None = None,
                   calib_frames: int = DEFAULT_CALIB_FRAMES, calib_method: str = "minmax", per_channel: bool = True,
                   fusion: str = "auto", engine: str = "auto", keep_fp32_ops: tuple[str, ...] = (),
                   budgets: Budgets | None = None, parity_n: int = gates.DEFAULT_PARITY_N,
                   task_frames: int | None = gates.DEFAULT_TASK_FRAMES, threads: int | None = None,
                   reference: Reference | None = None, progress: bool = True,
                   target_cpu: str = DEFAULT_TARGET_CPU) -> list[QuantizeResult]:
    """Quantize `src` in each of `modes` (one after another) against one fp32 reference built once for all of them.

    Every input is checked before any work. Each artifact gets its own gate verdict and manifest; if any failed,
    GateFailed (exit 3) is raised after all modes are written and judged, naming the failed ones (`.results` holds
    every QuantizeResult). Options for one mode only (calib for static, fusion/engine for dynamic, keep_fp32_ops for
    fp16) apply to that mode; `target_cpu` (targets.py) sets the INT8 weight range of dynamic and static."""
    modes = parse_modes(modes)
    target = resolve_target_cpu(target_cpu)
    if "static" in modes and not calib:
        raise UserError("--mode static needs calibration frames: pass --calib DIR (a directory of episodes)")
    if fusion not in ("auto", "on", "off"):
        raise UserError(f"unknown --fusion {fusion!r}; choose auto, on or off")
    if engine not in ENGINES:
        raise UserError(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "streaming" and "dynamic" not in modes:
        raise UserError("--engine streaming applies to --mode dynamic only")
    from vla_export.quantize.ort_quant import CALIB_METHODS

    if calib_method not in CALIB_METHODS:
        raise UserError(f"unknown --calib-method {calib_method!r}; choose one of {', '.join(CALIB_METHODS)}")
    if calib_frames < 1:
        raise UserError(f"--calib-frames must be at least 1, got {calib_frames}")
    budgets = budgets or Budgets()
    src = Path(src)
    # The shared part's peak (input checks, calibration frames, the fp32 reference); each mode adds its own.
    with mf.PeakRSS() as shared_peak:
        source, _graph = open_source(src)
        del _graph
        plan: list[tuple[str, str, Path]] = []  # (mode, engine, output path)
        for mode in modes:
            out = output_path(src, mode, out_dir)
            if out.resolve() == src.resolve():
                raise UserError(f"output {out} would overwrite the input; choose another -o")
            mf.check_writable_dir(out.parent)
            plan.append((mode, resolve_engine(engine if mode == "dynamic" else "ort", mode, source), out))
        calib_feeds, reference_wall = None, None
        if progress and len(modes) > 1:
            from rich.console import Console

            Console(stderr=True).print(f"quantize {src.name}: {len(modes)} modes ({', '.join(modes)}), one after "
                                       "another, against one fp32 reference")
        with _steps(progress) as step:
            if "static" in modes:
                step(f"preprocessing up to {calib_frames} calibration frames from {calib}")
                if not (source.checkpoint and Path(source.checkpoint).exists()):
                    raise UserError(f"calibration needs the source checkpoint {source.checkpoint} (its "
                                    "preprocessing); restore it or re-export")
                if source.spec.state:
                    calib_feeds = _recurrent_calibration(source, calib, calib_frames)
                else:
                    calib_feeds = gates.load_calibration(source.checkpoint, calib, calib_frames)
                gates.check_frames_fit(calib_feeds, source.spec, calib, "--calib")
            if reference is None:
                step("fp32 PyTorch reference on parity inputs" + (" and validation frames" if episodes else ""))
                log.info("building the fp32 PyTorch reference from %s for %s", source.checkpoint, ", ".join(modes))
                t0 = time.perf_counter()
                reference = gates.load_reference(source.checkpoint, source.checkpoint_sha256, episodes=episodes,
                                                 parity_n=parity_n, task_frames=task_frames,
                                                 load_kwargs=source.checkpoint_load_kwargs())
                reference_wall = round(time.perf_counter() - t0, 3)
        # Only the reference's inputs and outputs (megabytes) are needed from here on: drop the torch weights before
        # the first conversion, so they are never resident next to a quantizer's copies. The rest serves every mode,
        # so it is kept: rebuilding it per mode would cost time and save nothing at the peak.
        reference.checkpoint.model = None
        release_memory()

    results: list[QuantizeResult] = []
    for i, (mode, mode_engine, out) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)} {mode}] " if len(plan) > 1 else ""
        with mf.PeakRSS() as mode_peak:
            results.append(_quantize_one(
                source, mode, mode_engine, out, tag=tag, all_modes=modes, episodes=episodes, calib=calib,
                calib_feeds=calib_feeds if mode == "static" else None, calib_frames=calib_frames,
                calib_method=calib_method, per_channel=per_channel, fusion=fusion, keep_fp32_ops=keep_fp32_ops,
                target=target,
                budgets=budgets, parity_n=parity_n, task_frames=task_frames, threads=threads, reference=reference,
                reference_wall=reference_wall, progress=progress,
                stage_peak=lambda mode_peak=mode_peak: max(shared_peak.peak_bytes, mode_peak.peak_bytes)))
        # This mode's sessions and models are gone: hand their heap back to the OS before the next mode converts, so
        # a multi-mode run peaks at its largest mode (plus the reference's arrays), never at a sum of modes.
        release_memory()

    failed = [r for r in results if not r.passed]
    if progress and len(results) > 1:
        from rich.console import Console

        Console(stderr=True).print("quantize: " + ", ".join(
            f"{r.manifest['settings']['mode']} {r.path.name} {'FAILED' if not r.passed else 'passed'}"
            for r in results))
    if failed:
        if len(results) == 1:
            r = failed[0]
            err = GateFailed(f"{r.path.name} failed its accuracy gate ({r.manifest['failure']}); it is kept, marked "
                             f"failed in {mf.manifest_path(r.path).name}: loosen the budget or try another mode")
        else:
            passed = [r.path.name for r in results if r.passed]
            err = GateFailed(
                f"{len(failed)} of {len(results)} artifacts failed their accuracy gate: "
                + "; ".join(f"{r.manifest['settings']['mode']} {r.path.name} ({r.manifest['failure']})"
                            for r in failed)
                + f"; kept, marked failed in their manifests; passed: {', '.join(passed) or 'none'}")
        err.results = results
        raise err
    return results


def _quantize_one(source: SourceModel, mode: str, engine: str, out: Path, *, tag: str, all_modes: tuple[str, ...],
                  episodes, calib, calib_feeds, calib_frames, calib_method, per_channel, fusion, keep_fp32_ops,
                  target: Int8Target, budgets: Budgets, parity_n, task_frames, threads, reference: Reference, reference_wall,
                  progress: bool, stage_peak: Callable[[], int]) -> QuantizeResult:
    """Convert, gate, publish and write the manifest of one mode; the verdict is in the manifest, never raised."""
    suffix, variant, precision = MODES[mode]
    with _steps(progress) as step, mf.staging_dir(out.parent) as stage:
        work = stage / "work"
        work.mkdir()
        staged = stage / out.name
        step(tag + ("fp16 conversion" if mode == "fp16" else f"{mode} INT8 quantization ({engine} engine)"))
        with mf.measured() as timing:
            details = _convert(mode, engine, source, staged, work, calib_feeds=calib_feeds,
                               calib_method=calib_method, per_channel=per_channel, fusion=fusion,
                               keep_fp32_ops=keep_fp32_ops, reference=reference, target=target)
        shutil.rmtree(work, ignore_errors=True)
        step(tag + "accuracy gate: ONNX Runtime vs PyTorch fp32")
        t0 = time.perf_counter()
        result, failures = gates.evaluate(staged, precision, reference, budgets, threads=threads,
                                            variant=variant)
        gate_wall = round(time.perf_counter() - t0, 3)
        staged_files = mf.artifact_files(staged)
        # A stale manifest must never describe the new bytes, even for a moment.
        with contextlib.suppress(FileNotFoundError):
            os.remove(mf.manifest_path(out))
        published = mf.publish(staged_files, out.parent)[0]

    total = mf.total_bytes(published)
    host_kernels = mf.cpu_features()["int8_kernels"]
    settings = {"mode": mode, "engine": engine, "per_channel": per_channel, "fusion_option": fusion,
                "calib": str(Path(calib).resolve()) if calib and mode == "static" else None,
                "calib_frames": calib_frames if mode == "static" else None,
                "calib_method": calib_method if mode == "static" else None,
                "calib_state": ("recurrent state of each frame from a rollout of the fp32 ONNX over whole training "
                                "episodes" if mode == "static" and source.spec.state else None),
                "keep_fp32_ops": list(keep_fp32_ops) if mode == "fp16" else None,
                # The CPU the INT8 weights were ranged for, what that means, and what judged it here (the manifest's
                # machine record has the full feature list).
                "target_cpu": target.record(mode) | {
                    "gate_host_int8_kernels": host_kernels,
                    "note": host_note(target, host_kernels)} if precision == "int8" else None,
                "episodes": str(Path(episodes).resolve()) if episodes else None,
                "parity_n": parity_n, "task_frames": task_frames,
                "budgets": budgets.record(),
                # the modes of this call, which shared one fp32 reference
                "modes_in_call": list(all_modes),
                **details}
    m = mf.new_manifest(
        "quantize", published, backend="onnxruntime", precision=precision, variant=variant,
        io_spec=source.manifest["io_spec"], source=source.source_record(), settings=settings,
        timing={**timing, "gate_wall_s": gate_wall, "reference_wall_s": reference_wall,
                "stage_peak_rss_bytes": max(stage_peak(), timing["peak_rss_bytes"])},
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
    return QuantizeResult(published, m)


def _recurrent_calibration(source: SourceModel, calib, calib_frames: int) -> dict:
    """Calibration frames of a recurrent head, each with the state the fp32 model carries into it.

    Zero states alone would calibrate the state inputs' ranges to nothing and clip every real state; so whole
    training episodes (in time order) are rolled out through the fp32 ONNX and each frame is paired with its state."""
    from vla_export.runtime import OrtRunner

    data = gates.load_frames(source.checkpoint, calib, "train", calib_frames, "--calib")
    feeds = dict(data.feeds)
    n = len(data.actions)
    gates.check_frames_fit(feeds | source.spec.initial_state(n), source.spec, calib, "--calib")
    with OrtRunner(source.path, source.spec, name="fp32-calibration-rollout") as runner:
        states = gates.rollout_states(runner.infer, feeds, gates.episode_index(list(data.episode)), source.spec)
    return feeds | states


def _convert(mode: str, engine: str, source: SourceModel, staged: Path, work: Path, *, calib_feeds, calib_method,
             per_channel, fusion, keep_fp32_ops, reference: Reference, target: Int8Target) -> dict[str, Any]:
    from vla_export.quantize import ort_quant

    if mode == "fp16":
        from vla_export.quantize.fp16 import convert_fp16

        return {"engine": "onnxconverter-common", "fp16": convert_fp16(source.path, staged, tuple(keep_fp32_ops))}
    if mode == "static":
        return ort_quant.static_int8(source.path, staged, work, feeds=calib_feeds,
                                     input_names=source.spec.input_names, calib_method=calib_method,
                                     per_channel=per_channel, reduce_range=target.reduce_range)
    if engine == "streaming":
        from vla_export.quantize.streaming import quantize_dynamic_streaming

        return quantize_dynamic_streaming(source.path, staged, per_channel=per_channel, fusion=fusion,
                                          reduce_range=target.reduce_range)
    return ort_quant.dynamic_int8(source.path, staged, work, per_channel=per_channel, fusion=fusion,
                                  reduce_range=target.reduce_range,
                                  choose_feeds=reference.parity_feeds, choose_ref=reference.parity_out)
