#!/usr/bin/env python3
"""Time `make demo` the way a newcomer meets it: a fresh clone, no .venv, then one command. Writes a phase table.

    python3 scripts/time_demo.py                      # clones this repo's HEAD into a temp dir
    python3 scripts/time_demo.py --ref main --out demo_timing --keep

Each `vla-export` command of the demo appends its process start/end to a log (`VLA_EXPORT_PHASE_LOG`, see
vla_export/cli.py), so the phases that `make demo` runs side by side (AOTI beside export -> quantize -> trt) keep
their own times; "install" ends when `.venv/.installed-core` is written. Output: timing.md (Markdown table) and
timing.json beside it, with the machine (CPU model, ISA features, cores) and the load average before and after:
a loaded machine's numbers are not an idle machine's, and the table says which it was.

Needs only the standard library (it runs before any environment exists) plus git and make.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vla_export.manifest import cpu_features, cpu_model  # noqa: E402  (standard library only)

PHASE_LOG_ENV = "VLA_EXPORT_PHASE_LOG"  # vla_export.cli.PHASE_LOG_ENV (not imported: click may not be installed)
GOAL_S = 360  # issue 13: under 6 minutes, install included


def phase_name(record: dict) -> str:
    argv = record["argv"]
    if argv[:2] == ["episodes", "synth"]:
        return "data (episodes synth)"
    if argv[0] == "checkpoint":
        return "aoti-cache: untrained checkpoint" if "--random" in argv else "checkpoint (training)"
    if argv[0] == "aoti":
        # the Makefile's aoti-cache compiles an untrained checkpoint of the demo's config under $(AOTI_CACHE)
        return "aoti-cache: compile" if "demo-layout" in " ".join(argv) else "aoti (trained weights, cached code)"
    if argv[0] in ("quantize", "trt"):
        for i, a in enumerate(argv):
            if a in ("--mode", "--precision") and i + 1 < len(argv):
                return f"{argv[0]} {argv[i + 1]}"
    return argv[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="HEAD", help="commit to clone (default HEAD of this repository)")
    ap.add_argument("--workdir", default=None, help="where to clone (default: a new temporary directory)")
    ap.add_argument("--out", default="demo_timing", help="directory for timing.md and timing.json")
    ap.add_argument("--keep", action="store_true", help="keep the clone")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vla-demo-"))
    clone = work / "vla-export"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", args.ref], check=True)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    log = work / "phases.jsonl"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print(f"make demo in {clone} ({commit}); output in {out}/demo.log", flush=True)
    t0 = time.time()
    with open(out / "demo.log", "w") as demo_log:
        # a newcomer's machine has no Inductor cache: a fresh one, or AOTI would be timed from earlier compiles
        env = {**os.environ, PHASE_LOG_ENV: str(log), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")}
        rc = subprocess.run(["make", "demo"], cwd=clone, env=env,
                            stdout=demo_log, stderr=subprocess.STDOUT).returncode
    total = time.time() - t0
    load_after = os.getloadavg()

    stamp = clone / ".venv" / ".installed-core"  # the demo installs the core only (Makefile)
    rows = [{"phase": "install (.venv, pip)", "start_s": 0.0,
             "end_s": round(stamp.stat().st_mtime - t0, 1) if stamp.exists() else None, "exit": None}]
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for r in sorted(records, key=lambda r: r["start"]):
        rows.append({"phase": phase_name(r), "start_s": round(r["start"] - t0, 1), "end_s": round(r["end"] - t0, 1),
                     "exit": r["exit"]})
    for r in rows:
        r["wall_s"] = round(r["end_s"] - r["start_s"], 1) if r["end_s"] is not None else None
    features = cpu_features()
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": features["arch"], "isa": features["flags"],
               "int8_kernels": features["int8_kernels"]}
    result = {"commit": commit, "exit": rc, "total_s": round(total, 1), "goal_s": GOAL_S, "machine": machine,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in load_after], "phases": rows,
              "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))}
    (out / "timing.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [f"`make demo`, fresh clone of `{commit}`, {result['created']}: {machine['cpu']} ({machine['arch']}, "
             f"{machine['cores']} cores, ISA {', '.join(machine['isa']) or 'none listed'}); load average before "
             f"{load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)",
             "", "| phase | starts at s | ends at s | wall s | exit |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        exit_text = "" if r["exit"] is None else ("4 (skipped)" if r["exit"] == 4 else str(r["exit"]))
        end = "" if r["end_s"] is None else f"{r['end_s']:.1f}"
        wall = "" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        lines.append(f"| {r['phase']} | {r['start_s']:.1f} | {end} | {wall} | {exit_text} |")
    verdict = "under" if total < GOAL_S else "OVER"
    lines += ["", f"**total {int(total // 60)} min {int(total % 60):02d} s** ({total:.1f} s, {verdict} the {GOAL_S} s "
              f"goal), `make demo` exit {rc}. Phases overlap where `make -j2` runs them side by side."]
    (out / "timing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep and not args.workdir:
        subprocess.run(["rm", "-rf", str(work)])
    return rc


if __name__ == "__main__":
    sys.exit(main())
