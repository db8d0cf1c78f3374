"""Task data: held-out episodes preprocessed for a checkpoint, with ground-truth actions, for task-level metrics.

`load_task_data` reproduces the training split (seed and fraction from config.json `training` when the checkpoint
was trained here) so validation measures held-out episodes, orders frames by episode then time (an LSTM rollout
carries state within an episode and resets it at the next), and preprocesses with the checkpoint's own
`Preprocessor` (or, for a checkpoint with its own processor.json, that processor). `calibration_frames` draws INT8 calibration inputs from the train split, never from validation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vla_export.data.episodes import list_episodes, load_episode, split_episodes
from vla_export.data.preprocess import Preprocessor
from vla_export.errors import UserError
from vla_export.processors import frame_preprocessor

SPLITS = ("train", "val", "all")


@dataclass
class TaskData:
    feeds: dict[str, np.ndarray]  # model inputs (no recurrent state), frames stacked on axis 0
    actions: np.ndarray  # [N, action_dim] float32 ground truth
    episode: list[str]  # episode name per frame
    t: np.ndarray  # [N] frame index within its episode

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def episode_slices(self) -> list[tuple[str, slice]]:
        """(name, slice) of each episode's contiguous frames, in order: reset LSTM state at each start."""
        out, start = [], 0
        for i in range(1, len(self.episode) + 1):
            if i == len(self.episode) or self.episode[i] != self.episode[start]:
                out.append((self.episode[start], slice(start, i)))
                start = i
        return out

    def batch(self, index: slice | np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.feeds.items()}


def split_settings(config: dict) -> tuple[float, int]:
    """(val_fraction, seed) of the split the checkpoint was trained with (defaults 0.2, 0)."""
    training = config.get("training") or {}
    return float(training.get("val_fraction", 0.2)), int(training.get("split_seed", training.get("seed", 0)) or 0)


def select_episodes(checkpoint_dir: str | os.PathLike, episodes_dir: str | os.PathLike, split: str = "val",
                    max_episodes: int | None = None) -> list[Path]:
    from vla_export.checkpoint import read_config

    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {SPLITS}")
    config = read_config(checkpoint_dir)
    paths = list_episodes(episodes_dir)
    if split != "all":
        val_fraction, seed = split_settings(config)
        train, val = split_episodes(paths, val_fraction, seed) if len(paths) > 1 else (paths, paths)
        paths = val if split == "val" else train
        if not paths:
            raise UserError(f"the {split} split of {episodes_dir} is empty; add episodes or use split='all'")
    return paths[:max_episodes] if max_episodes else paths


def load_task_data(checkpoint_dir: str | os.PathLike, episodes_dir: str | os.PathLike, split: str = "val",
                   max_frames: int | None = None, max_episodes: int | None = None,
                   preprocessor: Preprocessor | None = None) -> TaskData:
    """Preprocessed frames + ground-truth actions of one split, ordered by episode then time."""
    pre = preprocessor or frame_preprocessor(checkpoint_dir)
    action_dim = int(pre.model_config.get("action_dim", 2))
    parts: list[dict[str, np.ndarray]] = []
    actions, names, times = [], [], []
    remaining = max_frames if max_frames else None
    for path in select_episodes(checkpoint_dir, episodes_dir, split, max_episodes):
        ep = load_episode(path)
        if ep.actions.shape[1] < action_dim:
            raise UserError(f"episode {path} has {ep.actions.shape[1]} action columns but the model predicts "
                            f"{action_dim}; these episodes do not match the checkpoint")
        n = len(ep) if remaining is None else min(len(ep), remaining)
        if n <= 0:
            break
        parts.append(pre.preprocess_frames(ep.images[:n], ep.instruction))
        actions.append(ep.actions[:n, :action_dim])
        names += [ep.name] * n
        times.append(np.arange(n, dtype=np.int64))
        if remaining is not None:
            remaining -= n
            if remaining <= 0:
                break
    if not parts:
        raise UserError(f"no frames loaded from {episodes_dir} ({split} split)")
    feeds = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return TaskData(feeds=feeds, actions=np.concatenate(actions).astype(np.float32), episode=names,
                    t=np.concatenate(times))


def calibration_frames(checkpoint_dir: str | os.PathLike, episodes_dir: str | os.PathLike, n: int = 64,
                       seed: int = 0, batch: int = 1) -> list[dict[str, np.ndarray]]:
    """`n` frames (as feed dicts of `batch` frames each) spread over the TRAIN split, for INT8 calibration.

    Recurrent-state inputs (LSTM h/c) are not included; add `spec.initial_state(batch)` or rolled-out states."""
    if n < 1:
        raise UserError(f"need at least one calibration frame, got {n}")
    pre = frame_preprocessor(checkpoint_dir)
    paths = select_episodes(checkpoint_dir, episodes_dir, "train")
    rng = np.random.default_rng(seed)
    episodes = [load_episode(p) for p in paths]
    picks = [(e, int(t)) for e, ep in enumerate(episodes) for t in range(len(ep))]
    order = rng.permutation(len(picks))[: n * batch]
    picks = sorted(picks[i] for i in order)
    out = []
    for i in range(0, len(picks) - batch + 1, batch):
        chunk = picks[i:i + batch]
        images = [episodes[e].images[t] for e, t in chunk]
        out.append(pre(images, [episodes[e].instruction for e, _ in chunk]))
    return out
