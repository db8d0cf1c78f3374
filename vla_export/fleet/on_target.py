"""What runs on a target device: plain functions, no Ray (run.py wraps `run_target` in a Ray task).

Steps, in order, each writing into its own folder of the work directory and each returning a step record
`{"status": passed|failed|skipped, "reason", "wall_s", "files": [...], "summary": {...}}`:
- `build_trt_on_target`: `vla-export trt --bundle` here: a TensorRT engine from the bundle's ONNX, added to this
  target's copy of the bundle. Without TensorRT or a GPU, BackendUnavailable: skipped with its reason.
- `compile_aoti_on_target`: `vla-export aoti --bundle` here: an AOTInductor package from the bundle's weights
  (--with-weights) or the checkpoint the targets file ships; skipped with that reason when there is neither.
- `verify_on_target`: `vla-export verify` here (`deploy.verify.run_verify`): every artifact the bundle now holds,
  judged against the reference outputs and budgets that travelled with it, with the on-target latency split.
- `profile_on_target`: `validate.profile.profile` of every artifact the bundle now holds.

A step that raises is that step's failure (its reason is the exception's first line); the others still run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vla_export import manifest as mf
from vla_export.errors import BackendUnavailable, UserError

VERIFY_FILES = ("verify.json", "verify.md")
PROFILE_FILE = "profile.json"


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
    """`vla-export trt --bundle` here: an engine from the bundle's ONNX, added to (this target's copy of) the bundle,
    re-hashed, so verify judges it against the reference outputs that travelled with the bundle."""
    from vla_export.deploy.bundle import add_artifact
    from vla_export.engines.commands import bundle_onnx_for
    from vla_export.engines.tensorrt import EngineBuildRequest, build_engine, import_tensorrt

    explicit = settings.get("precision")
    precision = explicit or "fp16"  # as `vla-export trt`: the precision engines are built at unless told
    try:
        onnx_path = bundle_onnx_for(bundle_dir, precision)
    except UserError as e:
        if explicit:  # the targets file asked for something this bundle cannot give: its mistake, a failure
            raise
        import_tensorrt()  # no TensorRT here says so first (skipped: backend), whatever the bundle holds
        return {"status": "skipped", "reason": f"not applicable: {e}"}
    req = EngineBuildRequest(onnx_path=onnx_path, precision=precision, out_dir=bundle_dir,
                             workspace_gb=float(settings.get("workspace_gb", 4.0)),
                             timing_cache=out_dir / "timing.cache")  # not in the bundle: every file there is hashed
    engine, manifest = build_engine(req)
    add_artifact(bundle_dir, engine, manifest)
    return _bring_back(engine, out_dir) | {
        "status": "passed", "artifact": engine.name,
        "summary": {"precision": manifest.get("precision"), "source": onnx_path.name,
                    "tensorrt": manifest.get("tensorrt"), "build_s": (manifest.get("timing") or {}).get("build_s"),
                    "bytes": engine.stat().st_size}}


def _bring_back(artifact: Path, out_dir: Path) -> dict[str, Any]:
    """Link an artifact and its manifest from the bundle into the step's folder: what travels back to the driver."""
    names = [p.name for p in mf.artifact_files(artifact)] + [mf.manifest_path(artifact).name]
    for name in names:
        try:
            os.link(artifact.parent / name, out_dir / name)
        except OSError:
            shutil.copyfile(artifact.parent / name, out_dir / name)
    return {"files": names}


