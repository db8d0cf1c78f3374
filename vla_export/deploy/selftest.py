"""The self-test set a bundle carries, so the machine that runs it can judge its artifact there.

A bundle is judged where it was made (`validate`), but it runs elsewhere: an AVX2 robot PC computes ORT's INT8
kernels differently from the VNNI workstation that quantized the model, and a TensorRT engine is built on the target
itself. So `bundle` stores, hashed like every other file:

- `selftest.npz` (no pickles: `np.load(allow_pickle=False)`):
  - `feed.<input>`: K preprocessed inputs (recurrent state at its initial value), and `ref.<output>`: the fp32
    PyTorch reference's outputs on them;
  - `obs.<key>`: M raw observations as the policy observes them (RGB uint8 frames per camera, state vectors), and
    `frame.ref_actions`: the first action the policy acts on for each, from a reset, computed through the bundle's
    own pre/post-processing (so `Policy` end to end is checked, processing included; for an action chunk that is
    the chunk's first action, the rule validate's task MAE uses). With `--episodes` the observations are real
    frames of the checkpoint's validation split: the hybrid's one camera + instruction, or every key a processor
    declares (cameras, `observation.state`, task text), read by name from named HDF5 episodes or a LeRobot v3
    dataset; without, seeded synthetic ones of the schema;
- `selftest.json`: the observation schema and texts (instructions), the budgets (the validate gate table), where
  the observations came from (`frames_from`, and `frames_at`: [episode, frame] of each real one), and the machine
  and versions that computed the reference.

`run_parity` and `run_end_to_end` judge an opened runner / `Policy` against it; `verify` (deploy/verify.py) and
`Policy.load` (its quick part: the first `QUICK_FEEDS` inputs and `QUICK_FRAMES` frames) call them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vla_export import manifest as mf
from vla_export.errors import UserError

SELFTEST_ARRAYS = "selftest.npz"
SELFTEST_INFO = "selftest.json"
SELFTEST_FORMAT_VERSION = 1
DEFAULT_FEEDS = 8  # K: parity inputs (seeded example inputs of the IO spec, every dynamic dim at its opt value)
DEFAULT_FRAMES = 8  # M: raw frames for the end-to-end check
QUICK_FEEDS = 2
QUICK_FRAMES = 1
# A bundle without processor.json (the built-in hybrid) observes one camera frame and an instruction.
IMAGE_KEY, TEXT_KEY = "image", "instruction"
HYBRID_SCHEMA = {IMAGE_KEY: {"type": "image"}, TEXT_KEY: {"type": "text"}}


# -- building (at bundle time, where the checkpoint is) ----------------------------------------------------------------
def _validation_picks(ckpt_dir: Path, episodes_dir: Path, m: int) -> tuple[list, list[tuple[int, int]]]:
    """The checkpoint's validation episodes (never its training frames) and M (episode, frame) picks spread over
    them, so the self-test sees starts, middles and ends of several episodes rather than one stretch."""
    from vla_export.data.episodes import load_episode
    from vla_export.data.task import select_episodes

    episodes = [load_episode(p) for p in select_episodes(ckpt_dir, episodes_dir, "val")]
    picks = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep))]
    idx = np.linspace(0, len(picks) - 1, num=min(m, len(picks))).round().astype(int)
    return episodes, [picks[i] for i in idx]


def _frames_from_episodes(ckpt_dir: Path, episodes_dir: Path, m: int
                          ) -> tuple[np.ndarray, list[str], list[list], str]:
    """The hybrid's M frames (its one camera) and instructions from the validation episodes."""
    episodes, picks = _validation_picks(ckpt_dir, episodes_dir, m)
    images = np.stack([episodes[e].images[t] for e, t in picks])
    instructions = [episodes[e].instruction for e, _ in picks]
    at = [[episodes[e].name, int(t)] for e, t in picks]
    return images, instructions, at, f"validation split of {episodes_dir.resolve()}"


