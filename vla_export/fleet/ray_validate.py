"""`vla-export validate --ray`: the task part of validation (an artifact's actions for every episode frame) spread
over a Ray cluster with Ray Data `map_batches`, one ONNX Runtime session per actor.

Rows are the units single-machine `validate` runs, not frames: for a feed-forward head the consecutive chunks of
`min(TASK_BATCH, max batch)` frames that `run_batched` makes, for a recurrent head whole episodes (rolled out
from the zero state, as `rollout` does). Each actor (`TaskPredictor`) runs one unit per call through the same
runner (`open_runner`, same provider), so every session call sees the same inputs at the same batch size as on one
machine: on one host the actions are bitwise equal to `validate`'s (tested); on hosts with other ISAs they differ
as any two machines' float32 kernels do. The artifact's files travel through Ray's object store, so nodes need no
shared filesystem. The fp32 PyTorch reference is still computed here, once per checkpoint.

Artifacts other than ONNX on the CPU execution provider (TensorRT, AOTInductor, CUDA EPs) are predicted locally.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vla_export import manifest as mf
from vla_export.fleet import connect, require_ray

ACTIONS = "actions"


class TaskPredictor:
    """A Ray Data actor: opens the artifact once (one ORT session), then predicts one unit per row."""

    def __init__(self, artifact_files: list, artifact_name: str, device: str, provider: str | None,
                 recurrent: bool):
        import ray

        from vla_export.fleet.on_target import write_files
        from vla_export.runtime import open_runner

        files = ray.get(artifact_files[0])  # wrapped in a list: the ref itself travels, resolved here once
        self._dir = tempfile.TemporaryDirectory(prefix="vla-ray-validate-")
        write_files(files, Path(self._dir.name))
        self.runner = open_runner(Path(self._dir.name) / artifact_name, device=device, provider=provider).activate()
        self.spec = self.runner.spec
        self.recurrent = recurrent

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vla_export.validate.validate import cast_feeds, rollout, run_batched

        def infer(feeds):
            return self.runner.infer(cast_feeds(feeds, self.spec))

        frames, actions = [], []
        for i in range(len(batch["frames"])):
            idx = np.asarray(batch["frames"][i], dtype=np.int64)
            feeds = {name: np.asarray(batch[name][i]) for name in batch if name not in ("unit", "frames")}
            if self.recurrent:
                out = rollout(infer, feeds, [np.arange(len(idx))], self.spec)
            else:
                out = run_batched(infer, feeds, len(idx))
            frames.append(idx)
            actions.append(np.asarray(out[ACTIONS]))
        return {"frame": np.concatenate(frames), ACTIONS: np.concatenate(actions)}


def task_units(inputs, spec, max_batch: int, task_batch: int) -> list[np.ndarray]:
    """Frame indices of each unit, in the order and grouping single-machine validate uses."""
    if spec.state:
        return [np.asarray(e, dtype=np.int64) for e in inputs.episodes]
    n = len(inputs.task.actions)
    step = max(1, min(task_batch, max_batch))
    return [np.arange(i, min(i + step, n), dtype=np.int64) for i in range(0, n, step)]


class RayTaskPredictor:
    """`task_predictor` for `validate.validate`: returns the artifact's actions for every task frame, or None for
    artifacts it leaves to the local path."""

    def __init__(self, address: str | None = None, actors: int = 2, ray_init: dict[str, Any] | None = None):
        self.ray = require_ray()
        if actors < 1:
            from vla_export.errors import UserError

            raise UserError(f"--ray-actors must be >= 1, got {actors}")
        self.actors = actors
        self.connected_here = connect(self.ray, address, **(ray_init or {}))
        self.used: list[str] = []

    def close(self) -> None:
        if self.connected_here and self.ray.is_initialized():
            self.ray.shutdown()

    def __enter__(self) -> "RayTaskPredictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, artifact, target: dict[str, Any], inputs, spec, max_batch: int) -> np.ndarray | None:
        from vla_export.validate.validate import TASK_BATCH

        if artifact.backend != "onnxruntime" or (target.get("provider") or "CPUExecutionProvider") != \
                "CPUExecutionProvider":
            return None
        ray = self.ray
        state_inputs = set(spec.state.values())
        names = [t.name for t in spec.inputs if t.name not in state_inputs]
        rows = []
        for u, idx in enumerate(task_units(inputs, spec, max_batch, TASK_BATCH)):
            rows.append({"unit": u, "frames": idx} | {k: inputs.task.feeds[k][idx] for k in names})
        # the artifact's own files and manifest only, not its directory's other artifacts
        files = {p.name: p.read_bytes() for p in mf.artifact_files(artifact.path)}
        files[mf.manifest_path(artifact.path).name] = mf.manifest_path(artifact.path).read_bytes()
        ref = ray.put(files)
        # an actor takes one CPU; a pool larger than the cluster's CPUs would wait for actors that never start
        actors = max(1, min(self.actors, int(ray.cluster_resources().get("CPU", 1))))
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), actors * 2))
        out = ds.map_batches(TaskPredictor, batch_size=1, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                             fn_constructor_kwargs={
                                 "artifact_files": [ref], "artifact_name": artifact.path.name,
                                 "device": target.get("device", "cpu"), "provider": target.get("provider"),
                                 "recurrent": bool(spec.state)})
        n = len(inputs.task.actions)
        pred: np.ndarray | None = None
        seen = np.zeros(n, dtype=bool)
        for batch in out.iter_batches(batch_format="numpy", batch_size=None):
            frames, actions = np.asarray(batch["frame"]), np.asarray(batch[ACTIONS])
            if pred is None:
                pred = np.zeros((n, *actions.shape[1:]), dtype=actions.dtype)
            pred[frames] = actions
            seen[frames] = True
        if pred is None or not seen.all():
            raise RuntimeError(f"Ray Data returned actions for {int(seen.sum())} of {n} task frames")
        self.used.append(artifact.name)
        return pred


def validate_with_ray(paths, *, address: str | None = None, actors: int = 2, **kwargs) -> dict[str, Any]:
    """`validate.validate` with its task predictions made on the Ray cluster; records that in validation.json."""
    from vla_export.validate.validate import validate

    with RayTaskPredictor(address=address, actors=actors) as predictor:
        report = validate(paths, task_predictor=predictor, **kwargs)
        nodes = len([n for n in predictor.ray.nodes() if n.get("Alive")])
    report["ray"] = {"address": address or os.environ.get("RAY_ADDRESS") or "local", "actors": actors,
                     "alive_nodes": nodes, "task_predictions_on_ray": predictor.used}
    path = report.pop("path")
    mf.write_text_atomic(path, json.dumps(report, indent=2, default=mf._json_default) + "\n")
    report["path"] = path
    return report
