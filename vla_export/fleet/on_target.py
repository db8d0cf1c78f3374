"""What runs on a target device: plain functions, no Ray (run.py wraps `run_target` in a Ray task).

Steps, in order, each into its own folder of the work directory and each returning a step record
`{"status": passed|failed|skipped, "reason", "wall_s", "files": [...], "summary": {...}}`:
- `build_trt_on_target`: a TensorRT engine from the bundle's ONNX (`engines.tensorrt.build_engine`). Without
  TensorRT or a GPU that raises BackendUnavailable: skipped with its reason.
- `compile_aoti_on_target`: an AOTInductor package, compiled from the checkpoint the targets file names (a bundle
  carries no weights, so without one this is skipped with that reason).
- `verify_on_target`: the on-target check of the bundle: `vla_export.deploy.verify.run_verify` (issue 11) where
  it is installed, else `check_bundle_on_target` below.
- `profile_on_target`: `validate.profile.profile` of the bundle's artifact and of everything built here.

A step that raises is that step's failure (its reason is the exception's first line); the others still run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vla_export import manifest as mf
from vla_export.errors import BackendUnavailable, GateFailed, UserError

VERIFY_FILES = ("verify.json", "verify.md")
PROFILE_FILE = "profile.json"
SELF_CHECK_FRAMES = 8
SELF_CHECK_WARMUP = 2


def probe() -> dict[str, Any]:
    """Who this target is: its machine record and tool versions (what the work key is made of)."""
    from vla_export.fleet.store import hardware_identity, software_identity

    machine, versions = mf.machine_info(), mf.tool_versions()
    return {"machine": machine, "versions": versions, "hardware": hardware_identity(machine),
            "software": software_identity(versions)}


def write_files(files: dict[str, bytes], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        p = dest / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return dest


def read_files(directory: str | os.PathLike) -> dict[str, bytes]:
    """Every file under `directory` by relative path (what travels to a target, and back)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _step(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one step; BackendUnavailable is a skip, anything else that raises is the step's failure."""
    t0 = time.perf_counter()
    try:
        record = fn()
    except BackendUnavailable as e:
        record = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one step's error is that step's result, the target goes on
        record = {"status": "failed", "reason": _first_line(e)}
    record.setdefault("reason", None)
    record.setdefault("files", [])
    record["wall_s"] = round(time.perf_counter() - t0, 3)
    return record


# -- TensorRT ------------------------------------------------------------------------------------------------------------
def build_trt_on_target(bundle_dir: Path, out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    from vla_export.deploy.bundle import read_bundle
    from vla_export.engines.tensorrt import EngineBuildRequest, build_engine

    info = read_bundle(bundle_dir)
    if info.get("backend") != "onnxruntime":
        return {"status": "skipped", "reason": f"the bundle's artifact is {info.get('backend')}, not ONNX: nothing to "
                                               "build a TensorRT engine from"}
    explicit = settings.get("precision")
    precision = explicit or info.get("precision") or "fp32"
    req = EngineBuildRequest(onnx_path=bundle_dir / info["artifact"], precision=precision, out_dir=out_dir,
                             workspace_gb=float(settings.get("workspace_gb", 4.0)))
    try:
        engine, manifest = build_engine(req)
    except BackendUnavailable:
        raise
    except UserError as e:
        if explicit:  # the targets file asked for something this artifact cannot give: its mistake, a failure
            raise
        return {"status": "skipped", "reason": f"not applicable to {info['artifact']}: {e}"}
    files = [engine.name, mf.manifest_path(engine).name]
    return {"status": "passed", "files": files, "artifact": engine.name,
            "summary": {"precision": manifest.get("precision"), "tensorrt": manifest.get("tensorrt"),
                        "build_s": (manifest.get("timing") or {}).get("build_s"), "bytes": engine.stat().st_size}}


# -- AOTInductor ---------------------------------------------------------------------------------------------------------
def compile_aoti_on_target(checkpoint_dir: Path | None, out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    from vla_export.engines.aoti import compile_aoti

    if checkpoint_dir is None:
        return {"status": "skipped", "reason": "no checkpoint to compile from (a bundle carries no weights); set "
                                               "aoti.checkpoint for this target in the targets file"}
    package, manifest, _built = compile_aoti(checkpoint_dir, out_dir, device=settings.get("device", "cpu"),
                                             dtype=settings.get("dtype", "fp32"))
    return {"status": "passed", "files": [package.name, mf.manifest_path(package).name], "artifact": package.name,
            "summary": {"device": manifest.get("device"), "precision": manifest.get("precision"),
                        "parity": (manifest.get("metrics") or {}).get("parity"), "bytes": package.stat().st_size}}


# -- verify ----------------------------------------------------------------------------------------------------------------
def _run_verify_if_installed():
    """issue 11's `run_verify(bundle_dir, out_dir, *, tolerances, rate_hz, backend) -> dict` when present."""
    try:
        from vla_export.deploy.verify import run_verify
    except ImportError:
        return None
    return run_verify


def verify_on_target(bundle_dir: Path, out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    run_verify = _run_verify_if_installed()
    kwargs = {"rate_hz": float(settings.get("rate_hz", 10.0)), "backend": settings.get("backend", "auto")}
    if run_verify is None:
        result = check_bundle_on_target(bundle_dir, out_dir, **kwargs)
        checker = "check_bundle_on_target"
    else:
        try:
            result = run_verify(bundle_dir, out_dir, tolerances=settings.get("tolerances"), **kwargs)
        except GateFailed as e:  # a budget failed: verify.json says which; the step fails with that line
            return {"status": "failed", "reason": str(e), "files": _present(out_dir, VERIFY_FILES),
                    "summary": _read_json(out_dir / "verify.json")}
        checker = "run_verify"
    passed = bool(result.get("passed"))
    return {"status": "passed" if passed else "failed",
            "reason": None if passed else (result.get("verdict") or "verify failed; see verify.md"),
            "files": _present(out_dir, VERIFY_FILES), "summary": result | {"checker": checker}}


def _present(directory: Path, names) -> list[str]:
    return [n for n in names if (directory / n).is_file()]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_bundle_on_target(bundle_dir: Path, out_dir: Path, *, rate_hz: float = 10.0,
                           backend: str = "auto") -> dict[str, Any]:
    """The on-target check from the pieces a bundle has today: every file's sha256 (`verify_bundle`), the artifact
    opened by `Policy.load` on this machine, actions for deterministic frames that are finite and of the bundle's
    action size, and the latency split (preprocess / inference / postprocess, p50/p99) against 1/rate_hz.

    It cannot judge parity: bundles made before issue 11 carry no reference outputs. Writes verify.json + verify.md.
    """
    from vla_export.data.episodes import synth_instructions
    from vla_export.deploy.bundle import verify_bundle
    from vla_export.deploy.policy import Policy
    from vla_export.validate.metrics import latency_stats

    checks: list[dict[str, Any]] = []
    info = verify_bundle(bundle_dir)
    checks.append({"check": "bundle sha256", "passed": True, "detail": f"{len(info['files'])} files match"})
    policy = Policy.load(bundle_dir, backend=backend, verify=False)
    try:
        size = int(info.get("preprocessing", {}).get("image_size") or 224)
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(SELF_CHECK_FRAMES)]
        instruction = synth_instructions()[0]
        times: dict[str, list[float]] = {"preprocess": [], "inference": [], "postprocess": []}
        actions = []
        policy.reset()
        for i, frame in enumerate([frames[0]] * SELF_CHECK_WARMUP + frames):
            t0 = time.perf_counter()
            feeds = policy.preprocess(frame, instruction)
            t1 = time.perf_counter()
            raw = policy.infer(feeds)
            t2 = time.perf_counter()
            action = np.asarray(raw[0], dtype=np.float32).copy()
            t3 = time.perf_counter()
            if i >= SELF_CHECK_WARMUP:
                actions.append(action)
                for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    times[k].append(dt * 1e3)
        described = policy.describe()
    finally:
        policy.close()
    actions_arr = np.stack(actions)
    n_actions = len(info["actions"]["names"])
    finite = bool(np.isfinite(actions_arr).all())
    checks.append({"check": "actions finite", "passed": finite, "detail": f"{len(actions)} frames"})
    checks.append({"check": "action size", "passed": actions_arr.shape[1] == n_actions,
                   "detail": f"{actions_arr.shape[1]} outputs, bundle names {n_actions}"})
    latency = {k: latency_stats(v) for k, v in times.items()}
    total = latency_stats([sum(x) for x in zip(*times.values(), strict=True)])
    budget_ms = 1e3 / rate_hz
    checks.append({"check": f"p99 end-to-end <= {budget_ms:.1f} ms ({rate_hz:g} Hz)",
                   "passed": total["p99_ms"] <= budget_ms, "detail": f"p99 {total['p99_ms']:.2f} ms"})
    passed = all(c["passed"] for c in checks)
    failed = [c["check"] for c in checks if not c["passed"]]
    result = {
        **mf.run_header("check_bundle_on_target"),
        "bundle": str(bundle_dir), "artifact": info["artifact"], "bundle_sha256": info.get("bundle_sha256"),
        "backend": described, "rate_hz": rate_hz, "latency_ms": latency | {"end_to_end": total},
        "checks": checks, "passed": passed,
        "verdict": "passed" if passed else f"FAILED: {'; '.join(failed)}",
        "not_judged": "parity against reference outputs: this bundle carries none (made before issue 11's self-test)",
    }
    out_dir = mf.check_writable_dir(out_dir)
    mf.write_text_atomic(out_dir / "verify.json", json.dumps(result, indent=2, default=mf._json_default) + "\n")
    mf.write_text_atomic(out_dir / "verify.md", _verify_markdown(result))
    return result


def _verify_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    feats = m.get("cpu_features") or {}
    lines = [f"# verify: {r['artifact']}", "",
             f"Machine: {m.get('cpu')} ({m.get('arch')}; ISA {', '.join(feats.get('flags') or []) or '-'}; INT8 "
             f"kernels {feats.get('int8_kernels')}){'; GPU ' + m['gpu'] if m.get('gpu') else ''}",
             f"Backend: {r['backend'].get('backend')} {r['backend'].get('provider') or r['backend'].get('device')} "
             f"({r['backend'].get('reason')})", "", f"Verdict: **{r['verdict']}**", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'pass' if c['passed'] else 'FAIL'} | {c['detail']} |" for c in r["checks"]]
    lines += ["", f"Latency split (ms, {SELF_CHECK_FRAMES} frames after {SELF_CHECK_WARMUP} warm-up, budget "
                  f"{1e3 / r['rate_hz']:.1f} ms at {r['rate_hz']:g} Hz):", "",
              "| part | p50 | p99 | mean | max |", "|---|---:|---:|---:|---:|"]
    for part, s in r["latency_ms"].items():
        lines.append(f"| {part} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['mean_ms']:.3f} | {s['max_ms']:.3f} |")
    lines += ["", f"Not judged: {r['not_judged']}", ""]
    return "\n".join(lines)


# -- profile ---------------------------------------------------------------------------------------------------------------
def profile_on_target(artifacts: list[Path], out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    from vla_export.validate.profile import profile

    # In-process: run.py gives every target run a fresh Ray worker process (max_calls=1), which is the isolation
    # profile's subprocess would give, without a child process that outlives a killed node.
    result = profile([str(a) for a in artifacts], warmup=int(settings["warmup"]), iters=int(settings["iters"]),
                     batches=[int(b) for b in settings["batches"]], isolate=False, include_eager=False,
                     output=out_dir / PROFILE_FILE, progress=False)
    rows = [{k: r.get(k) for k in ("id", "name", "backend", "precision", "device", "provider", "status", "reason",
                                   "threads", "batches")} for r in result["rows"]]
    failed = [r for r in rows if r["status"] != "ok"]
    return {"status": "failed" if failed else "passed",
            "reason": "; ".join(f"{r['id']}: {r['reason']}" for r in failed) or None,
            "files": [PROFILE_FILE], "summary": {"rows": rows, "settings": result["settings"]}}


# -- the whole target ------------------------------------------------------------------------------------------------------
def run_target(bundle_files: dict[str, bytes], target: dict[str, Any], checkpoint_files: dict[str, bytes] | None = None,
               report: Callable[[str, str], None] | None = None, work_root: str | None = None) -> dict[str, Any]:
    """Every step of one target on this machine. `target` is `Target.settings()` plus "name"; returns the record
    and the files to bring back (relative path -> bytes; e.g. verify/verify.json, trt/model.fp16.engine)."""
    report = report or (lambda step, state: None)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vla-fleet-", dir=work_root))
    try:
        bundle_dir = write_files(bundle_files, work / "bundle")
        report("transfer", "running")
        from vla_export.deploy.bundle import verify_bundle

        verify_bundle(bundle_dir)  # the bytes that arrived are the bytes that were sent: refuse to go on otherwise
        checkpoint_dir = write_files(checkpoint_files, work / "checkpoint") if checkpoint_files else None
        steps: dict[str, dict[str, Any]] = {}
        built: list[Path] = []
        for name in target["steps"]:
            report(name, "running")
            out = work / "out" / name
            out.mkdir(parents=True, exist_ok=True)
            if name == "trt":
                record = _step(lambda out=out: build_trt_on_target(bundle_dir, out, target.get("trt") or {}))
            elif name == "aoti":
                record = _step(lambda out=out: compile_aoti_on_target(checkpoint_dir, out, target.get("aoti") or {}))
            elif name == "verify":
                record = _step(lambda out=out: verify_on_target(bundle_dir, out, target.get("verify") or {}))
            elif name == "profile":
                paths = [bundle_dir / json.loads((bundle_dir / "bundle.json").read_text())["artifact"], *built]
                record = _step(lambda out=out, paths=paths: profile_on_target(paths, out, target["profile"]))
            else:
                raise UserError(f"unknown fleet step {name!r}")
            if record["status"] == "passed" and record.get("artifact"):
                built.append(out / record["artifact"])
            record["files"] = [f"{name}/{f}" for f in record["files"]]
            steps[name] = record
            report(name, record["status"])
        files = {}
        for record in steps.values():
            for rel in record["files"]:
                files[rel] = (work / "out" / rel).read_bytes()
        statuses = [s["status"] for s in steps.values()]
        failed = [f"{n}: {s['reason']}" for n, s in steps.items() if s["status"] == "failed"]
        if failed:
            status, reason = "failed", "; ".join(failed)
        elif "verify" in steps and steps["verify"]["status"] == "skipped":
            status, reason = "skipped", f"verify: {steps['verify']['reason']}"
        elif all(s == "skipped" for s in statuses):
            status, reason = "skipped", "every step was skipped"
        else:
            status, reason = "passed", None
        return {"target": target["name"], "status": status, "reason": reason, "steps": steps, "files": files,
                "wall_s": round(time.perf_counter() - t0, 3), **probe()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
