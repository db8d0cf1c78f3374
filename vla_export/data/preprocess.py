"""Preprocessing: camera image + instruction -> the model's input tensors, a function of the checkpoint alone.

Everything it needs is in the checkpoint directory: `config.json` `preprocessing` (image_size, image_mean,
image_std, kosmos_tokenizer, clip_tokenizer) and `model_config` (kosmos.latent_query_num, text_len, clip_text_len),
and the two tokenizer files it names. Training, validation, the runtime and the ROS 2 node all call
`Preprocessor.from_checkpoint(dir)`, so a deployed policy sees exactly the tensors it was trained on.

Layouts (those of `models.kosmos2_clip.io_spec(cfg).example_inputs`):
  input_ids      <s> <image> <image_token>*Q </image> text... </s> <pad>...   length 3 + Q + text_len
  attention_mask 1 up to and including </s>, 0 on padding
  image_embeds_position_mask 1 on the Q image slots
  clip_input_ids <|startoftext|> text... <|endoftext|> <pad>...             length clip_text_len
Long instructions are truncated, keeping the end token.

Tokenizers are `tokenizers` JSON files. The demo checkpoints carry small word-level ones built by
`build_tokenizers`. With real pretrained towers (`--kosmos-pretrained`/`--clip-pretrained`), point
`preprocessing.kosmos_tokenizer` / `preprocessing.clip_tokenizer` in config.json at the models' own
`tokenizer.json` files (copied into the checkpoint directory): special tokens are looked up by their strings, text is
encoded without the tokenizer's own special tokens, and a missing `<image_token>` (HF's Kosmos-2 tokenizer fills the
image slots with a placeholder the model overwrites) or CLIP `<pad>` falls back to `<unk>` / `<|endoftext|>`.

Images: RGB uint8 HxWx3 of any size, resized to image_size x image_size with bilinear interpolation
(antialiased, torch CPU: deterministic), scaled to [0, 1], normalised by mean/std.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vla_export.errors import UserError
from vla_export.models.kosmos2_clip import CLIP_SPECIAL_TOKENS, KOSMOS_SPECIAL_TOKENS

# Words every demo tokenizer knows, so a new instruction of the same kind is not all <unk>.
BASIC_WORDS = (
    "the a an to and of in on at around toward towards near far left right forward backward slowly quickly fast "
    "slow stop go move navigate track follow find approach reach avoid obstacles obstacle target cup red blue green "
    "yellow white black mug bottle box chair table door while robot turn keep distance"
).split()
_WORD_RE = re.compile(r"\w+|[^\w\s]+")  # what tokenizers' Whitespace pre-tokenizer splits


def normalise_words(text: str) -> list[str]:
    """The word-level tokenizers' view of a text (lower-cased words and punctuation), for building vocabularies."""
    return _WORD_RE.findall(text.lower())


def _word_level(specials: list[str], words: list[str]):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    return tok


def build_tokenizers(out_dir: str | os.PathLike, texts: Sequence[str], vocab_size: int | dict[str, int],
                     names: dict[str, str] | None = None) -> dict[str, str]:
    """Write word-level Kosmos-2 and CLIP tokenizers over `texts` + BASIC_WORDS; returns {key: file name}.

    Special tokens take ids 0.. in the order of KOSMOS_SPECIAL_TOKENS / CLIP_SPECIAL_TOKENS. Words are ranked by
    frequency in `texts` (then BASIC_WORDS) and cut to fit `vocab_size` (an int, or {"kosmos": n, "clip": m})."""
    from vla_export.checkpoint import DEFAULT_PREPROCESSING

    names = names or {"kosmos_tokenizer": DEFAULT_PREPROCESSING["kosmos_tokenizer"],
                      "clip_tokenizer": DEFAULT_PREPROCESSING["clip_tokenizer"]}
    sizes = vocab_size if isinstance(vocab_size, dict) else {"kosmos": vocab_size, "clip": vocab_size}
    counts = Counter(w for t in texts for w in normalise_words(t))
    ranked = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    ranked += [w for w in BASIC_WORDS if w not in counts]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, specials, size in (("kosmos_tokenizer", KOSMOS_SPECIAL_TOKENS, sizes["kosmos"]),
                                ("clip_tokenizer", CLIP_SPECIAL_TOKENS, sizes["clip"])):
        room = int(size) - len(specials)
        if room < 1:
            raise UserError(f"vocab_size {size} leaves no room for words after {len(specials)} special tokens")
        tok = _word_level(list(specials), ranked[:room])
        tok.save(str(out_dir / names[key]))
    return dict(names)


