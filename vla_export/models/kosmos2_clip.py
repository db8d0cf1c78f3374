"""`kosmos2-clip-hybrid`: the reference VLA policy (Kosmos-2 + CLIP -> fusion MLP -> temporal head -> actions).

Both towers are transformers models built from configs (no hub access) or, when the config names a local
directory, loaded with `from_pretrained(path)` offline.

Features per frame: the Kosmos-2 text decoder's last hidden state mean-pooled over the attended tokens, the CLIP
text projection and the CLIP image projection; concatenated, fused by an MLP, passed through a temporal head
(`mlp`, stateless, or `lstm`, with explicit `h`/`c` state tensors so a robot streams frames through an exported
graph) and an action head.

Kosmos-2 places the image embeddings into the token sequence with a boolean-mask scatter
(`inputs_embeds[mask] = image_embeds`), a data-dependent shape that blocks CUDA-graph capture and TensorRT's
parser (ScatterND after NonZero). The policy does the same placement with a gather + `where`, static in shape and
identical in value whenever each row of `image_embeds_position_mask` has `latent_query_num` ones, which the
preprocessing guarantees (`tests/test_models.py` checks it against `Kosmos2Model.forward`).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_export.io_spec import Dim, IOSpec, TensorSpec

ARCH_NAME = "kosmos2-clip-hybrid"

# Token layout the preprocessing builds (ids are looked up by string in the tokenizer, so a real Kosmos-2
# tokenizer directory works too): <s> <image> <image>*Q </image> text... </s> <pad>...
KOSMOS_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<image>", "</image>", "<image_token>"]
CLIP_SPECIAL_TOKENS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
# Kosmos-2's real ids: bos 0, pad 1, eos 2, unk 3. CLIP's eos must not be 2: transformers' CLIP text model treats
# eos_token_id == 2 as "legacy" and pools at argmax(input_ids) instead of at the eos token.
KOSMOS_PAD_ID = 1
CLIP_PAD_ID, CLIP_BOS_ID, CLIP_EOS_ID = 0, 2, 3

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: seconds on a CPU, under 5 M parameters.
    "tiny": {
        "kosmos": {
            "latent_query_num": 8,
            "text_config": {"vocab_size": 512, "embed_dim": 64, "layers": 2, "attention_heads": 2, "ffn_dim": 128,
                            "max_position_embeddings": 128},
            "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "image_size": 224, "patch_size": 14},
        },
        "clip": {
            "projection_dim": 64,
            "text_config": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "max_position_embeddings": 32},
            "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
        },
        "fusion_dim": 128,
        "head_dim": 64,
        # The demo model: pooled tokens lose where the cup is left-right, which linear_y follows (docs/benchmarks.md)
        "spatial_heads": 4,
        "spatial_skip": True,
    },
    # CPU benchmarks: tens of millions of parameters, same shape of computation as `full`.
    "small": {
        "kosmos": {
            "latent_query_num": 32,
            "text_config": {"vocab_size": 8192, "embed_dim": 512, "layers": 6, "attention_heads": 8, "ffn_dim": 2048,
                            "max_position_embeddings": 512},
            "vision_config": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                              "num_attention_heads": 6, "image_size": 224, "patch_size": 14},
        },
        "clip": {
            "projection_dim": 256,
            "text_config": {"vocab_size": 8192, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "max_position_embeddings": 77},
            "vision_config": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 4,
                              "num_attention_heads": 6, "image_size": 224, "patch_size": 32},
        },
        "fusion_dim": 512,
        "head_dim": 256,
    },
    # microsoft/kosmos-2-patch14-224 + openai/clip-vit-base-patch32 dimensions: 1,817,467,907 parameters (mlp head).
    "full": {
        "kosmos": {},  # transformers' Kosmos2Config defaults are the patch14-224 model
        "clip": {
            "projection_dim": 512,
            "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                            "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77},
            "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "image_size": 224, "patch_size": 32},
        },
        "fusion_dim": 512,
        "head_dim": 256,
    },
}

DEFAULTS: dict[str, Any] = {
    "head": "mlp",  # "mlp" (stateless) or "lstm" (explicit h/c state)
    "action_dim": 2,
    "text_len": 16,  # instruction tokens (incl. </s>) in the Kosmos-2 sequence after the image span
    "clip_text_len": 16,  # CLIP tokens incl. start/end
    "max_batch": 8,  # upper bound of the dynamic batch dim (TensorRT profile max, torch.export bound)
    "image_size": 224,
    "dropout": 0.0,
    # Instruction-queried attention over the Kosmos-2 vision patch grid, pooling each head's patch coordinates and
    # values into the fused features (`SpatialPool`); 0: the original layout (pooled tokens only).
    "spatial_heads": 0,
    # A linear path from the spatial heads' attended (x, y) straight to the standardised actions, beside the fused
    # features' MLP. Through the MLP alone the coordinates reached linear_y only as the schedule annealed, and in
    # one seed of three not within the demo's steps; with this path every seed's linear_y learned from the second
    # epoch on (docs/benchmarks.md, issue 13). False: no such path (and the layout of checkpoints made before it).
    "spatial_skip": False,
    # Buffers `action_mean`/`action_std`: the head predicts standardised actions, de-normalised inside the model,
    # so every exported graph outputs physical units. False: the original layout (no buffers).
    "action_norm": True,
    "kosmos_pretrained": None,  # local HF directory with a Kosmos-2 model: from_pretrained(path) offline
    "clip_pretrained": None,  # local HF directory with a CLIP model
}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolve_config(preset: str = "tiny", overrides: dict | None = None) -> dict[str, Any]:
    """Full model config: DEFAULTS <- PRESETS[preset] <- overrides (any field, nested dicts merged)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = deep_merge(deep_merge(DEFAULTS, PRESETS[preset]), overrides or {})
    cfg["preset"] = preset
    if cfg["head"] not in ("mlp", "lstm"):
        raise ValueError(f"unknown head {cfg['head']!r}; choose mlp or lstm")
    return cfg


