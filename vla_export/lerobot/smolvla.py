"""LeRobot SmolVLA (`lerobot.policies.smolvla`) as the architecture `lerobot-smolvla`.

Model config: `{"lerobot": <LeRobot's config.json>, "action_dim": A, "vocab_size": V,
"sampler": {"type": "flow_matching_euler", "steps": N}}`. The exported graph is `VLAFlowMatching.sample_actions`
as `select_action` runs it: the cameras stacked as `observation_images` [B, n_cam, 3, H, W] (float in [0, 1]; the
resize-with-pad to `resize_imgs_with_padding` and the [-1, 1] scaling SigLIP expects are LeRobot's own code inside the
graph), normalised `observation_state` [B, S] (padded to `max_state_dim` in the graph), the task as `input_ids` /
`attention_mask` [B, tokenizer_max_length] and the flow-matching start `noise` [B, chunk_size, max_action_dim] in;
the normalised chunk `actions` [B, chunk_size, A] out.

Fixed shapes and steps: the prompt is always padded to `tokenizer_max_length` (the processor's `tokenize` step); a
policy saved with `pad_language_to: "longest"` gives the same actions, since padded tokens are masked out of every
attention and do not move the position ids (`cumsum(pad_masks) - 1`). The `num_steps` Euler steps of
`sample_actions` are a Python loop over a config constant, so tracing unrolls them; the prefix (images, language,
state) runs once and its per-layer keys/values (LeRobot's `past_key_values` dict) stay plain tensors inside the
graph, reused by every step. With the noise an input the sampler is deterministic, so the graph equals LeRobot's
`select_action(batch, noise=...)`.

One transformers op is rewritten for the export: SmolVLM's vision embeddings compute the patch position ids in a
Python loop over the batch with a data-dependent `arange(p_attn_mask.sum())` + `bucketize` (a size torch.export
cannot keep symbolic). LeRobot always passes `patch_attention_mask=None` (every patch valid) at one static image
size, so those ids are one constant: `FixedGridVisionEmbeddings` records them from transformers' own forward once,
at build time, and adds the position embedding of that constant (same weights, same state-dict keys).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vla_export.errors import UserError
from vla_export.io_spec import Dim, IOSpec, TensorSpec
from vla_export.lerobot.features import policy_features, random_observation
from vla_export.models import Architecture

ARCH_NAME = "lerobot-smolvla"
STATE_KEY, ACTION_KEY, IMAGES_KEY, TASK_KEY = "observation.state", "action", "observation.images", "task"
NOISE_KEY, IDS_KEY, MASK_KEY = "noise", "input_ids", "attention_mask"
TOKENIZER_FILE = "tokenizer.json"
MAX_BATCH = 8


def _features(lr: dict[str, Any]) -> tuple[list[str], tuple[int, ...], int, int]:
    """(camera keys, image shape CHW, state width, action width) from a LeRobot SmolVLA config dict."""
    cams, chw, state_dim, action_dim = policy_features(lr, "SmolVLA")
    if int(lr.get("empty_cameras", 0)):
        raise UserError("SmolVLA with empty_cameras is not supported by the export yet (set empty_cameras to 0)")
    if lr.get("adapt_to_pi_aloha"):
        raise UserError("SmolVLA with adapt_to_pi_aloha is not supported by the export yet")
    if state_dim > int(lr["max_state_dim"]) or action_dim > int(lr["max_action_dim"]):
        raise UserError(f"SmolVLA state/action widths {state_dim}/{action_dim} exceed max_state_dim/max_action_dim "
                        f"{lr['max_state_dim']}/{lr['max_action_dim']}")
    if int(lr.get("n_obs_steps", 1)) != 1:
        raise UserError(f"SmolVLA with n_obs_steps {lr['n_obs_steps']} is not exported (LeRobot's SmolVLA uses the "
                        "last observation only)")
    return cams, chw, state_dim, action_dim


def sampler_settings(lr: dict[str, Any]) -> dict[str, Any]:
    return {"type": "flow_matching_euler", "steps": int(lr.get("num_steps", 10))}


def _vocab_size(lr: dict[str, Any]) -> int:
    """The VLM's vocabulary size (the example token ids of the parity gate are drawn below it)."""
    from transformers import AutoConfig

    name = lr.get("vlm_model_name")
    try:
        return int(AutoConfig.from_pretrained(name).text_config.vocab_size)
    except Exception as e:  # OSError (no such model/folder, no hub), ValueError (not a VLM config)
        raise UserError(f"SmolVLA's vlm_model_name {name!r} cannot be read by transformers "
                        f"({str(e).splitlines()[0][:160]}); it must be a local SmolVLM folder or a cached hub id") from e


