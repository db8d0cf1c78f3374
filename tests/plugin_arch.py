"""User architectures plugged in with `--arch tests.plugin_arch:<factory>`: a module plus its IO spec (`build`), and
with their own processor (`build_vision_text`: camera + instruction; `build_arm`: two cameras + joint state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from vla_export.io_spec import Dim, IOSpec, TensorSpec


class TinyMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def build(cfg):
    width = int(cfg.get("width", 4))
    spec = IOSpec(
        inputs=[TensorSpec("x", "float32", ("batch", width))],
        outputs=[TensorSpec("actions", "float32", ("batch", 2))],
        dims={"batch": Dim("batch", 1, 1, 8)},
    )
    return TinyMLP(width).eval(), spec


# -- a plug-in with its own processor (issue 12): 96x96 camera + instruction, its own tokenizer and action stats ----
TOKENIZER_DIR = Path(__file__).parent / "data"  # plugin_tokenizer.json: a word-level tokenizer of the plug-in's own
IMAGE_SIZE, TEXT_LEN, VOCAB = 96, 12, 64
ACTION_MEAN, ACTION_STD = [0.1, -0.05], [0.3, 0.2]


class VisionTextPolicy(nn.Module):
    """A conv image encoder (96x96) + a token-embedding text encoder -> fused MLP -> 2 normalised actions."""

    def __init__(self, width: int):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, width, 5, stride=4), nn.ReLU(), nn.Conv2d(width, width, 3, stride=2),
                                   nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Embedding(VOCAB, width)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, 2))

    def forward(self, pixels, token_ids, token_mask):
        mask = token_mask.to(pixels.dtype).unsqueeze(-1)
        text = (self.embed(token_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(torch.cat([self.image(pixels), text], dim=-1))


def vision_text_processor():
    from vla_export.processors import ImageStep, Processor, RenameStep, TokenizeStep, UnnormalizeStep

    return Processor(
        {"observation.image": {"type": "image"}, "task": {"type": "text"}},
        [ImageStep(["observation.image"], size=[IMAGE_SIZE, IMAGE_SIZE], mean=[0.485, 0.456, 0.406],
                   std=[0.229, 0.224, 0.225]),
         TokenizeStep("task", "plugin_tokenizer.json", max_length=TEXT_LEN, ids="token_ids", mask="token_mask"),
         RenameStep({"observation.image": "pixels", "token_ids": "token_ids", "token_mask": "token_mask"})],
        [UnnormalizeStep.with_stats({"action": "mean_std"}, {"action": {"mean": ACTION_MEAN, "std": ACTION_STD}})],
        action_dim=2, base_dir=TOKENIZER_DIR)


def build_vision_text(cfg):
    width = int(cfg.get("width", 8))
    spec = IOSpec(
        inputs=[TensorSpec("pixels", "float32", ("batch", 3, IMAGE_SIZE, IMAGE_SIZE)),
                TensorSpec("token_ids", "int64", ("batch", TEXT_LEN)),
                TensorSpec("token_mask", "int64", ("batch", TEXT_LEN))],
        outputs=[TensorSpec("actions", "float32", ("batch", 2), "normalised; the processor unnormalises")],
        dims={"batch": Dim("batch", 1, 1, 8)},
    )
    return VisionTextPolicy(width).eval(), spec, vision_text_processor()


# -- a joint-space plug-in (`--arch tests.plugin_arch:build_arm`): two cameras + joint state -> 6 joint targets, an arm
# as LeRobot's ACT drives one; its processor declares a joint output (the ROS 2 node's arm tests run it) -------------
ARM_JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
ARM_CAMERAS = ("observation.images.top", "observation.images.wrist")
ARM_IMAGE = 32  # the model's input size; cameras publish other sizes and the processor resizes


def arm_processor():
    """LeRobot's layout: `observation.images.<cam>` per camera, `observation.state` (named joints), min-max state,
    mean-std actions; its output block says the actions are joint targets published as Float64MultiArray."""
    from vla_export.processors import ImageStep, NormalizeStep, Processor, RenameStep, UnnormalizeStep
    from vla_export.processors.core import FLOAT64_ARRAY_MSG

    stats = {"observation.state": {"min": np.full(6, -2.0), "max": np.full(6, 2.0)},
             "action": {"mean": np.linspace(-0.5, 0.5, 6), "std": np.full(6, 0.3)}}
    return Processor(
        {**{cam: {"type": "image", "shape": [3, 48, 64]} for cam in ARM_CAMERAS},
         "observation.state": {"type": "state", "shape": [6], "names": ARM_JOINTS}},
        [ImageStep(list(ARM_CAMERAS), size=[ARM_IMAGE, ARM_IMAGE]),
         NormalizeStep.with_stats({"observation.state": "min_max"}, stats),
         RenameStep({"observation.images.top": "top", "observation.images.wrist": "wrist",
                     "observation.state": "state"})],
        [UnnormalizeStep.with_stats({"action": "mean_std"}, stats)],
        action_dim=6, output={"kind": "joint", "msg_type": FLOAT64_ARRAY_MSG, "joint_names": ARM_JOINTS})


def build_arm(cfg):
    """Plug-in factory (`--arch tests.plugin_arch:build_arm`): a conv encoder per camera + the state -> MLP."""
    width = int(cfg.get("width", 8))

    class ArmPolicy(nn.Module):
        def __init__(self):
            super().__init__()
            self.top = nn.Sequential(nn.Conv2d(3, width, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten())
            self.wrist = nn.Sequential(nn.Conv2d(3, width, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten())
            self.head = nn.Sequential(nn.Linear(2 * width + 6, 16), nn.Tanh(), nn.Linear(16, 6))

        def forward(self, top, wrist, state):
            return self.head(torch.cat([self.top(top), self.wrist(wrist), state], dim=-1))

    spec = IOSpec(
        inputs=[TensorSpec("top", "float32", ("batch", 3, ARM_IMAGE, ARM_IMAGE)),
                TensorSpec("wrist", "float32", ("batch", 3, ARM_IMAGE, ARM_IMAGE)),
                TensorSpec("state", "float32", ("batch", 6), "min-max normalised joint positions")],
        outputs=[TensorSpec("actions", "float32", ("batch", 6), "normalised; the processor unnormalises")],
        dims={"batch": Dim("batch", 1, 1, 4)},
    )
    return ArmPolicy().eval(), spec, arm_processor()


# -- a plug-in shaped like LeRobot's ACT (issue 12): two cameras + state -> a normalised action chunk ---------------
CHUNK_CAMS = ("observation.images.top", "observation.images.wrist")
CHUNK_STATE_DIM, CHUNK_ACTION_DIM, CHUNK_LEN, CHUNK_IMAGE = 3, 4, 3, 32
# far from (0, 1), so a task MAE that skipped the postprocessor's unnormalise would be far off
CHUNK_ACTION_MEAN, CHUNK_ACTION_STD = [5.0, -3.0, 1.0, 0.5], [2.0, 0.5, 1.5, 0.1]
CHUNK_STATE_MEAN, CHUNK_STATE_STD = [0.2, -0.1, 0.0], [1.5, 0.5, 2.0]


class ChunkPolicy(nn.Module):
    """Cameras [B, 2, 3, 32, 32] (one shared conv encoder) + state [B, 3] -> actions [B, chunk 3, 4] (normalised)."""

    def __init__(self, width: int):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, width, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.state = nn.Linear(CHUNK_STATE_DIM, width)
        self.head = nn.Linear(3 * width, CHUNK_LEN * CHUNK_ACTION_DIM)

    def forward(self, images, state):
        b = images.shape[0]
        cams = self.image(images.flatten(0, 1)).reshape(b, -1)
        return self.head(torch.cat([cams, self.state(state)], dim=-1)).reshape(b, CHUNK_LEN, CHUNK_ACTION_DIM)


def chunk_processor():
    """ACT's processor shape: image -> normalize -> stack -> rename, then action_chunk -> unnormalize."""
    from vla_export.processors import (
        ActionChunkStep,
        ImageStep,
        NormalizeStep,
        Processor,
        RenameStep,
        StackStep,
        UnnormalizeStep,
    )

    size = [CHUNK_IMAGE, CHUNK_IMAGE]
    return Processor(
        {**{k: {"type": "image", "shape": [3, *size]} for k in CHUNK_CAMS},
         "observation.state": {"type": "state", "shape": [CHUNK_STATE_DIM]}},
        [ImageStep(list(CHUNK_CAMS), size=size),
         NormalizeStep.with_stats({"observation.state": "mean_std"},
                                  {"observation.state": {"mean": CHUNK_STATE_MEAN, "std": CHUNK_STATE_STD}}),
         StackStep(list(CHUNK_CAMS), out="images"),
         RenameStep({"observation.state": "state", "images": "images"})],
        [ActionChunkStep("action", chunk_size=CHUNK_LEN, n_action_steps=2),
         UnnormalizeStep.with_stats({"action": "mean_std"},
                                    {"action": {"mean": CHUNK_ACTION_MEAN, "std": CHUNK_ACTION_STD}})],
        action_dim=CHUNK_ACTION_DIM)


def build_chunked(cfg):
    width = int(cfg.get("width", 8))
    spec = IOSpec(
        inputs=[TensorSpec("images", "float32", ("batch", len(CHUNK_CAMS), 3, CHUNK_IMAGE, CHUNK_IMAGE)),
                TensorSpec("state", "float32", ("batch", CHUNK_STATE_DIM))],
        outputs=[TensorSpec("actions", "float32", ("batch", CHUNK_LEN, CHUNK_ACTION_DIM),
                            "normalised chunk; the processor executes and unnormalises it")],
        dims={"batch": Dim("batch", 1, 1, 8)},
    )
    return ChunkPolicy(width).eval(), spec, chunk_processor()
