#!/usr/bin/env python
"""Quantization benchmark on one CPU: sizes, quantization time and peak RSS, and batch-1 latency of eager PyTorch
fp32 vs ONNX Runtime fp32 / INT8 dynamic (ORT quantize_dynamic and the streaming engine) / FP16, in one run.

Each quantization runs as its own `vla-export quantize` process, so its peak RSS is that quantization's alone (a
Python process never returns freed memory, so in-process peaks would inherit the earlier steps'). Latency rows are
all measured afterwards in this one process, on the same inputs, one after another: p50 over --iters calls after
--warmup calls (Runner.time_prepared + metrics.latency_stats).

Goals checked (printed as ratios): INT8 dynamic >= 4x eager fp32 on full, >= 2x on small; size <= 0.30x fp32
(INT8) and <= 0.52x (FP16) on small and full; quantizing full with peak RSS <= 12 GB.

    .venv/bin/python scripts/bench_quantize.py --preset tiny
    .venv/bin/python scripts/bench_quantize.py --preset small --out bench/quantize-small
    .venv/bin/python scripts/bench_quantize.py --synthetic-mb 800   # memory of the two INT8 engines only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SPEED_GOALS = {"full": 4.0, "small": 2.0}
SIZE_GOALS = {"int8": 0.30, "fp16": 0.52}
RSS_GOAL_FULL = 12e9


def sh(args: list[str]) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode not in (0, 3):
        sys.exit(f"command failed ({res.returncode}): {' '.join(args)}\n{res.stderr[-3000:]}")
    print(f"  {' '.join(Path(a).name if '/' in a else a for a in args[1:5])}... {time.perf_counter() - t0:.1f} s",
          flush=True)
    return res


def make_synthetic(path: Path, megabytes: int, width: int = 2048) -> None:
    """A stack of MatMul+Relu layers holding `megabytes` of fp32 weights in `.onnx.data` (no torch needed)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    per_layer = 2 * width * 2 * width * 4
    layers = max(1, round(megabytes * 1e6 / per_layer))
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        for j, shape in enumerate(((width, 2 * width), (2 * width, width))):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape, dtype=np.float32) * 0.02), f"w{i}_{j}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}_0"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"w{i}_1"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")


