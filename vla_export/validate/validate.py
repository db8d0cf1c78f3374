"""`vla-export validate`: every artifact against the PyTorch fp32 reference of the checkpoint it was built from.

Artifacts are found through their manifests and grouped by source checkpoint; the reference model is rebuilt once
per checkpoint and its outputs computed once per input set and batch size (cached), then every artifact runs through
`runners.open_runner` on the same inputs: ONNX Runtime once per available execution provider, TensorRT, AOTInductor.

Per artifact (and provider):
- provenance: the artifact's files must hash to the manifest's `sha256` ("modified since built") and the source
  checkpoint must still hash to `source.checkpoint_sha256` ("stale": rebuilt reference would not be its reference);
- parity: MAE / max abs / relative L2 / cosine of every output vs the reference over N inputs at batch 1 and 4;
- LSTM heads: a rollout per episode feeding `h_out -> h`, `c_out -> c` from `spec.initial_state`, for both;
- task (with `--episodes`: HDF5 episodes or a LeRobot v3 dataset directory): action MAE against ground truth
  (overall and per action), its change from the reference's, worst episode; outputs become actions as
  `data.task` says (a processor checkpoint's through its postprocessor: ACT's first chunk action, unnormalised);
  and the instruction colour swap on two-cup episodes (`instruction.py`, the built-in hybrid's);
- gates: tolerances keyed by precision (variant entries override), resolved in `resolve_tolerances`.

A backend this machine cannot run (`BackendUnavailable`) is "skipped", which does not fail the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_export import manifest as mf
from vla_export.errors import BackendUnavailable, GateFailed, UserError
from vla_export.io_spec import NUMPY_DTYPES, IOSpec
from vla_export.validate import metrics

VALIDATION_FILE = "validation.json"
PROFILE_FILE = "profile.json"
REPORT_FILES = {VALIDATION_FILE, PROFILE_FILE, "report.json"}
ACTIONS = "actions"

# Parity MAE of `actions` vs the fp32 reference, and the largest allowed rise of the task action MAE (absolute, in
# action units). fp32: exporters and runtimes reorder float sums, which costs ~1e-7 on these models (measured: ORT
# 1.3e-7 on the full model, AOTInductor 3e-8 on tiny), so 1e-4 is three orders above noise and still catches a wrong
# weight or op. fp16: ~1e-4 measured on GPU; 1e-3 leaves room for longer reductions. int8: 0.007-0.024 measured on
# random weights; a single fp32-sized tolerance cannot judge it, so it is held mainly to the task budget.
# Each absolute entry has a twin relative to the reference's scale (metrics.DEFAULT_PARITY_REL_L2, measured and
# explained there): `parity_rel_l2` (||out - ref|| / ||ref|| of actions) and `task_mae_rel_increase` (the task MAE
# rise as a share of the reference's own task MAE). Both of a pair must hold.
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    p: {"parity_mae": mae, "task_mae_increase": 0.01, "parity_rel_l2": metrics.DEFAULT_PARITY_REL_L2[p],
        "task_mae_rel_increase": metrics.DEFAULT_TASK_MAE_REL_INCREASE}
    for p, mae in (("fp32", 1e-4), ("fp16", 1e-3), ("bf16", 1e-2), ("int8", 0.05))
}
# Variant-specific entries override their precision's: static INT8's relative budget (metrics.py says why).
DEFAULT_VARIANT_TOLERANCES: dict[str, dict[str, float]] = {
    v: {"parity_rel_l2": rel} for v, rel in metrics.DEFAULT_VARIANT_PARITY_REL_L2.items()}
DEFAULT_N = 16
DEFAULT_BATCH_SIZES = (1, 4)
TASK_BATCH = 8


# -- tolerances ------------------------------------------------------------------------------------------------------
def resolve_tolerances(tol: float | None = None, tol_fp16: float | None = None, tol_int8: float | None = None,
                       max_task_mae_increase: float | None = None, *, rtol: float | None = None,
                       rtol_fp16: float | None = None, rtol_int8: float | None = None,
                       max_task_mae_rel_increase: float | None = None,
                       base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gate table: defaults (or `base`, e.g. the budgets a bundle carries) with the CLI's overrides applied.
    Written verbatim into validation.json."""
    precisions = {k: dict(v) for k, v in (base["precision"] if base else DEFAULT_TOLERANCES).items()}
    variants = {k: dict(v) for k, v in ((base or {}).get("variant", {}) if base else DEFAULT_VARIANT_TOLERANCES).items()}
    for key, word, values in (("parity_mae", "tolerance", (("fp32", tol), ("fp16", tol_fp16), ("int8", tol_int8))),
                              ("parity_rel_l2", "relative tolerance",
                               (("fp32", rtol), ("fp16", rtol_fp16), ("int8", rtol_int8)))):
        for precision, value in values:
            if value is not None:
                if value <= 0:
                    raise UserError(f"{word} for {precision} must be > 0, got {value}")
                precisions.setdefault(precision, {})[key] = float(value)
                if key == "parity_rel_l2":  # an explicit budget for a precision covers its variants too
                    for variant, entry in variants.items():
                        if precision in variant.split("-"):
                            entry.pop("parity_rel_l2", None)
    if max_task_mae_rel_increase is not None:
        if max_task_mae_rel_increase < 0:
            raise UserError(f"--max-task-mae-rel-increase must be >= 0, got {max_task_mae_rel_increase}")
        for entry in precisions.values():
            entry["task_mae_rel_increase"] = float(max_task_mae_rel_increase)
    if max_task_mae_increase is not None:
        if max_task_mae_increase < 0:
            raise UserError(f"--max-task-mae-increase must be >= 0, got {max_task_mae_increase}")
        for entry in precisions.values():
            entry["task_mae_increase"] = float(max_task_mae_increase)
    return {"precision": precisions, "variant": {k: v for k, v in variants.items() if v}}


