"""`vla-export fleet` and `validate --ray` on a real Ray cluster of three nodes on this machine (no mocks).

Each node advertises its own custom resource (`target:avx2` on the head, `target:cpu-b`, `target:cpu-c`), so the
fleet's scheduling by resource is really exercised: every target's record names the node that ran it, and that must
be the node with its resource. One test kills a node while its target is running and checks that this target is
failed with the reason, the others pass, and the result store holds only whole entries; a rerun then finishes it.

Tests that need Ray are skipped with their reason where it is not installed (pip install 'vla-export[ray]'); the
targets file, work keys, store and the missing-Ray message are tested everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vla_export.errors import UserError

HAS_RAY = importlib.util.find_spec("ray") is not None


def needs_ray(test):
    return pytest.mark.ray(pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'vla-export[ray]'")(test))


OBJECT_STORE = 80 * 2**20  # bytes per node: the tiny bundle is ~3 MB; Ray's default (30% of RAM) per node is not
QUICK = {"verify": {"rate_hz": 0.2, "warmup": 1, "iters": 5}, "profile": {"warmup": 1, "iters": 3, "batches": [1]}}
# a 5 s budget at 0.2 Hz: the test judges the check's wiring, not this host's speed (timing must not decide a test)


def _targets_yaml(path: Path, entries: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"targets": entries}, sort_keys=False))
    return path


# -- without a cluster -------------------------------------------------------------------------------------------------
def test_targets_file_yaml_json_and_defaults(tmp_path):
    pytest.importorskip("yaml", reason="YAML targets files need PyYAML (Ray depends on it)")
    from vla_export.fleet.targets import DEFAULT_PROFILE, STEPS, load_targets

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "targets.yaml").write_text(
        "targets:\n"
        "  workstation:\n"
        "    resource: target:rtx-a5000\n"
        "    trt: {precision: fp16}\n"
        "  jetson:\n"
        "    resource: target:orin-nx\n"
        "    aoti: {checkpoint: ckpt, device: cuda}\n"
        "    steps: [verify, aoti]\n"
        "  robot-pc: target:avx2   # shorthand\n")
    ws, jetson, pc = load_targets(tmp_path / "targets.yaml")
    assert (ws.name, ws.resource, ws.trt, ws.steps) == ("workstation", "target:rtx-a5000", {"precision": "fp16"},
                                                        list(STEPS))
    assert jetson.steps == ["aoti", "verify"]  # always run in pipeline order: an engine is built before it is verified
    assert jetson.aoti["checkpoint"] == str((tmp_path / "ckpt").resolve())  # relative to the targets file
    assert "checkpoint" not in jetson.settings()["aoti"]  # it enters the work key by content, not by path
    assert pc.resource == "target:avx2" and pc.profile == DEFAULT_PROFILE
    (tmp_path / "targets.json").write_text(json.dumps({"targets": {"pc": {"resource": "target:avx2",
                                                                          "profile": {"iters": 5}}}}))
    (pc_json,) = load_targets(tmp_path / "targets.json")
    assert pc_json.profile == DEFAULT_PROFILE | {"iters": 5}


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("[]", "needs a non-empty `targets:` mapping"),
    ('{"targets": {"pc": {"steps": ["verify"]}}}', r"targets\.pc needs `resource: NAME`"),
    ('{"targets": {"pc": {"resource": "target:x", "steps": ["deploy"]}}}', r"targets\.pc\.steps must be a list"),
    ('{"targets": {"pc": {"resource": "target:x", "profil": {}}}}', r"unknown key 'profil'"),
    ('{"targets": {"pc": {"resource": "target:x", "profile": {"batches": [0]}}}}', "positive integers"),
    ('{"targets": {"pc": {"resource": "target:x"}}', "not valid JSON"),
])
def test_bad_targets_file_is_one_line_exit_2(tmp_path, content, message):
    import re

    from vla_export.cli import main

    path = tmp_path / "targets.json"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(main, ["fleet", str(tmp_path), "--targets", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0
    assert re.search(message, result.output), result.output


def test_without_ray_the_commands_say_how_to_install_it(tmp_path, monkeypatch):
    from vla_export.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as on a machine without it
    (tmp_path / "targets.json").write_text('{"targets": {"pc": "target:avx2"}}')
    result = CliRunner().invoke(main, ["fleet", str(tmp_path), "--targets", str(tmp_path / "targets.json")])
    assert result.exit_code == 4, result.output  # an optional backend missing here, like TensorRT: exit 4
    assert "pip install 'vla-export[ray]'" in result.output and result.output.strip().count("\n") == 0
    result = CliRunner().invoke(main, ["validate", str(tmp_path), "--episodes", str(tmp_path), "--ray"])
    assert result.exit_code == 4 and "pip install 'vla-export[ray]'" in result.output, result.output


def test_work_key_follows_bundle_hardware_software_and_settings():
    from vla_export.fleet.store import hardware_identity, software_identity, work_key

    machine = {"hostname": "robot-1", "arch": "x86_64", "cpu": "Intel Xeon",
               "cpu_features": {"flags": ["avx2", "fma", "avx512_vnni"], "int8_kernels": "vnni"}}
    versions = {"vla-export": "0.1.0", "onnxruntime": "1.32.0", "torch": "2.13.0", "python": "3.11.7"}
    settings = {"steps": ["verify"], "profile": {"iters": 50}}

    def key(bundle="b" * 64, m=machine, v=versions, target="pc", s=settings):
        return work_key(bundle, hardware_identity(m), software_identity(v), target, s)

    base = key()
    assert key(m=machine | {"hostname": "robot-2"}) == base  # an identical second robot PC is the same hardware
    others = [key(bundle="c" * 64),
              key(m=machine | {"cpu_features": {"flags": ["avx2", "fma"], "int8_kernels": "avx2"}}),  # no VNNI
              key(m=machine | {"gpu": "NVIDIA RTX A5000", "gpu_compute_capability": "8.6"}),
              key(v=versions | {"onnxruntime": "1.33.0"}), key(v=versions | {"tensorrt": "10.13"}),
              key(target="jetson"), key(s=settings | {"profile": {"iters": 100}})]
    assert len({base, *others}) == len(others) + 1


def test_store_holds_whole_entries_only(tmp_path):
    from vla_export.fleet.store import ResultStore

    store = ResultStore(tmp_path / "store")
    entry = store.put("k1", {"status": "passed"}, {"verify/verify.json": b'{"passed": true}', "trt/e.engine": b"E"})
    assert store.get("k1")["status"] == "passed" and (entry / "trt/e.engine").read_bytes() == b"E"
    assert not list(store.root.glob(".staging-*"))
    # what a run killed mid-write leaves: a staging directory, never an entry; the next run removes it
    (store.root / ".staging-abc" / "verify").mkdir(parents=True)
    (store.root / ".staging-abc" / "verify" / "verify.json").write_text('{"pass')
    assert store.get("abc") is None and store.clean_staging() == [".staging-abc"]
    assert not list(store.root.glob(".staging-*"))
    # a damaged entry is missing work, not a result
    (entry / "trt/e.engine").write_bytes(b"X")
    assert store.get("k1") is None
    with pytest.raises(UserError, match="escapes"):
        store.put("k2", {}, {"../outside": b""})


# -- on a real three-node Ray cluster ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Tiny-preset checkpoint -> ONNX (the export stage) -> bundle, and 3 synthetic episodes of 7 frames."""
    from vla_export.data.episodes import synth_episodes
    from vla_export.deploy.bundle import make_bundle
    from vla_export.deploy.tiny import build_tiny_checkpoint, export_tiny_onnx

    root = tmp_path_factory.mktemp("fleet")
    ckpt = build_tiny_checkpoint(root / "checkpoint", head="mlp")
    artifact = export_tiny_onnx(ckpt, root / "artifacts")
    synth_episodes(root / "episodes", count=3, seed=3, frames=7, image_size=64)
    make_bundle(artifact, root / "bundle", episodes=root / "episodes")  # self-test frames from these episodes
    return {"root": root, "checkpoint": ckpt, "artifacts": artifact.parent, "bundle": root / "bundle",
            "episodes": root / "episodes"}


