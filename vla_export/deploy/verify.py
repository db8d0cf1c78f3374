"""`vla-export verify BUNDLE`: judge a bundle's artifacts on the machine that will run them.

An artifact that passed `validate` on the machine that made it can be worse on the robot: another CPU's INT8 kernels
(AVX2 without VNNI saturates where VNNI does not), a TensorRT engine built on the target, another ORT version. The
bundle carries its own self-test set (deploy/selftest.py): stored inputs, raw frames with instructions, the fp32
reference outputs for both, and the budgets. `verify`, here:

1. re-hashes every file of the bundle (a tampered or incomplete bundle: exit 2);
2. for each artifact the bundle holds (or `--artifact NAME`): opens it through the runtime layer and compares it on
   the stored inputs with the reference (parity), then runs the raw frames through `Policy` (preprocessing,
   artifact, postprocessing) and compares the actions (end to end), both against the bundle's budgets, which
   `--tol*` override;
3. measures the on-target latency budget, split into preprocessing, inference and postprocessing, each with
   mean/std/min/max/p50/p99 after a warm-up, and judges the p99 of the whole step against `1000 / --rate-hz` ms;
4. writes `verify.json` + `verify.md` (machine and ISA, backend, parity, end-to-end error, latency split, verdict).

Exit codes: 0 every artifact that ran passed; 3 a budget failed (the line names the check); 2 a bad bundle; 4 no
artifact of the bundle can run on this machine (e.g. only a TensorRT engine on a CPU host).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vla_export import manifest as mf
from vla_export.errors import BackendUnavailable, GateFailed, UserError

VERIFY_JSON = "verify.json"
VERIFY_MD = "verify.md"
DEFAULT_RATE_HZ = 10.0
DEFAULT_WARMUP = 3
DEFAULT_ITERS = 30


def _stats(ms: list[float]) -> dict[str, float]:
    from vla_export.validate.metrics import latency_stats

    s = latency_stats(ms)
    return {k: s[k] for k in ("mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p99_ms") if k in s}


def measure_latency(policy, test, warmup: int, iters: int, rate_hz: float) -> dict[str, Any]:
    """Per-step milliseconds of preprocess / inference / postprocess on the self-test frames, after warm-up.

    CPU runners compute synchronously; GPU runners synchronise in `infer` (their outputs are copied to numpy), so
    each phase's wall time is the time the robot waits for it."""
    from vla_export.validate.validate import cast_feeds

    phases: dict[str, list[float]] = {"preprocess": [], "inference": [], "postprocess": [], "total": []}
    frames = len(test.images)
    for i in range(warmup + iters):
        image, text = test.images[i % frames], test.instructions[i % frames]
        policy.reset()
        t0 = time.perf_counter()
        feeds = policy.preprocess(image[None], text)
        if policy.spec.state:
            feeds = {**feeds, **policy.spec.initial_state(1)}
        feeds = cast_feeds(feeds, policy.spec)
        t1 = time.perf_counter()
        out = policy.runner.infer(feeds)
        t2 = time.perf_counter()
        policy.postprocess(out)
        t3 = time.perf_counter()
        if i >= warmup:
            for name, dt in (("preprocess", t1 - t0), ("inference", t2 - t1), ("postprocess", t3 - t2),
                             ("total", t3 - t0)):
                phases[name].append(dt * 1e3)
    policy.reset()
    budget_ms = 1000.0 / rate_hz
    split = {name: _stats(ms) for name, ms in phases.items()}
    p99 = split["total"]["p99_ms"]
    failures = [] if p99 <= budget_ms else [f"latency p99 {p99:.3g} ms > {budget_ms:.3g} ms ({rate_hz:g} Hz)"]
    return {"warmup": warmup, "iters": iters, "rate_hz": rate_hz, "budget_ms": budget_ms, "split": split,
            "failures": failures, "passed": not failures}


def _runtime_record(policy) -> dict[str, Any]:
    desc = policy.runner.describe()
    versions = mf.tool_versions()
    record = {"backend": policy.backend, "runner": desc, "device": policy.device}
    if desc.get("backend") == "onnxruntime":
        record |= {"onnxruntime": versions.get("onnxruntime") or versions.get("onnxruntime-gpu"),
                   "provider": desc.get("provider")}
    elif desc.get("backend") == "tensorrt":
        record |= {"tensorrt": desc.get("tensorrt"), "gpu": desc.get("gpu")}
    else:
        record |= {"torch": versions.get("torch")}
    return record


