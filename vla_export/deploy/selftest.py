"""The self-test set a bundle carries, so the machine that runs it can judge its artifact there.

A bundle is judged where it was made (`validate`), but it runs elsewhere: an AVX2 robot PC computes ORT's INT8
kernels differently from the VNNI workstation that quantized the model, and a TensorRT engine is built on the target
itself. So `bundle` stores, hashed like every other file:

- `selftest.npz` (no pickles: `np.load(allow_pickle=False)`):
  - `feed.<input>`: K preprocessed inputs (recurrent state at its initial value), and `ref.<output>`: the fp32
    PyTorch reference's outputs on them;
  - `frame.images`: M raw RGB frames, and `frame.ref_actions`: the reference's actions for them, computed from the
    frames through the bundle's own preprocessing (so `Policy` end to end is checked, preprocessing included);
- `selftest.json`: the instructions of the M frames, the budgets (the validate gate table), where the frames came
  from, and the machine and versions that computed the reference.

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


# -- building (at bundle time, where the checkpoint is) ----------------------------------------------------------------
def _frames_from_episodes(ckpt_dir: Path, episodes_dir: Path, m: int) -> tuple[np.ndarray, list[str], str]:
    """M frames spread over the checkpoint's validation episodes (never its training frames)."""
    from vla_export.data.episodes import load_episode
    from vla_export.data.task import select_episodes

    paths = select_episodes(ckpt_dir, episodes_dir, "val")
    episodes = [load_episode(p) for p in paths]
    picks = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep))]
    idx = np.linspace(0, len(picks) - 1, num=min(m, len(picks))).round().astype(int)
    images = np.stack([episodes[picks[i][0]].images[picks[i][1]] for i in idx])
    instructions = [episodes[picks[i][0]].instruction for i in idx]
    return images, instructions, f"validation split of {episodes_dir.resolve()}"


def _synthetic_frames(config: dict[str, Any], m: int, seed: int) -> tuple[np.ndarray, list[str], str]:
    """Seeded noise frames when no episodes are at hand: they still check preprocessing + artifact end to end."""
    size = int((config.get("preprocessing") or {}).get("image_size") or 96)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(m, size, size, 3), dtype=np.uint8)
    instruction = str((config.get("preprocessing") or {}).get("default_instruction") or "")
    return images, [instruction] * m, f"synthetic noise frames (seed {seed}); pass --episodes for real frames"


def build_selftest(ckpt_dir: Path, config: dict[str, Any], stage: Path, budgets: dict[str, Any], *,
                   episodes: Path | None = None, feeds_n: int = DEFAULT_FEEDS, frames_n: int = DEFAULT_FRAMES,
                   seed: int = 0, load_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute the reference on K inputs and M frames and write selftest.npz + selftest.json into `stage`.

    `stage` already holds the bundle's config.json and preprocessing files: the frames are preprocessed by exactly
    what the robot will load."""
    from vla_export.checkpoint import load_checkpoint
    from vla_export.data.preprocess import Preprocessor
    from vla_export.runtime import TorchRunner

    ckpt = load_checkpoint(ckpt_dir, **(load_kwargs or {}))
    spec = ckpt.spec
    feeds = spec.example_inputs(batch=feeds_n, seed=seed + 1000)
    feeds |= {k: v for k, v in spec.initial_state(feeds_n).items() if k not in feeds}
    if episodes is not None:
        images, instructions, origin = _frames_from_episodes(ckpt_dir, Path(episodes), frames_n)
    else:
        images, instructions, origin = _synthetic_frames(config, frames_n, seed)
    pre = Preprocessor.from_checkpoint(stage)
    frame_feeds = pre(list(images), instructions)
    frame_feeds |= {k: v for k, v in spec.initial_state(len(images)).items() if k not in frame_feeds}
    with TorchRunner(ckpt.model, spec, name="pytorch-fp32-reference") as ref:
        ref_out = ref.infer(feeds)
        frame_out = ref.infer(frame_feeds)
    arrays = {f"feed.{k}": v for k, v in feeds.items()}
    arrays |= {f"ref.{k}": np.asarray(v, dtype=np.float32) for k, v in ref_out.items()}
    arrays |= {"frame.images": images, "frame.ref_actions": np.asarray(frame_out["actions"], dtype=np.float32)}
    tmp = stage / f".{SELFTEST_ARRAYS}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(stage / SELFTEST_ARRAYS)
    info = {
        "format_version": SELFTEST_FORMAT_VERSION,
        "feeds": feeds_n, "frames": len(images), "instructions": instructions, "frames_from": origin,
        "quick": {"feeds": min(QUICK_FEEDS, feeds_n), "frames": min(QUICK_FRAMES, len(images))},
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
        self.images = data.get("frame.images")
        self.ref_actions = data.get("frame.ref_actions")
        self.instructions = list(self.info.get("instructions") or [])
        if not self.feeds or not self.reference or self.images is None or self.ref_actions is None:
            raise UserError(f"{arrays} lacks feeds, reference outputs or frames; rebuild the bundle")

    @property
    def budgets(self) -> dict[str, Any]:
        return self.info["budgets"]

    def subset(self, quick: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
        k = self.info["quick"]["feeds"] if quick else len(next(iter(self.feeds.values())))
        m = self.info["quick"]["frames"] if quick else len(self.images)
        return ({n: v[:k] for n, v in self.feeds.items()}, {n: v[:k] for n, v in self.reference.items()}, m)


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
        got.append(np.asarray(policy.act(selftest.images[i], selftest.instructions[i]), dtype=np.float32))
    policy.reset()
    metrics = error_metrics(selftest.ref_actions[:m], np.stack(got))
    failures = judge(metrics, budget, "end-to-end action")
    return {"frames": m, "metrics": metrics, "budget": budget, "failures": failures, "passed": not failures}
