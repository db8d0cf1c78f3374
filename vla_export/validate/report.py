"""`vla-export report`: profile.json + validation.json -> report.md, report.json, report.png, and a table on stdout.

The original benchmark report compared a GPU row with a CPU row, timed a toy model without synchronisation and
printed its accuracy as a constant. Here every row names the device it ran on, rows are ranked only within their
device (p50 latency at batch 1), speed-ups come only from the same run and device, and the accuracy columns are the
numbers `validate` measured (parity vs the fp32 reference, action MAE on held-out episodes) with its verdict.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from vla_export import manifest as mf
from vla_export.errors import UserError
from vla_export.validate.profile import PROFILE_FILE
from vla_export.validate.validate import VALIDATION_FILE, device_label

REPORT_MD, REPORT_JSON, REPORT_PNG = "report.md", "report.json", "report.png"
RANK_BATCH = "1"
COLUMNS = ["rank", "artifact", "backend", "device", "mean ms", "std ms", "min ms", "max ms", "p50 ms", "FPS",
           "speed-up", "size MB", "parity MAE", "task MAE", "verdict"]
DEVICE_MARKERS = {"cpu": "o", "cuda": "^"}
SWAP_COLUMN = "swap MAE wrong/right"


def _read_json(path: Path, what: str, hint: str) -> dict[str, Any]:
    return mf.read_json(path, hint, f"rerun {what}")


def _validation_index(validation: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Validation results by row id (`name@provider` or `name@device`), as profile rows are keyed."""
    return {r["id"]: r for r in (validation or {}).get("results", [])}


