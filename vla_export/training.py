"""Training the demo policy on episodes (CPU), and writing native checkpoints (trained, random, or imported).

Every frame goes through `Preprocessor` (built from the very config and tokenizer files the checkpoint will hold),
so the tensors the model is trained on are the tensors deployment produces. The split is by episode
(`split_episodes`), and its seed/fraction are recorded in config.json `training` so validation reuses it.

By default the Kosmos-2 and CLIP towers keep their weights (pretrained, or the config's random init): their outputs
are computed once per frame (`TowerFeatures`) and only the fusion MLP, spatial heads and the temporal and action heads
learn, which is ~9x cheaper a step and, on the demo data, as accurate (FROZEN_TOWERS_RECIPE). `train_towers` trains
every weight.

Loss: Huber on actions standardised by the training set's per-dimension std. Where the model has normalisation
buffers (`action_norm`, the default), the train mean/std go into them and the head predicts standardised actions
(bias zero: the untrained model predicts the mean); the model de-normalises in forward, so its outputs, and every
exported graph's, stay in physical units. Original-layout models get the mean as the head's bias instead.
The LSTM head trains on short windows (truncated BPTT) with zero initial state; validation rolls it over whole
episodes from zero state, as a robot would.

The run length and the learning-rate schedule go by step (`epochs`, default the recipe's), so a seed gives the
same weights on the same machine however busy it is (CPUs with other kernels, e.g. AVX-512 against AVX2, round
differently); `time_budget_s` is only a guard that stops a run on a far slower machine (config.json then records
`stopped_by_time_budget`). Frames are
preprocessed once (`FrameSet.cache_pixels`), left-right mirrored half the time with lateral/yaw actions negated
(`mirror_signs`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_export.checkpoint import load_checkpoint, make_config, save_checkpoint
from vla_export.data.episodes import Episode, list_episodes, load_episode, split_episodes, synth_instructions
from vla_export.data.preprocess import Preprocessor, build_tokenizers, normalise_words
from vla_export.errors import UserError
from vla_export.models import get_architecture

DEFAULT_ARCH = "kosmos2-clip-hybrid"
DEFAULT_VAL_FRACTION = 0.2
# Two recipes (epochs, frames per step), both measured on the demo data (72 episodes, docs/benchmarks.md):
# - frozen towers (the default): the Kosmos-2 and CLIP towers keep their weights (pretrained, or the config's random
#   init), their outputs are computed once per frame (`TowerFeatures`), and only the fusion MLP, spatial heads and the
#   temporal and action heads learn. 18 epochs of 32 frames (1170 steps) took ~40 ms a step + ~35 s of tower features
#   on one core of a 2-core EPYC (Zen 1); every action's val MAE <= 0.5x its baseline for seeds 0, 1 and 2.
# - `train_towers` (CLI --train-towers): every weight learns, 9 epochs of 16 frames (1170 steps). The same goal was
#   met, by a thinner margin, at ~360 ms a step on that EPYC (7 minutes) and ~87 ms on an idle Xeon core.
FROZEN_TOWERS_RECIPE = {"epochs": 18, "batch_size": 32}
TRAIN_TOWERS_RECIPE = {"epochs": 9, "batch_size": 16}  # also what a plug-in without `tower_features` gets
# A guard against a machine far slower or busier than those, not part of the recipe: the schedule goes by step
# (`lr_at`), and the guard only stops a run that passes it. The old 165 s cap stopped the EPYC above at ~400 steps,
# before linear_y had learned, and annealed by wall time, so the default command's result depended on the host.
DEFAULT_TIME_BUDGET_S = 900.0
# 2088 train + 504 val frames of the demo data at 224x224: 1.6 GB
PIXEL_CACHE_MAX_BYTES = 3 * 2**30
BUDGET_TRAIN_SHARE = 0.9
SMALL_MODEL_PARAMS = 20_000_000


@dataclass
class TrainSettings:
    seed: int = 0
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = 0
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S
    epochs: int | None = None  # None: the recipe's (FROZEN_TOWERS_RECIPE or TRAIN_TOWERS_RECIPE)
    batch_size: int | None = None  # None: the recipe's
    # False: the towers stay as they are and only the head learns (FROZEN_TOWERS_RECIPE), where the model can say
    # which modules its towers are (`TOWERS`, `tower_features`, `fuse`); True: every weight learns
    train_towers: bool = False
    lr: float = 1e-3  # seed 0, 780 steps, no mirror: val/baseline 0.445 (1e-3), 0.84 (5e-3); 0.48 (2.5e-3, 633 steps)
    weight_decay: float = 0.01
    window: int = 4  # LSTM truncated-BPTT window (frames)
    sequences: int = 8  # LSTM windows per step (from different places of the data: decorrelated batches)
    max_episodes: int | None = None
    threads: int | None = None  # None: training_threads(model)
    ema_decay: float | None = 0.99  # weight averaging (None: keep the last step's weights)
    warmup_steps: int = 40
    mirror: bool = True  # left-right mirror augmentation where valid (`mirror_signs`)
    val_every: int = 3  # epochs between validation passes recorded in `history` (0: only the final one)
    # The spatial heads (`SpatialPool`) learn where the named cup is from near-uniform attention, whose coordinate
    # gradients are small: they and their skip path to the actions get their own, larger rate. With the skip path at
    # the base rate seed 1's linear_y ended at 0.61 of baseline, with it in this group at 0.49; without the skip path
    # even 10x did not make seed 1's linear_y learn (docs/benchmarks.md, issue 13).
    spatial_lr_scale: float = 3.0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def tokenizer_vocab_sizes(model_config: dict[str, Any]) -> dict[str, int]:
    """The vocab sizes the model's embeddings accept (tokenizers must not exceed them)."""
    kosmos = int(model_config.get("kosmos", {}).get("text_config", {}).get("vocab_size", 65037))
    clip = int(model_config.get("clip", {}).get("text_config", {}).get("vocab_size", 49408))
    return {"kosmos": kosmos, "clip": clip}


