"""`vla-export profile`: latency, throughput, load time, memory and size of every artifact on every device it runs on
here, plus the eager PyTorch model of each source checkpoint (fp32 on CPU; fp32 and fp16 on CUDA when present).

Timing is the runner's `time_prepared` (inputs staged once, warm-up, then CUDA events on GPU or `perf_counter`
around a synchronous call on CPU) summarised by `metrics.latency_stats`.

Memory: by default each row runs in its own Python process (`isolate=True`), so one runner's allocations, caches
and thread pools do not leak into the next row's numbers. The processes are forked from a multiprocessing
forkserver that has imported the libraries every row needs (`WORKER_PRELOAD`) once and run nothing: a fresh
interpreter per row had spent ~6 s importing them (39 s of an 83 s profile of the demo's six rows on a 2-core EPYC),
and the server never touches CUDA or a thread pool, so each fork starts as clean as a new interpreter. A row records `peak_rss_bytes` (the process's peak RSS
while loading and timing, sampled by `manifest.PeakRSS`), `rss_delta_bytes` (that peak minus the RSS after imports,
before loading: what this runner costs), and on CUDA `cuda_max_allocated_bytes` (torch's allocator high-water mark;
ORT/TensorRT allocate outside it, so it is recorded only for torch rows). With `isolate=False` the same numbers are
taken in-process, which is faster but lets earlier rows' memory colour later ones.

Speed-ups are computed only between rows of one run on one device: each row against the eager fp32 row of its
device (`speedup_vs_eager` at each batch size).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from vla_export import manifest as mf
from vla_export.errors import BackendUnavailable, UserError
from vla_export.io_spec import IOSpec

PROFILE_FILE = "profile.json"
DEFAULT_WARMUP = 50
DEFAULT_ITERS = 100
DEFAULT_BATCHES = (1, 8)
ROW_KEYS = ("id", "kind", "name", "artifact", "artifact_sha256", "backend", "precision", "variant", "device", "provider",
            "checkpoint")


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# -- what to measure ---------------------------------------------------------------------------------------------------
def plan_targets(paths: list[str | os.PathLike], include_eager: bool = True,
                 providers: list[str] | None = None) -> list[dict[str, Any]]:
    """One target per (artifact, device/provider) and per (checkpoint, device, precision) eager model."""
    from vla_export.runtime import ORT_PROVIDER_DEVICE, available_ort_providers
    from vla_export.validate.validate import find_artifacts, row_id

    artifacts = find_artifacts(paths)
    providers = providers or available_ort_providers()
    targets: list[dict[str, Any]] = []
    checkpoints: list[str] = []
    for a in artifacts:
        if a.checkpoint and a.checkpoint not in checkpoints:
            checkpoints.append(a.checkpoint)
        common = {"kind": "artifact", "artifact": str(a.path), "name": a.name, "backend": a.backend,
                  "precision": a.precision, "variant": a.variant, "checkpoint": a.checkpoint,
                  "artifact_sha256": a.manifest.get("sha256")}
        if a.backend == "onnxruntime":
            for p in providers:
                targets.append(common | {"id": row_id(a.name, ORT_PROVIDER_DEVICE[p], p), "provider": p,
                                         "device": ORT_PROVIDER_DEVICE[p]})
        else:
            device = "cuda" if a.backend == "tensorrt" else a.manifest.get("device", "cpu")
            targets.append(common | {"id": row_id(a.name, device, None), "provider": None, "device": device})
    if include_eager:
        devices = [("cpu", "fp32")] + ([("cuda", "fp32"), ("cuda", "fp16")] if cuda_available() else [])
        for ckpt in checkpoints:
            if not Path(ckpt).exists():
                continue
            for device, precision in devices:
                name = f"pytorch-eager-{precision}"
                if len(checkpoints) > 1:
                    name += f" ({Path(ckpt).name})"
                targets.append({"kind": "eager", "id": f"{name}@{device}", "name": name, "backend": "torch",
                                "precision": precision, "variant": f"torch-eager-{precision}", "checkpoint": ckpt,
                                "provider": None, "device": device, "artifact": None})
    return targets


# -- one target ------------------------------------------------------------------------------------------------------
def _example_spec(target: dict[str, Any], artifact_spec: IOSpec | None) -> IOSpec:
    """The checkpoint's spec (it has the model's example-input factory), else the artifact's generic one."""
    ckpt = target.get("checkpoint")
    if ckpt and Path(ckpt).exists():
        try:
            from vla_export.checkpoint import load_spec

            return load_spec(ckpt)[0]
        except UserError:
            pass
    if artifact_spec is None:
        raise UserError(f"{target['id']}: no checkpoint and no IO spec to make inputs from")
    return artifact_spec


