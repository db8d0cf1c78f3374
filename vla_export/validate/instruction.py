"""Instruction sensitivity: does a policy (any runner: PyTorch, ONNX Runtime, TensorRT, AOTInductor) follow the
colour its instruction names?

In a two-cup scene (a red and a blue cup in view) the instruction decides which cup to track, so swapping the
instruction's colour (red <-> blue) on the same frames should move the actions, and away from the ground truth. The
figures, per artifact: the mean |action change| the swap causes against the mean |action| of the ground truth, and
the task MAE with the right and with the wrong instruction. A policy that ignores its instruction shows a change near
zero and a wrong-to-right MAE ratio near 1; an INT8 artifact that lost the language pathway shows the same, even when
its task MAE on the right instruction still passes its gate.

Episodes are the ones whose files say two cups are in view (`Episode.cup_colours`, written by `episodes synth`);
files that do not say which cups are in view fall back to every episode whose instruction names a colour (recorded in
`selection`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLOUR_SWAP = {"red": "blue", "blue": "red"}
SELECTION_TWO_CUPS = "two-cup episodes (the files name both cups in view)"
SELECTION_NAMED = "episodes whose instruction names a colour (the files do not say which cups are in view)"


def swap_colour(text: str) -> str | None:
    """The instruction with red and blue exchanged (case kept), or None when it names neither."""
    changed = False

    def repl(m: re.Match) -> str:
        nonlocal changed
        changed = True
        word = m.group(0)
        new = COLOUR_SWAP[word.lower()]
        return new.capitalize() if word[0].isupper() else new

    out = re.sub(r"\b(?:red|blue)\b", repl, text, flags=re.IGNORECASE)
    return out if changed else None


@dataclass
class SwapSet:
    """The same frames twice: with each episode's own instruction (`right`) and with its colour swapped (`wrong`)."""

    right: dict[str, np.ndarray]
    wrong: dict[str, np.ndarray]
    actions: np.ndarray  # [N, action_dim] ground truth
    episodes: list[np.ndarray]  # frame indices per episode, in order
    names: list[str]
    instructions: list[tuple[str, str]]  # (right, wrong) per episode
    selection: str
    action_names: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"episodes": len(self.names), "frames": int(len(self.actions)), "selection": self.selection,
                "swaps": sorted({f"{r} -> {w}" for r, w in self.instructions})}


def select_swap_episodes(episodes: list) -> tuple[list, str]:
    """(episodes to swap, how they were chosen): two-cup scenes, or colour-named ones where files do not say."""
    two = [e for e in episodes if len(set(e.cup_colours)) >= 2 and swap_colour(e.instruction)]
    if two:
        return two, SELECTION_TWO_CUPS
    if any(e.cup_colours for e in episodes):
        return [], SELECTION_TWO_CUPS  # the files say, and none of these scenes has two cups
    return [e for e in episodes if swap_colour(e.instruction)], SELECTION_NAMED


def build_swap_set(episodes: list, preprocessor, action_dim: int, action_names: list[str] | None = None,
                   max_frames: int | None = None) -> SwapSet | None:
    """Preprocessed right/wrong feeds of the swappable `episodes` (vla_export.data.episodes.Episode), or None."""
    chosen, selection = select_swap_episodes(episodes)
    right, wrong, actions, index, names, texts = [], [], [], [], [], []
    start = 0
    for ep in chosen:
        n = len(ep) if max_frames is None else min(len(ep), max_frames - start)
        if n <= 0:
            break
        swapped = swap_colour(ep.instruction)
        right.append(preprocessor.preprocess_frames(ep.images[:n], ep.instruction))
        wrong.append(preprocessor.preprocess_frames(ep.images[:n], swapped))
        actions.append(ep.actions[:n, :action_dim])
        index.append(np.arange(start, start + n))
        names.append(ep.name)
        texts.append((ep.instruction, swapped))
        start += n
    if not names:
        return None

    def stack(parts):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return SwapSet(right=stack(right), wrong=stack(wrong), actions=np.concatenate(actions).astype(np.float32),
                   episodes=index, names=names, instructions=texts, selection=selection,
                   action_names=list(action_names or []))


def colour_swap_set(checkpoint_dir: str | os.PathLike, episodes_dir: str | os.PathLike, split: str = "val",
                    max_episodes: int | None = None, max_frames: int | None = None,
                    preprocessor=None) -> SwapSet | None:
    """The swap set of a checkpoint's `split` (the training split, as `load_task_data` reproduces it), or None.

    None for a checkpoint with its own processor.json: the swap reads the built-in hybrid's raw `actions` on its
    cup scenes, and such a policy's outputs are actions only after its postprocessor."""
    from vla_export.checkpoint import read_config
    from vla_export.data.episodes import load_episode
    from vla_export.data.preprocess import Preprocessor
    from vla_export.data.task import select_episodes
    from vla_export.processors import has_processor

    if preprocessor is None and has_processor(checkpoint_dir):
        return None
    pre = preprocessor or Preprocessor.from_checkpoint(checkpoint_dir)
    config = read_config(checkpoint_dir)
    action_dim = int(pre.model_config.get("action_dim", 2))
    episodes = [load_episode(p) for p in select_episodes(checkpoint_dir, episodes_dir, split, max_episodes)]
    return build_swap_set(episodes, pre, action_dim, config.get("action_names"), max_frames)


def _infer_and_spec(runner):
    from vla_export.validate.validate import cast_feeds

    spec = runner.spec
    return (lambda feeds: runner.infer(cast_feeds(feeds, spec))), spec


def predict(runner, feeds: dict[str, np.ndarray], episodes: list[np.ndarray], max_batch: int = 8) -> np.ndarray:
    """`actions` for every frame: rolled out per episode from zero state for recurrent heads, else batched."""
    from vla_export.validate.validate import rollout, run_batched

    infer, spec = _infer_and_spec(runner)
    if spec.state:
        out = rollout(infer, feeds, episodes, spec)
    else:
        dim = spec.dims.get("batch")
        limit = (dim.max if dim.dynamic else dim.opt) if dim is not None else 1
        out = run_batched(infer, feeds, max(1, min(max_batch, limit)))
    return np.asarray(out["actions"], dtype=np.float64)


def instruction_sensitivity(runner, swap: SwapSet, max_batch: int = 8) -> dict[str, Any]:
    """The colour-swap figures of one activated runner (`vla_export.validate.runners.Runner`) on `swap`."""
    right = predict(runner, swap.right, swap.episodes, max_batch)
    wrong = predict(runner, swap.wrong, swap.episodes, max_batch)
    truth = swap.actions.astype(np.float64)
    delta = np.abs(wrong - right)
    mean_abs_action = float(np.abs(truth).mean())
    mae_right = float(np.abs(right - truth).mean())
    mae_wrong = float(np.abs(wrong - truth).mean())
    names = swap.action_names[: truth.shape[1]] or [f"a{i}" for i in range(truth.shape[1])]
    return {
        **swap.describe(),
        "mean_abs_delta": float(delta.mean()),
        "mean_abs_action": mean_abs_action,
        "delta_ratio": float(delta.mean()) / mean_abs_action if mean_abs_action > 0 else None,
        "mean_abs_delta_per_action": {n: float(v) for n, v in zip(names, delta.mean(0), strict=True)},
        "task_mae_right": mae_right,
        "task_mae_wrong": mae_wrong,
        "wrong_to_right": mae_wrong / mae_right if mae_right > 0 else None,
    }
