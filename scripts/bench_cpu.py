#!/usr/bin/env python
"""CPU benchmark in one process on one CPU: eager fp32, ORT fp32, ORT int8 (dynamic), ORT fp16, AOTInductor (cpu).

Builds (or takes) a checkpoint, runs the real stages (export, quantize, aoti) into a work directory, then times
every artifact with the same inputs, thread count, warm-up and iterations, and prints p50 latency, the speed-up of
each over eager PyTorch fp32 (same machine, same run) and the parity MAE of `actions` against eager fp32.
A stage that is missing or fails gives a row with the reason instead of a number.

Usage:
  .venv/bin/python scripts/bench_cpu.py --preset tiny
  .venv/bin/python scripts/bench_cpu.py --preset small --threads 2 --iters 30   # the lead's run
  .venv/bin/python scripts/bench_cpu.py --checkpoint checkpoints/demo --work /tmp/bench --json bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ARCH = "kosmos2-clip-hybrid"


def random_checkpoint(out_dir: Path, preset: str, head: str, seed: int = 0) -> Path:
    """An untrained native checkpoint of `preset` with word-level tokenizers (what `vla-export checkpoint --random`
    writes)."""
    import torch

    from vla_export.checkpoint import make_config, save_checkpoint
    from vla_export.data.episodes import synth_instructions
    from vla_export.data.preprocess import build_tokenizers
    from vla_export.models import build_model

    config = make_config(ARCH, preset, {"head": head})
    torch.manual_seed(seed)
    model, _ = build_model(ARCH, config["model_config"])
    mc = config["model_config"]
    vocab = {"kosmos": int(mc["kosmos"]["text_config"]["vocab_size"]),
             "clip": int(mc["clip"]["text_config"]["vocab_size"])}
    with tempfile.TemporaryDirectory() as tmp:
        names = build_tokenizers(tmp, synth_instructions(), vocab)
        return save_checkpoint(model, out_dir, config, extra_files={n: Path(tmp) / n for n in names.values()})


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def build_artifacts(ckpt: Path, art: Path, skip_aoti: bool, log) -> dict[str, Any]:
    """name -> artifact path, or a string saying why there is none."""
    out: dict[str, Any] = {}
    try:
        from vla_export.export.onnx_export import ExportOptions, export_checkpoint
    except ImportError as e:
        return {k: f"export stage missing ({e})" for k in ("ort-fp32", "ort-int8-dynamic", "ort-fp16")} | (
            {"aoti-cpu-fp32": "skipped (--skip-aoti)"} if skip_aoti else {})
    t0 = time.perf_counter()
    try:
        onnx_path = export_checkpoint(ckpt, art, ExportOptions(quiet=True)).artifact
        out["ort-fp32"] = onnx_path
        log(f"export: {time.perf_counter() - t0:.1f} s")
    except Exception as e:  # noqa: BLE001 - a failed stage is a row with its reason, not the end of the benchmark
        out["ort-fp32"] = f"export failed: {first_line(e)}"
        onnx_path = None
    for name, mode in (("ort-int8-dynamic", "dynamic"), ("ort-fp16", "fp16")):
        if onnx_path is None:
            out[name] = "no fp32 ONNX to start from"
            continue
        try:
            from vla_export.quantize.stage import output_path, quantize
        except ImportError as e:
            out[name] = f"quantize stage missing ({e})"
            continue
        t0 = time.perf_counter()
        try:
            out[name] = quantize(onnx_path, mode, progress=False).path
        except Exception as e:  # noqa: BLE001
            # A failed gate still publishes the artifact, marked failed: time it anyway, the verdict is beside it.
            path = output_path(Path(onnx_path), mode)
            out[name] = path if path.exists() else f"quantize --mode {mode} failed: {first_line(e)}"
        log(f"quantize {mode}: {time.perf_counter() - t0:.1f} s")
    if skip_aoti:
        out["aoti-cpu-fp32"] = "skipped (--skip-aoti)"
    else:
        try:
            from vla_export.engines.aoti import compile_aoti
        except ImportError as e:
            out["aoti-cpu-fp32"] = f"aoti stage missing ({e})"
        else:
            t0 = time.perf_counter()
            try:
                out["aoti-cpu-fp32"] = compile_aoti(ckpt, art, device="cpu", dtype="fp32")[0]
                log(f"aoti compile: {time.perf_counter() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001
                out["aoti-cpu-fp32"] = f"aoti failed: {first_line(e)}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "full"])
    p.add_argument("--head", default="mlp", choices=["mlp", "lstm"])
    p.add_argument("--checkpoint", default=None, help="Use this checkpoint instead of a random one of --preset.")
    p.add_argument("--work", default=None, help="Work directory for the checkpoint and artifacts [a temp dir].")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ORT [torch's default].")
    p.add_argument("-n", type=int, default=8, help="Inputs for the parity MAE.")
    p.add_argument("--skip-aoti", action="store_true", help="Skip the AOTInductor compile (minutes on small).")
    p.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = p.parse_args(argv)
    if args.preset == "full":
        print("warning: the full preset needs ~7 GB per fp32 copy and ~20 GB to quantize", file=sys.stderr)

    import torch
    from rich.console import Console
    from rich.table import Table

    from vla_export import manifest as mf
    from vla_export.checkpoint import load_checkpoint
    from vla_export.runtime import OrtRunner, TorchRunner, open_runner
    from vla_export.validate.metrics import error_metrics, latency_stats
    from vla_export.validate.validate import cast_feeds, run_batched

    console = Console(stderr=True)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench-cpu-") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.checkpoint:
            ckpt_path = Path(args.checkpoint)
        else:
            t0 = time.perf_counter()
            ckpt_path = random_checkpoint(work / "checkpoint", args.preset, args.head)
            console.print(f"random {args.preset} checkpoint: {time.perf_counter() - t0:.1f} s")
        artifacts = build_artifacts(ckpt_path, work / "artifacts", args.skip_aoti, console.print)

        ckpt = load_checkpoint(ckpt_path)
        spec = ckpt.spec
        timing_feeds = spec.example_inputs(batch=args.batch, seed=1)
        parity_feeds = spec.example_inputs(batch=args.n, seed=0)
        if spec.state:
            timing_feeds |= spec.initial_state(args.batch)
            parity_feeds |= spec.initial_state(args.n)

        rows: list[dict[str, Any]] = []

        def bench(name: str, runner, size_bytes: int | None, status: str | None) -> None:
            t0 = time.perf_counter()
            runner.activate()
            load_s = time.perf_counter() - t0
            out = run_batched(lambda f: runner.infer(cast_feeds(f, runner.spec)), parity_feeds, 1)
            stats = latency_stats(runner.time_prepared(cast_feeds(timing_feeds, runner.spec), args.warmup,
                                                       args.iters), args.batch)
            runner.deactivate()
            rows.append({"name": name, "load_s": load_s, "size_bytes": size_bytes, "status": status,
                         "outputs": out, **stats})
            console.print(f"{name}: p50 {stats['p50_ms']:.3f} ms")

        bench("eager-fp32", TorchRunner(ckpt.model, spec, name="eager-fp32"), None, "reference")
        for name, art in artifacts.items():
            if isinstance(art, str):
                rows.append({"name": name, "skipped": art})
                continue
            try:
                runner = open_runner(art)
                if isinstance(runner, OrtRunner):
                    runner.threads = threads
                bench(name, runner, mf.total_bytes(art), mf.read_manifest(art).get("status"))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                rows.append({"name": name, "skipped": f"could not run: {first_line(e)}"})

        eager_p50, eager_actions = rows[0]["p50_ms"], rows[0]["outputs"]["actions"]
        for r in rows:
            if "p50_ms" in r:
                r["speedup_vs_eager"] = eager_p50 / r["p50_ms"]
                r["parity_mae"] = error_metrics(eager_actions, r.pop("outputs")["actions"])["mae"]

        table = Table(title=f"CPU benchmark: preset {args.preset if not args.checkpoint else ckpt_path}, batch "
                            f"{args.batch}, {threads} threads, {args.warmup} warm-up + {args.iters} iters, "
                            f"{mf.cpu_model()}")
        for col in ("row", "p50 ms", "mean ms", "p99 ms", "speed-up vs eager", "parity MAE", "size MB", "load s",
                    "artifact status"):
            table.add_column(col, justify="left" if col in ("row", "artifact status") else "right")
        for r in rows:
            if "skipped" in r:
                table.add_row(r["name"], "-", "-", "-", "-", "-", "-", "-", f"skipped: {r['skipped']}")
                continue
            table.add_row(r["name"], f"{r['p50_ms']:.3f}", f"{r['mean_ms']:.3f}", f"{r['p99_ms']:.3f}",
                          f"{r['speedup_vs_eager']:.2f}x", f"{r['parity_mae']:.2e}",
                          "-" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.2f}", f"{r['load_s']:.2f}",
                          str(r["status"] or "-"))
        Console(width=160).print(table)
        if args.json:
            Path(args.json).write_text(json.dumps({"preset": args.preset, "threads": threads, "batch": args.batch,
                                                   "machine": mf.machine_info(), "versions": mf.tool_versions(),
                                                   "rows": rows}, indent=2, default=mf._json_default))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
