"""Artifact manifests and the file-handling rules every stage shares.

Each artifact `X` (a `.onnx`, `.engine`, `.pt2`, ...) has `X.json` beside it: how it was made (stage, settings,
source sha256, tool versions, device, wall time, peak RSS), every file it needs with its size, and its metrics.
Files are written under a temporary name and renamed only once complete and checked, so a crash or a failed gate
never leaves something that looks like a valid artifact.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vla_export.errors import UserError

MANIFEST_SUFFIX = ".json"
FORMAT_VERSION = 1


# -- hashing and sizes -----------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One digest over several files (name + content), e.g. a `.onnx` and its `.onnx.data`, or a checkpoint dir."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def onnx_external_files(onnx_path: str | os.PathLike) -> list[Path]:
    """External-data files an ONNX model references (read from the graph, not guessed from the name)."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    names = set()
    for init in _all_initializers(model.graph):
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for kv in init.external_data:
                if kv.key == "location":
                    names.add(kv.value)
    return [onnx_path.parent / n for n in sorted(names)]


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.ByteSize():
                yield from _all_initializers(attr.g)
            for g in attr.graphs:
                yield from _all_initializers(g)


def aoti_weights_path(package: str | os.PathLike) -> Path:
    """The weights file beside an AOTInductor package compiled without its weights (`model.cpu.fp32.pt2` ->
    `model.cpu.fp32.weights.safetensors`)."""
    package = Path(package)
    return package.with_name(package.name.removesuffix(".pt2") + ".weights.safetensors")


def artifact_files(path: str | os.PathLike) -> list[Path]:
    """Every file an artifact needs to run: the file itself plus, for ONNX, its external data and, for an
    AOTInductor package, its weights file where it has one."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    if path.suffix == ".onnx":
        files += onnx_external_files(path)
    if path.suffix == ".pt2" and aoti_weights_path(path).exists():
        files.append(aoti_weights_path(path))
    return files


def file_sizes(paths: list[Path]) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in paths}


def total_bytes(path: str | os.PathLike) -> int:
    """Honest size: every byte the artifact needs (a `.onnx` plus its `.onnx.data`)."""
    return sum(p.stat().st_size for p in artifact_files(path))


# -- environment -----------------------------------------------------------------------------------------------
def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("vla-export", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "transformers",
                "tensorrt", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide which integer/float kernels ONNX Runtime and PyTorch pick. INT8 results differ
# between these classes (ORT's U8S8 GEMM on AVX2/AVX-512 without VNNI sums byte pairs into 16 bits and saturates),
# so every measurement records them and `validate`/`verify` compare them.
X86_KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                    "amx_tile", "amx_int8", "amx_bf16")
ARM_KERNEL_FLAGS = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "fphp", "asimdhp")


def _cpuinfo_flags(text: str | None = None) -> set[str]:
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def int8_kernel_class(flags: set[str], arch: str | None = None) -> str:
    """The class of integer kernels this CPU gets: `vnni` (dot-product int8 on x86: AVX512-VNNI, AVX-VNNI or AMX),
    `avx2` (no VNNI: U8S8 pairs saturate at 16 bits), `arm64-dot` (SDOT/UDOT), `arm64` or `other`."""
    arch = (arch or platform.machine()).lower()
    if arch in ("x86_64", "amd64", "i686", "x86"):
        if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
            return "vnni"
        return "avx2" if "avx2" in flags else "other"
    if arch in ("aarch64", "arm64"):
        return "arm64-dot" if "asimddp" in flags else "arm64"
    return "other"


def cpu_features(cpuinfo_text: str | None = None, arch: str | None = None) -> dict[str, Any]:
    """{"arch", "flags": the kernel-relevant ISA features present, "int8_kernels": int8_kernel_class}."""
    arch = arch or platform.machine()
    flags = _cpuinfo_flags(cpuinfo_text)
    wanted = ARM_KERNEL_FLAGS if arch.lower() in ("aarch64", "arm64") else X86_KERNEL_FLAGS
    return {"arch": arch, "flags": [f for f in wanted if f in flags], "int8_kernels": int8_kernel_class(flags, arch)}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_features": cpu_features(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except ImportError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def isa_difference(recorded: dict[str, Any] | None, here: dict[str, Any], what: str = "validated") -> str | None:
    """A note when an artifact was judged (`what`) on a CPU whose kernel-relevant features differ from this one's
    (machine records of `machine_info()`), e.g. INT8 gated on a VNNI host and now run on an AVX2-only one."""
    if not recorded:
        return None
    theirs = recorded.get("cpu_features") or {}
    mine = here.get("cpu_features") or {}
    if not theirs:
        return (f"{what} on {recorded.get('cpu', 'an unrecorded CPU')} without a record of its ISA features; "
                "judged here")
    if set(theirs.get("flags", [])) == set(mine.get("flags", [])) and theirs.get("arch") == mine.get("arch"):
        return None
    lost = [f for f in theirs.get("flags", []) if f not in mine.get("flags", [])]
    gained = [f for f in mine.get("flags", []) if f not in theirs.get("flags", [])]
    return (f"{what} on {recorded.get('cpu')} ({theirs.get('arch')}, int8 kernels {theirs.get('int8_kernels')}), "
            f"judged here on {here.get('cpu')} ({mine.get('arch')}, int8 kernels {mine.get('int8_kernels')}; "
            f"missing here: {', '.join(lost) or 'none'}; only here: {', '.join(gained) or 'none'})")


def run_header(command: str | None) -> dict[str, Any]:
    """The head of a run report (validation.json, profile.json): id, time, command, machine, versions."""
    import uuid

    return {
        "run_id": uuid.uuid4().hex[:12],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(),
        "versions": tool_versions(),
    }


# -- peak memory -------------------------------------------------------------------------------------------------
class PeakRSS:
    """Samples this process's RSS (and its children's) in a thread; `.peak_bytes` after the block.

    `ru_maxrss` would be simpler but is a process-lifetime high-water mark: useless for a second stage in
    the same process."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        import psutil

        proc = psutil.Process()
        rss = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                rss += child.memory_info().rss
        return rss

    def _run(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.peak_bytes = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss())