def resolve_config(preset: str | None, overrides: dict | None) -> dict[str, Any]:
    cfg = dict(overrides or {})
    if "lerobot" not in cfg:
        raise UserError("lerobot-smolvla needs the LeRobot policy config: use vla-export checkpoint --from-lerobot "
                        "DIR")
    cfg["action_dim"] = _features(cfg["lerobot"])[3]
    cfg["sampler"] = sampler_settings(cfg["lerobot"])
    if "vocab_size" not in cfg:
        cfg["vocab_size"] = _vocab_size(cfg["lerobot"])
    return cfg


def io_spec(cfg: dict[str, Any]) -> IOSpec:
    lr = cfg["lerobot"]
    cams, (c, h, w), state_dim, action_dim = _features(lr)
    chunk, max_action, n_tok = int(lr["chunk_size"]), int(lr["max_action_dim"]), int(lr["tokenizer_max_length"])
    steps = sampler_settings(lr)["steps"]
    why = "resize-with-pad inside the graph is computed for this size; the processor resizes frames to it"
    spec = IOSpec(
        inputs=[TensorSpec("observation_state", "float32", ("batch", state_dim), "normalised observation.state"),
                TensorSpec("observation_images", "float32", ("batch", len(cams), c, "height", "width"),
                           f"cameras {cams} in [0, 1], stacked"),
                TensorSpec(IDS_KEY, "int64", ("batch", n_tok), f"task tokens, right-padded to {n_tok}"),
                TensorSpec(MASK_KEY, "int64", ("batch", n_tok), "1 for task tokens, 0 for padding"),
                TensorSpec(NOISE_KEY, "float32", ("batch", chunk, max_action),
                           "flow matching's start x_1, standard normal")],
        outputs=[TensorSpec("actions", "float32", ("batch", chunk, action_dim),
                            f"normalised action chunk, {steps} Euler steps")],
        dims={"batch": Dim("batch", 1, 1, MAX_BATCH),
              "height": Dim("height", h, h, h, dynamic=False, reason=why),
              "width": Dim("width", w, w, w, dynamic=False, reason=why)},
    )
    vocab = int(cfg.get("vocab_size", 2))

    def examples(batch: int = 1, seed: int = 0, **_: int) -> dict[str, np.ndarray]:
        """Random inputs with prompts of random length (some padding in every row but a full one), so the parity
        gate sees masked tokens."""
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, vocab, (batch, n_tok), dtype=np.int64)
        mask = np.zeros((batch, n_tok), dtype=np.int64)
        for b in range(batch):
            mask[b, :n_tok if b == 0 else int(rng.integers(1, n_tok + 1))] = 1
        return {"observation_state": rng.standard_normal((batch, state_dim), dtype=np.float32),
                "observation_images": rng.random((batch, len(cams), c, h, w), dtype=np.float32),
                IDS_KEY: ids, MASK_KEY: mask,
                NOISE_KEY: rng.standard_normal((batch, chunk, max_action), dtype=np.float32)}

    spec.example_factory = examples
    return spec


