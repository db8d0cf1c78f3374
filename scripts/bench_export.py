#!/usr/bin/env python
"""Benchmark the export stage on a preset with random weights: wall time per phase, peak RSS, file sizes.

Builds the model (random init) and saves it as a checkpoint in a temp dir (in a child process, so its memory is
gone before the export starts), then runs `vla-export export` in a fresh process, exactly as a user would, and
reads the phases back from the manifest. Goal check: export total < 5 min and the export process's peak RSS
<= 1.5x the fp32 weight bytes.

    python scripts/bench_export.py --preset tiny
    python scripts/bench_export.py --preset full --head mlp --json bench_export_full.json   # ~25 GB disk, 24 GB RAM

Never run `full` on a machine shared with other heavy jobs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_WALL_S = 300.0
GOAL_RSS_RATIO = 1.5


def build_checkpoint(preset: str, head: str, out_dir: str, queue) -> None:
    """Child process: random-weight model of `preset` -> native checkpoint. Reports timing and weight bytes."""
    import torch

    from vla_export.checkpoint import make_config, save_checkpoint
    from vla_export.manifest import measured
    from vla_export.models import build_model

    torch.manual_seed(0)
    with measured() as build:
        config = make_config("kosmos2-clip-hybrid", preset, {"head": head})
        model, _ = build_model("kosmos2-clip-hybrid", config["model_config"])
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with measured() as save:
        save_checkpoint(model, out_dir, config)
    queue.put({"build": dict(build), "save_checkpoint": dict(save), "parameters": params,
               "fp32_weight_bytes": weight_bytes})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "small", "full"], default="tiny")
    ap.add_argument("--head", choices=["mlp", "lstm"], default="mlp")
    ap.add_argument("--workdir", default=None, help="where the checkpoint and artifacts go (default: a temp dir)")
    ap.add_argument("--n-inputs", default="16")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--external-data-threshold", default="1GB")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"bench-export-{args.preset}-")
        work = Path(tmp.name)
    else:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    ckpt, out = work / "checkpoint", work / "artifacts"

    console.print(f"building {args.preset}/{args.head} with random weights -> {ckpt}", soft_wrap=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=build_checkpoint, args=(args.preset, args.head, str(ckpt), queue))
    child.start()
    built = queue.get()
    child.join()
    if child.exitcode:
        console.print(f"[red]building the checkpoint failed (exit {child.exitcode})")
        return 1

    cmd = [sys.executable, "-m", "vla_export.cli", "export", str(ckpt), "-o", str(out), "--force",
           "--n-inputs", args.n_inputs, "--batch-sizes", args.batch_sizes,
           "--external-data-threshold", args.external_data_threshold]
    console.print("running: " + " ".join(cmd), soft_wrap=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    export_wall = time.perf_counter() - t0
    # ru_maxrss of children: the largest waited-for child, i.e. max(build child, export process), in KiB on Linux.
    children_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if rc != 0:
        console.print(f"[red]export failed with exit code {rc}")
        return rc
    manifest = json.loads((out / "model.onnx.json").read_text())
    timing = manifest["timing"]
    weight_bytes = built["fp32_weight_bytes"]

    table = Table(title=f"export benchmark: preset {args.preset}, head {args.head}, "
                        f"{built['parameters']:,} parameters, {weight_bytes / 2**30:.2f} GiB fp32 weights")
    table.add_column("phase")
    table.add_column("wall s", justify="right")
    table.add_column("peak RSS GiB", justify="right")
    table.add_row("build model (random init)", f"{built['build']['wall_s']:.1f}",
                  f"{built['build']['peak_rss_bytes'] / 2**30:.2f}")
    table.add_row("save checkpoint", f"{built['save_checkpoint']['wall_s']:.1f}",
                  f"{built['save_checkpoint']['peak_rss_bytes'] / 2**30:.2f}")
    for name, m in timing["phases"].items():
        table.add_row(f"export: {name}", f"{m['wall_s']:.1f}", f"{m['peak_rss_bytes'] / 2**30:.2f}")
    table.add_row("[bold]export command total", f"{export_wall:.1f}", f"{timing['peak_rss_bytes'] / 2**30:.2f}")
    console.print(table)

    files = Table(title="files")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    for name, size in manifest["files"].items():
        files.add_row(name, f"{size:,}")
    files.add_row("[bold]total", f"{manifest['total_bytes']:,}")
    console.print(files)

    rss_ratio = timing["peak_rss_bytes"] / weight_bytes
    wall_ok, rss_ok = export_wall < GOAL_WALL_S, rss_ratio <= GOAL_RSS_RATIO
    console.print(f"goal: export total {export_wall:.1f} s < {GOAL_WALL_S:.0f} s: "
                  f"{'[green]met' if wall_ok else '[red]missed'}[/] ({export_wall / GOAL_WALL_S:.2f}x the budget)",
                  soft_wrap=True)
    console.print(f"goal: peak RSS {timing['peak_rss_bytes'] / 2**30:.2f} GiB <= {GOAL_RSS_RATIO}x fp32 weights "
                  f"({GOAL_RSS_RATIO * weight_bytes / 2**30:.2f} GiB): {'[green]met' if rss_ok else '[red]missed'}[/] "
                  f"(ratio {rss_ratio:.2f}; kernel ru_maxrss of the largest child {children_maxrss / 2**30:.2f} GiB)",
                  soft_wrap=True)
    console.print(f"parity: max MAE {manifest['metrics']['parity']['max_mae']:.3g} "
                  f"(exporter {manifest['settings']['exporter_used']}); torch/ORT intra-op threads "
                  f"{timing.get('threads')} of {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    if args.preset != "full":
        console.print(f"note: fixed costs (torch, transformers and ORT runtimes: ~0.4 GiB) dwarf the "
                      f"{weight_bytes / 2**20:.0f} MiB of {args.preset} weights; the RSS ratio is meant for full",
                      soft_wrap=True)
    result = {"preset": args.preset, "head": args.head, "parameters": built["parameters"],
              "fp32_weight_bytes": weight_bytes, "build": built["build"], "save_checkpoint": built["save_checkpoint"],
              "export_wall_s": round(export_wall, 3), "export_phases": timing["phases"],
              "export_peak_rss_bytes": timing["peak_rss_bytes"], "children_ru_maxrss_bytes": children_maxrss,
              "threads": timing.get("threads"), "load_average_1min": os.getloadavg()[0],
              "files": manifest["files"], "total_bytes": manifest["total_bytes"],
              "goals": {"wall_s_lt_300": wall_ok, "rss_ratio": round(rss_ratio, 3), "rss_ratio_le_1_5": rss_ok},
              "parity_max_mae": manifest["metrics"]["parity"]["max_mae"], "machine": manifest["machine"]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        os.chmod(args.json, 0o644)
        console.print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if wall_ok and rss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
