"""`vla-export episodes ...` and `vla-export checkpoint`: the data and the policy the pipeline starts from."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vla_export.errors import UserError


@click.group("episodes")
def episodes_group():
    """Create or inspect robot episodes (HDF5: images [T,H,W,3] uint8 or named observation.* datasets, actions
    [T,>=2], instruction; `info` also reads a LeRobot v3 dataset directory).

    \b
    Example:
      vla-export episodes synth -o data/episodes --count 72 --seed 0
      vla-export episodes info data/episodes
    """


@episodes_group.command("synth")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write episode_NNNN.h5 files and a .complete marker into.")
@click.option("--count", default=72, show_default=True, type=int, help="Number of episodes.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same episodes (bit-identical arrays).")
@click.option("--frames", default=None, type=int, help="Frames per episode (default 36).")
@click.option("--image-size", default=None, type=int, help="Stored image side in pixels (default 96).")
def synth_cmd(out_dir, count, seed, frames, image_size):
    """Write synthetic episodes: a mobile robot tracking a cup among obstacles, with its controller's actions.

    \b
    Example:
      vla-export episodes synth -o data/episodes --count 72 --seed 0
    """
    from vla_export.data.episodes import DEFAULT_FRAMES, DEFAULT_IMAGE_SIZE, synth_episodes

    paths = synth_episodes(out_dir, count=count, seed=seed, frames=frames or DEFAULT_FRAMES,
                           image_size=image_size or DEFAULT_IMAGE_SIZE, progress=True)
    click.echo(f"wrote {len(paths)} episodes to {out_dir}")


@episodes_group.command("info")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info_cmd(directory, as_json):
    """Summarise an episode directory: frames, image sizes, instructions, action ranges, the train/val split.

    \b
    Example:
      vla-export episodes info data/episodes
    """
    import numpy as np

    from vla_export.data.episodes import list_episodes, load_episode, split_episodes

    paths = list_episodes(directory)
    eps = [load_episode(p) for p in paths]
    train, val = split_episodes(paths)
    actions = np.concatenate([e.actions for e in eps]).astype(np.float64)
    sizes = sorted({f"{v.shape[1]}x{v.shape[2]}" for e in eps for k, v in e.observations.items()
                    if k in e.camera_keys})
    observations = sorted({k for e in eps for k in e.observations})
    instructions: dict[str, int] = {}
    for e in eps:
        instructions[e.instruction] = instructions.get(e.instruction, 0) + 1
    summary = {
        "directory": str(directory), "episodes": len(eps), "frames": int(sum(len(e) for e in eps)),
        "observations": observations, "image_sizes": sizes, "action_columns": int(actions.shape[1]),
        "action_mean": actions.mean(0).round(4).tolist(), "action_std": actions.std(0).round(4).tolist(),
        "action_min": actions.min(0).round(4).tolist(), "action_max": actions.max(0).round(4).tolist(),
        "instructions": instructions, "split": {"train": len(train), "val": len(val), "val_fraction": 0.2, "seed": 0},
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['episodes']} episodes, {summary['frames']} frames, observations "
               f"{', '.join(observations)}, images {', '.join(sizes)}, {summary['action_columns']} action columns; "
               f"split train {len(train)} / val {len(val)}")
    click.echo("| action | mean | std | min | max |\n|---|---|---|---|---|")
    from vla_export.data.episodes import ACTION_NAMES, SINGLE_CAMERA

    # the mobile robot's names belong to the original layout only; other data's columns are numbered
    original = all(list(e.observations) == [SINGLE_CAMERA] for e in eps)
    for i in range(actions.shape[1]):
        name = ACTION_NAMES[i] if original and i < len(ACTION_NAMES) else f"a{i}"
        click.echo(f"| {name} | {summary['action_mean'][i]} | {summary['action_std'][i]} | "
                   f"{summary['action_min'][i]} | {summary['action_max'][i]} |")
    click.echo("| instruction | episodes |\n|---|---|")
    for text, n in sorted(instructions.items()):
        click.echo(f"| {text} | {n} |")


def _parse_sets(items: tuple[str, ...]) -> dict:
    """`--set a.b=JSON` -> nested override dict (a bare word that is not JSON is taken as a string)."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set head=lstm or --set text_len=24")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {p} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