@pytest.fixture(scope="module")
def cluster():
    """A head and two workers, each with num_cpus=1, a small object store, and its own target resource."""
    if not HAS_RAY:
        pytest.skip("needs Ray: pip install 'vla-export[ray]'")
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"target:avx2": 1}, "object_store_memory": OBJECT_STORE,
        "include_dashboard": False})
    nodes = {"target:avx2": c.head_node}
    for res in ("target:cpu-b", "target:cpu-c"):
        nodes[res] = c.add_node(num_cpus=1, resources={res: 1}, object_store_memory=OBJECT_STORE)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield {"cluster": c, "nodes": nodes}
    ray.shutdown()
    c.shutdown()


@needs_ray
def test_unreachable_ray_head_is_one_line_exit_2_in_seconds(demo, tmp_path):
    """Ray itself retries an absent head for minutes; the fleet refuses it at once. Runs before `cluster` exists,
    so this process is not connected to Ray yet."""
    import socket

    import ray

    from vla_export.cli import main

    assert not ray.is_initialized()
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "targets.json").write_text('{"targets": {"pc": "target:avx2"}}')
    result = CliRunner().invoke(main, ["fleet", str(demo["bundle"]), "--targets", str(tmp_path / "targets.json"),
                                       "--address", f"127.0.0.1:{port}", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"cannot reach the Ray head at 127.0.0.1:{port}" in result.output
    assert result.output.strip().count("\n") == 0


def _node_of(resource: str) -> str:
    import ray

    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
    return node


def _entries(store: Path) -> list[Path]:
    return sorted(p for p in store.iterdir() if p.is_dir())


TARGETS = {"avx2": {"resource": "target:avx2", **QUICK}, "cpu-b": {"resource": "target:cpu-b", **QUICK},
           "cpu-c": {"resource": "target:cpu-c", **QUICK}}


@needs_ray
def test_fleet_verifies_each_target_on_its_node_and_a_rerun_skips_all_work(cluster, demo):
    from vla_export.cli import main
    from vla_export.fleet.run import run_fleet
    from vla_export.fleet.targets import load_targets

    out = demo["root"] / "fleet-out"
    targets = _targets_yaml(demo["root"] / "targets.yaml", TARGETS)
    result = CliRunner().invoke(main, ["fleet", str(demo["bundle"]), "--targets", str(targets), "-o", str(out)])
    assert result.exit_code == 0, result.output
    fleet = json.loads((out / "fleet.json").read_text())
    assert [r["name"] for r in fleet["targets"]] == ["avx2", "cpu-b", "cpu-c"] and fleet["passed"]
    for r in fleet["targets"]:
        assert r["status"] == "passed" and not r["cached"], r
        assert r["node_id"] == _node_of(r["resource"])  # scheduled by its custom resource onto its own node
        steps = r["steps"]
        assert steps["verify"]["status"] == "passed" and steps["profile"]["status"] == "passed"
        assert steps["aoti"]["status"] == "skipped" and "carries no weights" in steps["aoti"]["reason"]
        if steps["trt"]["status"] == "skipped":  # no TensorRT/GPU here: skipped, with what to install
            assert "vla-export[trt]" in steps["trt"]["reason"]
        entry = Path(r["store"])
        verify = json.loads((entry / "verify" / "verify.json").read_text())  # vla-export verify, run there
        assert verify["passed"] and verify["machine"]["cpu_features"] == r["machine"]["cpu_features"]
        (row,) = verify["results"]
        assert row["artifact"] == "model.onnx" and row["parity"]["metrics"]["actions"]["mae"] < 1e-4
        prof = json.loads((entry / "profile" / "profile.json").read_text())
        assert prof["rows"][0]["batches"]["1"]["p50_ms"] > 0
    md = (out / "fleet.md").read_text()
    assert [line for line in md.splitlines() if line.startswith("## ")] == ["## avx2", "## cpu-b", "## cpu-c"]
    assert "no speed ratio across devices" in md and "speed-up" not in md
    assert (out / "fleet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entries = {p: p.stat().st_mtime_ns for p in _entries(out / "store")}
    assert len(entries) == 3

    events = []
    again = run_fleet(demo["bundle"], load_targets(targets), out, on_event=lambda *e: events.append(e),
                      progress=False)
    assert [r["status"] for r in again["targets"]] == ["passed"] * 3 and all(r["cached"] for r in again["targets"])
    assert events == []  # no target task ran: only the probes that name each target's hardware and software
    assert {p: p.stat().st_mtime_ns for p in _entries(out / "store")} == entries


@needs_ray
def test_fleet_exits_3_naming_targets_that_failed_a_budget_or_have_no_node(cluster, demo):
    from vla_export.cli import main

    out = demo["root"] / "fleet-out"
    strict = {"resource": "target:cpu-b", "steps": ["verify"], "verify": QUICK["verify"] | {"tol": 1e-12}}
    targets = _targets_yaml(demo["root"] / "ghost.yaml", {"avx2": TARGETS["avx2"], "jetson": "target:orin-nx",
                                                          "strict": strict})
    result = CliRunner().invoke(main, ["fleet", str(demo["bundle"]), "--targets", str(targets), "-o", str(out)])
    assert result.exit_code == 3, result.output
    assert "avx2: passed (stored result reused)" in result.output
    assert "jetson: failed: no alive node in the cluster advertises resource target:orin-nx" in result.output
    assert "strict: failed: verify: model.onnx: parity" in result.output  # judged on cpu-b against the bundle's ref
    assert "error: 2 of 3 targets failed: jetson, strict" in result.output
    fleet = json.loads((out / "fleet.json").read_text())
    assert "store" not in fleet["targets"][2]  # a failed target is not stored: the next run tries it again


def _task(report):
    (row,) = report["results"]
    return row["task"]


@needs_ray
def test_validate_ray_equals_validate_on_the_same_frames(cluster, demo):
    """Bitwise equal, not just close: each actor runs the chunks single-machine validate runs (8, 8, 5 frames of
    21), at the same batch sizes, on the same host, so ONNX Runtime computes the same floats."""
    from vla_export.cli import main
    from vla_export.validate.validate import validate

    local = validate([demo["artifacts"]], n=2, batch_sizes=(1,), episodes_dir=str(demo["episodes"]), split="all",
                     output=demo["root"] / "validation-local.json", progress=False)
    out = demo["root"] / "validation-ray.json"
    result = CliRunner().invoke(main, ["validate", str(demo["artifacts"]), "--episodes", str(demo["episodes"]),
                                       "--split", "all", "-n", "2", "--batch", "1", "--ray", "-o", str(out)])
    assert result.exit_code == 0, result.output
    on_ray = json.loads(out.read_text())
    assert on_ray["ray"]["task_predictions_on_ray"] == ["model.onnx"] and on_ray["ray"]["alive_nodes"] == 3
    assert _task(local)["mae"] > 0 and _task(on_ray) == _task(local)
    assert on_ray["references"] == local["references"]


@needs_ray
def test_validate_ray_rolls_out_recurrent_heads_per_episode(cluster, demo):
    from vla_export.deploy.tiny import build_tiny_checkpoint, export_tiny_onnx
    from vla_export.fleet.ray_validate import validate_with_ray
    from vla_export.validate.validate import validate

    ckpt = build_tiny_checkpoint(demo["root"] / "checkpoint-lstm", head="lstm", seed=1)
    artifacts = export_tiny_onnx(ckpt, demo["root"] / "artifacts-lstm").parent
    kwargs = {"n": 2, "batch_sizes": (1,), "episodes_dir": str(demo["episodes"]), "split": "all", "progress": False}
    local = validate([artifacts], output=demo["root"] / "lstm-local.json", **kwargs)
    on_ray = validate_with_ray([artifacts], output=demo["root"] / "lstm-ray.json", **kwargs)
    assert on_ray["ray"]["task_predictions_on_ray"] == ["model.onnx"]
    assert _task(local)["mae"] > 0 and _task(on_ray) == _task(local)


@needs_ray
def test_killed_node_fails_its_target_the_others_complete_and_a_rerun_finishes(cluster, demo):
    """Kills target cpu-c's node while its profile step runs (a profile too long to end first); runs last here."""
    from vla_export.fleet.run import run_fleet
    from vla_export.fleet.store import ResultStore
    from vla_export.fleet.targets import parse_targets

    c, nodes = cluster["cluster"], cluster["nodes"]
    out = demo["root"] / "fleet-kill"
    long_profile = {"resource": "target:cpu-c", "verify": QUICK["verify"],
                    "profile": {"warmup": 1, "iters": 1_000_000, "batches": [1]}}
    killed = []

    def kill_cpu_c_when_profiling(target, step, state):
        if (target, step, state) == ("cpu-c", "profile", "running") and not killed:
            c.remove_node(nodes["target:cpu-c"])
            killed.append(step)

    fleet = run_fleet(demo["bundle"], parse_targets({"targets": TARGETS | {"cpu-c": long_profile}}), out,
                      on_event=kill_cpu_c_when_profiling, progress=False)
    assert killed == ["profile"]
    status = {r["name"]: r for r in fleet["targets"]}
    assert status["avx2"]["status"] == status["cpu-b"]["status"] == "passed"
    assert status["cpu-c"]["status"] == "failed" and "died" in status["cpu-c"]["reason"], status["cpu-c"]
    assert "died" in (out / "fleet.md").read_text().split("## cpu-c")[1]
    # nothing half-written: two whole entries (every file matching result.json), no staging, no temp file
    store = ResultStore(out / "store")
    entries = _entries(out / "store")
    assert [p.name for p in entries] == sorted([status["avx2"]["key"], status["cpu-b"]["key"]])
    assert all(store.get(p.name) is not None for p in entries)
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]

    # the device comes back; the rerun reuses the two finished targets and runs the third
    nodes["target:cpu-c"] = c.add_node(num_cpus=1, resources={"target:cpu-c": 1}, object_store_memory=OBJECT_STORE)
    c.wait_for_nodes()
    rerun = run_fleet(demo["bundle"], parse_targets({"targets": TARGETS}), out, progress=False)
    assert [(r["name"], r["status"], r["cached"]) for r in rerun["targets"]] == [
        ("avx2", "passed", True), ("cpu-b", "passed", True), ("cpu-c", "passed", False)]
    assert rerun["passed"] and len(_entries(out / "store")) == 3