class FixedGridVisionEmbeddings(nn.Module):
    """SmolVLM's vision embeddings for every patch valid at one image size: patch conv + the position embedding of
    the constant position ids transformers' own forward computes for that case (recorded once, see module doc). Same
    submodules, so the same state-dict keys; the ids are a non-persistent buffer."""

    def __init__(self, original: nn.Module, height: int, width: int, channels: int):
        super().__init__()
        self.patch_embedding = original.patch_embedding
        self.position_embedding = original.position_embedding
        seen = []
        hook = self.position_embedding.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
        try:
            with torch.no_grad():
                p = original.patch_size
                original(torch.zeros(1, channels, height, width),
                         patch_attention_mask=torch.ones(1, height // p, width // p, dtype=torch.bool))
        finally:
            hook.remove()
        self.register_buffer("position_ids", seen[0][:1].clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return embeddings + self.position_embedding(self.position_ids)


class SmolVLASampler(nn.Module):
    """`SmolVLAPolicy._get_action_chunk(batch, noise)` with named tensor inputs: LeRobot's `prepare_images`,
    `prepare_state` and `VLAFlowMatching.sample_actions` (its Euler loop unrolled by tracing), then the action
    width LeRobot unpads to. State-dict keys are the LeRobot file's (`model.*`)."""

    def __init__(self, policy):
        super().__init__()
        self.model = policy.model
        self.prepare_images, self.prepare_state = policy.prepare_images, policy.prepare_state
        cams, (c, h, w), _, self.action_dim = _features(_config_dict(policy.config))
        self.cams = cams
        # resize_with_pad(img, width, height): the vision encoder sees that size, the static size of its patch grid
        rw, rh = policy.config.resize_imgs_with_padding or (w, h)
        vision = self.model.vlm_with_expert.get_vlm_model().vision_model
        vision.embeddings = FixedGridVisionEmbeddings(vision.embeddings, int(rh), int(rw), c)

    def forward(self, observation_state, observation_images, input_ids, attention_mask, noise):
        batch = {k: observation_images[:, i] for i, k in enumerate(self.cams)}
        batch[STATE_KEY] = observation_state
        images, img_masks = self.prepare_images(batch)
        state = self.prepare_state(batch)
        actions = self.model.sample_actions(images, img_masks, input_ids, attention_mask.bool(), state, noise=noise)
        return actions[:, :, :self.action_dim]


def _config_dict(config) -> dict[str, Any]:
    """The features of a LeRobot config object in config.json's form, for `_features`."""
    def feats(d):
        return {k: {"type": f.type.value, "shape": list(f.shape)} for k, f in d.items()}

    return {"input_features": feats(config.input_features), "output_features": feats(config.output_features),
            "max_state_dim": config.max_state_dim, "max_action_dim": config.max_action_dim,
            "n_obs_steps": config.n_obs_steps, "empty_cameras": config.empty_cameras,
            "adapt_to_pi_aloha": config.adapt_to_pi_aloha}


def build(cfg: dict[str, Any]) -> tuple[nn.Module, IOSpec]:
    from vla_export.lerobot import build_lerobot_policy

    lr = dict(cfg["lerobot"])
    _features(lr)
    # the weights come from model.safetensors (the VLM's included): never download the VLM's own weights here
    lr["load_vlm_weights"] = False
    if lr.get("rtc_config") and lr["rtc_config"].get("enabled"):
        raise UserError("SmolVLA with real-time chunking (rtc_config.enabled) is not exported")
    policy = build_lerobot_policy(lr)
    if policy.config.type != "smolvla":
        raise UserError(f"lerobot-smolvla got a {policy.config.type!r} policy config")
    return SmolVLASampler(policy).eval(), io_spec(cfg)


def tokenize_step(cfg: dict[str, Any], step_config: dict[str, Any], newline: bool, files_dir):
    """vla-export's `tokenize` step for LeRobot's `tokenizer_processor` (and `smolvla_new_line_processor` when
    `newline`): the tokenizer LeRobot loads (`AutoTokenizer.from_pretrained(tokenizer_name)`) saved as a `tokenizers`
    JSON file into `files_dir`, so it travels with the checkpoint; always padded to `max_length` (see module doc)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from vla_export.processors.steps import TokenizeStep

    name = step_config.get("tokenizer_name") or cfg["lerobot"].get("vlm_model_name")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # OSError without a hub or folder
        raise UserError(f"tokenizer {name!r} of the SmolVLA preprocessor cannot be loaded "
                        f"({str(e).splitlines()[0][:160]})") from e
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer {name!r} is not a fast (tokenizers) tokenizer; vla-export stores tokenizers JSON")
    if tok.pad_token is None:
        raise UserError(f"tokenizer {name!r} has no pad token; LeRobot pads the SmolVLA prompt with it")
    if not step_config.get("truncation", True):
        raise UserError("SmolVLA tokenizer_processor with truncation false is not exported (the prompt length is "
                        "fixed)")
    tok.backend_tokenizer.save(str(Path(files_dir) / TOKENIZER_FILE))
    max_length = int(step_config.get("max_length") or cfg["lerobot"]["tokenizer_max_length"])
    if max_length != int(cfg["lerobot"]["tokenizer_max_length"]):
        raise UserError(f"the tokenizer step's max_length {max_length} differs from the policy's "
                        f"tokenizer_max_length {cfg['lerobot']['tokenizer_max_length']}")
    return TokenizeStep(step_config.get("task_key", TASK_KEY), TOKENIZER_FILE, max_length, ids=IDS_KEY,
                        mask=MASK_KEY, pad_token=str(tok.pad_token),
                        padding_side=step_config.get("padding_side", "right"), add_special_tokens=True,
                        suffix="\n" if newline else "")


def processor_steps(cfg: dict[str, Any]):
    """Observation schema plus the steps around normalisation: frames -> float CHW in [0, 1] at the config's size
    (LeRobot's dataset frames; the resize-with-pad is in the graph); then the cameras stacked, the flow's noise,
    the IO-spec names. The task's `tokenize` step comes from the saved preprocessor (`tokenize_step`)."""
    from vla_export.processors.steps import ImageStep, NoiseStep, RenameStep, StackStep

    lr = cfg["lerobot"]
    cams, (_, h, w), state_dim, _ = _features(lr)
    observation = {k: {"type": "image", "shape": [3, h, w]} for k in cams}
    observation[STATE_KEY] = {"type": "state", "shape": [state_dim]}
    observation[TASK_KEY] = {"type": "text"}
    before = [ImageStep(cams, size=[h, w])]
    after = [StackStep(cams, out=IMAGES_KEY),
             NoiseStep(NOISE_KEY, shape=[int(lr["chunk_size"]), int(lr["max_action_dim"])], seed=0),
             RenameStep({STATE_KEY: "observation_state", IMAGES_KEY: "observation_images", IDS_KEY: IDS_KEY,
                         MASK_KEY: MASK_KEY, NOISE_KEY: NOISE_KEY})]
    return observation, before, after


def chunk_step(cfg: dict[str, Any]):
    from vla_export.processors import ActionChunkStep

    lr = cfg["lerobot"]
    return ActionChunkStep(ACTION_KEY, chunk_size=int(lr["chunk_size"]), n_action_steps=int(lr["n_action_steps"]))


def noise_step(processor):
    """The processor's `noise` step: `noise_step(policy.processor).give(noise)` sets the next model call's noise."""
    from vla_export.processors.steps import NoiseStep

    for step in processor.preprocessor:
        if isinstance(step, NoiseStep):
            return step
    raise UserError("this processor has no noise step; it is not a SmolVLA policy's")


def example_observation(cfg: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """A random camera frame per camera (uint8 HxWx3), a state vector and a task: what a robot gives `Policy.act`."""
    obs: dict[str, Any] = random_observation(cfg["lerobot"], "SmolVLA", seed)
    obs[TASK_KEY] = "pick the cube"
    return obs


ARCHITECTURE = Architecture(name=ARCH_NAME, build=build, resolve_config=resolve_config, spec=io_spec)