def _processor_observations(ckpt_dir: Path, stage: Path, schema: dict[str, dict[str, Any]], episodes_dir: Path,
                            m: int) -> tuple[dict[str, Any], list[list], str]:
    """M raw observations of a processor bundle, each key the processor declares read BY NAME from the validation
    episodes (HDF5 named episodes or a LeRobot v3 dataset), through the same `EpisodeFeeder.observation` that
    validate's task MAE uses, so the self-test judges the cameras and state a robot would publish, not noise.
    Episodes that lack a declared observation are refused (one UserError line), not padded with synthetic data."""
    from vla_export.data.task import EpisodeFeeder

    feeder = EpisodeFeeder(stage)  # the stage's processor.json: what the robot will load
    episodes, picks = _validation_picks(ckpt_dir, episodes_dir, m)
    parts = [feeder.observation(episodes[e], [t]) for e, t in picks]
    missing = sorted(set(schema) - set(parts[0]))
    if missing:
        raise UserError(f"the processor observes {missing}, which the self-test cannot take from episodes; "
                        f"bundle without --episodes (synthetic observations) or use a processor of cameras, "
                        f"state and task text")
    obs = {k: ([s for p in parts for s in p[k]] if schema[k]["type"] == "text"
               else np.concatenate([np.asarray(p[k]) for p in parts])) for k in schema}
    at = [[episodes[e].name, int(t)] for e, t in picks]
    return obs, at, f"validation split of {episodes_dir.resolve()} (observations by name)"


def _synthetic_observations(schema: dict[str, dict[str, Any]], m: int, seed: int, instruction: str
                            ) -> dict[str, Any]:
    """Seeded observations of a processor's schema when no episodes are given: RGB uint8 frames at the schema's
    size (64x64 when it names none), standard-normal state vectors, the default instruction. They check
    preprocessing + artifact + postprocessing end to end, not task skill."""
    rng = np.random.default_rng(seed)
    obs: dict[str, Any] = {}
    for key, info in schema.items():
        shape = list(info.get("shape") or [])
        if info["type"] == "image":
            h, w = (shape[1:] if len(shape) == 3 and shape[0] == 3 else shape[:2]) or (64, 64)
            obs[key] = rng.integers(0, 256, size=(m, int(h), int(w), 3), dtype=np.uint8)
        elif info["type"] == "state":
            obs[key] = rng.standard_normal((m, int(shape[0]) if shape else 1)).astype(np.float32)
        else:
            obs[key] = [instruction] * m
    return obs


def _observations(ckpt_dir: Path, stage: Path, config: dict[str, Any], schema: dict[str, dict[str, Any]],
                  processor: bool, episodes: Path | None, m: int, seed: int
                  ) -> tuple[dict[str, Any], list[list] | None, str]:
    """The M raw observations of the self-test, keyed as the policy observes them (`schema`), the (episode, frame)
    each came from (None when synthetic), and a line saying where they came from."""
    if episodes is not None and processor:
        return _processor_observations(ckpt_dir, stage, schema, episodes, m)
    if episodes is not None:
        frames, instructions, at, origin = _frames_from_episodes(ckpt_dir, episodes, m)
        return {IMAGE_KEY: frames, TEXT_KEY: instructions}, at, origin
    instruction = str((config.get("preprocessing") or {}).get("default_instruction") or "")
    return (_synthetic_observations(schema, m, seed, instruction), None,
            f"synthetic observations (seed {seed}); pass --episodes for real frames")


