"""`vla-export profile` and `vla-export report`: every field, consistent statistics, same-device speed-ups, and a
report that renders with and without GPU rows."""

from __future__ import annotations

import copy
import json

import pytest
from click.testing import CliRunner

from tests.test_validate import make_tiny_set
from vla_export import manifest as mf
from vla_export.cli import main
from vla_export.errors import EXIT_USER_ERROR
from vla_export.validate.profile import add_speedups, measure_isolated, measure_target, plan_targets, profile
from vla_export.validate.report import build_report

STAT_KEYS = {"iters", "mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p90_ms", "p99_ms", "fps", "warmup"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_set(tmp_path_factory.mktemp("profile"), episodes=False)


@pytest.fixture(scope="module")
def profiled(tiny):
    return profile([tiny.artifacts], warmup=2, iters=6, batches=(1, 2), isolate=False, progress=False)


def check_stats(stats: dict, batch: int, iters: int):
    assert set(stats) >= STAT_KEYS
    assert stats["iters"] == iters
    assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert stats["min_ms"] <= stats["mean_ms"] <= stats["max_ms"] and stats["std_ms"] >= 0
    assert stats["fps"] == pytest.approx(batch * 1e3 / stats["mean_ms"])


def test_profile_rows_have_every_field(tiny, profiled):
    rows = {r["id"]: r for r in profiled["rows"]}
    assert set(rows) == {"model.onnx@CPUExecutionProvider", "pytorch-eager-fp32@cpu"}
    for r in rows.values():
        assert r["status"] == "ok" and r["device"] == "cpu" and r["threads"] >= 1
        assert r["load_s"] > 0 and r["peak_rss_bytes"] > 0 and r["rss_delta_bytes"] >= 0
        assert r["size_bytes"] > 0
        for b in ("1", "2"):
            check_stats(r["batches"][b], int(b), 6)
    onnx_row = rows["model.onnx@CPUExecutionProvider"]
    assert onnx_row["size_bytes"] == mf.total_bytes(tiny.onnx) == mf.read_manifest(tiny.onnx)["total_bytes"]
    assert onnx_row["baseline"] == "pytorch-eager-fp32@cpu"
    eager = rows["pytorch-eager-fp32@cpu"]
    assert eager["speedup_vs_eager"] == {"1": 1.0, "2": 1.0}
    assert onnx_row["speedup_vs_eager"]["1"] == pytest.approx(
        eager["batches"]["1"]["p50_ms"] / onnx_row["batches"]["1"]["p50_ms"])
    saved = json.loads((tiny.artifacts / "profile.json").read_text())
    assert saved["run_id"] == profiled["run_id"] and saved["machine"]["cpu_count"] >= 1
    assert saved["settings"]["warmup"] == 2 and saved["settings"]["iters"] == 6


def test_batch_above_the_artifacts_max_is_skipped(tiny):
    (target,) = [t for t in plan_targets([tiny.artifacts]) if t["kind"] == "artifact"]
    row = measure_target(target, [1, 64], warmup=1, iters=3, threads=1)
    assert row["threads"] == 1 and "p50_ms" in row["batches"]["1"]
    assert "max batch" in row["batches"]["64"]["skipped"]


def test_speedups_only_within_a_device():
    def row(id_, kind, device, p50, precision="fp32"):
        return {"id": id_, "kind": kind, "device": device, "precision": precision, "status": "ok",
                "batches": {"1": {"p50_ms": p50}}}

    rows = [row("eager@cpu", "eager", "cpu", 100.0), row("onnx@cpu", "artifact", "cpu", 25.0),
            row("engine@cuda", "artifact", "cuda", 1.0)]
    add_speedups(rows)
    assert rows[1]["speedup_vs_eager"] == {"1": 4.0}
    assert rows[2]["speedup_vs_eager"] == {} and rows[2]["baseline"] is None  # no eager row on cuda in this run


def test_profile_cli_isolated_rows(tiny, tmp_path):
    out = tmp_path / "profile.json"
    res = CliRunner().invoke(main, ["profile", str(tiny.artifacts), "--warmup", "1", "--iters", "3", "--batch", "1",
                                    "--threads", "1", "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["settings"]["isolate"] is True
    for r in saved["rows"]:
        assert r["status"] == "ok", r
        assert r["threads"] == 1 and r["rss_delta_bytes"] > 0
        check_stats(r["batches"]["1"], 1, 3)


def test_isolated_row_that_fails_or_hangs_is_a_failed_row(tiny, tmp_path):
    """A row's process that raises, or outlives its timeout, becomes a failed row with the reason; the run goes on."""
    target = next(t for t in plan_targets([tiny.artifacts], include_eager=False) if t["backend"] == "onnxruntime")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    row = measure_isolated(target | {"artifact": str(broken)}, [1], 0, 2)
    assert row["status"] == "failed" and row["reason"].startswith("worker failed: "), row
    row = measure_isolated(target, [1], 10**6, 2, timeout_s=3)  # a million warm-up calls: killed at 3 s
    assert row["status"] == "failed" and row["reason"] == "timed out after 3 s", row


def test_profile_bad_options_are_one_line(tiny):
    res = CliRunner().invoke(main, ["profile", str(tiny.artifacts), "--batch", "1,x"])
    assert res.exit_code == EXIT_USER_ERROR and "--batch" in res.output
    res = CliRunner().invoke(main, ["profile", str(tiny.artifacts), "--iters", "1"])
    assert res.exit_code == EXIT_USER_ERROR


def test_report_renders_cpu_only(tiny, profiled, tmp_path):
    res = CliRunner().invoke(main, ["validate", str(tiny.artifacts), "-n", "2", "--batch", "1"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["report", str(tiny.artifacts), "-o", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report.md").read_text()
    assert "| rank | artifact | backend | device |" in md and "model.onnx" in md and "pytorch-eager-fp32" in md
    assert "## Machine" in md and "## Reproduce" in md and "vla-export profile" in md
    # the command as vla-export was given it, not the argv of the program that called it (here pytest's)
    assert f"vla-export validate {tiny.artifacts} -n 2 --batch 1\n" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["rows"]}
    assert rows["model.onnx"]["verdict"] == "passed" and rows["model.onnx"]["parity_mae"] < 1e-4
    assert rows["pytorch-eager-fp32"]["verdict"] == "reference"
    assert sorted(r["rank"] for r in report["rows"]) == [1, 2]
    assert "model.onnx" in res.output  # the table is printed too


def _with_gpu_rows(profile_json: dict) -> dict:
    """A profile as a CUDA machine writes it: the CPU rows plus eager and TensorRT rows on cuda."""
    out = copy.deepcopy(profile_json)
    out["machine"] |= {"gpu": "NVIDIA H100 80GB HBM3", "gpu_compute_capability": "9.0"}
    stats = {"iters": 6, "mean_ms": 2.0, "std_ms": 0.1, "min_ms": 1.8, "max_ms": 2.4, "p50_ms": 1.9, "p90_ms": 2.2,
             "p99_ms": 2.4, "fps": 500.0, "warmup": 2}
    base = {"kind": "artifact", "status": "ok", "device": "cuda", "provider": None, "threads": None,
            "checkpoint": None, "size_bytes": 5_000_000, "load_s": 0.5, "peak_rss_bytes": 10**9}
    out["rows"] += [
        base | {"id": "model.fp16.engine@cuda", "name": "model.fp16.engine", "artifact": "model.fp16.engine",
                "backend": "tensorrt", "precision": "fp16", "variant": "trt-fp16", "batches": {"1": stats}},
        base | {"id": "pytorch-eager-fp32@cuda", "name": "pytorch-eager-fp32", "kind": "eager", "artifact": None,
                "backend": "torch", "precision": "fp32", "variant": "torch-eager-fp32",
                "batches": {"1": stats | {"p50_ms": 30.0, "mean_ms": 31.0, "max_ms": 40.0, "p99_ms": 39.0}}},
    ]
    add_speedups(out["rows"])
    return out


def test_report_renders_with_gpu_rows(tiny, profiled, tmp_path):
    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "profile.json").write_text(json.dumps(_with_gpu_rows(profiled)))
    report = build_report(art)
    md = (art / "report.md").read_text()
    assert "model.fp16.engine" in md and "NVIDIA H100" in md and "no validation.json" in md
    by_id = {r["id"]: r for r in report["rows"]}
    # ranked within each device: cuda has its own rank 1
    assert by_id["model.fp16.engine@cuda"]["rank"] == 1 and by_id["pytorch-eager-fp32@cuda"]["rank"] == 2
    assert {by_id[i]["rank"] for i in ("model.onnx@CPUExecutionProvider", "pytorch-eager-fp32@cpu")} == {1, 2}
    assert by_id["model.fp16.engine@cuda"]["speedup_vs_eager"] == pytest.approx(30.0 / 1.9)
    assert by_id["model.fp16.engine@cuda"]["baseline"] == "pytorch-eager-fp32@cuda"
    assert (art / "report.png").stat().st_size > 0


def test_report_without_profile_is_one_line(tmp_path):
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == EXIT_USER_ERROR and "vla-export profile" in res.output


@pytest.mark.gpu
def test_profile_cuda_eager_rows(tiny):
    """On a CUDA machine: eager fp32 and fp16 rows on cuda, timed with CUDA events, with allocator peaks."""
    result = profile([tiny.artifacts], warmup=2, iters=5, batches=(1,), isolate=False, progress=False,
                     output=tiny.root / "profile-gpu.json")
    rows = {r["id"]: r for r in result["rows"]}
    for rid in ("pytorch-eager-fp32@cuda", "pytorch-eager-fp16@cuda"):
        assert rows[rid]["status"] == "ok" and rows[rid]["cuda_max_allocated_bytes"] > 0
        check_stats(rows[rid]["batches"]["1"], 1, 5)
    assert rows["pytorch-eager-fp16@cuda"]["baseline"] == "pytorch-eager-fp32@cuda"
    assert rows["pytorch-eager-fp32@cpu"]["baseline"] == "pytorch-eager-fp32@cpu"