def write_tokenizers(out_dir: Path, config: dict[str, Any], texts: list[str]) -> dict[str, Path]:
    """Build the demo tokenizers for `config` into `out_dir`; returns {file name: path} for save_checkpoint."""
    pre = config["preprocessing"]
    names = build_tokenizers(out_dir, texts, tokenizer_vocab_sizes(config["model_config"]),
                             names={"kosmos_tokenizer": pre["kosmos_tokenizer"], "clip_tokenizer": pre["clip_tokenizer"]})
    return {name: out_dir / name for name in names.values()}


def _episode_texts(episodes_dir: str | os.PathLike | None) -> list[str]:
    if episodes_dir is None:
        return synth_instructions()
    import h5py

    texts = []
    for p in list_episodes(episodes_dir):
        try:
            with h5py.File(p, "r") as f:
                texts.append(str(f.attrs.get("instruction", "")))
        except OSError as e:
            raise UserError(f"episode {p} is not a readable HDF5 file ({str(e).splitlines()[0][:120]})") from e
    return [t for t in texts if t] or synth_instructions()


def auto_threads() -> int:
    """Intra-op threads for CPU training: the cores not already busy (at least 1).

    Oversubscribed OpenMP threads spin at barriers: on a 2-core machine with a load of 6, two threads ran a tiny
    training step 12x slower than one thread (1.6 s vs 0.13 s)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(torch.get_num_threads(), int(cores - load + 0.5)))


def training_threads(model) -> int:
    """Threads for training `model`: one for models under SMALL_MODEL_PARAMS, else `auto_threads()`.

    The tiny preset's ops are too small to split: on the 2-core machine one thread took 87 ms per step of 16 frames
    and two threads 97 ms with a passive OpenMP wait policy, 520-2900 ms with the default one while other processes
    kept a core busy. One thread is as fast and cannot collapse when the load rises mid-run."""
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        return 1
    return auto_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# -- data -------------------------------------------------------------------------------------------------------------
class FrameSet:
    """Episodes held as uint8 frames + per-episode token arrays, preprocessed exactly as `Preprocessor.__call__` does.

    `cache_pixels()` preprocesses every frame once (resizing 96->224 each step cost ~15% of a tiny training step);
    without it, batches are preprocessed on the fly."""

    def __init__(self, episodes: list[Episode], pre: Preprocessor, action_dim: int):
        if not episodes:
            raise UserError("no episodes to train or validate on")
        self.episodes = episodes
        self.pre = pre
        self.action_dim = action_dim
        for ep in episodes:
            if len(ep.camera_keys) != 1:  # the hybrid sees one camera: never train on a silently chosen one
                raise UserError(f"episode {ep.name} has cameras {ep.camera_keys}; the built-in hybrid trains on "
                                "episodes with exactly one camera")
            if ep.actions.shape[1] < action_dim:
                raise UserError(f"episode {ep.name} has {ep.actions.shape[1]} action columns but the model predicts "
                                f"{action_dim}; set --set action_dim={ep.actions.shape[1]}")
        self.text = [pre.encode_text([ep.instruction]) for ep in episodes]
        self.index = np.array([(e, t) for e, ep in enumerate(episodes) for t in range(len(ep))], dtype=np.int64)
        self.offsets = np.cumsum([0] + [len(ep) for ep in episodes])[:-1]
        self.actions = np.concatenate([ep.actions[:, :action_dim] for ep in episodes]).astype(np.float32)
        self.pixels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.index)

    def pixel_bytes(self) -> int:
        s = self.pre.image_size
        return len(self) * 3 * s * s * 4

    def cache_pixels(self, max_bytes: int = PIXEL_CACHE_MAX_BYTES) -> bool:
        """Preprocess every frame once if the float32 tensors fit in `max_bytes`; returns whether they are cached."""
        if self.pixels is not None:
            return True
        if self.pixel_bytes() > max_bytes:
            return False
        s = self.pre.image_size
        pixels = torch.empty((len(self), 3, s, s), dtype=torch.float32)  # filled in place: no second copy at peak
        for ep, start in zip(self.episodes, self.offsets, strict=True):
            pixels[start:start + len(ep)] = torch.from_numpy(self.pre.pixel_values(ep.images))
        self.pixels = pixels
        return True

    def feeds(self, pairs: np.ndarray, mirror: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Preprocessed inputs for (episode, t) pairs, exactly as `Preprocessor.__call__` makes them.

        `mirror` (bool per pair): flip those images left-right (augmentation; see `mirror_signs`)."""
        if self.pixels is not None:
            pixels = self.pixels[torch.from_numpy(self.offsets[pairs[:, 0]] + pairs[:, 1])]
        else:
            pixels = torch.from_numpy(self.pre.pixel_values(np.stack([self.episodes[e].images[t] for e, t in pairs])))
        if mirror is not None and mirror.any():
            flip = torch.from_numpy(mirror)
            pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        out = {"pixel_values": pixels}
        for key in self.text[0]:
            out[key] = torch.from_numpy(np.concatenate([self.text[e][key] for e, _ in pairs]))
        return out

    def targets(self, pairs: np.ndarray, mirror: np.ndarray | None = None,
                signs: np.ndarray | None = None) -> torch.Tensor:
        y = np.stack([self.episodes[e].actions[t, :self.action_dim] for e, t in pairs]).astype(np.float32)
        if mirror is not None and signs is not None:
            y = np.where(mirror[:, None], y * signs, y).astype(np.float32)
        return torch.from_numpy(y)