def verify_artifact(bundle_dir: Path, name: str, entry: dict[str, Any], test, budgets: dict[str, Any], *,
                    backend: str, rate_hz: float, warmup: int, iters: int, threads: int | None,
                    machine: dict[str, Any], validation_machine: dict[str, Any] | None) -> dict[str, Any]:
    from vla_export.deploy.policy import Policy
    from vla_export.deploy.selftest import budget_for, run_end_to_end, run_parity

    row: dict[str, Any] = {"artifact": name, "precision": entry.get("precision"), "variant": entry.get("variant")}
    try:
        # verify=False: the bundle was hashed once above, and this is the full self-test, not Policy's quick one
        policy = Policy.load(bundle_dir, backend=backend, verify=False, threads=threads, artifact=name)
    except BackendUnavailable as e:
        return row | {"status": "skipped", "reason": str(e)}
    with policy:
        budget = budget_for(budgets, entry.get("precision") or "fp32", entry.get("variant"))
        row["runtime"] = _runtime_record(policy)
        row["parity"] = run_parity(policy.runner, test, budget)
        row["end_to_end"] = run_end_to_end(policy, test, budget)
        row["latency"] = measure_latency(policy, test, warmup, iters, rate_hz)
    row["judged_elsewhere"] = mf.isa_difference((entry.get("validation") or {}).get("machine") or validation_machine, machine)
    row["failures"] = row["parity"]["failures"] + row["end_to_end"]["failures"] + row["latency"]["failures"]
    row["status"] = "failed" if row["failures"] else "passed"
    return row


def run_verify(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
               tolerances: dict[str, Any] | None = None, rate_hz: float = DEFAULT_RATE_HZ, backend: str = "auto",
               artifact: str | None = None, warmup: int = DEFAULT_WARMUP, iters: int = DEFAULT_ITERS,
               threads: int | None = None, log=None) -> dict[str, Any]:
    """Verify the bundle here; write verify.json + verify.md to `out_dir` (when given). Returns the report.

    `tolerances`: a gate table (validate's `resolve_tolerances`) replacing the bundle's budgets. Raises UserError
    (2) for a bad bundle, BackendUnavailable (4) when nothing can run here; a failed budget is in the report
    (`passed: False`), and the CLI turns it into exit 3."""
    from vla_export.deploy.bundle import bundle_artifacts, verify_bundle
    from vla_export.deploy.selftest import SelfTest

    log = log or (lambda msg: None)
    if rate_hz <= 0:
        raise UserError(f"--rate-hz must be > 0, got {rate_hz}")
    if iters < 1 or warmup < 0:
        raise UserError(f"--iters must be >= 1 and --warmup >= 0, got {iters} and {warmup}")
    bundle_dir = Path(bundle_dir)
    info = verify_bundle(bundle_dir)
    test = SelfTest(bundle_dir)
    held = bundle_artifacts(info)
    if artifact is not None and artifact not in held:
        raise UserError(f"bundle {bundle_dir} holds no artifact {artifact!r}; it holds {', '.join(held)}")
    names = [artifact] if artifact else list(held)
    budgets = tolerances or test.budgets
    machine = mf.machine_info()
    validation = info.get("validation") if isinstance(info.get("validation"), dict) else {}
    rows = []
    for name in names:
        log(f"verify {name}: parity on {test.info['feeds']} inputs, {test.info['frames']} frames end to end, "
            f"latency over {iters} steps")
        rows.append(verify_artifact(bundle_dir, name, held[name], test, budgets, backend=backend, rate_hz=rate_hz,
                                    warmup=warmup, iters=iters, threads=threads, machine=machine,
                                    validation_machine=validation.get("machine") if name == info["artifact"] else None))
    ran = [r for r in rows if r["status"] != "skipped"]
    report = {**mf.run_header("vla-export verify"), "bundle": str(bundle_dir.resolve()),
              "bundle_sha256": info.get("bundle_sha256"), "budgets": budgets, "rate_hz": rate_hz,
              "selftest": {k: test.info.get(k) for k in ("feeds", "frames", "frames_from")} | {
                  "reference_machine": (test.info.get("reference") or {}).get("machine")},
              "results": rows, "passed": bool(ran) and all(r["status"] == "passed" for r in ran)}
    if out_dir is not None:
        write_report(report, Path(out_dir))
    if not ran:
        raise BackendUnavailable(f"no artifact of {bundle_dir} can run on this machine: "
                                 + "; ".join(f"{r['artifact']}: {r['reason']}" for r in rows))
    return report