def build_rows(profile: dict[str, Any], validation: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per profiled runner, joined with its validation result, ranked within its device."""
    index = _validation_index(validation)
    references = (validation or {}).get("references", {})
    rows = []
    for p in profile["rows"]:
        b1 = p.get("batches", {}).get(RANK_BATCH, {})
        v = index.get(p["id"])
        row: dict[str, Any] = {
            "id": p["id"], "artifact": p["name"], "backend": p["backend"], "device": p["device"],
            "provider": p.get("provider"), "precision": p.get("precision"), "threads": p.get("threads"),
            "batch": int(RANK_BATCH),
            **{k: b1.get(f"{k}_ms") for k in ("mean", "std", "min", "max", "p50", "p90", "p99")},
            "fps": b1.get("fps"), "speedup_vs_eager": (p.get("speedup_vs_eager") or {}).get(RANK_BATCH),
            "baseline": p.get("baseline"), "size_bytes": p.get("size_bytes"), "load_s": p.get("load_s"),
            "peak_rss_bytes": p.get("peak_rss_bytes"), "batches": p.get("batches", {}),
            "profile_status": p.get("status"), "profile_reason": p.get("reason"),
        }
        if v is not None:
            row |= {"parity_mae": v.get("parity_mae"), "task_mae": (v.get("task") or {}).get("mae"),
                    "task_mae_per_action": (v.get("task") or {}).get("per_action_mae"),
                    "task_mae_increase": (v.get("task") or {}).get("increase"),
                    "instruction_swap": _swap_summary(v.get("instruction_swap")), "verdict": v["verdict"],
                    "status": v["status"]}
        elif p["kind"] == "eager" and p["device"] == "cpu" and p["precision"] == "fp32":
            # The eager fp32 CPU model is the reference itself: parity 0 by definition.
            ref = references.get(p.get("checkpoint") or "", {})
            row |= {"parity_mae": 0.0 if validation else None, "task_mae": (ref.get("task") or {}).get("mae"),
                    "task_mae_per_action": (ref.get("task") or {}).get("per_action_mae"),
                    "instruction_swap": _swap_summary(ref.get("instruction_swap")),
                    "verdict": "reference", "status": "reference"}
        else:
            row |= {"parity_mae": None, "task_mae": None,
                    "verdict": "not validated" if validation else "no validation.json", "status": None}
        if p.get("status") != "ok":
            row["verdict"] = f"{p.get('status')}: {p.get('reason')}"
        rows.append(row)
    for device in sorted({r["device"] for r in rows}):
        timed = sorted((r for r in rows if r["device"] == device and r["p50"] is not None), key=lambda r: r["p50"])
        for i, r in enumerate(timed, 1):
            r["rank"] = i
    return sorted(rows, key=lambda r: (r["device"] != "cpu", r["device"], r.get("rank") or 10**6, r["artifact"]))


def _swap_summary(swap: dict[str, Any] | None) -> dict[str, Any] | None:
    if not swap:
        return None
    return {k: swap.get(k) for k in ("task_mae_right", "task_mae_wrong", "wrong_to_right", "mean_abs_delta",
                                     "mean_abs_action", "delta_ratio", "episodes", "frames", "selection")}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def action_names(rows: list[dict[str, Any]]) -> list[str]:
    """Every action dimension with a per-action task MAE in some row, in the checkpoint's order."""
    names: list[str] = []
    for r in rows:
        for name in r.get("task_mae_per_action") or {}:
            if name not in names:
                names.append(name)
    return names


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """COLUMNS with one task-MAE column per action dimension (one average hides a dead output) and the
    instruction-swap figure, where validation measured them."""
    cols = list(COLUMNS)
    at = cols.index("task MAE") + 1
    extra = [f"task MAE {a}" for a in action_names(rows)]
    if any(r.get("instruction_swap") for r in rows):
        extra.append(SWAP_COLUMN)
    return cols[:at] + extra + cols[at:]


def row_cells(r: dict[str, Any], actions: list[str] | None = None, swap: bool = False) -> list[str]:
    device = device_label(r["device"], r.get("provider")) + (
        f" ({r['threads']} thr)" if r["device"] == "cpu" and r.get("threads") else "")
    return [_fmt(r.get("rank"), "d"), r["artifact"], r["backend"], device, _fmt(r["mean"], ".3f"),
            _fmt(r["std"], ".3f"), _fmt(r["min"], ".3f"), _fmt(r["max"], ".3f"), _fmt(r["p50"], ".3f"),
            _fmt(r["fps"], ".1f"), _fmt(r["speedup_vs_eager"], ".2f") + ("x" if r["speedup_vs_eager"] else ""),
            _fmt(None if r["size_bytes"] is None else r["size_bytes"] / 1e6, ".2f"), _fmt(r["parity_mae"], ".2e"),
            _fmt(r["task_mae"], ".4f"),
            *[_fmt((r.get("task_mae_per_action") or {}).get(a), ".4f") for a in actions or []],
            *([_swap_cell(r.get("instruction_swap"))] if swap else []), r["verdict"]]


def _swap_cell(swap: dict[str, Any] | None) -> str:
    if not swap:
        return "-"
    return f"{_fmt(swap.get('task_mae_wrong'), '.4f')} / {_fmt(swap.get('task_mae_right'), '.4f')}"


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = columns(rows)
    actions, swap = action_names(rows), SWAP_COLUMN in cols
    return cols, [row_cells(r, actions, swap) for r in rows]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    cols, cells = _cells(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c not in (
        "artifact", "backend", "device", "verdict") else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def batch_table(rows: list[dict[str, Any]]) -> str:
    """p50 and FPS at every profiled batch size, per row."""
    sizes = sorted({b for r in rows for b, s in r["batches"].items() if "p50_ms" in s}, key=int)
    if not sizes:
        return ""
    head = ["artifact", "device"] + [f"b{b} p50 ms / FPS" for b in sizes]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(sizes)]
    for r in rows:
        cells = []
        for b in sizes:
            s = r["batches"].get(b, {})
            cells.append(f"{s['p50_ms']:.3f} / {s['fps']:.1f}" if "p50_ms" in s else s.get("skipped", "-"))
        lines.append("| " + " | ".join([r["artifact"], r["device"], *cells]) + " |")
    return "\n".join(lines)


def machine_section(profile: dict[str, Any]) -> str:
    m, v = profile.get("machine", {}), profile.get("versions", {})
    lines = [f"- CPU: {m.get('cpu', '?')} ({m.get('cpu_count', '?')} logical cores), "
             f"{m.get('memory_gb', '?')} GB RAM, {m.get('os', '?')} {m.get('arch', '')}",
             f"- GPU: {m.get('gpu', 'none')}" + (f" (compute capability {m['gpu_compute_capability']})"
                                                  if m.get("gpu_compute_capability") else ""),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    feats = m.get("cpu_features")
    if feats:  # the ISA decides which kernels ran (INT8 differs between VNNI and AVX2-only CPUs)
        lines.insert(1, f"- CPU features the kernels use: {', '.join(feats.get('flags', [])) or 'none'} "
                        f"({feats.get('arch')}; int8 kernels: {feats.get('int8_kernels')})")
    s = profile.get("settings", {})
    lines.append(f"- profile: warm-up {s.get('warmup')}, {s.get('iters')} timed iterations, batch sizes "
                 f"{s.get('batches')}, threads {s.get('threads') or 'library default'}, "
                 f"{'one process per row' if s.get('isolate') else 'in-process'}; {s.get('timing', '')}")
    return "\n".join(lines)


def reproduce_commands(profile: dict[str, Any], validation: dict[str, Any] | None, artifacts_dir: Path) -> list[str]:
    cmds = []
    if validation:
        cmds.append(validation.get("command") or f"vla-export validate {artifacts_dir}")
    cmds.append(profile.get("command") or f"vla-export profile {artifacts_dir}")
    cmds.append(f"vla-export report {artifacts_dir}")
    return cmds


def artifact_commands(artifacts_dir: Path) -> list[str]:
    """How each artifact was built, where its manifest recorded the command."""
    out = []
    for m in sorted(artifacts_dir.glob("*.json")):
        if m.name in (VALIDATION_FILE, PROFILE_FILE, REPORT_JSON):
            continue
        try:
            data = json.loads(m.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(data, dict) and data.get("command"):
            out.append(str(data["command"]))
    return out


def plot(rows: list[dict[str, Any]], path: Path, split: str | None = None) -> Path | None:
    """Latency (batch 1 p50) vs task MAE (parity MAE where no task data), one marker style per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_task = any(r.get("task_mae") is not None for r in rows)
    key, label = ("task_mae", f"task action MAE ({split or 'val'} episodes)") if use_task else (
        "parity_mae", "parity MAE vs fp32 reference (no task data)")
    points = [r for r in rows if r["p50"] is not None and r.get(key) is not None]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for device in sorted({r["device"] for r in points}):
        pts = [r for r in points if r["device"] == device]
        ax.scatter([r["p50"] for r in pts], [r[key] for r in pts], marker=DEVICE_MARKERS.get(device, "s"), s=60,
                   label=device)
        for r in pts:
            ax.annotate(r["artifact"], (r["p50"], r[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if points:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(title="device")
    else:
        ax.text(0.5, 0.5, "no rows with both latency and accuracy", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("p50 latency at batch 1 (ms, log scale)")
    ax.set_ylabel(label)
    ax.set_title("latency vs accuracy (compare latency only within a device)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def build_report(artifacts_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write report.md, report.json and report.png into `output_dir` (default: the artifacts directory)."""
    artifacts_dir = Path(artifacts_dir)
    if not artifacts_dir.is_dir():
        raise UserError(f"artifacts directory {artifacts_dir} does not exist; run the pipeline first (make demo)")
    profile = _read_json(artifacts_dir / PROFILE_FILE, "vla-export profile",
                         f"run `vla-export profile {artifacts_dir}` first")
    vpath = artifacts_dir / VALIDATION_FILE
    validation = _read_json(vpath, "vla-export validate", "") if vpath.exists() else None
    out_dir = mf.check_writable_dir(output_dir or artifacts_dir)
    rows = build_rows(profile, validation)
    commands = reproduce_commands(profile, validation, artifacts_dir)
    built_by = artifact_commands(artifacts_dir)
    png = plot(rows, out_dir / REPORT_PNG, ((validation or {}).get("settings") or {}).get("split"))
    devices = sorted({r["device"] for r in rows})

    md = [f"# vla-export report ({_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')})", "",
          f"Profile run `{profile.get('run_id')}` ({profile.get('created')})"
          + (f", validation run `{validation.get('run_id')}` ({validation.get('created')})" if validation else
             ", **no validation.json: accuracy columns are empty** (run `vla-export validate`)") + ".", "",
          f"Latency at batch {RANK_BATCH}. Rank and speed-up are within one device ({', '.join(devices)}): "
          "speed-up = eager PyTorch fp32 p50 / row p50, both measured on that device in this run. Rows on "
          "different devices are not compared. Size counts every file the artifact needs (external data too).", "",
          markdown_table(rows), ""]
    if validation:
        tol = validation.get("tolerances", {}).get("precision", {})
        md += ["Gates (parity MAE of `actions` vs the fp32 reference; task MAE increase over the reference): "
               + "; ".join(f"{p} <= {t['parity_mae']:g} / +{t['task_mae_increase']:g}" for p, t in tol.items()) + ".",
               f"Inputs: {validation.get('settings', {}).get('n')} "
               f"{'episode frames' if validation.get('settings', {}).get('episodes') else 'spec example inputs'} "
               f"at batch sizes {validation.get('settings', {}).get('batch_sizes')}.", ""]
        swaps = [r for r in rows if r.get("instruction_swap")]
        if swaps:
            first = swaps[0]["instruction_swap"]
            md += [f"Instruction swap (`{SWAP_COLUMN}`): on {first.get('episodes')} validation episodes, "
                   f"{first.get('selection')}, {first.get('frames')} frames, the instruction's colour is swapped "
                   "(red <-> blue); task MAE "
                   "with the wrong instruction / with the right one. A policy that ignores its instruction scores "
                   "about 1x; details (mean |action change| against mean |action|) in validation.json.", ""]
    bt = batch_table(rows)
    if bt:
        md += ["## All batch sizes", "", bt, ""]
    md += [f"![latency vs accuracy]({REPORT_PNG})", "", "## Machine", "", machine_section(profile), "",
           "## Reproduce", "", "```sh", *commands, "```", "",
           "The whole pipeline (episodes, checkpoint, export, quantize, trt, aoti, validate, profile, report): "
           "`make demo`.", ""]
    if built_by:
        md += ["Artifacts were built with:", "", "```sh", *built_by, "```", ""]
    mf.write_text_atomic(out_dir / REPORT_MD, "\n".join(md))
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "profile_run": profile.get("run_id"), "validation_run": (validation or {}).get("run_id"),
        "machine": profile.get("machine"), "versions": profile.get("versions"), "rank_batch": int(RANK_BATCH),
        "rows": rows, "commands": commands, "artifact_commands": built_by,
        "files": {"markdown": str(out_dir / REPORT_MD), "plot": str(png) if png else None},
    }
    mf.write_text_atomic(out_dir / REPORT_JSON, json.dumps(report, indent=2, default=mf._json_default) + "\n")
    return report


def report_table(report: dict[str, Any]):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"vla-export report (batch {report['rank_batch']}; ranked within each device)")
    cols, cells = _cells(report["rows"])
    for c in cols:
        left = c in ("artifact", "backend", "device", "verdict")
        table.add_column(c, justify="left" if left else "right", no_wrap=c != "verdict")
    for row in cells:
        table.add_row(*map(escape, row))
    return table
