"""Every stage of vla-export for each LeRobot policy, through the real CLI, on a local LeRobot v3 dataset written by
LeRobot itself (issue 12): checkpoint --from-lerobot, export, quantize in each mode (dynamic, static calibrated on
the dataset, fp16; a mode that misses its budget exits 3 with one line), validate --episodes (held-out split, task
MAE equal to LeRobot's own policy on LeRobot's own dataset items), profile, report, bundle --episodes, and
Policy.act from the bundle equal to LeRobot's select_action within 1e-4.

One pipeline run per policy (module fixture; tiny random-weight policies, one torch thread); a policy is one entry
of `tests.lerobot.pipeline.CASES`. `scripts/lerobot_pipeline.py` runs the same chain and prints the measured table
(docs/lerobot.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot", reason="needs LeRobot 0.4: scripts/lerobot_env.sh")

from tests.lerobot.pipeline import CASES, QUANT_FILES, QUANT_MODES, cli, run_pipeline, summary_rows  # noqa: E402


@pytest.fixture(scope="module", params=list(CASES))  # a policy is one entry of CASES (SmolVLA: one more)
def run(request, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is small and shared; latency numbers here are not the point
    try:
        result = run_pipeline(CASES[request.param], tmp_path_factory.mktemp(request.param))
    finally:
        torch.set_num_threads(threads)
    for name, stage in result.stages.items():
        print(f"{request.param} {name}: exit {stage.exit_code} in {stage.wall_s:.1f} s")
    return result


def test_every_stage_runs_and_exits_as_documented(run):
    """Nothing crashes; every stage but quantize/validate succeeds; a quantize mode exits 0 (passed) or 3 (its
    gate failed, the artifact written and marked failed), and validate exits 3 exactly when a row failed."""
    assert list(run.stages) == ["checkpoint", "export", *[f"quantize {m}" for m in QUANT_MODES], "validate",
                                "profile", "report", "bundle"], {k: s.output[-2000:] for k, s in run.stages.items()}
    for name, stage in run.stages.items():
        assert stage.crash is None, f"{name} crashed:\n{stage.crash}"
        if name.startswith("quantize") or name == "validate":
            assert stage.exit_code in (0, 3), f"{name}: {stage.output[-2000:]}"
        else:
            assert stage.exit_code == 0, f"{name}: {stage.output[-2000:]}"
    for mode in QUANT_MODES:
        stage, manifest = run.stages[f"quantize {mode}"], run.manifest(QUANT_FILES[mode])
        assert manifest["status"] == ("passed" if stage.exit_code == 0 else "failed"), mode
        if stage.exit_code == 3:  # one line saying which budget, and the artifact's reason in its manifest
            assert len(stage.error_lines) == 1 and QUANT_FILES[mode] in stage.error_lines[0], stage.output
            assert manifest["failure"]
    rows = json.loads((run.artifacts / "validation.json").read_text())["results"]
    assert run.stages["validate"].exit_code == (3 if any(r["status"] == "failed" for r in rows) else 0)


def test_each_quantize_mode_passes_or_fails_as_the_case_expects(run):
    """Per policy, which modes pass is a fact to hold, not a free choice: a mode in the case's
    `expected_gate_failures` exits 3 with one error line naming its artifact and the budget it missed (e.g. SmolVLA
    fp16: the flow time constants, docs/lerobot.md); every other mode exits 0."""
    expected = run.case.expected_gate_failures
    assert set(expected) <= set(QUANT_MODES), expected
    for mode in QUANT_MODES:
        stage = run.stages[f"quantize {mode}"]
        if mode in expected:
            assert stage.exit_code == 3, f"{mode} was expected to miss its gate: {stage.output[-2000:]}"
            (line,) = stage.error_lines
            assert QUANT_FILES[mode] in line and expected[mode] in line, line
            print(f"{run.case.name} {mode}: expected gate failure: {line}")
        else:
            assert stage.exit_code == 0, f"{mode}: {stage.output[-2000:]}"


def test_manifests_chain_back_to_the_imported_checkpoint(run):
    from vla_export.checkpoint import checkpoint_sha256

    sha = checkpoint_sha256(run.root / "checkpoint")
    export = run.manifest("model.onnx")
    assert (export["stage"], export["precision"], export["status"]) == ("export", "fp32", "passed")
    assert export["source"]["checkpoint_sha256"] == sha
    want = {"dynamic": ("int8", "ort-int8-dynamic"), "static": ("int8", "ort-int8-static"),
            "fp16": ("fp16", "ort-fp16")}
    for mode in QUANT_MODES:
        m = run.manifest(QUANT_FILES[mode])
        assert (m["stage"], m["precision"], m["variant"]) == ("quantize", *want[mode])
        assert m["source"]["checkpoint_sha256"] == sha and m["source"]["artifact_sha256"] == export["sha256"]
        # gated on the dataset: parity on example inputs and the task MAE of the held-out frames
        assert {"parity", "task"} <= set(m["metrics"]), mode
    static = run.manifest(QUANT_FILES["static"])
    assert static["settings"]["calib"] == str(run.dataset.resolve())  # calibrated on the LeRobot dataset


def test_validate_task_mae_is_lerobots_own_on_the_held_out_episodes(run):
    """The reference's task MAE on the validation split equals LeRobot's own policy on LeRobot's own dataset items
    (its history and padding for Diffusion Policy); the fp32 ONNX equals it; every artifact has a task row."""
    from vla_export.data.episodes import load_episode
    from vla_export.data.task import select_episodes

    ckpt = run.root / "checkpoint"
    val = {ref.index for ref in select_episodes(ckpt, run.dataset, "val")}
    train = {ref.index for ref in select_episodes(ckpt, run.dataset, "train")}
    assert val and train and not val & train
    got, truth = run.case.lerobot_task_actions(run.root / "pretrained_model", run.dataset, val)
    want = float(np.abs(got.astype(np.float64) - truth).mean())
    report = json.loads((run.artifacts / "validation.json").read_text())
    assert report["settings"]["split"] == "val"
    (reference,) = report["references"].values()
    assert reference["inputs"]["task_frames"] == len(truth) and reference["inputs"]["task_episodes"] == len(val)
    val_names = {load_episode(ref).name for ref in select_episodes(ckpt, run.dataset, "val")}
    rows = {r["artifact"]: r for r in report["results"]}
    assert set(rows) == {"model.onnx", *QUANT_FILES.values()}
    for name, row in rows.items():
        task = row["task"]
        assert task["reference_mae"] == pytest.approx(want, abs=1e-5), name
        assert set(task["per_episode_mae"]) == val_names, name
    assert rows["model.onnx"]["task"]["mae"] == pytest.approx(want, abs=1e-5)
    assert rows["model.onnx"]["status"] == "passed"


def test_profile_and_report_have_a_row_per_artifact(run):
    profile = json.loads((run.artifacts / "profile.json").read_text())
    timed = {r.get("artifact") and r["artifact"].rsplit("/", 1)[-1]: r for r in profile["rows"] if r["status"] == "ok"}
    assert {"model.onnx", *QUANT_FILES.values()} <= set(timed), profile["rows"]
    assert any(r["backend"] == "torch" for r in profile["rows"] if r["status"] == "ok")  # the eager reference
    for name, row in timed.items():
        stats = row["batches"]["1"]
        assert 0 < stats["p50_ms"] <= stats["p99_ms"], name
    md = (run.root / "artifacts" / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()]
    for name in ("model.onnx", *QUANT_FILES.values(), "pytorch-eager-fp32"):
        assert sum(f"| {name} |" in ln for ln in table) == 1, (name, table)
    # how to reproduce it: the commands as they were given, not the test runner's own argv
    assert f"vla-export validate {run.artifacts} --episodes {run.dataset}" in md
    assert "vla-export profile" in md


def test_bundle_policy_act_equals_lerobot(run):
    assert (run.root / "bundle" / "selftest.json").is_file()
    frames_at = json.loads((run.root / "bundle" / "selftest.json").read_text())["frames_at"]
    assert frames_at  # the self-test frames are the dataset's own
    assert run.parity_policy_vs_lerobot is not None and run.parity_policy_vs_lerobot < 1e-4


def test_a_quantize_mode_that_misses_its_budget_exits_3_with_one_line(run, tmp_path):
    """The failure path, forced: a budget no INT8 model meets. The artifact is written and marked failed; the one
    line names the artifact and the budget."""
    stage = cli("quantize", ["quantize", run.artifacts / "model.onnx", "--mode", "dynamic", "--tol-int8", "1e-9",
                             "--episodes", run.dataset, "--parity-n", "2", "-o", tmp_path])
    assert stage.crash is None and stage.exit_code == 3, stage.output
    assert len(stage.error_lines) == 1 and "model.int8.onnx" in stage.error_lines[0], stage.output
    assert "1e-09" in stage.error_lines[0] or "budget" in stage.error_lines[0], stage.error_lines
    manifest = json.loads((tmp_path / "model.int8.onnx.json").read_text())
    assert manifest["status"] == "failed" and "parity" in manifest["failure"]


def test_the_summary_table_names_every_mode_and_its_verdict(run):
    rows = summary_rows(run)
    assert [r["artifact"] for r in rows] == ["model.onnx", *[QUANT_FILES[m] for m in QUANT_MODES],
                                             "pytorch-eager-fp32"]
    assert rows[-1]["p50_ms"] > 0 and rows[-1]["gate"] == "reference"
    for r in rows[:-1]:
        assert r["gate"] in ("passed", "failed") and r["parity_mae"] is not None and r["task_mae"] is not None, r
        assert (r["exit"] == 0) == (r["gate"] == "passed"), r
        print(f"{run.case.name} {r['artifact']}: gate {r['gate']} parity MAE {r['parity_mae']:.3g} task MAE "
              f"{r['task_mae']:.4f} (reference {r['reference_task_mae']:.4f}) p50 {r.get('p50_ms', float('nan')):.1f}"
              f" ms {r['why']}")