def tolerance_for(table: dict[str, Any], precision: str, variant: str | None) -> dict[str, float]:
    """A precision's gate, with its variant's entries on top. Unknown precisions get the strictest (fp32) gate."""
    base = dict(table["precision"].get(precision, table["precision"]["fp32"]))
    # A table written before the relative budgets existed (an older validation.json or bundle) gets their defaults.
    defaults = DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])
    return defaults | base | table["variant"].get(variant or "", {})


# -- discovery -------------------------------------------------------------------------------------------------------
@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def backend(self) -> str:
        return self.manifest.get("backend", "?")

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", "fp32")

    @property
    def variant(self) -> str:
        return self.manifest.get("variant") or f"{self.backend}-{self.precision}"

    @property
    def checkpoint(self) -> str | None:
        return (self.manifest.get("source") or {}).get("checkpoint")

    @property
    def spec(self) -> IOSpec:
        return IOSpec.from_json(self.manifest["io_spec"])

    def max_batch(self) -> int:
        dim = self.spec.dims.get("batch")
        if dim is None:
            return 1
        return dim.max if dim.dynamic else dim.opt


def _is_artifact_manifest(data: Any) -> bool:
    return isinstance(data, dict) and "backend" in data and "artifact" in data and "io_spec" in data


def find_artifacts(paths: list[str | os.PathLike]) -> list[Artifact]:
    """Artifacts named by their manifests: in each directory every `X.json` with a `backend` (reports excluded),
    or the artifact files / manifests given. Sorted by name, each once."""
    found: dict[Path, Artifact] = {}
    for p in map(Path, paths):
        if p.is_dir():
            manifests = sorted(m for m in p.glob("*.json") if m.name not in REPORT_FILES and not m.name.startswith("."))
        elif p.suffix == ".json" and p.exists():
            manifests = [p]
        elif p.exists():
            manifests = [mf.manifest_path(p)]
            if not manifests[0].exists():
                raise UserError(f"{p} has no manifest {manifests[0].name} beside it; rebuild it with vla-export")
        else:
            raise UserError(f"{p} does not exist; pass an artifacts directory (default: artifacts) or artifact files")
        for m in manifests:
            try:
                data = json.loads(m.read_text())
            except (json.JSONDecodeError, OSError) as e:
                if p.is_dir():
                    continue  # not every JSON in a directory is a manifest
                raise UserError(f"manifest {m} is not readable JSON ({e}); rebuild the artifact") from e
            if not _is_artifact_manifest(data):
                if not p.is_dir():
                    raise UserError(f"{m} is not an artifact manifest (no backend/artifact/io_spec fields)")
                continue
            artifact = (m.parent / data["artifact"]).resolve()
            found.setdefault(artifact, Artifact(artifact, data))
    if not found:
        raise UserError(f"no artifacts with manifests in {', '.join(map(str, paths))}; "
                        "build some with `vla-export export` (and quantize/trt/aoti)")
    return sorted(found.values(), key=lambda a: a.name)