def probe(engine: str, src: str, out_dir: str) -> None:
    """One engine in this (fresh) process: peak RSS above the process's baseline after imports."""
    import logging

    import onnx  # noqa: F401 - imported before the baseline, as in the stage
    import psutil

    from vla_export import manifest as mf

    logging.disable(logging.WARNING)
    out = Path(out_dir) / engine
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from vla_export.quantize.streaming import quantize_dynamic_streaming

    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with mf.PeakRSS() as peak:
        if engine == "fp16":
            from vla_export.quantize.fp16 import convert_fp16

            convert_fp16(Path(src), out / "m.onnx")
        elif engine == "ort":
            quantize_dynamic(src, str(out / "m.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        else:
            quantize_dynamic_streaming(Path(src), out / "m.onnx", per_channel=True, fusion="off")
    print(json.dumps({"engine": engine, "wall_s": time.perf_counter() - t0, "baseline_rss": base,
                      "peak_rss": peak.peak_bytes, "out_bytes": mf.total_bytes(out / "m.onnx")}))


def memory_probe(out: Path, megabytes: int) -> None:
    """Peak RSS of quantize_dynamic vs the streaming INT8 engine (and the fp16 conversion) on a synthetic model,
    each in a fresh process."""
    src = out / "synthetic" / "model.onnx"
    src.parent.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        make_synthetic(src, megabytes)
    from vla_export import manifest as mf

    size = mf.total_bytes(src)
    print(f"synthetic fp32 model: {size / 1e6:.0f} MB of MatMul weights")
    print("| engine | peak RSS above baseline MB | x fp32 size | wall s | output MB |\n|---|---|---|---|---|")
    for engine in ("streaming", "ort", "fp16"):
        res = subprocess.run([sys.executable, __file__, "--probe", engine, str(src), str(src.parent)],
                             capture_output=True, text=True)
        if res.returncode:
            sys.exit(res.stderr[-2000:])
        r = json.loads(res.stdout.strip().splitlines()[-1])
        extra = r["peak_rss"] - r["baseline_rss"]
        print(f"| {engine} | {extra / 1e6:.0f} | {extra / size:.2f} | {r['wall_s']:.1f} | {r['out_bytes'] / 1e6:.0f} |")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--probe":
        return probe(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "small", "full"], default="tiny")
    ap.add_argument("--out", default=None, help="work/output directory (default bench/quantize-<preset>)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--engines", default="ort,streaming", help="dynamic INT8 engines to compare")
    ap.add_argument("--target-cpus", default="portable",
                    help="INT8 weight ranges to compare (vla-export quantize --target-cpu), e.g. portable,vnni")
    ap.add_argument("--synthetic-mb", type=int, default=None,
                    help="only compare the engines' peak RSS on a synthetic MatMul model of this many MB")
    ap.add_argument("--reuse", action="store_true",
                    help="keep quantized models already in --out (re-measure latency only, e.g. on a quieter machine)")
    args = ap.parse_args()
    if args.synthetic_mb:
        return memory_probe(Path(args.out or "bench/quantize-memory"), args.synthetic_mb)
    if args.iters < 20:
        sys.exit("--iters must be >= 20 for a meaningful p50")

    out = Path(args.out or f"bench/quantize-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    vla = str(Path(sys.executable).with_name("vla-export"))
    ckpt, art = out / "ckpt", out / "artifacts"

    print(f"[1/4] checkpoint ({args.preset}, random weights) and fp32 ONNX export", flush=True)
    if not (ckpt / "config.json").exists():
        sh([vla, "checkpoint", "--preset", args.preset, "--random", "-o", str(ckpt), "--no-progress"])
    src = art / "model.onnx"
    if not src.exists():
        sh([vla, "export", str(ckpt), "-o", str(art)])

    print("[2/4] quantization, one process each", flush=True)
    from vla_export import manifest as mf

    runs = {}
    targets = args.target_cpus.split(",")
    jobs = [(f"int8-dynamic-{e}" + (f"-{t}" if len(targets) > 1 else ""),
             ["--mode", "dynamic", "--engine", e, "--target-cpu", t])
            for e in args.engines.split(",") for t in targets]
    jobs.append(("fp16", ["--mode", "fp16"]))
    for name, extra in jobs:
        odir = art / name
        if args.reuse and any(odir.glob("*.onnx")):
            print(f"  {name}: reusing {next(odir.glob('*.onnx'))} (--reuse)", flush=True)
        else:
            sh([vla, "quantize", str(src), *extra, "-o", str(odir)])
        path = next(odir.glob("*.onnx"))
        runs[name] = {"path": path, "manifest": mf.read_manifest(path)}

    print("[3/4] latency, batch 1, this process", flush=True)
    from vla_export.checkpoint import load_checkpoint
    from vla_export.runtime import OrtRunner, TorchRunner
    from vla_export.validate.metrics import latency_stats

    checkpoint = load_checkpoint(ckpt)
    spec = checkpoint.spec
    feeds = spec.example_inputs(batch=1, seed=0)
    rows = {}

    def timed(name, runner):
        with runner:
            rows[name] = latency_stats(runner.time_prepared(feeds, args.warmup, args.iters))
        print(f"  {name}: p50 {rows[name]['p50_ms']:.2f} ms", flush=True)

    timed("pytorch-eager-fp32", TorchRunner(checkpoint.model, spec))
    checkpoint.model = None
    timed("ort-fp32", OrtRunner(src, spec))
    for name, r in runs.items():
        timed(f"ort-{name}", OrtRunner(r["path"], spec, precision=r["manifest"]["precision"]))

    print("[4/4] results", flush=True)
    import torch

    eager = rows["pytorch-eager-fp32"]["p50_ms"]
    fp32_bytes = mf.total_bytes(src)
    table = ["| variant | p50 ms | speed-up vs eager | total bytes | ratio to fp32 | quantize s | peak RSS GB: conversion / whole stage incl. gate |"
             " gate |",
             "|---|---|---|---|---|---|---|---|",
             f"| pytorch-eager-fp32 | {eager:.2f} | 1.00x | | | | | |",
             f"| ort-fp32 | {rows['ort-fp32']['p50_ms']:.2f} | {eager / rows['ort-fp32']['p50_ms']:.2f}x | "
             f"{fp32_bytes:,} | 1.000 | | | |"]
    summary = {}
    for name, r in runs.items():
        m = r["manifest"]
        p50 = rows[f"ort-{name}"]["p50_ms"]
        summary[name] = {"p50_ms": p50, "speedup_vs_eager": eager / p50, "total_bytes": m["total_bytes"],
                         "ratio_to_fp32": m["sizes"]["ratio_to_fp32"], "quantize_wall_s": m["timing"]["wall_s"],
                         "peak_rss_bytes": m["timing"]["peak_rss_bytes"], "status": m["status"],
                         "parity_mae": m["metrics"]["parity"]["mae"],
                         "parity_rel_l2": m["metrics"]["parity"]["rel_l2"],
                         "target_cpu": (m["settings"].get("target_cpu") or {}).get("name"),
                         "stage_peak_rss_bytes": m["timing"].get("stage_peak_rss_bytes")}
        table.append(f"| ort-{name} | {p50:.2f} | {eager / p50:.2f}x | {m['total_bytes']:,} | "
                     f"{m['sizes']['ratio_to_fp32']:.3f} | {m['timing']['wall_s']:.1f} | "
                     f"{m['timing']['peak_rss_bytes'] / 1e9:.2f} / {(m['timing'].get('stage_peak_rss_bytes') or 0) / 1e9:.2f} | "
                     f"{m['status']} (MAE {summary[name]['parity_mae']:.2g}, rel L2 "
                     f"{summary[name]['parity_rel_l2']:.2g}) |")
    goals = []
    speed_goal = SPEED_GOALS.get(args.preset)
    for name, s in summary.items():
        kind = "fp16" if name == "fp16" else "int8"
        if kind == "int8" and speed_goal:
            goals.append(f"{name}: {s['speedup_vs_eager']:.2f}x eager (goal >= {speed_goal:g}x on {args.preset}): "
                         f"{'MET' if s['speedup_vs_eager'] >= speed_goal else 'NOT MET'}")
        if args.preset in ("small", "full"):
            goals.append(f"{name}: size {s['ratio_to_fp32']:.3f}x fp32 (goal <= {SIZE_GOALS[kind]:.2f}x): "
                         f"{'MET' if s['ratio_to_fp32'] <= SIZE_GOALS[kind] else 'NOT MET'}")
        if args.preset == "full" and kind == "int8":
            peak = max(s["peak_rss_bytes"], s.get("stage_peak_rss_bytes") or 0)
            goals.append(f"{name}: peak RSS {peak / 1e9:.1f} GB for the whole stage incl. its fp32 reference "
                         f"(goal <= 12 GB): {'MET' if peak <= RSS_GOAL_FULL else 'NOT MET'}")
    device = f"{mf.cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    text = "\n".join([f"# Quantization benchmark, preset {args.preset}", "",
                      f"One run on {device}; batch 1, p50 of {args.iters} calls after {args.warmup} warm-up calls.",
                      "", *table, "", "Goals:", *[f"- {g}" for g in goals or ["(none for the tiny preset)"]], ""])
    print(text)
    (out / "bench_quantize.md").write_text(text)
    (out / "bench_quantize.json").write_text(json.dumps(
        {"preset": args.preset, "device": device, "machine": mf.machine_info(), "iters": args.iters,
         "warmup": args.warmup, "latency": rows, "fp32_total_bytes": fp32_bytes, "variants": summary,
         "goals": goals}, indent=2) + "\n")
    print(f"wrote {out / 'bench_quantize.md'} and .json")


if __name__ == "__main__":
    main()
