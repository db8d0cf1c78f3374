"""fleet.md + fleet.json + fleet.png: one section per target, each target's numbers measured there.

Latency is reported per target only. Targets are different devices (a GPU workstation, a Jetson, an AVX2 robot
PC), so no speed ratio across targets is computed or drawn: the plot has one panel per target with its own axis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vla_export import manifest as mf

FLEET_FILES = ("fleet.json", "fleet.md", "fleet.png")


def _machine_line(r: dict[str, Any]) -> str:
    m = r.get("machine") or {}
    if not m:
        return "-"
    feats = m.get("cpu_features") or {}
    gpu = f"; GPU {m['gpu']} (sm {m.get('gpu_compute_capability')})" if m.get("gpu") else "; no GPU"
    return (f"{m.get('cpu')} ({m.get('arch')}, {m.get('cpu_count')} cores; ISA "
            f"{', '.join(feats.get('flags') or []) or '-'}; INT8 kernels {feats.get('int8_kernels')}){gpu}")


def _profile_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    step = (r.get("steps") or {}).get("profile") or {}
    return (step.get("summary") or {}).get("rows") or []


def _verify_summary(r: dict[str, Any]) -> dict[str, Any]:
    return ((r.get("steps") or {}).get("verify") or {}).get("summary") or {}


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(fleet: dict[str, Any], out_dir: Path) -> str:
    b = fleet["bundle"]
    c = fleet["counts"]
    lines = [f"# fleet: {b['artifact']} on {len(fleet['targets'])} targets", "",
             f"Bundle `{b['path']}` ({b['backend']}, {b['precision']}), bundle sha256 `{b['bundle_sha256'][:16]}…`. "
             f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped. Run {fleet['run_id']}, "
             f"{fleet['created']}, driver {fleet['machine'].get('hostname')}.", "",
             "Each target's latency was measured on that target: numbers of different targets are different devices "
             "and are not compared here (no speed ratio across devices).", "",
             "| target | resource | status | machine | verify | stored |", "|---|---|---|---|---|---|"]
    for r in fleet["targets"]:
        verdict = ((r.get("steps") or {}).get("verify") or {}).get("status") or "-"
        lines.append(f"| {r['name']} | `{r['resource']}` | **{r['status']}** | {_machine_line(r)} | {verdict} | "
                     f"{'reused' if r.get('cached') else ('new' if r.get('store') else '-')} |")
    for r in fleet["targets"]:
        lines += ["", f"## {r['name']}", "",
                  f"Status: **{r['status']}**" + (f": {r['reason']}" if r.get("reason") else ""), "",
                  f"- resource `{r['resource']}`, node {r.get('node_ip') or '-'} "
                  f"({(r.get('node_id') or '-')[:12]})",
                  f"- machine: {_machine_line(r)}"]
        versions = r.get("versions") or {}
        if versions:
            lines.append("- software: " + ", ".join(f"{k} {versions[k]}" for k in sorted(versions)))
        if r.get("key"):
            lines.append(f"- work key `{r['key'][:16]}…`" + (" (result reused from the store: same bundle, hardware, "
                                                            "software and settings)" if r.get("cached") else ""))
        if r.get("store"):
            rel = Path(r["store"])
            try:
                rel = rel.relative_to(out_dir.resolve())
            except ValueError:
                pass
            lines.append(f"- files: `{rel}/` (verify/verify.md, profile/profile.json, engines built there)")
        steps = r.get("steps") or {}
        if steps:
            lines += ["", "| step | status | wall s | detail |", "|---|---|---:|---|"]
            for name, s in steps.items():
                detail = s.get("reason") or ", ".join(Path(f).name for f in s.get("files", [])) or "-"
                lines.append(f"| {name} | {s['status']} | {_fmt(s.get('wall_s'), '.1f')} | {detail} |")
        v = _verify_summary(r)
        if v.get("rows"):
            lines += ["", f"Verify on this target (against the reference outputs that travelled with the bundle; "
                          f"latency per step against {v.get('rate_hz')} Hz):", "",
                      "| artifact | backend | status | parity MAE | end-to-end MAE | step p50 ms | step p99 ms | "
                      "failed checks |", "|---|---|---|---:|---:|---:|---:|---|"]
            for row in v["rows"]:
                total = (row.get("latency_ms") or {}).get("total") or {}
                rt = row.get("runtime") or {}
                where = (rt.get("runner") or {}).get("provider") or rt.get("device") or "-"
                detail = "; ".join(row.get("failures") or []) or row.get("reason") or "-"
                lines.append(f"| {row['artifact']} | {rt.get('backend') or '-'} ({where}) | {row['status']} | "
                             f"{_fmt(row.get('parity_mae'), '.3g')} | {_fmt(row.get('end_to_end_mae'), '.3g')} | "
                             f"{_fmt(total.get('p50_ms'))} | {_fmt(total.get('p99_ms'))} | {detail} |")
        rows = _profile_rows(r)
        if rows:
            lines += ["", "Profile on this target:", "",
                      "| artifact | backend | device | threads | batch | p50 ms | p99 ms | FPS | status |",
                      "|---|---|---|---:|---:|---:|---:|---:|---|"]
            for row in rows:
                for batch, s in (row.get("batches") or {"-": {}}).items():
                    status = "ok" if row["status"] == "ok" else f"{row['status']}: {row.get('reason')}"
                    if "skipped" in s:
                        status = f"skipped: {s['skipped']}"
                    lines.append(f"| {row['name']} | {row['backend']} | {row.get('provider') or row['device']} | "
                                 f"{row.get('threads') or '-'} | {batch} | {_fmt(s.get('p50_ms'))} | "
                                 f"{_fmt(s.get('p99_ms'))} | {_fmt(s.get('fps'), '.1f')} | {status} |")
    lines += ["", f"Command: `{fleet.get('command') or 'vla-export fleet'}`", ""]
    return "\n".join(lines)


def plot(fleet: dict[str, Any], path: Path) -> Path:
    """One panel per target (own y axis: devices are not compared), p50 and p99 at each profiled batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = fleet["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    for ax, r in zip(axes[0], targets, strict=True):
        labels, p50, p99 = [], [], []
        for row in _profile_rows(r):
            for batch, s in (row.get("batches") or {}).items():
                if "p50_ms" in s:
                    labels.append(f"{row['name']}\n{row.get('provider') or row['device']}, b{batch}".replace(
                        "ExecutionProvider", ""))
                    p50.append(s["p50_ms"])
                    p99.append(s["p99_ms"])
        m = r.get("machine") or {}
        ax.set_title(f"{r['name']} [{r['status']}]\n{(m.get('gpu') or m.get('cpu') or '-')[:40]}", fontsize=8)
        if labels:
            xs = range(len(labels))
            ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
            ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
            ax.set_xticks(list(xs), labels, fontsize=6)
            ax.set_ylabel("ms on this target", fontsize=8)
            ax.legend(fontsize=7)
        else:
            reason = (r.get("reason") or "not profiled")[:80]
            ax.text(0.5, 0.5, "\n".join(reason[i:i + 28] for i in range(0, len(reason), 28)), ha="center",
                    va="center", fontsize=7, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("latency per target (each panel its own device; not comparable across panels)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_fleet_report(fleet: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    files = {"json": out_dir / "fleet.json", "markdown": out_dir / "fleet.md", "plot": out_dir / "fleet.png"}
    fleet["files"] = {k: str(v) for k, v in files.items()}
    plot(fleet, files["plot"])
    mf.write_text_atomic(files["markdown"], markdown(fleet, out_dir))
    mf.write_text_atomic(files["json"], json.dumps(fleet, indent=2, default=mf._json_default) + "\n")
    return fleet