def output_dir_for(paths: list[str | os.PathLike]) -> Path:
    first = Path(paths[0])
    return first if first.is_dir() else first.parent


# -- provenance ------------------------------------------------------------------------------------------------------
def provenance_problems(artifact: Artifact) -> tuple[list[str], bool]:
    """(problems, stale). Checks the artifact's own files and its source checkpoint against the manifest."""
    problems: list[str] = []
    stale = False
    if not artifact.path.exists():
        return [f"artifact file {artifact.path} is missing"], False
    try:
        files = mf.artifact_files(artifact.path)
        missing = [f.name for f in files if not f.exists()]
        if missing:
            problems.append(f"files missing: {', '.join(missing)}")
        elif artifact.manifest.get("sha256") and mf.sha256_files(files) != artifact.manifest["sha256"]:
            problems.append("modified since built: its files no longer match the manifest's sha256")
    except Exception as e:  # an unreadable .onnx cannot even list its external data
        problems.append(f"cannot read its files ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    source = artifact.manifest.get("source") or {}
    ckpt, recorded = source.get("checkpoint"), source.get("checkpoint_sha256")
    if not ckpt:
        problems.append("manifest records no source checkpoint; cannot rebuild its reference")
    elif not Path(ckpt).exists():
        problems.append(f"source checkpoint {ckpt} no longer exists")
        stale = True
    elif recorded:
        from vla_export.checkpoint import checkpoint_sha256

        if checkpoint_sha256(ckpt) != recorded:
            problems.append(f"stale: source checkpoint {ckpt} changed since the artifact was built; rebuild it")
            stale = True
    return problems, stale


# -- inputs and the reference ------------------------------------------------------------------------------------------
def cast_feeds(feeds: dict[str, np.ndarray], spec: IOSpec) -> dict[str, np.ndarray]:
    """Feeds in the dtypes `spec` declares (an fp16-IO artifact takes float16), only the inputs it has."""
    out = {}
    for t in spec.inputs:
        if t.name in feeds:
            want = NUMPY_DTYPES[t.dtype]
            v = feeds[t.name]
            out[t.name] = v if v.dtype == want else v.astype(want)
    return out


def take(feeds: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in feeds.items()}


def run_batched(infer: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feeds: dict[str, np.ndarray],
                batch: int) -> dict[str, np.ndarray]:
    n = len(next(iter(feeds.values())))
    return metrics.concat_outputs([infer(take(feeds, slice(i, i + batch))) for i in range(0, n, batch)])


def rollout(infer: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feeds: dict[str, np.ndarray],
            episodes: list[np.ndarray], spec: IOSpec) -> dict[str, np.ndarray]:
    """Stream each episode's frames one at a time, feeding the recurrent state back (zeros at episode start).

    Returns every output per frame, in the frames' order."""
    n = len(next(iter(feeds.values())))
    per_frame: list[dict[str, np.ndarray] | None] = [None] * n
    state_inputs = set(spec.state.values())
    for frames in episodes:
        state = spec.initial_state(1)
        for i in frames:
            step = {k: v[i:i + 1] for k, v in feeds.items() if k not in state_inputs} | state
            out = infer(step)
            per_frame[i] = out
            state = {inp: out[o].astype(NUMPY_DTYPES[spec.tensor(inp).dtype]) for o, inp in spec.state.items()}
    return metrics.concat_outputs([o for o in per_frame if o is not None])


@dataclass
class InputSet:
    """What every artifact of one checkpoint is run on."""

    source: str  # "examples" | "episodes"
    parity: dict[str, np.ndarray]  # N inputs
    task: Any = None  # vla_export.data.task.TaskData or None
    episodes: list[np.ndarray] = field(default_factory=list)  # frame indices per episode (task frames)
    swap: Any = None  # vla_export.validate.instruction.SwapSet (two-cup episodes, colour swapped) or None

    def describe(self) -> dict[str, Any]:
        out = {"source": self.source, "n": int(len(next(iter(self.parity.values()))))}
        if self.task is not None:
            out |= {"task_frames": int(len(self.task.actions)), "task_episodes": len(self.episodes)}
        return out


def episode_index(episode_per_frame: list[str]) -> list[np.ndarray]:
    """Frame indices per episode, episodes in first-seen order (task data is ordered by episode then time)."""
    order: dict[str, list[int]] = {}
    for i, e in enumerate(episode_per_frame):
        order.setdefault(str(e), []).append(i)
    return [np.asarray(v) for v in order.values()]


def make_inputs(checkpoint, n: int, seed: int, episodes_dir: str | None, split: str,
                max_frames: int | None, max_episodes: int | None) -> InputSet:
    spec = checkpoint.spec
    if episodes_dir is None:
        feeds = spec.example_inputs(batch=n, seed=seed)
        if spec.state:
            # Parity for recurrent heads starts from the zero state a rollout starts from.
            feeds |= spec.initial_state(n)
        return InputSet("examples", feeds)
    try:
        from vla_export.data.task import load_task_data
    except ImportError as e:
        raise UserError(f"--episodes needs vla_export.data.task, which is not installed here ({e})") from e
    task = load_task_data(checkpoint.path, episodes_dir, split=split, max_frames=max_frames, max_episodes=max_episodes)
    total = len(task.actions)
    if total == 0:
        raise UserError(f"no {split} frames in {episodes_dir}; add episodes or use another --split")
    feeds = dict(task.feeds)
    if spec.state:
        missing = {k: v for k, v in spec.initial_state(total).items() if k not in feeds}
        feeds |= missing
        task.feeds = feeds
    pick = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))
    from vla_export.validate.instruction import colour_swap_set

    swap = colour_swap_set(checkpoint.path, episodes_dir, split, max_episodes=max_episodes, max_frames=max_frames)
    return InputSet("episodes", take(feeds, pick), task, episode_index(list(task.episode)), swap)