def build_selftest(ckpt_dir: Path, config: dict[str, Any], stage: Path, budgets: dict[str, Any], *,
                   episodes: Path | None = None, feeds_n: int = DEFAULT_FEEDS, frames_n: int = DEFAULT_FRAMES,
                   seed: int = 0, load_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute the reference on K inputs and M raw observations; write selftest.npz + selftest.json into `stage`.

    `stage` already holds the bundle's config.json and pre/post-processing files: the observations are processed by
    exactly what the robot will load (the bundle's processor.json when it has one, else the hybrid's
    preprocessing), and the reference action of each is the first action the policy would act on from a reset."""
    from vla_export.checkpoint import load_checkpoint
    from vla_export.data.preprocess import Preprocessor
    from vla_export.processors import Processor, has_processor
    from vla_export.runtime import TorchRunner

    ckpt = load_checkpoint(ckpt_dir, **(load_kwargs or {}))
    spec = ckpt.spec
    feeds = spec.example_inputs(batch=feeds_n, seed=seed + 1000)
    feeds |= {k: v for k, v in spec.initial_state(feeds_n).items() if k not in feeds}
    processor = Processor.load(stage) if has_processor(stage) else None
    schema = processor.observation if processor is not None else HYBRID_SCHEMA
    obs, at, origin = _observations(ckpt_dir, stage, config, schema, processor is not None,
                                    Path(episodes) if episodes else None, frames_n, seed)
    m = len(next(iter(obs.values())))
    with TorchRunner(ckpt.model, spec, name="pytorch-fp32-reference") as ref:
        ref_out = ref.infer(feeds)
        if processor is None:
            pre = Preprocessor.from_checkpoint(stage)
            frame_feeds = pre(list(obs[IMAGE_KEY]), obs[TEXT_KEY])
            frame_feeds |= {k: v for k, v in spec.initial_state(m).items() if k not in frame_feeds}
            ref_actions = np.asarray(ref.infer(frame_feeds)["actions"], dtype=np.float32)
        else:
            rows = []
            for i in range(m):  # one at a time from a reset: chunk queues and ensembles start empty
                processor.reset()
                one = {k: (v[i] if isinstance(v, list) else v[i:i + 1]) for k, v in obs.items()}
                f = processor.preprocess(one)
                f |= {k: v for k, v in spec.initial_state(1).items() if k not in f}
                rows.append(processor.postprocess(ref.infer(f))[0])
            ref_actions = np.stack(rows).astype(np.float32)
    arrays = {f"feed.{k}": v for k, v in feeds.items()}
    arrays |= {f"ref.{k}": np.asarray(v, dtype=np.float32) for k, v in ref_out.items()}
    arrays |= {f"obs.{k}": np.asarray(v) for k, v in obs.items() if schema[k]["type"] != "text"}
    arrays["frame.ref_actions"] = ref_actions
    tmp = stage / f".{SELFTEST_ARRAYS}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(stage / SELFTEST_ARRAYS)
    info = {
        "format_version": SELFTEST_FORMAT_VERSION,
        "feeds": feeds_n, "frames": m, "frames_from": origin,
        # [episode name, frame index] of each observation, so anyone can check the stored frames against the data
        # (absent for synthetic ones); older readers ignore it, the format version stays
        **({"frames_at": at} if at is not None else {}),
        "observation": {"processor": processor is not None, "schema": schema,
                        "texts": {k: list(v) for k, v in obs.items() if schema[k]["type"] == "text"}},
        "quick": {"feeds": min(QUICK_FEEDS, feeds_n), "frames": min(QUICK_FRAMES, m)},
        "budgets": budgets,
        "reference": {"what": "PyTorch fp32 eager on CPU", "checkpoint_sha256": ckpt.sha256,
                      "machine": mf.machine_info(), "versions": mf.tool_versions()},
    }
    (stage / SELFTEST_INFO).write_text(json.dumps(info, indent=2, default=mf._json_default) + "\n")
    return info


# -- reading (on the target) ---------------------------------------------------------------------------------------------
class SelfTest:
    """The bundle's self-test set, read without unpickling anything."""

    def __init__(self, bundle_dir: Path):
        arrays, info = bundle_dir / SELFTEST_ARRAYS, bundle_dir / SELFTEST_INFO
        if not arrays.is_file() or not info.is_file():
            raise UserError(f"bundle {bundle_dir} has no self-test set ({SELFTEST_ARRAYS}, {SELFTEST_INFO}): it was "
                            "made by an older vla-export; rebuild it with `vla-export bundle`")
        self.info = mf.read_json(info, missing=f"{info} is missing", invalid=f"{info} is not valid JSON; rebuild "
                                 "the bundle")
        if self.info.get("format_version") != SELFTEST_FORMAT_VERSION:
            raise UserError(f"{info} has format_version {self.info.get('format_version')!r}, this vla-export reads "
                            f"{SELFTEST_FORMAT_VERSION}; rebuild the bundle with this version")
        try:
            with np.load(arrays, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise UserError(f"{arrays} is not a readable self-test set ({e}); rebuild the bundle") from e
        self.feeds = {k[5:]: v for k, v in data.items() if k.startswith("feed.")}
        self.reference = {k[4:]: v for k, v in data.items() if k.startswith("ref.")}
        self.ref_actions = data.get("frame.ref_actions")
        observation = self.info.get("observation") or {}
        self.uses_processor = bool(observation.get("processor"))
        self.observations: dict[str, Any] = {k[4:]: v for k, v in data.items() if k.startswith("obs.")}
        self.observations |= {k: list(v) for k, v in (observation.get("texts") or {}).items()}
        if not self.feeds or not self.reference or self.ref_actions is None or not self.observations:
            raise UserError(f"{arrays} lacks feeds, reference outputs or observations; rebuild the bundle")
        self.frames = int(self.ref_actions.shape[0])

    @property
    def budgets(self) -> dict[str, Any]:
        return self.info["budgets"]

    def subset(self, quick: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
        k = self.info["quick"]["feeds"] if quick else len(next(iter(self.feeds.values())))
        m = self.info["quick"]["frames"] if quick else self.frames
        return ({n: v[:k] for n, v in self.feeds.items()}, {n: v[:k] for n, v in self.reference.items()}, m)


    def act_on(self, policy, i: int) -> np.ndarray:
        """`policy.act` on raw observation `i`, as a robot calls it: (image, instruction) or an observation dict."""
        one = {k: v[i] for k, v in self.observations.items()}
        if self.uses_processor:
            return policy.act(one)
        return policy.act(one[IMAGE_KEY], one[TEXT_KEY])

    def feeds_of(self, policy, i: int) -> dict[str, np.ndarray]:
        """The preprocessed feeds (batch 1, no recurrent state) of raw observation `i`, through the policy."""
        one = {k: v[i] for k, v in self.observations.items()}
        if self.uses_processor:
            return policy._with_threads(policy.processor.preprocess, one)
        return policy.preprocess(one[IMAGE_KEY][None], one[TEXT_KEY])


# -- judging ------------------------------------------------------------------------------------------------------------
def budget_for(budgets: dict[str, Any], precision: str, variant: str | None) -> dict[str, float]:
    from vla_export.validate.validate import tolerance_for

    return tolerance_for(budgets, precision, variant)


def judge(metrics: dict[str, float], budget: dict[str, float], what: str) -> list[str]:
    """Every `parity_<metric>` budget against that metric of `metrics` (error metrics: lower is better)."""
    failures = []
    for key, limit in sorted(budget.items()):
        if not key.startswith("parity_"):
            continue
        name = key[len("parity_"):]
        value = metrics.get(name)
        if value is None:
            continue
        if not np.isfinite(value) or value > limit:
            failures.append(f"{what} {name} {value:.3g} > {limit:.3g}")
    return failures


def run_parity(runner, selftest: SelfTest, budget: dict[str, float], quick: bool = False) -> dict[str, Any]:
    """The artifact (an activated runner) on the stored inputs, one at a time, against the stored reference."""
    from vla_export.validate.metrics import error_metrics
    from vla_export.validate.validate import cast_feeds

    feeds, reference, _ = selftest.subset(quick)
    n = len(next(iter(feeds.values())))
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(n):  # batch 1, as a robot calls it
        got = runner.infer(cast_feeds({k: v[i:i + 1] for k, v in feeds.items()}, runner.spec))
        for name, value in got.items():
            outs.setdefault(name, []).append(np.asarray(value, dtype=np.float32))
    per_output = {name: error_metrics(reference[name], np.concatenate(outs[name]))
                  for name in reference if name in outs}
    failures = judge(per_output.get("actions", {}), budget, "parity")
    return {"inputs": n, "metrics": per_output, "budget": budget, "failures": failures, "passed": not failures}


def run_end_to_end(policy, selftest: SelfTest, budget: dict[str, float], quick: bool = False) -> dict[str, Any]:
    """Raw frames + instructions through `Policy` (preprocessing, artifact, postprocessing) vs the reference."""
    from vla_export.validate.metrics import error_metrics

    _, _, m = selftest.subset(quick)
    got = []
    for i in range(m):
        policy.reset()  # each frame is judged as the first of an episode, as the reference computed it
        got.append(np.asarray(selftest.act_on(policy, i), dtype=np.float32).reshape(-1))
    policy.reset()
    metrics = error_metrics(selftest.ref_actions[:m], np.stack(got))
    failures = judge(metrics, budget, "end-to-end action")
    return {"frames": m, "metrics": metrics, "budget": budget, "failures": failures, "passed": not failures}