def _threads_used(target: dict[str, Any], threads: int | None) -> int | None:
    if target["device"] != "cpu":
        return None
    if threads:
        return threads
    if target["backend"] == "onnxruntime":
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count()  # ORT's default intra-op pool: physical cores
    import torch

    return torch.get_num_threads()


def _make_runner(target: dict[str, Any], threads: int | None):
    from vla_export.runtime import OrtRunner, TorchRunner, open_runner

    if target["kind"] == "eager":
        from vla_export.checkpoint import load_checkpoint

        if target["device"].startswith("cuda") and not cuda_available():
            raise BackendUnavailable("no CUDA device here")
        ck = load_checkpoint(target["checkpoint"])
        return TorchRunner(ck.model, ck.spec, name=target["name"], device=target["device"],
                           precision=target["precision"])
    runner = open_runner(target["artifact"], device=target["device"], provider=target["provider"])
    if isinstance(runner, OrtRunner):
        runner.threads = threads
    if runner.device.startswith("cuda") and target["backend"] != "onnxruntime" and not cuda_available():
        raise BackendUnavailable("no CUDA device here")
    return runner


def measure_target(target: dict[str, Any], batches: list[int], warmup: int, iters: int,
                   threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Load one runner, time it at each batch size, and record memory. Returns one profile row."""
    from vla_export.validate.metrics import latency_stats
    from vla_export.validate.validate import cast_feeds

    if threads:
        import torch

        torch.set_num_threads(threads)
    row: dict[str, Any] = {k: target.get(k) for k in ROW_KEYS}
    row |= {"threads": _threads_used(target, threads), "status": "ok", "batches": {}}
    if target.get("artifact"):
        row["size_bytes"] = mf.total_bytes(target["artifact"])
    elif target.get("checkpoint"):
        from vla_export.checkpoint import checkpoint_files

        row["size_bytes"] = sum(p.stat().st_size for p in checkpoint_files(Path(target["checkpoint"]))
                                if p.suffix == ".safetensors")
    # Libraries every row needs are imported before the baseline, so rss_delta_bytes is the runner's own cost.
    import torch  # noqa: F401

    if target["backend"] == "onnxruntime":
        import onnxruntime  # noqa: F401
    peak = mf.PeakRSS()
    baseline = peak._rss()
    cuda_torch = target["device"].startswith("cuda") and target["backend"] in ("torch", "aoti")
    if cuda_torch and cuda_available():
        import torch

        torch.cuda.reset_peak_memory_stats()
    runner = None
    try:
        with peak:
            t0 = time.perf_counter()
            runner = _make_runner(target, threads)
            runner.activate()
            row["load_s"] = time.perf_counter() - t0  # eager: includes reading the checkpoint
            spec = _example_spec(target, runner.spec)
            max_batch = _max_batch(runner.spec)
            for b in batches:
                if b > max_batch:
                    row["batches"][str(b)] = {"skipped": f"batch {b} > max batch {max_batch}"}
                    continue
                feeds = cast_feeds(spec.example_inputs(batch=b, seed=seed), runner.spec)
                if spec.state:
                    feeds |= cast_feeds(spec.initial_state(b), runner.spec)
                times = runner.time_prepared(feeds, warmup, iters)
                row["batches"][str(b)] = latency_stats(times, b) | {"warmup": warmup}
    except BackendUnavailable as e:
        row["status"], row["reason"] = "skipped", str(e)
    except UserError as e:
        row["status"], row["reason"] = "failed", str(e)
    finally:
        if runner is not None:
            runner.deactivate()
    row["peak_rss_bytes"] = peak.peak_bytes
    row["rss_delta_bytes"] = max(peak.peak_bytes - baseline, 0)
    if cuda_torch and cuda_available():
        import torch

        row["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return row


def _max_batch(spec: IOSpec) -> int:
    dim = spec.dims.get("batch")
    if dim is None:
        return 1
    return dim.max if dim.dynamic else dim.opt


# What every row imports before its baseline RSS: imported once by the forkserver, inherited by each row's process.
# Modules that are not installed (onnxruntime on a torch-only target) are skipped by the server.
WORKER_PRELOAD = ("numpy", "torch", "onnxruntime", "vla_export.runtime", "vla_export.checkpoint",
                  "vla_export.validate.validate", "vla_export.validate.metrics", "vla_export.validate.profile")
_worker_context = None


def worker_context():
    """The multiprocessing context rows run in: a forkserver with `WORKER_PRELOAD` imported (started on first use)."""
    global _worker_context
    if _worker_context is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(WORKER_PRELOAD))
        _worker_context = ctx
    return _worker_context


def measure_isolated(target: dict[str, Any], batches: list[int], warmup: int, iters: int,
                     threads: int | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """`measure_target` in its own process (clean memory numbers); a crash becomes a failed row."""
    with tempfile.TemporaryDirectory(prefix="vla-profile-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "row.json"
        job.write_text(json.dumps({"target": target, "batches": batches, "warmup": warmup, "iters": iters,
                                   "threads": threads}))
        proc = worker_context().Process(target=_row_process, args=(str(job), str(result)), name="vla-profile-row")
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
            return _failed_row(target, f"timed out after {timeout_s} s")
        row = json.loads(result.read_text()) if result.exists() else {}
        if "worker_error" in row:
            return _failed_row(target, f"worker failed: {row['worker_error']}")
        if proc.exitcode != 0 or not row:
            how = f"signal {-proc.exitcode}" if proc.exitcode and proc.exitcode < 0 else f"exit {proc.exitcode}"
            return _failed_row(target, f"worker died ({how}) without a result")
        return row


def _failed_row(target: dict[str, Any], reason: str) -> dict[str, Any]:
    return {k: target.get(k) for k in ROW_KEYS} | {
        "status": "failed", "reason": reason, "batches": {}}


# -- the whole run ---------------------------------------------------------------------------------------------------
def add_speedups(rows: list[dict[str, Any]]) -> None:
    """`speedup_vs_eager[batch]` = eager fp32 p50 / row p50, both measured on the same device in this run."""
    eager = {r["device"]: r for r in rows if r["kind"] == "eager" and r["precision"] == "fp32"
             and r["status"] == "ok"}
    for r in rows:
        base = eager.get(r["device"])
        r["baseline"] = base["id"] if base else None
        r["speedup_vs_eager"] = {}
        if base is None or r["status"] != "ok":
            continue
        for b, stats in r["batches"].items():
            ref = base["batches"].get(b, {})
            if "p50_ms" in stats and "p50_ms" in ref:
                r["speedup_vs_eager"][b] = ref["p50_ms"] / stats["p50_ms"]


def profile(paths: list[str | os.PathLike], *, warmup: int = DEFAULT_WARMUP, iters: int = DEFAULT_ITERS,
            batches: list[int] | tuple[int, ...] = DEFAULT_BATCHES, threads: int | None = None,
            isolate: bool = True, include_eager: bool = True, output: str | os.PathLike | None = None,
            command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Profile every artifact under `paths` (and the eager models); writes profile.json atomically, returns it."""
    from vla_export.validate.validate import _progress, output_dir_for

    if warmup < 0 or iters < 2:
        raise UserError(f"need --warmup >= 0 and --iters >= 2 (for a std), got {warmup}/{iters}")
    if not batches or min(batches) < 1:
        raise UserError(f"--batch needs positive sizes, got {list(batches)}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    targets = plan_targets(paths, include_eager=include_eager)
    out_path = Path(output) if output else output_dir_for(paths) / PROFILE_FILE
    mf.check_writable_dir(out_path.parent)
    rows = []
    with _progress(progress) as bar:
        task = bar.add_task("profile", total=len(targets))
        for t in targets:
            bar.update(task, description=f"{t['id']}")
            if isolate:
                rows.append(measure_isolated(t, list(batches), warmup, iters, threads))
            else:
                rows.append(measure_target(t, list(batches), warmup, iters, threads))
            bar.advance(task)
    add_speedups(rows)
    result = {
        **mf.run_header(command),
        "settings": {"warmup": warmup, "iters": iters, "batches": list(batches), "threads": threads,
                     "isolate": isolate, "timing": "CUDA events on GPU, perf_counter around synchronous calls on CPU"},
        "rows": rows,
    }
    mf.write_text_atomic(out_path, json.dumps(result, indent=2, default=mf._json_default) + "\n")
    result["path"] = str(out_path)
    return result


def profile_table(result: dict[str, Any], batch: str | None = None):
    """A rich table: one line per row and batch size; speed-ups only against the same device's eager row."""
    from rich.table import Table

    from vla_export.validate.validate import device_label

    table = Table(title=f"profile (run {result['run_id']}; speed-up vs eager fp32 on the same device)")
    for col in ("artifact", "backend", "device", "threads", "batch", "load s", "mean ms", "std", "p50 ms", "p99 ms",
                "FPS", "speed-up", "peak RSS MB", "size MB", "status"):
        left = col in ("artifact", "backend", "device", "status")
        table.add_column(col, justify="left" if left else "right", no_wrap=col != "status")
    for r in result["rows"]:
        sizes = [(b, s) for b, s in r["batches"].items() if batch is None or b == batch] or [("-", {})]
        for b, s in sizes:
            sp = r.get("speedup_vs_eager", {}).get(b)
            if "skipped" in s:
                status = f"skipped: {s['skipped']}"
            else:
                status = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('reason')}"
            table.add_row(r["name"], r["backend"], device_label(r["device"], r["provider"]), str(r.get("threads") or "-"), b,
                          _f(r.get("load_s"), ".2f"), _f(s.get("mean_ms")), _f(s.get("std_ms")), _f(s.get("p50_ms")),
                          _f(s.get("p99_ms")), _f(s.get("fps"), ".1f"), _f(sp, ".2f", "x"),
                          _f(_mb(r.get("peak_rss_bytes")), ".0f"), _f(_mb(r.get("size_bytes")), ".2f"), status)
    return table


def _mb(v):
    return None if v is None else v / 1e6  # MB (10^6), as in report.md


def _f(v, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def _row_process(job_path: str, out_path: str) -> None:
    """A row's process: `measure_target` on the job file's target, its row (or its error) written to `out_path`."""
    job = json.loads(Path(job_path).read_text())
    try:
        row = measure_target(job["target"], job["batches"], job["warmup"], job["iters"], job["threads"])
    except Exception as e:  # noqa: BLE001 - reported as the row's failure, in the parent
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        row = {"worker_error": f"{type(e).__name__}: {lines[0] if lines else ''}"}
    Path(out_path).write_text(json.dumps(row, default=mf._json_default))