class Reference:
    """The fp32 PyTorch model of one checkpoint, with cached outputs per (input set, mode, batch)."""

    def __init__(self, checkpoint):
        from vla_export.runtime import TorchRunner

        self.checkpoint = checkpoint
        self.spec = checkpoint.spec
        self.runner = TorchRunner(checkpoint.model, checkpoint.spec, name="pytorch-fp32-reference").activate()
        self._cache: dict[tuple, dict[str, np.ndarray]] = {}

    def batched(self, key: str, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        if (key, batch) not in self._cache:
            self._cache[(key, batch)] = run_batched(self.runner.infer, feeds, batch)
        return self._cache[(key, batch)]

    def rollout(self, key: str, feeds: dict[str, np.ndarray], episodes: list[np.ndarray]) -> dict[str, np.ndarray]:
        if (key, "rollout") not in self._cache:
            self._cache[(key, "rollout")] = rollout(self.runner.infer, feeds, episodes, self.spec)
        return self._cache[(key, "rollout")]


def load_reference(artifact: Artifact):
    """Rebuild the source checkpoint's model exactly as the manifest recorded it was loaded."""
    from vla_export.checkpoint import load_checkpoint

    settings = artifact.manifest.get("settings") or {}
    source = artifact.manifest.get("source") or {}
    kwargs = {k: source.get(k, settings.get(k)) for k in ("arch", "preset", "overrides", "rename")}
    trust = bool(source.get("trust", settings.get("trust_checkpoint", False)))
    return load_checkpoint(artifact.checkpoint, trust=trust, **{k: v for k, v in kwargs.items() if v is not None})


# -- task metrics ------------------------------------------------------------------------------------------------------
def task_metrics(pred: np.ndarray, truth: np.ndarray, episodes: list[np.ndarray], names: list[str],
                 action_names: list[str] | None = None) -> dict[str, Any]:
    per_episode = {name: float(np.abs(pred[idx] - truth[idx]).mean()) for name, idx in zip(names, episodes, strict=True)}
    worst = max(per_episode, key=per_episode.get)
    errors = np.abs(pred.astype(np.float64) - truth)
    # per action: one average hides an output that does not move
    # a checkpoint's names label its actions only when there is one per column (a plug-in may keep the defaults)
    names = list(action_names or [])
    labels = names[: errors.shape[1]] if len(names) >= errors.shape[1] else [f"a{i}" for i in range(errors.shape[1])]
    return {"mae": float(errors.mean()), "per_action_mae": {a: float(v) for a, v in zip(labels, errors.mean(0),
                                                                                        strict=True)},
            "per_episode_mae": per_episode, "worst_episode": worst, "worst_episode_mae": per_episode[worst]}


def task_predictions(infer, inputs: InputSet, spec: IOSpec, max_batch: int = TASK_BATCH) -> dict[str, np.ndarray]:
    """Actions for every task frame: a rollout for recurrent heads (the state carries the history), else batched."""
    if spec.state:
        return rollout(infer, inputs.task.feeds, inputs.episodes, spec)
    return run_batched(infer, inputs.task.feeds, max(1, min(TASK_BATCH, max_batch)))


# -- one artifact --------------------------------------------------------------------------------------------------------
def _targets(artifact: Artifact, providers: list[str]) -> list[dict[str, Any]]:
    """(provider, device) rows an artifact is validated on: ORT once per execution provider available."""
    if artifact.backend == "onnxruntime":
        from vla_export.runtime import ORT_PROVIDER_DEVICE

        return [{"provider": p, "device": ORT_PROVIDER_DEVICE[p]} for p in providers]
    if artifact.backend == "tensorrt":
        return [{"provider": None, "device": "cuda"}]
    return [{"provider": None, "device": artifact.manifest.get("device", "cpu")}]


def device_label(device: str, provider: str | None) -> str:
    """`cpu`, `cuda`, or `cuda [Tensorrt EP]` where an ORT execution provider is not the device's plain one."""
    short = (provider or "").replace("ExecutionProvider", "")
    return device if short.lower() in ("", "cpu", "cuda") else f"{device} [{short} EP]"


def row_id(name: str, device: str, provider: str | None) -> str:
    return f"{name}@{provider or device}"


def _base_result(artifact: Artifact, target: dict[str, Any], tol: dict[str, float]) -> dict[str, Any]:
    return {
        "id": row_id(artifact.name, target["device"], target["provider"]),
        "artifact": artifact.name, "path": str(artifact.path), "backend": artifact.backend,
        "precision": artifact.precision, "variant": artifact.variant, "device": target["device"],
        "provider": target["provider"], "checkpoint": artifact.checkpoint,
        "checkpoint_sha256": (artifact.manifest.get("source") or {}).get("checkpoint_sha256"),
        "artifact_sha256": artifact.manifest.get("sha256"), "size_bytes": artifact.manifest.get("total_bytes"),
        "tolerance": tol,
        "status": None, "verdict": None, "reasons": [],
        # The stage that wrote the artifact gated it on its machine; say so when this one computes differently.
        # (It is judged here all the same: this row's numbers are this machine's.)
        "judged_elsewhere": (mf.isa_difference(artifact.manifest.get("machine"), mf.machine_info(),
                                               f"gated by `{artifact.manifest.get('stage', '?')}`")
                             if (artifact.manifest.get("metrics") or {}) else None),
    }


def _finish(result: dict[str, Any]) -> dict[str, Any]:
    if result["status"] == "skipped":
        result["verdict"] = f"skipped: {result['reasons'][0]}"
    elif result["reasons"]:
        result["status"] = "failed"
        stale = any(r.startswith("stale") for r in result["reasons"])
        result["verdict"] = ("STALE: " if stale else "FAILED: ") + "; ".join(result["reasons"])
    else:
        result["status"], result["verdict"] = "passed", "passed"
    return result


def validate_on_target(artifact: Artifact, target: dict[str, Any], reference: Reference, inputs: InputSet,
                       tol: dict[str, float], batch_sizes: list[int], problems: list[str],
                       task_predictor: Callable | None = None) -> dict[str, Any]:
    from vla_export.runtime import open_runner

    result = _base_result(artifact, target, tol)
    result["reasons"] = list(problems)
    try:
        runner = open_runner(artifact.path, device=target["device"], provider=target["provider"])
        runner.activate()
    except BackendUnavailable as e:
        if result["reasons"]:  # a modified or stale artifact fails whether or not it can run here
            result["reasons"].append(f"not run here: {e}")
        else:
            result["status"], result["reasons"] = "skipped", [str(e)]
        return _finish(result)
    except Exception as e:  # noqa: BLE001 - UserError from the runners, or a loader's own error: the artifact fails
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        result["reasons"].append(f"cannot load: {first}")
        return _finish(result)
    result["load_time_s"] = runner.load_time_s
    spec, ref_spec = runner.spec, reference.spec
    if spec.input_names != ref_spec.input_names or ACTIONS not in spec.output_names:
        result["reasons"].append(f"IO spec differs from the checkpoint's (inputs {spec.input_names} vs "
                                 f"{ref_spec.input_names}, outputs {spec.output_names})")
        runner.deactivate()
        return _finish(result)
    outputs = [o for o in ref_spec.output_names if o in spec.output_names]

    def infer(feeds):
        return runner.infer(cast_feeds(feeds, spec))

    try:
        parity: dict[str, Any] = {}
        max_batch = artifact.max_batch()
        for b in batch_sizes:
            if b > max_batch:
                parity[f"batch_{b}"] = {"skipped": f"batch {b} > the artifact's max batch {max_batch}"}
                continue
            ref = reference.batched("parity", inputs.parity, b)
            parity[f"batch_{b}"] = metrics.compare_outputs(ref, run_batched(infer, inputs.parity, b), outputs)
        result["parity"] = parity
        gated = [p[ACTIONS] for p in parity.values() if ACTIONS in p]
        if gated:
            result["parity_mae"] = max(g["mae"] for g in gated)
            result["parity_max_abs"] = max(g["max_abs"] for g in gated)
            result["parity_cosine"] = min(g["cosine"] for g in gated)
            result["parity_rel_l2"] = max(g["rel_l2"] for g in gated)
        if ref_spec.state:
            # Without task data, the N parity inputs stand in for one episode of N consecutive frames.
            feeds, episodes = ((inputs.task.feeds, inputs.episodes) if inputs.task is not None
                               else (inputs.parity, [np.arange(len(next(iter(inputs.parity.values()))))]))
            ref_roll = reference.rollout("task" if inputs.task is not None else "parity", feeds, episodes)
            result["rollout"] = metrics.compare_outputs(ref_roll, rollout(infer, feeds, episodes, spec), outputs)
            result["rollout"]["episodes"] = len(episodes)
            gated.append(result["rollout"][ACTIONS])
            result["parity_mae"] = max(result.get("parity_mae", 0.0), result["rollout"][ACTIONS]["mae"])
            result["parity_rel_l2"] = max(result.get("parity_rel_l2", 0.0), result["rollout"][ACTIONS]["rel_l2"])
        if inputs.task is not None:
            names = [str(inputs.task.episode[idx[0]]) for idx in inputs.episodes]
            truth = np.asarray(inputs.task.actions, dtype=np.float64)
            ref_task = reference_task(reference, inputs, names)
            # task_predictor (validate --ray: fleet.ray_validate) spreads the frames over a cluster; None = here
            pred = task_predictor(artifact, target, inputs, spec, max_batch) if task_predictor else None
            outputs = ({ACTIONS: pred} if pred is not None else task_predictions(infer, inputs, spec, max_batch))
            # through the checkpoint's postprocessor where it has one (an ACT chunk: its first action, unnormalised)
            pred = inputs.task.predicted_actions(outputs)
            art_task = task_metrics(pred, truth, inputs.episodes, names, reference.checkpoint.action_names)
            increases = {e: art_task["per_episode_mae"][e] - ref_task["per_episode_mae"][e] for e in names}
            worst = max(increases, key=increases.get)
            result["task"] = art_task | {
                "reference_mae": ref_task["mae"], "increase": art_task["mae"] - ref_task["mae"],
                "worst_increase_episode": worst, "worst_episode_increase": increases[worst]}
        if inputs.swap is not None:
            from vla_export.validate.instruction import instruction_sensitivity

            result["instruction_swap"] = instruction_sensitivity(runner, inputs.swap, TASK_BATCH)
    except Exception as e:  # noqa: BLE001 - any runtime error of the artifact is its failure, not a crash of the run
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        result["reasons"].append(f"inference failed: {type(e).__name__}: {first}")
        return _finish(result)
    finally:
        runner.deactivate()

    if not all(g["finite"] for g in gated):
        result["reasons"].append("outputs contain NaN or Inf")
    else:
        if "parity_mae" in result and result["parity_mae"] > tol["parity_mae"]:
            result["reasons"].append(f"parity MAE {result['parity_mae']:.3g} > tol {tol['parity_mae']:.3g} "
                                     f"({artifact.precision})")
        worst_rel = max(gated, key=lambda g: g["rel_l2"]) if gated else None
        rel_line = worst_rel and metrics.relative_failure(ACTIONS, worst_rel, tol["parity_rel_l2"])
        if rel_line:
            result["reasons"].append(f"{rel_line} ({artifact.precision})")
    if "task" in result and result["task"]["increase"] > tol["task_mae_increase"]:
        result["reasons"].append(f"task MAE rose {result['task']['increase']:.3g} > "
                                 f"{tol['task_mae_increase']:.3g} over the reference")
    if "task" in result:
        result["task"]["rel_increase"] = (result["task"]["increase"] / result["task"]["reference_mae"]
                                          if result["task"]["reference_mae"] > 0 else None)
        rel_task = metrics.task_relative_failure(result["task"]["increase"], result["task"]["reference_mae"],
                                                 tol["task_mae_rel_increase"])
        if rel_task:
            result["reasons"].append(rel_task)
    return _finish(result)


def reference_task(reference: Reference, inputs: InputSet, names: list[str]) -> dict[str, Any]:
    key = ("task-metrics",)
    if key not in reference._cache:
        pred = inputs.task.predicted_actions(task_predictions(lambda f: reference.runner.infer(f), inputs,
                                                             reference.spec))
        reference._cache[key] = task_metrics(pred, np.asarray(inputs.task.actions, dtype=np.float64),
                                             inputs.episodes, names, reference.checkpoint.action_names)
    return reference._cache[key]


# -- the whole run -------------------------------------------------------------------------------------------------------
def validate(paths: list[str | os.PathLike], *, tolerances: dict[str, Any] | None = None, n: int = DEFAULT_N,
             batch_sizes: list[int] | tuple[int, ...] = DEFAULT_BATCH_SIZES, episodes_dir: str | None = None,
             split: str = "val", max_frames: int | None = None, max_episodes: int | None = None, seed: int = 0,
             providers: list[str] | None = None, output: str | os.PathLike | None = None,
             command: str | None = None, progress: bool = True,
             task_predictor: Callable | None = None) -> dict[str, Any]:
    """Validate every artifact under `paths`; writes validation.json (atomically) and returns its content.

    Does not raise on failed gates: the caller decides (`raise_on_failure`)."""
    from vla_export.runtime import available_ort_providers

    if n < 1:
        raise UserError(f"-n must be >= 1, got {n}")
    tolerances = tolerances or resolve_tolerances()
    artifacts = find_artifacts(paths)
    providers = providers or available_ort_providers()
    out_path = Path(output) if output else output_dir_for(paths) / VALIDATION_FILE
    mf.check_writable_dir(out_path.parent)

    groups: dict[str, list[Artifact]] = {}
    for a in artifacts:
        groups.setdefault(str(a.checkpoint), []).append(a)
    total = sum(len(_targets(a, providers)) for a in artifacts)

    results: list[dict[str, Any]] = []
    references: dict[str, Any] = {}
    with _progress(progress) as bar:
        task_id = bar.add_task("validate", total=total)
        for ckpt, group in groups.items():
            runnable = []
            for a in group:
                problems, stale = provenance_problems(a)
                if not stale and a.path.exists() and a.checkpoint:
                    runnable.append((a, problems))
                else:  # nothing to run it against (stale/missing source) or nothing to run
                    for target in _targets(a, providers):
                        r = _base_result(a, target, tolerance_for(tolerances, a.precision, a.variant))
                        r["reasons"] = problems
                        results.append(_finish(r))
                        bar.advance(task_id)
            if not runnable:
                continue
            bar.update(task_id, description=f"reference {Path(ckpt).name}")
            try:
                checkpoint = load_reference(runnable[0][0])
            except UserError as e:  # e.g. a checkpoint whose architecture no longer builds: its artifacts fail
                for a, problems in runnable:
                    for target in _targets(a, providers):
                        r = _base_result(a, target, tolerance_for(tolerances, a.precision, a.variant))
                        r["reasons"] = [*problems, f"cannot rebuild the reference from {ckpt}: {e}"]
                        results.append(_finish(r))
                        bar.advance(task_id)
                continue
            reference = Reference(checkpoint)
            inputs = make_inputs(checkpoint, n, seed, episodes_dir, split, max_frames, max_episodes)
            ref_entry: dict[str, Any] = {"checkpoint_sha256": checkpoint.sha256, "inputs": inputs.describe()}
            if inputs.task is not None:
                names = [str(inputs.task.episode[idx[0]]) for idx in inputs.episodes]
                ref_entry["task"] = reference_task(reference, inputs, names)
            if inputs.swap is not None:
                from vla_export.validate.instruction import instruction_sensitivity

                ref_entry["instruction_swap"] = instruction_sensitivity(reference.runner, inputs.swap, TASK_BATCH)
            references[ckpt] = ref_entry
            for a, problems in runnable:
                tol = tolerance_for(tolerances, a.precision, a.variant)
                for target in _targets(a, providers):
                    bar.update(task_id, description=f"{a.name} ({target['provider'] or target['device']})")
                    results.append(validate_on_target(a, target, reference, inputs, tol, list(batch_sizes),
                                                      problems, task_predictor))
                    bar.advance(task_id)
            reference.runner.deactivate()
            del reference, checkpoint  # the full model's fp32 weights are gigabytes: free before the next group

    results.sort(key=lambda r: r["id"])
    report = {
        **mf.run_header(command),
        "settings": {"n": n, "batch_sizes": list(batch_sizes), "seed": seed, "episodes": episodes_dir,
                     "split": split, "max_frames": max_frames, "max_episodes": max_episodes,
                     "ort_providers": providers, "gated_output": ACTIONS},
        "tolerances": tolerances,
        "references": references,
        "results": results,
        "passed": all(r["status"] != "failed" for r in results),
        "counts": {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "skipped")},
    }
    mf.write_text_atomic(out_path, json.dumps(report, indent=2, default=mf._json_default) + "\n")
    report["path"] = str(out_path)
    return report