def mirror_signs(action_names: list[str], instructions: list[str]) -> np.ndarray | None:
    """Action signs under a left-right mirror of the camera image, or None where mirroring is not a valid augmentation.

    A mirrored frame is a real-looking frame of the mirrored scene, whose command has lateral and yaw components
    negated (linear_y left, angular_z counter-clockwise). Not valid when an action's mirror image is unknown or the
    instructions name a side (then the text would have to be mirrored too)."""
    signs = {"linear_x": 1.0, "linear_y": -1.0, "angular_z": -1.0}
    if not action_names or any(n not in signs for n in action_names):
        return None
    if any(w in ("left", "right") for text in instructions for w in normalise_words(text)):
        return None
    return np.array([signs[n] for n in action_names], dtype=np.float32)


def _is_lstm(model_config: dict[str, Any]) -> bool:
    return model_config.get("head") == "lstm"


def _sequence_actions(model, fused: torch.Tensor, where: torch.Tensor | None, batch: int,
                      steps: int) -> torch.Tensor:
    """LSTM head over [batch*steps] encoded frames laid out batch-major (b0t0, b0t1, ...): state carried."""
    fused = fused.view(batch, steps, -1)
    where = where.view(batch, steps, -1) if where is not None else None
    h = fused.new_zeros(batch, model.cfg["head_dim"])
    c = fused.new_zeros(batch, model.cfg["head_dim"])
    outs = []
    for t in range(steps):
        h, c = model.temporal(fused[:, t], (h, c))
        outs.append(model.head_actions(h, where[:, t] if where is not None else None))
    return torch.stack(outs, dim=1).reshape(batch * steps, -1)


