"""LeRobot SmolVLA through vla-export: a real pretrained_model folder (LeRobot's own save_pretrained of a tiny
SmolVLA with random weights and its processors, its VLM a tiny local SmolVLM: tests/lerobot/smolvlm.py) -> checkpoint
--from-lerobot -> export (the flow-matching sampler unrolled, noise as an input; parity gate) -> bundle ->
Policy.act, equal to LeRobot's preprocessor + select_action(noise=...) + postprocessor step for step (task
tokenised with LeRobot's newline step, action queue), the noise Policy draws itself, the bundle running with LeRobot
unimportable, and validate's task MAE on held-out episodes of a LeRobot dataset."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.lerobot.policies import random_observations, save_with_processors

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot", reason="needs LeRobot 0.4: scripts/lerobot_env.sh")
pytest.importorskip("num2words", reason="SmolVLM's processor needs num2words: pip install 'lerobot[smolvla]'")

STATE_DIM, ACTION_DIM, IMAGE = 5, 4, (3, 32, 32)
CHUNK, N_ACTION, FLOW_STEPS, MAX_DIM, N_TOK = 6, 3, 3, 8, 12
CAMS = ("observation.images.top", "observation.images.wrist")
TASKS = ("pick the cube", "stack the cups\n")


def save_pretrained_smolvla(out: Path, vlm: Path, seed: int = 0, **overrides) -> Path:
    """A LeRobot pretrained_model folder written by LeRobot itself: config.json, model.safetensors, processors."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    settings = dict(vlm_model_name=str(vlm), num_vlm_layers=2, chunk_size=CHUNK, n_action_steps=N_ACTION,
                    num_steps=FLOW_STEPS, resize_imgs_with_padding=(IMAGE[2], IMAGE[1]),
                    tokenizer_max_length=N_TOK, pad_language_to="max_length", max_state_dim=MAX_DIM,
                    max_action_dim=MAX_DIM)
    settings.update(overrides)
    cfg = SmolVLAConfig(
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
                        **{k: PolicyFeature(FeatureType.VISUAL, IMAGE) for k in CAMS}},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        device="cpu", push_to_hub=False, **settings)
    torch.manual_seed(seed)
    policy = SmolVLAPolicy(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    # SmolVLA's default normalisation: MEAN_STD for state and action, IDENTITY for cameras
    stats = {"observation.state": {"mean": torch.randn(STATE_DIM, generator=g),
                                   "std": torch.rand(STATE_DIM, generator=g) + 0.5},
             "action": {"mean": torch.randn(ACTION_DIM, generator=g),
                        "std": torch.rand(ACTION_DIM, generator=g) + 0.5}}
    return save_with_processors(policy, cfg, stats, CAMS, g, out)