def failed_checks(report: dict[str, Any]) -> list[str]:
    return [f"{r['artifact']}: {f}" for r in report["results"] for f in r.get("failures", [])]


# -- the human report ---------------------------------------------------------------------------------------------------
def _g(v: Any, spec: str = ".3g") -> str:
    return "" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    feats = m.get("cpu_features") or {}
    lines = [f"# verify: {report['bundle']}", "",
             f"Verdict: **{'PASSED' if report['passed'] else 'FAILED'}** (run {report['run_id']}, {report['created']})",
             "", "## Machine", "",
             f"- CPU: {m.get('cpu')} ({m.get('arch')}, {m.get('cpu_count')} cores), ISA: "
             f"{', '.join(feats.get('flags', [])) or 'none recorded'}; int8 kernels: {feats.get('int8_kernels')}",
             f"- GPU: {m.get('gpu') or 'none'}; versions: "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k in
                         ("onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "vla-export")),
             f"- self-test: {report['selftest']['feeds']} inputs, {report['selftest']['frames']} frames "
             f"({report['selftest']['frames_from']})", "",
             "## Accuracy (vs the fp32 PyTorch reference that travelled with the bundle)", "",
             "| artifact | backend | status | parity MAE | parity rel L2 | end-to-end MAE | end-to-end rel L2 | budget |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        if r["status"] == "skipped":
            lines.append(f"| {r['artifact']} | | skipped: {r['reason']} | | | | | |")
            continue
        p, e = r["parity"]["metrics"].get("actions", {}), r["end_to_end"]["metrics"]
        budget = ", ".join(f"{k} {v:g}" for k, v in sorted(r["parity"]["budget"].items()) if k.startswith("parity_"))
        lines.append(f"| {r['artifact']} | {r['runtime']['backend']} ({r['runtime']['runner'].get('provider') or r['runtime']['device']}) "
                     f"| {r['status']} | {_g(p.get('mae'))} | {_g(p.get('rel_l2'))} | {_g(e.get('mae'))} | "
                     f"{_g(e.get('rel_l2'))} | {budget} |")
    lines += ["", f"## Latency per step, batch 1, against {report['rate_hz']:g} Hz "
              f"({1000 / report['rate_hz']:.3g} ms)", "",
              "| artifact | phase | mean ms | std | min | p50 | p99 | max |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        if r["status"] == "skipped":
            continue
        for phase, s in r["latency"]["split"].items():
            lines.append(f"| {r['artifact']} | {phase} | {_g(s['mean_ms'])} | {_g(s['std_ms'])} | {_g(s['min_ms'])} "
                         f"| {_g(s['p50_ms'])} | {_g(s['p99_ms'])} | {_g(s['max_ms'])} |")
    notes = [f"- {r['artifact']}: {r['judged_elsewhere']}" for r in report["results"] if r.get("judged_elsewhere")]
    fails = failed_checks(report)
    if notes:
        lines += ["", "## Judged on another machine than validated", "", *notes]
    if fails:
        lines += ["", "## Failed checks", "", *[f"- {f}" for f in fails]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir = mf.check_writable_dir(out_dir)
    j = mf.write_text_atomic(out_dir / VERIFY_JSON, json.dumps(report, indent=2, default=mf._json_default) + "\n")
    md = mf.write_text_atomic(out_dir / VERIFY_MD, markdown(report))
    return j, md


def summary_line(report: dict[str, Any]) -> str:
    parts = []
    for r in report["results"]:
        if r["status"] == "skipped":
            parts.append(f"{r['artifact']} skipped")
            continue
        p = r["parity"]["metrics"].get("actions", {})
        lat = r["latency"]["split"]["total"]
        parts.append(f"{r['artifact']} {r['status']} (parity MAE {p.get('mae', np.nan):.2g}, end-to-end MAE "
                     f"{r['end_to_end']['metrics'].get('mae', np.nan):.2g}, step p99 {lat['p99_ms']:.3g} ms)")
    return "; ".join(parts)


def raise_if_failed(report: dict[str, Any]) -> None:
    if not report["passed"]:
        fails = failed_checks(report)
        raise GateFailed(f"verify failed: {fails[0]}" + (f" (+{len(fails) - 1} more)" if len(fails) > 1 else ""))