@contextlib.contextmanager
def measured() -> Iterator[dict[str, float]]:
    """`with measured() as m: ...` then `m["wall_s"]`, `m["peak_rss_bytes"]`."""
    result: dict[str, float] = {}
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        yield result
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    result["peak_rss_bytes"] = peak.peak_bytes


# -- atomic output -----------------------------------------------------------------------------------------------
def check_writable_dir(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out_dir}: {e.strerror}; choose a writable -o/--output") from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out_dir} is not writable; choose a writable -o/--output")
    return out_dir


@contextlib.contextmanager
def staging_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory inside `out_dir` (same filesystem, so the final rename is atomic), removed on exit.

    Write all files of an artifact here, check them, then `publish()` them; anything left is deleted, so an
    exception (disk full, failed check) leaves no partial artifact behind."""
    out_dir = check_writable_dir(out_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    except OSError as e:  # e.g. /proc: it exists and root may "write" there, but nothing can be created in it
        raise UserError(f"cannot write into {out_dir} ({e.strerror}); choose a writable -o/--output") from e
    try:
        yield tmp
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            raise UserError(f"disk full while writing to {out_dir}: free space or choose another -o; "
                            "nothing was written") from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: list[Path], out_dir: str | os.PathLike, rename: dict[str, str] | None = None) -> list[Path]:
    """Move staged files into `out_dir` (readable by everyone: the exporter wrote `.onnx.data` as 0600).

    Data files go first and the main file (first in `staged`) last, so a reader never sees a main file whose
    data is missing."""
    out_dir = Path(out_dir)
    rename = rename or {}
    final = []
    for src in [*staged[1:], staged[0]]:
        dst = out_dir / rename.get(src.name, src.name)
        os.chmod(src, 0o644)
        os.replace(src, dst)
        final.append(dst)
    return [final[-1], *final[:-1]]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# -- manifests ---------------------------------------------------------------------------------------------------
def manifest_path(artifact: str | os.PathLike) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


def new_manifest(stage: str, artifact: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """The common head of every manifest; stages add `settings`, `source`, `metrics`, ..."""
    artifact = Path(artifact)
    files = artifact_files(artifact)
    return {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "artifact": artifact.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": file_sizes(files),
        "total_bytes": sum(p.stat().st_size for p in files),
        "sha256": sha256_files(files),
        "versions": tool_versions(),
        "machine": machine_info(),
        **fields,
    }


def write_manifest(artifact: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    return write_text_atomic(manifest_path(artifact), json.dumps(manifest, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, missing: str, invalid: str) -> dict[str, Any]:
    """A JSON file the user's pipeline wrote, with one-line errors: `missing`/`invalid` say what to do."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); {invalid}") from e


def read_manifest(artifact: str | os.PathLike) -> dict[str, Any]:
    return read_json(manifest_path(artifact), f"{Path(artifact).name} has no manifest beside it: rebuild it with "
                     "vla-export", "rebuild the artifact")


def _json_default(obj: Any):
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")
