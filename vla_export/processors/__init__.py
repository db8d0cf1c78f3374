"""Processors: an architecture's pre/post-processing as named steps stored as data (see `core`).

`Processor.load(dir)` / `processor.save(dir)`; `register_step(name)` for a step written in Python;
`processor_for_checkpoint(dir)` gives the processor a checkpoint or bundle declares: its `processor.json`, or for
the built-in hybrid (whose checkpoints predate processors) the equivalent steps built from `config.json`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vla_export.processors import steps  # noqa: F401  (registers the built-in steps)
from vla_export.processors.core import (
    PROCESSOR_FILE,
    STATE_FILE,
    Processor,
    ProcessorStep,
    has_processor,
    processor_files,
    register_step,
    registered_steps,
)
from vla_export.processors.steps import (
    ActionChunkStep,
    ImageStep,
    Kosmos2ClipTextStep,
    NormalizeStep,
    RenameStep,
    StackStep,
    TokenizeStep,
    UnnormalizeStep,
)

HYBRID_IMAGE_KEY = "observation.image"
TEXT_KEY = "task"
HYBRID_TEXT_FEEDS = ("input_ids", "attention_mask", "image_embeds_position_mask", "clip_input_ids",
                     "clip_attention_mask")

__all__ = [
    "PROCESSOR_FILE", "STATE_FILE", "Processor", "ProcessorStep", "has_processor", "processor_files", "register_step",
    "registered_steps", "ActionChunkStep", "ImageStep", "Kosmos2ClipTextStep", "NormalizeStep", "RenameStep",
    "StackStep", "TokenizeStep", "UnnormalizeStep", "hybrid_processor", "processor_for_checkpoint",
]


def hybrid_processor(config: dict[str, Any], base_dir: str | os.PathLike | None = None) -> Processor:
    """The built-in Kosmos-2 + CLIP hybrid's preprocessing as a processor: the same feeds `Preprocessor` makes (a
    test holds them equal), from the checkpoint config's `preprocessing` and `model_config`."""
    from vla_export.checkpoint import DEFAULT_PREPROCESSING

    pre = {**DEFAULT_PREPROCESSING, **(config.get("preprocessing") or {})}
    mc = config.get("model_config") or {}
    size = int(pre["image_size"])
    return Processor(
        {HYBRID_IMAGE_KEY: {"type": "image"}, TEXT_KEY: {"type": "text"}},
        [ImageStep([HYBRID_IMAGE_KEY], size=[size, size], mean=list(pre["image_mean"]), std=list(pre["image_std"])),
         Kosmos2ClipTextStep(TEXT_KEY, pre["kosmos_tokenizer"], pre["clip_tokenizer"],
                             latent_query_num=int((mc.get("kosmos") or {}).get("latent_query_num", 64)),
                             text_len=int(mc.get("text_len", 16)), clip_text_len=int(mc.get("clip_text_len", 16))),
         RenameStep({HYBRID_IMAGE_KEY: "pixel_values", **{k: k for k in HYBRID_TEXT_FEEDS}})],
        [], action_dim=int(mc.get("action_dim", 2)), base_dir=base_dir)


def processor_for_checkpoint(directory: str | os.PathLike, config: dict[str, Any] | None = None) -> Processor | None:
    """The processor of a checkpoint or bundle directory: its processor.json; else, for the built-in hybrid, the
    steps its config.json implies; else None (a plug-in that declares no processor)."""
    directory = Path(directory)
    if has_processor(directory):
        return Processor.load(directory)
    if config is None:
        from vla_export.checkpoint import read_config

        config = read_config(directory)
    from vla_export.models.kosmos2_clip import ARCH_NAME

    if config.get("architecture", ARCH_NAME) == ARCH_NAME:
        return hybrid_processor(config, directory)
    return None