class TowerFeatures:
    """The frozen towers' outputs (`model.tower_features`) for every frame of a FrameSet, and for its left-right
    mirror when `mirrored`, computed once: a training step then runs only `model.fuse` and the heads.

    On the demo data this replaced ~360 ms of tower forward and backward per step (one EPYC core) with one ~35 s pass,
    and the towers' random features served the heads as well as the trained towers had (docs/benchmarks.md)."""

    def __init__(self, model, data: FrameSet, mirrored: bool = False, batch_size: int = 64, advance=None):
        self.data = data
        self.plain = self._compute(model, data, False, batch_size, advance)
        self.mirror = self._compute(model, data, True, batch_size, advance) if mirrored else None

    @staticmethod
    @torch.no_grad()
    def _compute(model, data: FrameSet, mirror: bool, batch_size: int, advance) -> dict[str, torch.Tensor]:
        parts: list[dict[str, torch.Tensor]] = []
        for i in range(0, len(data), batch_size):
            pairs = data.index[i:i + batch_size]
            flip = np.full(len(pairs), True) if mirror else None
            parts.append(model.tower_features(**data.feeds(pairs, flip)))
            if advance is not None:
                advance(len(pairs))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def batch(self, pairs: np.ndarray, mirror: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """The features of (episode, t) pairs, mirrored where `mirror` says (as `FrameSet.feeds` mirrors images)."""
        rows = torch.from_numpy(self.data.offsets[pairs[:, 0]] + pairs[:, 1])
        out = {k: v[rows] for k, v in self.plain.items()}
        if mirror is not None and mirror.any():
            flip = torch.from_numpy(mirror)
            out = {k: torch.where(flip.view(-1, *[1] * (v.dim() - 1)), self.mirror[k][rows], v)
                   for k, v in out.items()}
        return out


def frozen_towers(model) -> tuple[str, ...]:
    """The tower modules a frozen-tower recipe keeps fixed, or () where the model does not say (plug-ins)."""
    towers = tuple(getattr(model, "TOWERS", ()))
    if not towers or not all(hasattr(model, a) for a in ("tower_features", "fuse", "temporal", "head_actions")):
        return ()
    return towers


def _encoder(model, data: FrameSet, features: TowerFeatures | None):
    """(pairs, mirror) -> (fused, where): through the whole model, or from the frozen towers' cached features."""
    if features is not None:
        return lambda pairs, mirror=None: model.fuse(features.batch(pairs, mirror))
    return lambda pairs, mirror=None: model.encode(**data.feeds(pairs, mirror))


@torch.no_grad()
def predict_frames(model, data: FrameSet, model_config: dict[str, Any], batch_size: int = 64,
                   features: TowerFeatures | None = None) -> np.ndarray:
    """Predictions for every frame of `data` in order; the LSTM rolls over each episode from zero state.
    `features`: the frames' cached tower features (frozen towers), used instead of running the towers again."""
    model.eval()
    encode = _encoder(model, data, features)
    if _is_lstm(model_config):
        preds = []
        for e, ep in enumerate(data.episodes):
            pairs = np.array([(e, t) for t in range(len(ep))], dtype=np.int64)
            encoded = [encode(pairs[i:i + batch_size]) for i in range(0, len(pairs), batch_size)]
            fused = torch.cat([f for f, _ in encoded])
            where = torch.cat([w for _, w in encoded]) if encoded[0][1] is not None else None
            h = fused.new_zeros(1, model.cfg["head_dim"])
            c = fused.new_zeros(1, model.cfg["head_dim"])
            for t in range(len(ep)):
                h, c = model.temporal(fused[t:t + 1], (h, c))
                preds.append(model.head_actions(h, where[t:t + 1] if where is not None else None).numpy())
        return np.concatenate(preds)
    out = []
    for i in range(0, len(data), batch_size):
        pairs = data.index[i:i + batch_size]
        if features is not None:
            fused, where = encode(pairs)
            out.append(model.head_actions(model.temporal(fused), where).numpy())
        else:
            out.append(model(**data.feeds(pairs)).numpy())
    return np.concatenate(out)


def _sample_windows(data: FrameSet, rng: np.random.Generator, count: int, window: int) -> tuple[np.ndarray, int]:
    window = max(1, min(window, min(len(ep) for ep in data.episodes)))
    pairs = []
    for _ in range(count):
        e = int(rng.integers(len(data.episodes)))
        start = int(rng.integers(0, len(data.episodes[e]) - window + 1))
        pairs.extend((e, start + k) for k in range(window))
    return np.array(pairs, dtype=np.int64), window


# -- training ---------------------------------------------------------------------------------------------------------
class WeightAverage:
    """Exponential moving average of the weights: the checkpoint gets the average, which in short noisy runs
    generalises better than the last step's weights. Validation during training uses it too."""

    def __init__(self, model, decay: float, names: set[str] | None = None):
        """`names`: the state entries to average (default every floating one; frozen weights need no average)."""
        self.model = model
        self.decay = decay
        # state_dict() tensors share storage with the weights, so `live` follows the optimizer's in-place steps
        self.live = {k: v for k, v in model.state_dict().items()
                     if v.is_floating_point() and (names is None or k in names)}
        self.shadow = {k: v.detach().clone() for k, v in self.live.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early, when the weights move fast
        for k, v in self.live.items():
            self.shadow[k].lerp_(v, 1.0 - decay)

    @contextlib.contextmanager
    def swapped(self):
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self.shadow}
        self.model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            self.model.load_state_dict(backup, strict=False)

    def copy_to_model(self) -> None:
        self.model.load_state_dict(self.shadow, strict=False)


SPATIAL_PARAMS = ("spatial.", "spatial_skip.")


def _param_groups(model, settings: TrainSettings) -> list[dict[str, Any]]:
    """AdamW groups with an `lr_scale` each: the spatial heads and their skip path at `settings.spatial_lr_scale`,
    the rest at 1."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    spatial = [p for n, p in trainable if n.startswith(SPATIAL_PARAMS)]
    rest = [p for n, p in trainable if not n.startswith(SPATIAL_PARAMS)]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if spatial:
        groups.append({"params": spatial, "lr_scale": settings.spatial_lr_scale})
    return groups


def train_policy(model, config: dict[str, Any], pre: Preprocessor, episodes_dir: str | os.PathLike,
                 settings: TrainSettings) -> dict[str, Any]:
    """Train `model` in place on the train split; returns the metrics recorded in config.json `training`."""

    t_start = time.perf_counter()
    seed_everything(settings.seed)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads or training_threads(model))
    try:
        return _train(model, config, pre, episodes_dir, settings, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _train(model, config: dict[str, Any], pre: Preprocessor, episodes_dir: str | os.PathLike,
           settings: TrainSettings, t_start: float) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    model_config = config["model_config"]
    action_dim = int(model_config.get("action_dim", 2))
    paths = list_episodes(episodes_dir)
    if settings.max_episodes:
        paths = paths[: settings.max_episodes]
    train_paths, val_paths = split_episodes(paths, settings.val_fraction, settings.split_seed)
    if not val_paths:
        raise UserError("the validation split is empty; use --val-fraction > 0 and at least 2 episodes")
    train = FrameSet([load_episode(p) for p in train_paths], pre, action_dim)
    val = FrameSet([load_episode(p) for p in val_paths], pre, action_dim)
    cached = train.cache_pixels() and val.cache_pixels()

    mean = train.actions.mean(0)
    std = np.maximum(train.actions.std(0), 1e-3)
    baseline_mae = float(np.abs(val.actions - mean).mean())
    signs = None
    if settings.mirror:
        names = list(config.get("action_names") or [])[:action_dim]
        signs = mirror_signs(names, [ep.instruction for ep in train.episodes])
    if signs is not None:
        # mirrored frames are half the data: their mean is the mirror of the train mean
        mean = (mean + mean * signs) / 2
    normalized = getattr(model, "action_mean", None) is not None
    with torch.no_grad():
        if normalized:
            # the head predicts standardised actions; the model de-normalises with the train statistics, which
            # travel in its buffers (and so in every exported graph)
            model.set_action_normalization(torch.from_numpy(mean), torch.from_numpy(std))
            model.action_head.bias.zero_()
        else:
            model.action_head.bias.copy_(torch.from_numpy(mean))
        model.action_head.weight.mul_(0.1)
    scale = torch.from_numpy(std)

    towers = () if settings.train_towers else frozen_towers(model)
    recipe = FROZEN_TOWERS_RECIPE if towers else TRAIN_TOWERS_RECIPE
    batch_size = settings.batch_size or recipe["batch_size"]
    lstm = _is_lstm(model_config)
    frames_per_step = settings.sequences * settings.window if lstm else batch_size
    steps_per_epoch = max(1, len(train) // frames_per_step)
    epochs = settings.epochs or recipe["epochs"]
    total_steps = epochs * steps_per_epoch
    budget = settings.time_budget_s
    for name in towers:
        getattr(model, name).requires_grad_(False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(_param_groups(model, settings), lr=settings.lr, weight_decay=settings.weight_decay)
    rng = np.random.default_rng(settings.seed)
    warmup = min(settings.warmup_steps, max(1, total_steps // 5))
    step, epoch, losses = 0, 0, []
    history = []
    val_mae = float("nan")
    # frozen weights need no average (the buffers, set above, do not change either)
    ema = WeightAverage(model, settings.ema_decay, trainable if towers else None) if settings.ema_decay else None
    stopped_by_budget = False

    def lr_at(s: int) -> float:
        # by step only, so a seed gives the same weights however fast or busy the machine is; the wall-time guard can
        # only stop a run early (recorded as stopped_by_time_budget), never reshape its schedule
        if s < warmup:
            return settings.lr * (s + 1) / warmup
        frac = min(1.0, max(0.0, (s - warmup) / max(1, total_steps - warmup)))
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    train_features = val_features = None

    def validate(final: bool = False) -> np.ndarray:
        # the final pass runs the whole model, as every exported graph will; the ones before reuse the cached features
        with ema.swapped() if ema is not None else contextlib.nullcontext():
            return np.abs(predict_frames(model, val, model_config, features=None if final else val_features)
                          - val.actions)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    with Progress(*columns, disable=not settings.progress, transient=False) as progress:
        if towers:
            model.eval()
            frames = len(train) * (2 if signs is not None else 1) + len(val)
            ftask = progress.add_task(f"tower features ({'+'.join(towers)} frozen)", total=frames,
                                      status=f"{frames} frames")
            advance = lambda n: progress.advance(ftask, n)  # noqa: E731
            train_features = TowerFeatures(model, train, mirrored=signs is not None, advance=advance)
            val_features = TowerFeatures(model, val, advance=advance)
            train.pixels = None  # the features stand in for the images from here on (~1.3 GB on the demo data)
        encode = _encoder(model, train, train_features)
        task = progress.add_task("training", total=1.0, status="")
        t_train = time.perf_counter()
        done = False
        val_text = "-"
        while not done:
            model.train()
            for name in towers:
                getattr(model, name).eval()  # not run while frozen; eval mode says they do not learn
            order = rng.permutation(len(train))
            for i in range(steps_per_epoch):
                if lstm:
                    pairs, window = _sample_windows(train, rng, settings.sequences, settings.window)
                    mirror = np.repeat(rng.random(len(pairs) // window) < 0.5, window) if signs is not None else None
                    pred = _sequence_actions(model, *encode(pairs, mirror), len(pairs) // window, window)
                else:
                    pairs = train.index[order[i * frames_per_step:(i + 1) * frames_per_step]]
                    mirror = rng.random(len(pairs)) < 0.5 if signs is not None else None
                    if train_features is not None:
                        fused, where = encode(pairs, mirror)
                        pred = model.head_actions(model.temporal(fused), where)
                    else:
                        pred = model(**train.feeds(pairs, mirror))
                # Huber on standardised actions: MSE-like near the target, so early feature learning gets graded
                # gradients (plain L1 gives sign-only gradients and stalled at the mean in our runs)
                loss = torch.nn.functional.smooth_l1_loss((pred - train.targets(pairs, mirror, signs)) / scale,
                                                          torch.zeros_like(pred), beta=1.0)
                lr_now = lr_at(step)
                for g in opt.param_groups:
                    g["lr"] = lr_now * g["lr_scale"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                if ema is not None:
                    ema.update(step)
                step += 1
                losses.append(float(loss.detach()))
                elapsed = time.perf_counter() - t_train
                frac = max(step / total_steps, elapsed / (budget * BUDGET_TRAIN_SHARE) if budget else 0.0)
                progress.update(task, completed=min(1.0, frac), status=f"epoch {epoch} loss "
                                f"{np.mean(losses[-20:]):.3f} val MAE {val_text}")
                if step >= total_steps:
                    done = True
                    break
                # the cap: keep the rest of the budget for the final validation pass
                if budget and elapsed >= budget * BUDGET_TRAIN_SHARE:
                    done = stopped_by_budget = True
                    break
            epoch += 1
            # a validation pass costs ~1/6 of an epoch: a few for the history, then the final one
            if done or (settings.val_every and epoch % settings.val_every == 0):
                errors = validate(final=done)
                val_mae = float(errors.mean())
                history.append({"epoch": epoch, "step": step,
                                "train_loss": float(np.mean(losses[-steps_per_epoch:])), "val_mae": val_mae,
                                "val_mae_per_action": [round(float(x), 5) for x in errors.mean(0)],
                                "elapsed_s": round(time.perf_counter() - t_train, 2)})
                val_text = f"{val_mae:.4f}"
    if ema is not None:
        ema.copy_to_model()
    for name in towers:
        getattr(model, name).requires_grad_(True)
    model.eval()
    wall = time.perf_counter() - t_start
    per_dim = errors.mean(0)
    return {
        "trained": True,
        "episodes_dir": str(Path(episodes_dir).resolve()),
        "episodes": len(paths),
        "train_episodes": [p.stem for p in train_paths],
        "val_episodes": [p.stem for p in val_paths],
        "train_frames": len(train),
        "val_frames": len(val),
        "split_seed": settings.split_seed,
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
        "val_mae": val_mae,
        "val_mae_per_action": [float(x) for x in per_dim],
        "baseline_mae": baseline_mae,
        "baseline": "predict the mean of the train actions",
        "baseline_mae_per_action": [float(x) for x in np.abs(val.actions - train.actions.mean(0)).mean(0)],
        "mae_ratio_to_baseline": val_mae / baseline_mae if baseline_mae > 0 else None,
        "train_action_mean": [float(x) for x in train.actions.mean(0)],
        "train_action_std": [float(x) for x in std],
        "epochs": epoch,
        "planned_epochs": epochs,
        "steps": step,
        "planned_steps": total_steps,
        "stopped_by_time_budget": stopped_by_budget,
        "batch_size": batch_size,
        "recipe": "frozen towers" if towers else "all weights",
        "frozen": list(towers),
        "window": settings.window if lstm else None,
        "sequences": settings.sequences if lstm else None,
        "lr": settings.lr,
        "spatial_lr_scale": settings.spatial_lr_scale,
        "warmup_steps": warmup,
        "weight_decay": settings.weight_decay,
        "ema_decay": settings.ema_decay,
        "mirror_augmentation": signs is not None,
        "action_normalization": {"mean": [float(x) for x in mean], "std": [float(x) for x in std]}
        if normalized else None,
        "pixel_cache": cached,
        "time_budget_s": budget,
        "wall_s": round(wall, 2),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }


def create_checkpoint(out_dir: str | os.PathLike, *, arch: str = DEFAULT_ARCH, preset: str | None = "tiny",
                      overrides: dict | None = None, episodes_dir: str | os.PathLike | None = None,
                      train: bool = True, settings: TrainSettings | None = None,
                      from_path: str | os.PathLike | None = None, trust: bool = False,
                      rename: dict[str, str] | None = None) -> Path:
    """Write a native checkpoint: trained on `episodes_dir`, random (`train=False`), or imported from `from_path`."""
    settings = settings or TrainSettings()
    if train and from_path is None and episodes_dir is None:
        raise UserError("training needs episodes: pass --train DIR (or --random for an untrained checkpoint)")
    seed_everything(settings.seed)
    imported = None
    if from_path is not None:
        imported = load_checkpoint(from_path, trust=trust, arch=arch, preset=preset, overrides=overrides,
                                   rename=rename)
        if Path(from_path).is_dir():
            config = make_config(imported.config["architecture"], imported.config.get("preset"),
                                 imported.config.get("overrides"), imported.config.get("action_names"),
                                 imported.config.get("action_units"), imported.config.get("preprocessing"),
                                 training=imported.config.get("training"))
        else:
            config = imported.config
            config["training"] = {**config.get("training", {}), "imported_from": str(Path(from_path).resolve()),
                                  "imported_sha256": imported.sha256}
        model = imported.model
    else:
        try:
            config = make_config(arch, preset, overrides)
            model, _ = get_architecture(arch).build(config["model_config"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot build {arch!r} preset {preset!r} with overrides {overrides}: {e}") from e
    out_dir = Path(out_dir)
    tok_dir = Path(tempfile.mkdtemp(prefix=".tokenizers-"))
    try:
        extra = write_tokenizers(tok_dir, config, _episode_texts(episodes_dir))
        if imported is not None and Path(from_path).is_dir():
            # an imported native checkpoint keeps its own tokenizer files
            pre_cfg = config["preprocessing"]
            for key in ("kosmos_tokenizer", "clip_tokenizer"):
                src = Path(from_path) / pre_cfg[key]
                if src.exists():
                    extra[pre_cfg[key]] = src
        if train and from_path is None:
            for name, src in extra.items():
                if src.parent != tok_dir:
                    shutil.copyfile(src, tok_dir / name)
            pre = Preprocessor(config["preprocessing"], config["model_config"], tok_dir,
                               architecture=config["architecture"])
            config["training"] = train_policy(model, config, pre, episodes_dir, settings)
        elif from_path is None:
            config["training"] = {"trained": False, "seed": settings.seed,
                                  "note": "random weights (--random): for pipeline tests, not for accuracy"}
        model.eval()
        save_checkpoint(model, out_dir, config, extra_files={k: str(v) for k, v in extra.items()})
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    return out_dir
