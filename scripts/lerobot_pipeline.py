"""The whole vla-export chain for each LeRobot policy, and the table of what passed (docs/lerobot.md).

Runs, for each policy (a tiny random-weight ACT / Diffusion Policy / SmolVLA saved by LeRobot's own save_pretrained,
on a local LeRobot v3 dataset written by LeRobot's own LeRobotDataset API): checkpoint --from-lerobot, export, quantize
in each mode (dynamic, static calibrated on the dataset, fp16; and INT8 dynamic/static with the full 8-bit weight
range, --target-cpu vnni, gated on this host), validate --episodes (held-out split, task MAE), profile, report,
bundle, and Policy.act from the bundle vs LeRobot's select_action. The stages are the CLI's
(`tests/lerobot/pipeline.py`, which tests/lerobot/test_pipeline.py asserts). Prints a Markdown table per policy
(each mode: its gate and why it failed, parity and task MAE, batch-1 p50/p99) with the host; writes the numbers as
JSON.

Needs the LeRobot environment (scripts/lerobot_env.sh):
    .venv-lerobot/bin/python scripts/lerobot_pipeline.py --out /tmp/lerobot-pipeline [--policies smolvla]
Random weights and random recorded actions: the task MAE says the chain is wired to LeRobot's numbers, not that a
policy is good; the gates compare each artifact with the fp32 reference on the same frames.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: vla_export and tests.lerobot


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown(policy: str, run, rows: list[dict]) -> str:
    lines = [f"**{policy}** (Policy.act vs LeRobot select_action, fp32 bundle: max abs "
             f"{fmt(run.parity_policy_vs_lerobot)})", "",
             "| artifact | exit (export/quantize) | gate | parity MAE | parity rel L2 | task MAE (reference) | task MAE rise "
             "| p50 ms | p99 ms | why it failed |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rise = r.get("task_rel_increase")
        why = "; ".join(x for x in (r.get("why"), r.get("validate_why")) if x)
        lines.append(f"| {r['artifact']} | {fmt(r['exit'], 'd')} | {r.get('gate') or '-'} | {fmt(r['parity_mae'])} "
                     f"| {fmt(r['parity_rel_l2'])} | {fmt(r['task_mae'], '.4f')} "
                     f"({fmt(r['reference_task_mae'], '.4f')}) | {'-' if rise is None else f'{100 * rise:+.2f}%'} "
                     f"| {fmt(r.get('p50_ms'), '.2f')} | {fmt(r.get('p99_ms'), '.2f')} | {why or '-'} |")
    return "\n".join(lines)


def main() -> int:
    import torch

    from tests.lerobot.pipeline import CASES, run_pipeline, summary_rows
    from vla_export.manifest import cpu_model, machine_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="working directory (datasets, checkpoints, artifacts)")
    ap.add_argument("--policies", default=",".join(CASES), help=f"comma list of {', '.join(CASES)} (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (export and profile)")
    ap.add_argument("--warmup", type=int, default=20, help="profile: untimed calls")
    ap.add_argument("--iters", type=int, default=100, help="profile: timed calls")
    ap.add_argument("--isolate", action="store_true", help="profile: one process per row (clean memory numbers)")
    ap.add_argument("--no-full-range", dest="full_range", action="store_false",
                    help="skip INT8 dynamic/static at --target-cpu vnni (full 8-bit weights; on a CPU without VNNI "
                         "ORT's U8S8 kernel saturates them, so their gate says what this host computes)")
    args = ap.parse_args()
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in CASES]
    if unknown:
        print(f"error: unknown policy {unknown}; choose from {sorted(CASES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    feats = (machine_info().get("cpu_features") or {})
    host = (f"{cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores available "
            f"(ISA: {', '.join(feats.get('flags', [])) or 'none of those probed'}; int8 kernels "
            f"{feats.get('int8_kernels')}); torch {torch.__version__}, {args.threads} thread(s), profile warm-up "
            f"{args.warmup} + {args.iters} timed calls at batch 1")
    print(f"host: {host}\n")
    out: dict = {"host": host, "command": " ".join(sys.argv), "policies": {}}
    failed_stage = False
    for name in names:
        start = time.perf_counter()
        run = run_pipeline(CASES[name], args.out / name, profile_iters=args.iters, profile_warmup=args.warmup,
                           threads=args.threads, isolate=args.isolate, full_range=args.full_range)
        wall = time.perf_counter() - start
        rows = summary_rows(run)
        for stage in run.stages.values():
            if stage.crash or stage.exit_code not in (0, 3):
                failed_stage = True
                print(f"{name}: {stage.command()} exited {stage.exit_code}:\n{stage.crash or stage.output[-2000:]}",
                      file=sys.stderr)
        print(markdown(name, run, rows))
        print(f"\n{name}: {len(run.stages)} stages in {wall:.0f} s ("
              + ", ".join(f"{k} {s.wall_s:.0f} s" for k, s in run.stages.items()) + ")\n")
        out["policies"][name] = {"rows": rows, "policy_vs_lerobot_max_abs": run.parity_policy_vs_lerobot,
                                 "wall_s": wall, "stages": {k: {"command": s.command(), "exit": s.exit_code,
                                                                "wall_s": s.wall_s} for k, s in run.stages.items()}}
    (args.out / "lerobot_pipeline.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'lerobot_pipeline.json'}")
    return 1 if failed_stage else 0


if __name__ == "__main__":
    sys.exit(main())