def _parse_renames(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise UserError(f"--rename {item!r}: expected OLD=NEW prefixes, e.g. --rename module.= ")
        out[old] = new
    return out


@click.command("checkpoint")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint directory to write (config.json, model.safetensors, tokenizer files).")
@click.option("--preset", default=None, help="Model size: tiny | small | full (default tiny; for --from legacy "
              ".pth files say which preset the file was trained with, default full).")
@click.option("--arch", default="kosmos2-clip-hybrid", show_default=True,
              help="Architecture name or package.module:factory plug-in.")
@click.option("--head", type=click.Choice(["mlp", "lstm"]), default=None, help="Temporal head (default mlp).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Model-config override, JSON value, dotted keys for nesting (repeatable).")
@click.option("--train", "train_dir", type=click.Path(), default=None, help="Episode directory to train on.")
@click.option("--episodes", "episodes_dir", type=click.Path(), default=None,
              help="Episodes whose instructions build the tokenizers (with --random or --from).")
@click.option("--random", "random_weights", is_flag=True, help="Write an untrained checkpoint (for pipeline tests).")
@click.option("--from", "from_path", type=click.Path(), default=None,
              help="Import an existing checkpoint (native directory or legacy .pth) into the native format.")
@click.option("--from-lerobot", "from_lerobot", type=click.Path(), default=None,
              help="Import a LeRobot pretrained_model folder (config.json, model.safetensors, policy processor "
              "files); needs pip install 'vla-export[lerobot]'.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow arbitrary pickled objects in a --from .pth file "
              "(runs code from the file: only for files you trust).")
@click.option("--rename", "renames", multiple=True, metavar="OLD=NEW",
              help="Rename state-dict key prefixes of a --from file (repeatable), e.g. module.= .")
@click.option("--kosmos-pretrained", type=click.Path(), default=None, help="Local HF Kosmos-2 directory (offline).")
@click.option("--clip-pretrained", type=click.Path(), default=None, help="Local HF CLIP directory (offline).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the weights and the batches.")
@click.option("--split-seed", default=0, show_default=True, type=int,
              help="Seed of the train/validation split by episode. Separate from --seed, so runs with different seeds "
              "are judged on the same held-out episodes.")
@click.option("--time-budget", default=None, type=float,
              help="Wall-time cap for training in seconds (default 900, a guard for very slow or loaded machines; "
              "ignored with --epochs). The run length itself is a fixed number of epochs, not a time.")
@click.option("--train-towers", is_flag=True,
              help="Train the Kosmos-2 and CLIP towers too (9 epochs of 16 frames, ~9x slower a step). Default: the "
              "towers keep their weights (pretrained or random init) and only the fusion, spatial and action heads "
              "learn, from tower features computed once per frame (18 epochs of 32 frames).")
@click.option("--epochs", default=None, type=int,
              help="Epochs to train (default: the recipe's, 18 or 9 with --train-towers); given explicitly, no time "
              "cap applies.")
@click.option("--lr", default=None, type=float, help="Peak learning rate (default from the training recipe).")
@click.option("--batch-size", default=None, type=int,
              help="Frames per step (default: the recipe's, 32 or 16 with --train-towers).")
@click.option("--val-fraction", default=0.2, show_default=True, type=float,
              help="Fraction of episodes held out for validation (split by episode).")
@click.option("--max-episodes", default=None, type=int, help="Use only the first N episodes (quick runs).")
@click.option("--threads", default=None, type=int,
              help="Torch CPU threads for training (default: the cores not busy with other processes).")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs, CI).")