# -- AOTInductor ---------------------------------------------------------------------------------------------------------
def compile_aoti_on_target(bundle_dir: Path, checkpoint_dir: Path | None, out_dir: Path,
                           settings: dict[str, Any]) -> dict[str, Any]:
    """`vla-export aoti --bundle` here: compiled from the bundle's own weights (a bundle made with --with-weights) or
    from the checkpoint the targets file shipped; added to this target's copy of the bundle."""
    from vla_export.deploy.bundle import add_artifact, read_bundle
    from vla_export.engines.aoti import check_device, compile_aoti
    from vla_export.engines.commands import bundle_checkpoint

    device, dtype = settings.get("device", "cpu"), settings.get("dtype", "fp32")
    check_device(device)  # cuda without a GPU: skipped (BackendUnavailable) before anything is compiled
    info = read_bundle(bundle_dir)
    if info.get("weights"):
        with bundle_checkpoint(bundle_dir, info) as ckpt:
            package, manifest, _built = compile_aoti(ckpt, bundle_dir, device=device, dtype=dtype)
        manifest["source"] |= {"checkpoint": str(bundle_dir.resolve()), "checkpoint_in_bundle": True}
        mf.write_manifest(package, manifest)
        source = "the bundle's weights"
    elif checkpoint_dir is not None:
        package, manifest, _built = compile_aoti(checkpoint_dir, bundle_dir, device=device, dtype=dtype)
        source = "the checkpoint shipped from the targets file"
    else:
        return {"status": "skipped", "reason": "the bundle carries no weights to compile from: re-bundle with "
                                               "--with-weights, or set aoti.checkpoint for this target"}
    add_artifact(bundle_dir, package, manifest)
    return _bring_back(package, out_dir) | {
        "status": "passed", "artifact": package.name,
        "summary": {"device": manifest.get("device"), "precision": manifest.get("precision"), "source": source,
                    "parity": (manifest.get("metrics") or {}).get("parity"), "bytes": package.stat().st_size}}


# -- verify ----------------------------------------------------------------------------------------------------------------
def verify_tolerances(bundle_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The bundle's own budgets with the targets file's `tol`/`tol_fp16`/`tol_int8` on top, as `verify --tol*`."""
    import copy

    from vla_export.deploy.selftest import SelfTest

    overrides = {p: settings.get(k) for p, k in (("fp32", "tol"), ("fp16", "tol_fp16"), ("int8", "tol_int8"))}
    if all(v is None for v in overrides.values()):
        return None
    table = copy.deepcopy(SelfTest(bundle_dir).budgets)
    for precision, value in overrides.items():
        if value is not None:
            table["precision"].setdefault(precision, {})["parity_mae"] = float(value)
    return table


def verify_on_target(bundle_dir: Path, out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """`vla-export verify` here (`deploy.verify.run_verify`): every artifact the bundle holds, engines built in the
    steps before included, against the budgets and reference outputs that travelled with it."""
    from vla_export.deploy.verify import failed_checks, run_verify, summary_line

    report = run_verify(bundle_dir, out_dir, tolerances=verify_tolerances(bundle_dir, settings),
                        rate_hz=float(settings.get("rate_hz", 10.0)), backend=settings.get("backend", "auto"),
                        warmup=int(settings.get("warmup", 3)), iters=int(settings.get("iters", 30)))
    rows = [{"artifact": r["artifact"], "status": r["status"], "reason": r.get("reason"),
             "failures": r.get("failures", []), "runtime": r.get("runtime"),
             "parity_mae": ((r.get("parity") or {}).get("metrics") or {}).get("actions", {}).get("mae"),
             "end_to_end_mae": ((r.get("end_to_end") or {}).get("metrics") or {}).get("mae"),
             "latency_ms": (r.get("latency") or {}).get("split")} for r in report["results"]]
    fails = failed_checks(report)
    return {"status": "passed" if report["passed"] else "failed", "reason": "; ".join(fails) or None,
            "files": [n for n in VERIFY_FILES if (out_dir / n).is_file()],
            "summary": {"passed": report["passed"], "verdict": summary_line(report), "rate_hz": report["rate_hz"],
                        "rows": rows}}


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
        from vla_export.deploy.bundle import bundle_artifacts, read_bundle, verify_bundle

        verify_bundle(bundle_dir)  # the bytes that arrived are the bytes that were sent: refuse to go on otherwise
        checkpoint_dir = write_files(checkpoint_files, work / "checkpoint") if checkpoint_files else None
        steps: dict[str, dict[str, Any]] = {}
        for name in target["steps"]:
            report(name, "running")
            out = work / "out" / name
            out.mkdir(parents=True, exist_ok=True)
            if name == "trt":
                record = _step(lambda out=out: build_trt_on_target(bundle_dir, out, target.get("trt") or {}))
            elif name == "aoti":
                record = _step(lambda out=out: compile_aoti_on_target(bundle_dir, checkpoint_dir, out,
                                                                      target.get("aoti") or {}))
            elif name == "verify":
                record = _step(lambda out=out: verify_on_target(bundle_dir, out, target.get("verify") or {}))
            elif name == "profile":
                paths = [bundle_dir / a for a in bundle_artifacts(read_bundle(bundle_dir))]
                record = _step(lambda out=out, paths=paths: profile_on_target(paths, out, target["profile"]))
            else:
                raise UserError(f"unknown fleet step {name!r}")
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
