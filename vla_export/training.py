"""Training the demo policy on episodes (CPU), and writing native checkpoints (trained, random, or imported).

Every frame goes through `Preprocessor` (built from the very config and tokenizer files the checkpoint will hold),
so the tensors the model is trained on are the tensors deployment produces. The split is by episode
(`split_episodes`), and its seed/fraction are recorded in config.json `training` so validation reuses it.

Loss: Huber on actions standardised by the training set's per-dimension std, with the action head's bias set to the
training mean so the untrained model already predicts the mean and the model outputs stay in physical units.
The LSTM head trains on short windows (truncated BPTT) with zero initial state; validation rolls it over whole
episodes from zero state, as a robot would.
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
from vla_export.data.preprocess import Preprocessor, build_tokenizers
from vla_export.errors import UserError
from vla_export.models import get_architecture

DEFAULT_ARCH = "kosmos2-clip-hybrid"
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TIME_BUDGET_S = 120.0


@dataclass
class TrainSettings:
    seed: int = 0
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = 0
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S
    epochs: int | None = None
    batch_size: int = 16
    lr: float = 2.5e-3
    weight_decay: float = 0.01
    window: int = 4  # LSTM truncated-BPTT window (frames)
    sequences: int = 8  # LSTM windows per step (from different places of the data: decorrelated batches)
    max_episodes: int | None = None
    threads: int | None = None  # None: auto_threads()
    ema_decay: float | None = 0.99  # weight averaging (None: keep the last step's weights)
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# -- data -------------------------------------------------------------------------------------------------------------
class FrameSet:
    """Episodes held as uint8 frames + per-episode token arrays; batches are preprocessed on the fly."""

    def __init__(self, episodes: list[Episode], pre: Preprocessor, action_dim: int):
        if not episodes:
            raise UserError("no episodes to train or validate on")
        self.episodes = episodes
        self.pre = pre
        self.action_dim = action_dim
        for ep in episodes:
            if ep.actions.shape[1] < action_dim:
                raise UserError(f"episode {ep.name} has {ep.actions.shape[1]} action columns but the model predicts "
                                f"{action_dim}; set --set action_dim={ep.actions.shape[1]}")
        self.text = [pre.encode_text([ep.instruction]) for ep in episodes]
        self.index = np.array([(e, t) for e, ep in enumerate(episodes) for t in range(len(ep))], dtype=np.int64)
        self.actions = np.concatenate([ep.actions[:, :action_dim] for ep in episodes]).astype(np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def feeds(self, pairs: np.ndarray) -> dict[str, torch.Tensor]:
        """Preprocessed inputs for (episode, t) pairs, exactly as `Preprocessor.__call__` makes them."""
        images = np.stack([self.episodes[e].images[t] for e, t in pairs])
        out = {"pixel_values": self.pre.pixel_values(images)}
        for key in self.text[0]:
            out[key] = np.concatenate([self.text[e][key] for e, _ in pairs])
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def targets(self, pairs: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.episodes[e].actions[t, :self.action_dim] for e, t in pairs]))


def _is_lstm(model_config: dict[str, Any]) -> bool:
    return model_config.get("head") == "lstm"


def _sequence_actions(model, feeds: dict[str, torch.Tensor], batch: int, steps: int) -> torch.Tensor:
    """LSTM head over [batch*steps] frames laid out batch-major (b0t0, b0t1, ...): features batched, state carried."""
    fused = model.features(**feeds).view(batch, steps, -1)
    h = fused.new_zeros(batch, model.cfg["head_dim"])
    c = fused.new_zeros(batch, model.cfg["head_dim"])
    outs = []
    for t in range(steps):
        h, c = model.temporal(fused[:, t], (h, c))
        outs.append(model.action_head(h))
    return torch.stack(outs, dim=1).reshape(batch * steps, -1)


@torch.no_grad()
def predict_frames(model, data: FrameSet, model_config: dict[str, Any], batch_size: int = 64) -> np.ndarray:
    """Predictions for every frame of `data` in order; the LSTM rolls over each episode from zero state."""
    model.eval()
    if _is_lstm(model_config):
        preds = []
        for e, ep in enumerate(data.episodes):
            pairs = np.array([(e, t) for t in range(len(ep))], dtype=np.int64)
            fused = torch.cat([model.features(**data.feeds(pairs[i:i + batch_size]))
                               for i in range(0, len(pairs), batch_size)])
            h = fused.new_zeros(1, model.cfg["head_dim"])
            c = fused.new_zeros(1, model.cfg["head_dim"])
            for t in range(len(ep)):
                h, c = model.temporal(fused[t:t + 1], (h, c))
                preds.append(model.action_head(h).numpy())
        return np.concatenate(preds)
    out = []
    for i in range(0, len(data), batch_size):
        out.append(model(**data.feeds(data.index[i:i + batch_size])).numpy())
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

    def __init__(self, model, decay: float):
        self.model = model
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early, when the weights move fast
        for k, v in self.model.state_dict().items():
            if k in self.shadow:
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


def train_policy(model, config: dict[str, Any], pre: Preprocessor, episodes_dir: str | os.PathLike,
                 settings: TrainSettings) -> dict[str, Any]:
    """Train `model` in place on the train split; returns the metrics recorded in config.json `training`."""

    t_start = time.perf_counter()
    seed_everything(settings.seed)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads or auto_threads())
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

    mean = train.actions.mean(0)
    std = np.maximum(train.actions.std(0), 1e-3)
    baseline_mae = float(np.abs(val.actions - mean).mean())
    with torch.no_grad():
        model.action_head.bias.copy_(torch.from_numpy(mean))
        model.action_head.weight.mul_(0.1)
    scale = torch.from_numpy(std)

    lstm = _is_lstm(model_config)
    frames_per_step = settings.sequences * settings.window if lstm else settings.batch_size
    steps_per_epoch = max(1, len(train) // frames_per_step)
    total_steps = settings.epochs * steps_per_epoch if settings.epochs else None
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    rng = np.random.default_rng(settings.seed)
    warmup = 40
    step, epoch, losses = 0, 0, []
    history = []
    val_mae = float("nan")
    ema = WeightAverage(model, settings.ema_decay) if settings.ema_decay else None
    t_train = time.perf_counter()
    budget = settings.time_budget_s if not settings.epochs else None

    def lr_at(s: int, elapsed: float) -> float:
        # warm-up, then cosine to 5%: over steps with --epochs, over the wall-time budget otherwise (so a machine
        # that slows down mid-run still anneals; the step count, not the seed, is what varies with load then)
        if s < warmup:
            return settings.lr * (s + 1) / warmup
        if budget:
            frac = min(1.0, elapsed / (budget * 0.9))
        else:
            frac = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    columns = [TextColumn("[bold]training"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("epoch {task.fields[epoch]} loss {task.fields[loss]:.3f} val MAE {task.fields[val]}"),
               TimeElapsedColumn()]
    with Progress(*columns, disable=not settings.progress, transient=False) as progress:
        task = progress.add_task("train", total=(budget * 0.9) if budget else total_steps, epoch=0, loss=float("nan"), val="-")
        done = False
        while not done:
            model.train()
            order = rng.permutation(len(train))
            for i in range(steps_per_epoch):
                if lstm:
                    pairs, window = _sample_windows(train, rng, settings.sequences, settings.window)
                    pred = _sequence_actions(model, train.feeds(pairs), len(pairs) // window, window)
                else:
                    pairs = train.index[order[i * frames_per_step:(i + 1) * frames_per_step]]
                    pred = model(**train.feeds(pairs))
                # Huber on standardised actions: MSE-like near the target, so early feature learning gets graded
                # gradients (plain L1 gives sign-only gradients and stalled at the mean in our runs)
                loss = torch.nn.functional.smooth_l1_loss((pred - train.targets(pairs)) / scale,
                                                          torch.zeros_like(pred), beta=1.0)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, time.perf_counter() - t_train)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if ema is not None:
                    ema.update(step)
                step += 1
                losses.append(float(loss.detach()))
                elapsed = time.perf_counter() - t_train
                progress.update(task, completed=elapsed if budget else step, loss=float(np.mean(losses[-20:])),
                                epoch=epoch)
                # stop at 90% of the budget: the validation pass takes the rest
                if (budget and elapsed >= budget * 0.9) or (total_steps and step >= total_steps):
                    done = True
                    break
            epoch += 1
            elapsed = time.perf_counter() - t_train
            # a validation pass costs ~1/5 of an epoch: skip it late in a time budget, the final one follows
            if not done and budget and elapsed > 0.6 * budget:
                continue
            with ema.swapped() if ema is not None else contextlib.nullcontext():
                errors = np.abs(predict_frames(model, val, model_config) - val.actions)
            val_mae = float(errors.mean())
            history.append({"epoch": epoch, "step": step, "train_loss": float(np.mean(losses[-steps_per_epoch:])),
                            "val_mae": val_mae, "elapsed_s": round(time.perf_counter() - t_train, 2)})
            progress.update(task, val=f"{val_mae:.4f}", epoch=epoch)
    if ema is not None:
        ema.copy_to_model()
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
        "mae_ratio_to_baseline": val_mae / baseline_mae if baseline_mae > 0 else None,
        "train_action_mean": [float(x) for x in mean],
        "train_action_std": [float(x) for x in std],
        "epochs": epoch,
        "steps": step,
        "batch_size": settings.batch_size,
        "window": settings.window if lstm else None,
        "sequences": settings.sequences if lstm else None,
        "lr": settings.lr,
        "ema_decay": settings.ema_decay,
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