def checkpoint_cmd(out_dir, preset, arch, head, sets, train_dir, episodes_dir, random_weights, from_path,
                   from_lerobot, trust_checkpoint, renames, kosmos_pretrained, clip_pretrained, seed, split_seed, time_budget,
                   train_towers, epochs, lr, batch_size, val_fraction, max_episodes, threads, no_progress):
    """Create a native policy checkpoint: train on episodes, random weights, or import an existing checkpoint.

    Training runs on the CPU, holds out whole episodes for validation and records the validation action MAE next
    to the predict-the-mean baseline in config.json `training`.

    \b
    Example:
      vla-export checkpoint --preset tiny --train data/episodes -o checkpoints/demo
      vla-export checkpoint --preset tiny --random -o checkpoints/random
      vla-export checkpoint --from old/best_model.pth --preset full -o checkpoints/imported --rename module.=
      vla-export checkpoint --from-lerobot outputs/train/act/checkpoints/last/pretrained_model -o checkpoints/act
    """
    from vla_export.training import DEFAULT_TIME_BUDGET_S, TrainSettings, create_checkpoint

    modes = [m for m, on in (("--train", train_dir), ("--random", random_weights), ("--from", from_path),
                             ("--from-lerobot", from_lerobot)) if on]
    if len(modes) != 1:
        raise UserError("choose exactly one of --train DIR, --random, --from PATH or --from-lerobot DIR"
                        + (f" (got {' and '.join(modes)})" if modes else ""))
    if from_lerobot:
        from vla_export.lerobot.convert import import_lerobot

        import_lerobot(from_lerobot, out_dir)
        click.echo(f"imported LeRobot policy {from_lerobot} -> {out_dir}")
        return
    for name, value in (("--threads", threads), ("--epochs", epochs), ("--batch-size", batch_size),
                        ("--max-episodes", max_episodes)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if time_budget is not None and time_budget <= 0:
        raise UserError(f"--time-budget must be positive seconds, got {time_budget}")
    overrides = _parse_sets(sets)
    if head:
        overrides["head"] = head
    if kosmos_pretrained:
        overrides["kosmos_pretrained"] = str(Path(kosmos_pretrained).resolve())
    if clip_pretrained:
        overrides["clip_pretrained"] = str(Path(clip_pretrained).resolve())
    settings = TrainSettings(seed=seed, split_seed=split_seed, val_fraction=val_fraction,
                             time_budget_s=None if epochs else (time_budget or DEFAULT_TIME_BUDGET_S),
                             epochs=epochs, batch_size=batch_size, train_towers=train_towers,
                             max_episodes=max_episodes, threads=threads, progress=not no_progress)
    if lr:
        settings.lr = lr
    if from_path:
        is_native = Path(from_path).is_dir()
        create_checkpoint(out_dir, arch=arch, preset=preset if (preset or is_native) else None,
                          overrides=overrides or None, episodes_dir=episodes_dir, train=False, settings=settings,
                          from_path=from_path, trust=trust_checkpoint, rename=_parse_renames(renames) or None)
        click.echo(f"imported {from_path} -> {out_dir}")
        return
    if train_dir:
        create_checkpoint(out_dir, arch=arch, preset=preset or "tiny", overrides=overrides, episodes_dir=train_dir,
                          train=True, settings=settings)
        config = json.loads((Path(out_dir) / "config.json").read_text())
        tr = config["training"]
        names = config.get("action_names") or []  # may name more actions than the model predicts
        per_action = ", ".join(f"{name} {v:.4f}/{b:.4f}" for name, v, b in zip(
            names, tr["val_mae_per_action"], tr["baseline_mae_per_action"], strict=False))
        click.echo(f"wrote {out_dir}: val MAE {tr['val_mae']:.4f} vs predict-the-mean baseline "
                   f"{tr['baseline_mae']:.4f} (ratio {tr['mae_ratio_to_baseline']:.2f}) on {tr['val_frames']} "
                   f"frames of {len(tr['val_episodes'])} held-out episodes (per action, val/baseline: {per_action}); "
                   f"{tr['steps']} steps in {tr['wall_s']} s")
        return
    create_checkpoint(out_dir, arch=arch, preset=preset or "tiny", overrides=overrides, episodes_dir=episodes_dir,
                      train=False, settings=settings)
    click.echo(f"wrote untrained checkpoint {out_dir}")


COMMANDS = [episodes_group, checkpoint_cmd]