def raise_on_failure(report: dict[str, Any]) -> None:
    failed = [r for r in report["results"] if r["status"] == "failed"]
    if failed:
        names = "; ".join(f"{r['id']}: {r['verdict']}" for r in failed)
        raise GateFailed(f"{len(failed)} artifact(s) failed validation: {names} (numbers in {report['path']})")


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def results_table(report: dict[str, Any]):
    """A rich table of every verdict and why."""
    from rich.table import Table

    table = Table(title=f"validation ({report['counts']['passed']} passed, {report['counts']['failed']} failed, "
                        f"{report['counts']['skipped']} skipped)")
    for col in ("artifact", "backend", "device", "precision", "parity MAE", "tol", "rel L2", "rtol", "max abs",
                "cosine", "task MAE", "Δ task", "Δ/ref", "swap |Δa|/|a|", "swap MAE wrong/right", "verdict"):
        left = col in ("artifact", "backend", "device", "verdict")
        table.add_column(col, justify="left" if left else "right", no_wrap=col != "verdict")
    style = {"passed": "green", "failed": "red", "skipped": "yellow"}
    for r in report["results"]:
        task = r.get("task") or {}
        swap = r.get("instruction_swap") or {}
        table.add_row(r["artifact"], r["backend"], device_label(r["device"], r["provider"]), r["precision"],
                      _fmt(r.get("parity_mae")), _fmt(r["tolerance"]["parity_mae"]), _fmt(r.get("parity_rel_l2")),
                      _fmt(r["tolerance"].get("parity_rel_l2")), _fmt(r.get("parity_max_abs")),
                      _fmt(r.get("parity_cosine"), ".6f"), _fmt(task.get("mae"), ".4f"),
                      _fmt(task.get("increase"), "+.3g"), _fmt(task.get("rel_increase"), "+.1%"),
                      _fmt(swap.get("delta_ratio"), ".2f"),
                      _fmt(swap.get("task_mae_wrong"), ".4f") + " / " + _fmt(swap.get("task_mae_right"), ".4f")
                      if swap else "-",
                      f"[{style[r['status']]}]{_escape(r['verdict'])}[/]")
    return table


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)