def _kosmos_config(cfg):
    from transformers import Kosmos2Config

    k = copy.deepcopy(cfg["kosmos"])
    text = {"pad_token_id": KOSMOS_PAD_ID, "bos_token_id": 0, "eos_token_id": 2, "dropout": cfg["dropout"],
            **k.pop("text_config", {})}
    return Kosmos2Config(text_config=text, vision_config=k.pop("vision_config", {}), **k)


def _clip_config(cfg):
    from transformers import CLIPConfig

    c = copy.deepcopy(cfg["clip"])
    text = {"pad_token_id": CLIP_PAD_ID, "bos_token_id": CLIP_BOS_ID, "eos_token_id": CLIP_EOS_ID,
            **c.pop("text_config", {})}
    return CLIPConfig(text_config=text, vision_config=c.pop("vision_config", {}), **c)


SPATIAL_KEY_DIM = 16
SPATIAL_VALUE_DIM = 16


class SpatialPool(nn.Module):
    """Where things are: each head's query (from the instruction features) attends over the vision patch grid and
    returns the attention-weighted patch coordinates (x, y in [-1, 1]) and a pooled value.

    The coordinates come from each patch's place in the grid, not from learned position embeddings, which the tiny
    towers did not learn to use within the demo's training recipe; a query for "the red cup" then reads the cup's
    bearing directly. Keys and values see each patch's token and its mean colour (the image average-pooled onto the
    same grid): the colour an instruction names is then a linear function of the key's input from the first step,
    where through the randomly initialised tower alone one seed in two never found the cup in the demo's budget.
    Static shapes throughout (average pool, softmax, matmul), so it exports like the rest of the graph."""

    def __init__(self, patch_dim: int, query_dim: int, grid: int, heads: int, out_dim: int, patch_size: int = 14):
        super().__init__()
        self.heads = heads
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(patch_dim)
        self.query_norm = nn.LayerNorm(query_dim)
        self.key = nn.Linear(patch_dim + 3, heads * SPATIAL_KEY_DIM)
        self.value = nn.Linear(patch_dim + 3, heads * SPATIAL_VALUE_DIM)
        self.query = nn.Linear(query_dim, heads * SPATIAL_KEY_DIM)
        self.out = nn.Sequential(nn.Linear(heads * (2 + SPATIAL_VALUE_DIM), out_dim), nn.GELU())
        axis = torch.linspace(-1.0, 1.0, grid)
        # row-major patch order (as the vision towers flatten their grid): x varies fastest
        coords = torch.stack([axis.repeat(grid), axis.repeat_interleave(grid)], dim=-1)  # [grid*grid, 2]
        self.register_buffer("coords", coords, persistent=False)  # derived from the config, not a weight

    def forward(self, patches: torch.Tensor, pixel_values: torch.Tensor,
                query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled features [B, out_dim] and every head's attended (x, y), flattened [B, heads * 2]."""
        return self.pool(patches, self.patch_colour(pixel_values), query)

    def patch_colour(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image average-pooled onto the patch grid: [B, N, 3]."""
        return nn.functional.avg_pool2d(pixel_values, self.patch_size).flatten(2).transpose(1, 2)

    def pool(self, patches: torch.Tensor, colour: torch.Tensor,
             query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` from the patch colours (`patch_colour`) instead of the image."""
        where, what = self.locate(patches, colour, query)
        b = patches.shape[0]
        return self.out(torch.cat([where, what], dim=-1).reshape(b, -1)), where.reshape(b, -1)

    def locate(self, patches: torch.Tensor, colour: torch.Tensor,
               query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head: the attended (x, y) [B, H, 1, 2] and the attended value [B, H, 1, dv]."""
        b, n, _ = patches.shape
        p = torch.cat([self.norm(patches), colour.to(patches.dtype)], dim=-1)
        k = self.key(p).view(b, n, self.heads, SPATIAL_KEY_DIM).transpose(1, 2)  # [B, H, N, dk]
        v = self.value(p).view(b, n, self.heads, SPATIAL_VALUE_DIM).transpose(1, 2)  # [B, H, N, dv]
        q = self.query(self.query_norm(query)).view(b, self.heads, 1, SPATIAL_KEY_DIM)  # [B, H, 1, dk]
        # unscaled dot product: sharper than 1/sqrt(dk) from the start, so the coordinates move with the keys
        weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # [B, H, 1, N]
        # a weighted sum, not a MatMul with a constant: INT8 static quantization would take that for a weight
        # MatMul and quantize the softmax output it shares with `weights @ v` (kept float, activation x activation)
        where = (weights.transpose(-1, -2) * self.coords.to(weights.dtype)).sum(-2, keepdim=True)  # [B, H, 1, 2]
        what = weights @ v  # [B, H, 1, dv]
        return where, what


def legacy_overrides(state_keys, overrides: dict | None = None) -> dict:
    """Overrides that make the built layout match a state dict from the original training scripts: no spatial
    branch when it has no `spatial.*` tensors, no normalisation buffers (identity) when it has no `action_mean`.
    Settings the user gave explicitly are kept."""
    keys = set(state_keys)
    out = dict(overrides or {})
    if not any(k.startswith("spatial.") for k in keys):
        out.setdefault("spatial_heads", 0)
    if not any(k.startswith("spatial_skip.") for k in keys):
        out.setdefault("spatial_skip", False)
    if "action_mean" not in keys and "action_std" not in keys:
        out.setdefault("action_norm", False)
    return out


class Kosmos2ClipPolicy(nn.Module):
    # The two transformers models, pretrained (`kosmos_pretrained`, `clip_pretrained`) or built from a config: the
    # modules a frozen-tower training recipe keeps as they are (`tower_features` is all of their work).
    TOWERS = ("kosmos", "clip")

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        from transformers import CLIPModel, Kosmos2Model

        self.cfg = cfg
        if cfg.get("kosmos_pretrained"):
            self.kosmos = Kosmos2Model.from_pretrained(cfg["kosmos_pretrained"], local_files_only=True)
        else:
            self.kosmos = Kosmos2Model(_kosmos_config(cfg))
        if cfg.get("clip_pretrained"):
            self.clip = CLIPModel.from_pretrained(cfg["clip_pretrained"], local_files_only=True)
        else:
            self.clip = CLIPModel(_clip_config(cfg))
        kt = self.kosmos.config.text_config
        self.pad_id = kt.pad_token_id
        feat = kt.embed_dim + 2 * self.clip.config.projection_dim
        self.fusion = nn.Sequential(nn.Linear(feat, cfg["fusion_dim"]), nn.GELU(), nn.Dropout(cfg["dropout"]))
        if cfg["head"] == "lstm":
            self.temporal = nn.LSTMCell(cfg["fusion_dim"], cfg["head_dim"])
        else:
            self.temporal = nn.Sequential(nn.Linear(cfg["fusion_dim"], cfg["head_dim"]), nn.GELU())
        self.action_head = nn.Linear(cfg["head_dim"], cfg["action_dim"])
        self.spatial = None
        if int(cfg.get("spatial_heads", 0)):
            vision = self.kosmos.config.vision_config
            grid = int(vision.image_size) // int(vision.patch_size)
            self.spatial = SpatialPool(vision.hidden_size, kt.embed_dim + self.clip.config.projection_dim, grid,
                                       int(cfg["spatial_heads"]), cfg["fusion_dim"], int(vision.patch_size))
        self.spatial_skip = None
        if self.spatial is not None and cfg.get("spatial_skip"):
            self.spatial_skip = nn.Linear(int(cfg["spatial_heads"]) * 2, cfg["action_dim"])
        if cfg.get("action_norm", False):
            # set from the training data (`set_action_normalization`); identity until then
            self.register_buffer("action_mean", torch.zeros(cfg["action_dim"]))
            self.register_buffer("action_std", torch.ones(cfg["action_dim"]))
        else:
            self.action_mean = self.action_std = None

    @torch.no_grad()
    def set_action_normalization(self, mean, std) -> None:
        """Dataset statistics the head's output is de-normalised with (saved with the weights, exported as
        constants)."""
        if self.action_mean is None:
            raise ValueError("this model was built with action_norm=False (original layout): no buffers to set")
        self.action_mean.copy_(torch.as_tensor(mean, dtype=self.action_mean.dtype))
        self.action_std.copy_(torch.as_tensor(std, dtype=self.action_std.dtype))

    def head_actions(self, hidden: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """The action head in physical units: standardised prediction x std + mean (identity without buffers).
        `where`: the frame's attended coordinates from `encode`, for the spatial skip path."""
        out = self.action_head(hidden)
        if self.spatial_skip is not None:
            out = out + self.spatial_skip(where)
        if self.action_mean is not None:
            out = out * self.action_std.to(out.dtype) + self.action_mean.to(out.dtype)
        return out

    # The Kosmos-2 text decoder with the image embeddings placed by index, not by a boolean-mask scatter.
    def kosmos_features(self, pixel_values, input_ids, attention_mask, image_embeds_position_mask,
                        return_patches: bool = False):
        patches_out, image_embeds = self.kosmos_image_features(pixel_values)  # [B, 1 + P, Dv], [B, Q, D]
        text = self.kosmos.text_model.model
        tokens = text.embed_tokens(input_ids)  # unscaled, as forward_embedding expects
        place = image_embeds_position_mask.to(torch.bool)
        # k-th marked position of a row takes image embedding k: index = (running count of marks) - 1.
        index = (torch.cumsum(place.to(torch.int64), dim=1) - 1).clamp(min=0, max=image_embeds.shape[1] - 1)
        gathered = torch.gather(image_embeds, 1, index.unsqueeze(-1).expand(-1, -1, image_embeds.shape[-1]))
        inputs_embeds = torch.where(place.unsqueeze(-1), gathered.to(tokens.dtype), tokens)
        # Position ids as Kosmos-2 derives them from input_ids (padding keeps padding_idx), which it cannot do
        # when given inputs_embeds.
        not_pad = input_ids.ne(self.pad_id).to(torch.int64)
        position_ids = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_id
        hidden = self.kosmos.text_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, return_dict=True
        ).last_hidden_state
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if return_patches:
            # the vision tower's patch grid (class token dropped), already computed for the image embeddings
            return pooled, self.kosmos.vision_model.model.post_layernorm(patches_out[:, 1:])
        return pooled

    def kosmos_image_features(self, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        """(the vision tower's last hidden state [B, 1 + P, Dv], the projected image embeddings [B, Q, D]).

        What `Kosmos2Model.get_image_features` computes, from the submodules it calls, because its return differs
        between the transformers versions pyproject allows: 4.x returns the projected embeddings as a tensor (and
        takes no `return_dict`), 5.x the vision output with the embeddings as `pooler_output`. The patch grid (the
        vision tower's hidden state) is needed as well, which 4.x's does not return. The submodules and their
        arithmetic are the same in 4.50 .. 5.x; the values are tested against `Kosmos2Model` itself
        (tests/test_models.py), so a transformers that changes them fails there."""
        vision = self.kosmos.vision_model(pixel_values=pixel_values, return_dict=True)
        hidden = vision.last_hidden_state
        # the whole last_hidden_state through post_layernorm, not just pooled_output, as get_image_features does
        embeds = nn.functional.normalize(self.kosmos.vision_model.model.post_layernorm(hidden), dim=-1)
        embeds = self.kosmos.image_to_text_projection(embeds)[0]  # (embeddings, projection attentions)
        return hidden, embeds

    def encode(self, pixel_values, input_ids, attention_mask, image_embeds_position_mask, clip_input_ids,
               clip_attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per frame: the fused features for the temporal head, and the spatial heads' attended coordinates
        [B, heads * 2] (None without spatial heads), which `head_actions` takes for the skip path."""
        return self.fuse(self.tower_features(pixel_values, input_ids, attention_mask, image_embeds_position_mask,
                                             clip_input_ids, clip_attention_mask))

    def tower_features(self, pixel_values, input_ids, attention_mask, image_embeds_position_mask, clip_input_ids,
                       clip_attention_mask) -> dict[str, torch.Tensor]:
        """What the two towers (the `TOWERS` modules) make of a frame, and nothing they learn from: `fuse` turns it
        into the head's input. Training with frozen towers computes this once per frame (`training.TowerFeatures`)."""
        k, patches = self.kosmos_features(pixel_values, input_ids, attention_mask, image_embeds_position_mask,
                                          return_patches=True)
        c_text = self.clip.text_model(input_ids=clip_input_ids, attention_mask=clip_attention_mask).pooler_output
        c_text = self.clip.text_projection(c_text)
        c_image = self.clip.visual_projection(self.clip.vision_model(pixel_values=pixel_values).pooler_output)
        features = {"kosmos_text": k, "clip_text": c_text, "clip_image": c_image}
        if self.spatial is not None:
            features["patches"] = patches
            features["patch_colour"] = self.spatial.patch_colour(pixel_values)
        return features

    def fuse(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`encode` from `tower_features`' output: the fusion MLP and the spatial heads."""
        k, c_text = features["kosmos_text"], features["clip_text"]
        fused = self.fusion(torch.cat([k, c_text, features["clip_image"]], dim=-1))
        where = None
        if self.spatial is not None:
            pooled, where = self.spatial.pool(features["patches"], features["patch_colour"],
                                              torch.cat([k, c_text], dim=-1))
            # added, not concatenated: the original layout's tensors keep their shapes
            fused = fused + pooled
        return fused, where

    def forward(self, pixel_values, input_ids, attention_mask, image_embeds_position_mask, clip_input_ids,
                clip_attention_mask, h=None, c=None):
        fused, where = self.encode(pixel_values, input_ids, attention_mask, image_embeds_position_mask,
                                   clip_input_ids, clip_attention_mask)
        if self.cfg["head"] == "lstm":
            if h is None:
                h = fused.new_zeros(fused.shape[0], self.cfg["head_dim"])
                c = fused.new_zeros(fused.shape[0], self.cfg["head_dim"])
            h_out, c_out = self.temporal(fused, (h, c))
            return self.head_actions(h_out, where), h_out, c_out
        return self.head_actions(self.temporal(fused), where)


def kosmos_seq_len(cfg: dict[str, Any]) -> int:
    """Kosmos-2 sequence length: <s> <image> Q image tokens </image> + text_len."""
    return 3 + int(cfg.get("kosmos", {}).get("latent_query_num", 64)) + int(cfg["text_len"])


def io_spec(cfg: dict[str, Any]) -> IOSpec:
    q = int(cfg.get("kosmos", {}).get("latent_query_num", 64))
    size = int(cfg["image_size"])
    image_prefix = 3 + q
    dims = {
        "batch": Dim("batch", 1, 1, int(cfg["max_batch"])),
        # Text length may vary per call (a shorter instruction needs no padding); the image span is fixed.
        "seq": Dim("seq", image_prefix + 1, kosmos_seq_len(cfg), image_prefix + 4 * int(cfg["text_len"])),
        "clip_seq": Dim("clip_seq", 2, int(cfg["clip_text_len"]), int(cfg["clip"]["text_config"].get(
            "max_position_embeddings", 77))),
    }
    inputs = [
        TensorSpec("pixel_values", "float32", ("batch", 3, size, size), "RGB image, resized and normalised"),
        TensorSpec("input_ids", "int64", ("batch", "seq"), "Kosmos-2 tokens: <s><image>[Q image slots]</image> text"),
        TensorSpec("attention_mask", "int64", ("batch", "seq"), "1 for real tokens, 0 for padding"),
        TensorSpec("image_embeds_position_mask", "int64", ("batch", "seq"), "1 at the Q image slots"),
        TensorSpec("clip_input_ids", "int64", ("batch", "clip_seq"), "CLIP tokens of the instruction"),
        TensorSpec("clip_attention_mask", "int64", ("batch", "clip_seq"), "1 for real CLIP tokens"),
    ]
    outputs = [TensorSpec("actions", "float32", ("batch", int(cfg["action_dim"])), "predicted actions")]
    state = {}
    if cfg["head"] == "lstm":
        hd = int(cfg["head_dim"])
        inputs += [TensorSpec("h", "float32", ("batch", hd), "LSTM hidden state (zeros at episode start)"),
                   TensorSpec("c", "float32", ("batch", hd), "LSTM cell state (zeros at episode start)")]
        outputs += [TensorSpec("h_out", "float32", ("batch", hd), "next hidden state"),
                    TensorSpec("c_out", "float32", ("batch", hd), "next cell state")]
        state = {"h_out": "h", "c_out": "c"}
    spec = IOSpec(inputs=inputs, outputs=outputs, dims=dims, state=state)

    vocab_k = int(cfg.get("kosmos", {}).get("text_config", {}).get("vocab_size", 65037))
    vocab_c = int(cfg["clip"]["text_config"].get("vocab_size", 49408))

    def examples(batch: int = 1, seed: int = 0, seq: int | None = None, clip_seq: int | None = None,
                 **_: int) -> dict[str, np.ndarray]:
        """Structurally valid inputs: the image span where the model expects it, random text of random length."""
        rng = np.random.default_rng(seed)
        seq = seq or dims["seq"].opt
        clip_seq = clip_seq or dims["clip_seq"].opt
        text_max = seq - image_prefix
        ids = np.full((batch, seq), KOSMOS_PAD_ID, dtype=np.int64)
        att = np.zeros((batch, seq), dtype=np.int64)
        img = np.zeros((batch, seq), dtype=np.int64)
        cids = np.full((batch, clip_seq), CLIP_PAD_ID, dtype=np.int64)
        catt = np.zeros((batch, clip_seq), dtype=np.int64)
        first_text_id = len(KOSMOS_SPECIAL_TOKENS)
        for b in range(batch):
            n = int(rng.integers(1, text_max + 1))  # text tokens incl. </s>
            ids[b, 0], ids[b, 1], ids[b, 2 + q] = 0, 4, 5
            ids[b, 2:2 + q] = 6
            ids[b, image_prefix:image_prefix + n - 1] = rng.integers(first_text_id, vocab_k, n - 1)
            ids[b, image_prefix + n - 1] = 2
            att[b, :image_prefix + n] = 1
            img[b, 2:2 + q] = 1
            m = int(rng.integers(2, clip_seq + 1))
            cids[b, 0], cids[b, m - 1] = CLIP_BOS_ID, CLIP_EOS_ID
            cids[b, 1:m - 1] = rng.integers(len(CLIP_SPECIAL_TOKENS), vocab_c, m - 2)
            catt[b, :m] = 1
        feeds = {
            "pixel_values": rng.standard_normal((batch, 3, size, size)).astype(np.float32),
            "input_ids": ids, "attention_mask": att, "image_embeds_position_mask": img,
            "clip_input_ids": cids, "clip_attention_mask": catt,
        }
        if cfg["head"] == "lstm":
            hd = int(cfg["head_dim"])
            feeds["h"] = (0.1 * rng.standard_normal((batch, hd))).astype(np.float32)
            feeds["c"] = (0.1 * rng.standard_normal((batch, hd))).astype(np.float32)
        return feeds

    spec.example_factory = examples
    return spec


def build(cfg: dict[str, Any]) -> tuple[nn.Module, IOSpec]:
    """Architecture factory: config -> (module in eval mode, IO spec). The `--arch` plug-in contract."""
    model = Kosmos2ClipPolicy(cfg).eval()
    return model, io_spec(cfg)
