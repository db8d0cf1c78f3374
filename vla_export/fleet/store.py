"""Content-addressed fleet results: one directory per work key, written whole or not at all.

A work key is the sha256 of what decides a target's results: the bundle's own digest (`bundle_sha256`, which covers
the sha256 of every file in it), the target's hardware (CPU model, arch, kernel-relevant ISA features, GPU and its
compute capability), its software versions (vla-export, ONNX Runtime, torch, TensorRT, Python, numpy), the target's
name and its settings. The same bundle on the same kind of device with the same software gives the same key, so a
rerun finds the result and skips the work; a new ORT on the robot, or another GPU, is new work.

An entry is staged under `.staging-*` in the store and renamed into place when every file is written, with
`result.json` (which lists each file's sha256) last: an interrupted run leaves no entry, and at most a staging
directory that the next run removes. Only finished results are stored: a target that failed (a node that died,
an exception) is run again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vla_export import manifest as mf
from vla_export.errors import UserError

RESULT_FILE = "result.json"
STAGING_PREFIX = ".staging-"
KEY_FORMAT = 1


def hardware_identity(machine: dict[str, Any]) -> dict[str, Any]:
    """What of `manifest.machine_info()` decides kernels and numbers (not the hostname: two identical robot PCs
    are the same hardware)."""
    features = machine.get("cpu_features") or {}
    return {"arch": machine.get("arch"), "cpu": machine.get("cpu"), "cpu_flags": sorted(features.get("flags") or []),
            "int8_kernels": features.get("int8_kernels"), "gpu": machine.get("gpu"),
            "gpu_compute_capability": machine.get("gpu_compute_capability")}


def software_identity(versions: dict[str, Any]) -> dict[str, Any]:
    keep = ("vla-export", "python", "numpy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt")
    return {k: versions[k] for k in keep if k in versions}


def work_key(bundle_sha256: str, hardware: dict[str, Any], software: dict[str, Any], target: str,
             settings: dict[str, Any]) -> str:
    body = {"format": KEY_FORMAT, "bundle_sha256": bundle_sha256, "hardware": hardware, "software": software,
            "target": target, "settings": settings}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class ResultStore:
    def __init__(self, root: str | os.PathLike):
        self.root = mf.check_writable_dir(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def clean_staging(self) -> list[str]:
        """Remove what an interrupted run left half-written (never an entry: those appear only by rename)."""
        left = sorted(p.name for p in self.root.glob(f"{STAGING_PREFIX}*"))
        for name in left:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return left

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored record, or None when absent or damaged (a damaged entry is treated as missing work)."""
        entry = self.path(key)
        try:
            record = json.loads((entry / RESULT_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        for name, meta in (record.get("stored_files") or {}).items():
            p = entry / name
            if not p.is_file() or p.stat().st_size != meta["bytes"] or mf.sha256_file(p) != meta["sha256"]:
                return None
        return record

    def put(self, key: str, record: dict[str, Any], files: dict[str, bytes]) -> Path:
        """Write `files` (relative names -> bytes) and the record, then rename the entry into place."""
        for name in files:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise UserError(f"fleet result file name {name!r} escapes its store entry")
        stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            stored = {}
            for name, data in sorted(files.items()):
                p = stage / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
                os.chmod(p, 0o644)
                stored[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            record = {**record, "key": key, "stored_files": stored}
            (stage / RESULT_FILE).write_text(json.dumps(record, indent=2, default=mf._json_default) + "\n")
            os.chmod(stage, 0o755)
            final = self.path(key)
            if final.exists():  # the same work done again (e.g. --force): swap, readers see old or new
                aside = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
                os.replace(final, aside / key)
                os.replace(stage, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(stage, final)
            return final
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
