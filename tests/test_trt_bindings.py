"""vla_export/engines/tensorrt.py against the real TensorRT Python bindings of 8.6, 10.x and 11.x.

TensorRT's libraries cannot be installed here, but its bindings wheels can; `scripts/check_trt_api.py` links them
against stub libraries so the real binding module imports, then checks every name and call signature our code uses,
the build plans against each version's real enums, and the calls that need no GPU. Each probe runs in a subprocess:
the stubbed module must not become `tensorrt` for the rest of the test session.
Skipped, with the reason, where the wheels cannot be downloaded or gcc/binutils are missing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_trt_api.py"
VERSIONS = ("8.6.1", "10.3.0", "11.4.0.106")


def _load_script():
    spec = importlib.util.spec_from_file_location("check_trt_api", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bindings() -> dict[str, Path]:
    """{version: prepared bindings dir}, downloaded once per machine into the cache."""
    check = _load_script()
    cache = Path(os.environ.get("VLA_TRT_BINDINGS_CACHE", check.DEFAULT_CACHE))
    roots = {}
    for version in VERSIONS:
        try:
            roots[version] = check.prepare(version, cache)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            pytest.skip(f"TensorRT {version} bindings wheel unavailable here: {e}")
    return roots


def _probe(root: Path, source: Path | None = None) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--probe", str(root)] + (["--source", str(source)] if source else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _plan(result: dict, precision: str, onnx: str) -> dict:
    return next(p for p in result["plans"]["plans"] if p["precision"] == precision and p["onnx"] == onnx)


@pytest.mark.parametrize("version", VERSIONS)
def test_tensorrt_code_fits_the_real_bindings(bindings, version):
    result = _probe(bindings[version])
    assert result["version"] == version
    surface = result["surface"]
    assert surface["missing"] == [] and surface["call_problems"] == [] and surface["core_not_reached"] == []
    assert surface["checked"] >= 50
    assert result["plans"]["ok"] and result["calls"]["ok"] and result["ok"]
    # The failed-factory path that `build_engine` turns into exit 4 is a TypeError in every version.
    assert result["calls"]["Builder"].startswith("TypeError") and "nullptr" in result["calls"]["Builder"]
    int8, fp16_from_fp32 = _plan(result, "int8", "int8-qdq"), _plan(result, "fp16", "fp32")
    if version.startswith("8."):
        assert int8["builder_flags"] == ["INT8", "FP16"] and not int8["strongly_typed"]
        assert int8["network_flags"] == ["EXPLICIT_BATCH"] and int8["network_flag_bits"] == 1  # EXPLICIT_BATCH = 0
        # 8.6's ParserError has no node_name/node_operator: the code probes them (and falls back to node()).
        assert surface["absent_but_probed"] == ["ParserError.node_name", "ParserError.node_operator"]
    else:
        assert int8["strongly_typed"] and int8["builder_flags"] == [] and int8["network_flags"] == ["STRONGLY_TYPED"]
        assert surface["absent_but_probed"] == []
    if version.startswith("11."):
        assert "needs" not in fp16_from_fp32 and "no FP16 builder flag" in fp16_from_fp32["refused"]
    else:
        assert fp16_from_fp32["builder_flags"] == ["FP16"]


def test_the_check_can_fail(bindings, tmp_path):
    """Names and calls that are wrong on some versions are reported on exactly those versions."""
    # builder + runner in one file: the checker reads only ASTs, so the two modules can be checked as one
    source = "\n".join((REPO / "vla_export" / sub / "tensorrt.py").read_text() for sub in ("engines", "runtime"))
    mutations = [
        ("ctx.execute_async_v3(self.stream.cuda_stream)", "ctx.execute_async_v2([], self.stream.cuda_stream)"),
        ("profile.set_shape(name, min=lo, opt=opt, max=hi)", "profile.set_shape(name, minimum=lo, opt=opt, max=hi)"),
        ("config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED",
         "config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED\n    config.set_flag(trt.BuilderFlag.FP16)"),
    ]
    for old, new in mutations:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    mutated = tmp_path / "tensorrt_mutated.py"
    mutated.write_text(source)
    for version, root in bindings.items():
        surface = _probe(root, mutated)["surface"]
        missing = set(surface["missing"])
        # execute_async_v2 was removed in 10.0; BuilderFlag.FP16 in 11.0.
        assert ("IExecutionContext.execute_async_v2" in missing) == (not version.startswith("8.")), version
        assert ("BuilderFlag.FP16" in missing) == version.startswith("11."), version
        assert [p["call"] for p in surface["call_problems"]] == ["IOptimizationProfile.set_shape()"], version
        assert surface["call_problems"][0]["keywords"] == ["minimum", "opt", "max"]