class _TextEncoder:
    """A tokenizer plus the special ids the layouts need, looked up by string."""

    def __init__(self, path: Path, required: dict[str, str], fallbacks: dict[str, list[str]]):
        from tokenizers import Tokenizer

        if not path.exists():
            raise UserError(f"tokenizer file {path} does not exist; the checkpoint's config.json preprocessing "
                            "names it: copy it into the checkpoint directory or fix the name")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception with the serde message
            raise UserError(f"{path} is not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from e
        self.path = path
        self.ids: dict[str, int] = {}
        for role, token in required.items():
            tid = self.tokenizer.token_to_id(token)
            for alt in fallbacks.get(role, []):
                if tid is None:
                    tid = self.tokenizer.token_to_id(alt)
            if tid is None:
                raise UserError(f"tokenizer {path} has no {token!r} token; use a tokenizer with the special tokens "
                                f"{list(required.values())}")
            self.ids[role] = int(tid)
        self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
            if len(self._cache) < 4096:
                self._cache[text] = ids
        return ids


class Preprocessor:
    """Image(s) + instruction(s) -> the model's input feeds (numpy), per the checkpoint's config and tokenizers."""

    def __init__(self, preprocessing: dict[str, Any], model_config: dict[str, Any], base_dir: str | os.PathLike,
                 architecture: str | None = None):
        self.base_dir = Path(base_dir)
        self.preprocessing = dict(preprocessing)
        self.model_config = dict(model_config)
        self.architecture = architecture
        self.image_size = int(preprocessing["image_size"])
        self.mean = np.asarray(preprocessing["image_mean"], dtype=np.float32).reshape(3)
        self.std = np.asarray(preprocessing["image_std"], dtype=np.float32).reshape(3)
        if (self.std <= 0).any():
            raise UserError(f"preprocessing image_std {self.std.tolist()} must be positive")
        self.latent_query_num = int(model_config.get("kosmos", {}).get("latent_query_num", 64))
        self.text_len = int(model_config.get("text_len", 16))
        self.clip_text_len = int(model_config.get("clip_text_len", 16))
        if self.text_len < 1 or self.clip_text_len < 2:
            raise UserError(f"text_len {self.text_len} / clip_text_len {self.clip_text_len} too short: need room for "
                            "the end token (and CLIP's start token)")
        self.kosmos = _TextEncoder(
            self.base_dir / preprocessing["kosmos_tokenizer"],
            {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "boi": "<image>", "eoi": "</image>",
             "image": "<image_token>"},
            {"image": ["<unk>"]},
        )
        self.clip = _TextEncoder(
            self.base_dir / preprocessing["clip_tokenizer"],
            {"pad": "<pad>", "bos": "<|startoftext|>", "eos": "<|endoftext|>"},
            {"pad": ["<|endoftext|>"]},
        )

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | os.PathLike) -> "Preprocessor":
        """The preprocessing a native checkpoint directory declares (its config.json and tokenizer files)."""
        from vla_export.checkpoint import DEFAULT_PREPROCESSING, read_config

        config = read_config(ckpt_dir)
        return cls({**DEFAULT_PREPROCESSING, **config.get("preprocessing", {})}, config["model_config"], ckpt_dir,
                   architecture=config.get("architecture"))

    @property
    def seq_len(self) -> int:
        return 3 + self.latent_query_num + self.text_len

    def spec(self):
        """The IO spec of the checkpoint's model (for `check_feeds`)."""
        from vla_export.models import get_architecture

        return get_architecture(self.architecture or "kosmos2-clip-hybrid").spec(self.model_config)

    # -- text --------------------------------------------------------------------------------------------------------
    def encode_text(self, instructions: str | Sequence[str]) -> dict[str, np.ndarray]:
        """Kosmos-2 and CLIP token arrays for a batch of instructions (no pixel_values)."""
        if isinstance(instructions, str):
            instructions = [instructions]
        instructions = list(instructions)
        for text in instructions:
            if not isinstance(text, str):
                raise UserError(f"instruction must be a string, got {type(text).__name__}")
        b, q, k = len(instructions), self.latent_query_num, self.kosmos.ids
        prefix = 3 + q
        ids = np.full((b, self.seq_len), k["pad"], dtype=np.int64)
        att = np.zeros((b, self.seq_len), dtype=np.int64)
        img = np.zeros((b, self.seq_len), dtype=np.int64)
        c = self.clip.ids
        cids = np.full((b, self.clip_text_len), c["pad"], dtype=np.int64)
        catt = np.zeros((b, self.clip_text_len), dtype=np.int64)
        for i, text in enumerate(instructions):
            words = self.kosmos.encode(text)[: self.text_len - 1]
            ids[i, 0], ids[i, 1], ids[i, 2:2 + q], ids[i, 2 + q] = k["bos"], k["boi"], k["image"], k["eoi"]
            ids[i, prefix:prefix + len(words)] = words
            ids[i, prefix + len(words)] = k["eos"]
            att[i, :prefix + len(words) + 1] = 1
            img[i, 2:2 + q] = 1
            cw = self.clip.encode(text)[: self.clip_text_len - 2]
            cids[i, 0] = c["bos"]
            cids[i, 1:1 + len(cw)] = cw
            cids[i, 1 + len(cw)] = c["eos"]
            catt[i, :len(cw) + 2] = 1
        return {"input_ids": ids, "attention_mask": att, "image_embeds_position_mask": img,
                "clip_input_ids": cids, "clip_attention_mask": catt}

    # -- images ------------------------------------------------------------------------------------------------------
    def pixel_values(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """[B,3,S,S] float32 from one HxWx3 uint8 image, a [B,H,W,3] array, or a list of images (sizes may differ)."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            groups = [check_image_batch(images)]
        elif isinstance(images, np.ndarray) and images.ndim == 3:
            groups = [check_image_batch(images[None])]
        elif isinstance(images, (list, tuple)) and images:
            groups = [check_image_batch(np.asarray(im)[None] if np.ndim(im) == 3 else np.asarray(im))
                      for im in images]
        else:
            raise UserError(f"images must be an RGB uint8 HxWx3 array or a list/array of them, got "
                            f"{describe(images)}")
        from vla_export.processors.steps import pixels_from_uint8  # the processors' `image` step runs the same code

        s = self.image_size
        out = [pixels_from_uint8(group, (s, s), self.mean, self.std) for group in groups]
        return np.concatenate(out, axis=0) if len(out) > 1 else out[0]

    def __call__(self, images, instructions: str | Sequence[str]) -> dict[str, np.ndarray]:
        """Model feeds (all IO-spec inputs except recurrent state) for images and one instruction or one each."""
        pixels = self.pixel_values(images)
        b = pixels.shape[0]
        if isinstance(instructions, str):
            text = self.encode_text([instructions])
            text = {k: np.repeat(v, b, axis=0) for k, v in text.items()}
        else:
            instructions = list(instructions)
            if len(instructions) != b:
                raise UserError(f"got {b} images but {len(instructions)} instructions; pass one instruction or one "
                                "per image")
            text = self.encode_text(instructions)
        return {"pixel_values": pixels, **text}

    def preprocess_frames(self, images: np.ndarray, instruction: str) -> dict[str, np.ndarray]:
        """Fast path for an episode: [T,H,W,3] uint8 frames sharing one instruction (tokenised once)."""
        return self(check_image_batch(images), instruction)

    def describe(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "kosmos_tokenizer": str(self.kosmos.path),
                "clip_tokenizer": str(self.clip.path), "seq_len": self.seq_len, "clip_text_len": self.clip_text_len}


def describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {tuple(x.shape)}"
    return type(x).__name__ + (f" of length {len(x)}" if hasattr(x, "__len__") else "")


def check_image_batch(images: np.ndarray) -> np.ndarray:
    """[B,H,W,3] uint8, non-empty: else one UserError line saying what is wrong."""
    if not isinstance(images, np.ndarray):
        raise UserError(f"images must be numpy arrays, got {type(images).__name__}")
    if images.dtype != np.uint8:
        hint = " (contains NaN)" if np.issubdtype(images.dtype, np.floating) and np.isnan(images).any() else ""
        raise UserError(f"images must be RGB uint8 (0-255), got {images.dtype}{hint}; convert with "
                        "np.clip(img, 0, 255).astype(np.uint8) or pass the camera's 8-bit frames")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"images must be HxWx3 RGB (or [B,H,W,3]), got shape {tuple(images.shape)}; convert "
                        "grayscale/RGBA frames to 3-channel RGB first")
    if 0 in images.shape:
        raise UserError(f"images are empty (shape {tuple(images.shape)}); pass at least one non-empty frame")
    return images


def read_tokenizer_names(ckpt_dir: str | os.PathLike) -> list[str]:
    """The tokenizer file names a checkpoint's config.json declares."""
    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    pre = config.get("preprocessing", {})
    return [pre[k] for k in ("kosmos_tokenizer", "clip_tokenizer") if k in pre]
