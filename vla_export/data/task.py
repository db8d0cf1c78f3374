"""Task data: held-out episodes turned into a checkpoint's feeds, with ground-truth actions, for task-level metrics.

`load_task_data` reproduces the training split (seed and fraction from config.json `training` when the checkpoint
was trained here) so validation measures held-out episodes, orders frames by episode then time (an LSTM rollout
carries state within an episode and resets it at the next), and turns frames into feeds with the checkpoint's own
`EpisodeFeeder`: the built-in hybrid's `Preprocessor` (one camera + instruction), or for a checkpoint with a
processor.json its preprocessor steps on the episode's named observations (cameras, `observation.state`, task text).
`calibration_frames` draws INT8 calibration inputs from the train split, never from validation.

Outputs -> actions (`TaskData.predicted_actions`): the hybrid's `actions` are in action units already (its first
`action_dim` columns are compared). A processor checkpoint's outputs go through its postprocessor, reset before each
batch, so every frame gives the action `Policy.act` executes on a step where the model runs on that frame's
observation: for an action chunk [B, chunk, D] (ACT) that is the chunk's FIRST action, unnormalised, compared with the
action recorded at that frame. The rest of a chunk is executed on later steps from an older observation (or, with
temporal ensembling, averaged with older chunks); judging it would make a frame's score depend on the frames before it
and on the queue length, so the task MAE is the per-frame, history-free one (what LeRobot's chunk loss is at offset 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_export.data.episodes import Episode, list_episodes, load_episode, split_episodes
from vla_export.errors import UserError

SPLITS = ("train", "val", "all")


@dataclass
class TaskData:
    feeds: dict[str, np.ndarray]  # model inputs (no recurrent state), frames stacked on axis 0
    actions: np.ndarray  # [N, action_dim] float32 ground truth
    episode: list[str]  # episode name per frame
    t: np.ndarray  # [N] frame index within its episode
    # model outputs of a batch of frames -> [B, action_dim] actions, comparable with `actions` (module docstring)
    to_actions: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None

    def predicted_actions(self, outputs: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
        """[N, action_dim] actions from the model's outputs for every frame (in frames' order)."""
        if self.to_actions is None:
            return np.asarray(outputs["actions"])[:, : self.actions.shape[1]]
        n = len(next(iter(outputs.values())))
        return np.concatenate([self.to_actions({k: v[i:i + batch] for k, v in outputs.items()})
                               for i in range(0, n, batch)])

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
                    max_episodes: int | None = None) -> list:
    """The episodes of one split (file paths, or a LeRobot dataset's `LeRobotEpisode`s; `load_episode` reads both)."""
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


class EpisodeFeeder:
    """A checkpoint's view of episodes: frames -> the IO spec's feeds, model outputs -> actions (module docstring).

    The built-in hybrid (no processor.json) keeps its `Preprocessor` (one camera + instruction; unchanged numbers).
    A processor checkpoint gets each observation key it declares from the episode by name; a one-camera processor
    also takes a one-camera episode whatever the camera is called (an HDF5 file of the original layout)."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        from vla_export.checkpoint import read_config
        from vla_export.processors import Processor, has_processor

        self.processor = None
        self.preprocessor = None
        if has_processor(checkpoint_dir):
            self.processor = Processor.load(checkpoint_dir)
            model_config = read_config(checkpoint_dir).get("model_config") or {}
            self.action_dim = int(self.processor.action_dim or model_config.get("action_dim", 2))
        else:
            from vla_export.data.preprocess import Preprocessor

            self.preprocessor = Preprocessor.from_checkpoint(checkpoint_dir)
            self.action_dim = int(self.preprocessor.model_config.get("action_dim", 2))

    def observation(self, episode: Episode, index) -> dict[str, Any]:
        """The processor's observation (batched) of the frames `index` selects."""
        proc = self.processor
        obs: dict[str, Any] = {}
        cams = proc.image_keys
        if all(k in episode.observations for k in cams):
            obs |= {k: episode.observations[k][index] for k in cams}
        elif len(cams) == 1 and len(episode.camera_keys) == 1:
            obs[cams[0]] = episode.observations[episode.camera_keys[0]][index]
        else:
            raise UserError(f"episode {episode.name} has cameras {episode.camera_keys} but this checkpoint's "
                            f"processor observes {cams}; use episodes recorded with those cameras")
        for key in proc.keys_of("state"):
            if key not in episode.observations:
                raise UserError(f"episode {episode.name} has no {key} (it has {sorted(episode.observations)}); this "
                                "checkpoint's processor observes it")
            value = episode.observations[key][index]
            want = (proc.observation[key].get("shape") or [None])[-1]
            if want is not None and value.shape[-1] != int(want):
                raise UserError(f"episode {episode.name}: {key} has {value.shape[-1]} values per frame, the "
                                f"checkpoint's processor expects {want}")
            obs[key] = value
        if proc.text_key is not None:
            obs[proc.text_key] = episode.tasks(index)
        return obs

    def feeds(self, episode: Episode, index, noise_rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Model feeds of the frames `index` (a slice or frame indices) of `episode`. `noise_rng`: every `noise`
        step draws its frames' noise from it instead of its own reset generator (see `calibration_frames`)."""
        if self.processor is None:
            if len(episode.camera_keys) != 1:
                raise UserError(f"episode {episode.name} has cameras {episode.camera_keys}; the built-in hybrid sees "
                                "exactly one camera (and the instruction)")
            texts = episode.tasks(index)
            # one shared instruction is tokenised once (the common case: an episode has one task)
            return self.preprocessor(episode.images[index], texts[0] if len(set(texts)) == 1 else texts)
        proc = self.processor
        frames = np.arange(len(episode))[index]
        n = proc.history()
        # Each frame is its own sample (a batch row), with the history it has when the policy runs through the
        # episode from its start: frames t-n+1 .. t of its episode, the first frame repeated before the start (what
        # LeRobot's queues hold on the robot and what its dataset gives with delta_timestamps, which pads with the
        # episode's first frame). The older frames only reach the history (`observe`, as on a step answered from
        # the action queue), so the steps after it (a diffusion policy's noise) run once, on the last call: a
        # sample's noise is the processor's first draw after reset, [len(frames), ...] for the frames asked for.
        proc.reset()
        try:
            for back in range(n - 1, 0, -1):
                proc.observe(self.observation(episode, np.maximum(frames - back, 0)))
            if noise_rng is not None:
                from vla_export.processors.steps import NoiseStep

                for step in proc.preprocessor:
                    if isinstance(step, NoiseStep):  # the step's own distribution, standard normal
                        step.give(noise_rng.standard_normal((len(frames), *step.cfg["shape"]), dtype=np.float32))
            return proc.preprocess(self.observation(episode, frames))
        finally:
            proc.reset()

    def recorded_actions(self, episode: Episode, index) -> np.ndarray:
        if episode.actions.shape[1] < self.action_dim:
            raise UserError(f"episode {episode.name} has {episode.actions.shape[1]} action columns but the model "
                            f"predicts {self.action_dim}; these episodes do not match the checkpoint")
        return episode.actions[index, : self.action_dim]

    def to_actions(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """A batch of model outputs -> [B, action_dim] through the postprocessor, fresh (reset) for the batch."""
        self.processor.reset()
        try:
            return self.processor.postprocess(outputs)
        finally:
            self.processor.reset()


def load_task_data(checkpoint_dir: str | os.PathLike, episodes_dir: str | os.PathLike, split: str = "val",
                   max_frames: int | None = None, max_episodes: int | None = None,
                   feeder: EpisodeFeeder | None = None) -> TaskData:
    """Feeds + ground-truth actions of one split, ordered by episode then time."""
    feeder = feeder or EpisodeFeeder(checkpoint_dir)
    parts: list[dict[str, np.ndarray]] = []
    actions, names, times = [], [], []
    remaining = max_frames if max_frames else None
    for path in select_episodes(checkpoint_dir, episodes_dir, split, max_episodes):
        ep = load_episode(path)
        n = len(ep) if remaining is None else min(len(ep), remaining)
        if n <= 0:
            break
        parts.append(feeder.feeds(ep, slice(0, n)))
        actions.append(feeder.recorded_actions(ep, slice(0, n)))
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
                    t=np.concatenate(times), to_actions=feeder.to_actions if feeder.processor is not None else None)


def calibration_frames(checkpoint_dir: str | os.PathLike, episodes_dir: str | os.PathLike, n: int = 64,
                       seed: int = 0, batch: int = 1) -> list[dict[str, np.ndarray]]:
    """`n` frames (as feed dicts of `batch` frames each) spread over the TRAIN split, for INT8 calibration.

    A sampler's noise input (a processor `noise` step) gets a fresh standard-normal draw for every frame, seeded by
    `seed`: `feeds` resets the processor per frame, so its own generator would give every frame the same first draw,
    and the calibrated range of the noise and of every flow/denoising step after it would be that one vector's. On
    the whole-chain pipeline's SmolVLA (8 frames) that one draw spanned [-1.53, 1.73], the noise's input quantizer
    clipped at 1.73, 9.9% of the parity gate's standard-normal noise lay beyond it and static INT8 missed its parity
    MAE budget (0.076 > 0.05); a draw per frame gave 0.016 (docs/lerobot.md).

    Recurrent-state inputs (LSTM h/c) are not included; add `spec.initial_state(batch)` or rolled-out states."""
    if n < 1:
        raise UserError(f"need at least one calibration frame, got {n}")
    feeder = EpisodeFeeder(checkpoint_dir)
    paths = select_episodes(checkpoint_dir, episodes_dir, "train")
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng([seed, 1])  # its own stream: the frames picked do not depend on the noise
    episodes = [load_episode(p) for p in paths]
    picks = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep))]
    order = rng.permutation(len(picks))[: n * batch]
    picks = sorted(picks[i] for i in order)
    out = []
    for i in range(0, len(picks) - batch + 1, batch):
        chunk = picks[i:i + batch]
        parts = [feeder.feeds(episodes[e], [t], noise_rng=noise_rng) for e, t in chunk]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out
