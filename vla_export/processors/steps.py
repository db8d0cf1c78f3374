"""The built-in processor steps. Each is registered under a stable name and configured by plain JSON.

Pre-processing: `image` (uint8 HWC or float CHW frames -> float CHW, resized, optionally mean/std-normalised),
`normalize` (per key: mean_std, min_max, quantiles, quantile10, identity; stats in safetensors), `tokenize` (a
`tokenizers` JSON file, padded to a fixed length), `kosmos2_clip_text` (the built-in hybrid's two token layouts),
`rename` (observation keys -> IO-spec input names, dropping the rest), `stack` (cameras -> one array),
`observation_history` (the last `n_obs_steps` observations per key, LeRobot's `populate_queues`; it sees every
observation, also those answered from the action queue), `noise` (the initial noise a diffusion sampler takes as an
input: drawn from a seeded generator, or given for the next model call).
Post-processing: `action_chunk` (execute a [B, chunk, D] chunk: a queue of `n_action_steps`, or ACT's temporal
ensemble), `unnormalize` (inverse of `normalize`, same modes and stats as LeRobot's `UnnormalizerProcessorStep`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vla_export.errors import UserError
from vla_export.processors.core import ProcessorStep, register_step

NORM_MODES = {"mean_std": ("mean", "std"), "min_max": ("min", "max"), "quantiles": ("q01", "q99"),
              "quantile10": ("q10", "q90"), "identity": ()}


def pixels_from_uint8(frames: np.ndarray, size: tuple[int, int] | None, mean: np.ndarray | None = None,
                      std: np.ndarray | None = None) -> np.ndarray:
    """[B,H,W,3] uint8 -> [B,3,h,w] float32: scaled to [0, 1], resized (bilinear, antialiased, torch CPU: the same
    numbers everywhere) when `size` differs, then (x - mean) / std when given. The hybrid's Preprocessor uses it too."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return _resize_normalize(x, size, mean, std)


def _resize_normalize(x, size, mean, std) -> np.ndarray:
    import torch

    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    if mean is not None:
        m = torch.from_numpy(np.asarray(mean, dtype=np.float32)).view(1, -1, 1, 1)
        s = torch.from_numpy(np.asarray(std, dtype=np.float32)).view(1, -1, 1, 1)
        x = (x - m) / s
    return x.contiguous().numpy()


@register_step("image")
class ImageStep(ProcessorStep):
    """Camera frames -> float32 [B,3,h,w]. Accepts RGB uint8 [B,H,W,3] (a camera) or float [B,3,H,W] in [0, 1] (a
    LeRobot dataset frame). config: keys (observation keys), size [h, w] or null (keep), mean/std (per channel) or
    null (normalisation left to a `normalize` step)."""

    def __init__(self, keys: list[str], size: list[int] | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None):
        super().__init__(keys=list(keys), size=list(size) if size else None, mean=mean, std=std)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std {std} must be positive")
        self.size = tuple(int(v) for v in size) if size else None

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        import torch

        data = dict(data)
        for key in self.cfg["keys"]:
            x = np.asarray(data[key])
            if x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3:
                data[key] = pixels_from_uint8(x, self.size, self.cfg["mean"], self.cfg["std"])
            elif np.issubdtype(x.dtype, np.floating) and x.ndim == 4 and x.shape[1] == 3:
                data[key] = _resize_normalize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), self.size,
                                              self.cfg["mean"], self.cfg["std"])
            else:
                raise UserError(f"observation {key!r}: got {x.dtype} {tuple(x.shape)}; pass RGB uint8 HxWx3 frames "
                                "(or float 3xHxW in [0, 1])")
        return data


@register_step("normalize")
class NormalizeStep(ProcessorStep):
    """(x - mean) / (std + eps), 2 (x - min) / (max - min) - 1 (a zero range divides by eps), quantile forms alike:
    LeRobot 0.4's `NormalizerProcessorStep` arithmetic. config: features {key: mode}, eps. state: `<key>.<stat>`."""

    inverse = False

    def __init__(self, features: dict[str, str], eps: float = 1e-8):
        for key, mode in features.items():
            if mode not in NORM_MODES:
                raise ValueError(f"feature {key!r}: unknown normalisation mode {mode!r} (use {sorted(NORM_MODES)})")
        super().__init__(features=dict(features), eps=float(eps))
        self.stats: dict[str, dict[str, np.ndarray]] = {}

    @classmethod
    def with_stats(cls, features: dict[str, str], stats: dict[str, dict[str, Any]], eps: float = 1e-8):
        step = cls(features, eps)
        step.load_state_dict({f"{k}.{s}": np.asarray(v, dtype=np.float32) for k, sub in stats.items()
                              for s, v in sub.items() if k in features})
        return step

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"{k}.{s}": v for k, sub in self.stats.items() for s, v in sub.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.stats = {}
        for flat, value in state.items():
            key, stat = flat.rsplit(".", 1)
            self.stats.setdefault(key, {})[stat] = np.asarray(value, dtype=np.float32)
        for key, mode in self.cfg["features"].items():
            missing = [s for s in NORM_MODES[mode] if s not in self.stats.get(key, {})]
            if missing:
                raise UserError(f"processor {self.registry_name} step: {key!r} is {mode} but its stats lack "
                                f"{missing}; the processor state file is incomplete")

    def transform(self, key: str, x: np.ndarray) -> np.ndarray:
        mode = self.cfg["features"][key]
        if mode == "identity":
            return x
        x = np.asarray(x, dtype=np.float32)
        st = self.stats[key]
        eps = np.float32(self.cfg["eps"])
        if mode == "mean_std":
            mean, std = st["mean"], st["std"]
            return x * std + mean if self.inverse else (x - mean) / (std + eps)
        lo, hi = (st[s] for s in NORM_MODES[mode])
        denom = hi - lo
        denom = np.where(denom == 0, eps, denom).astype(np.float32)
        return (x + 1) / 2 * denom + lo if self.inverse else 2 * (x - lo) / denom - 1

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        for key in self.cfg["features"]:
            if key in data and data[key] is not None:
                data[key] = self.transform(key, data[key]).astype(np.float32)
        return data


@register_step("unnormalize")
class UnnormalizeStep(NormalizeStep):
    inverse = True


@register_step("rename")
class RenameStep(ProcessorStep):
    """Keys -> new keys. config: map {old: new}; keep_others (default false: the result holds only mapped keys)."""

    def __init__(self, map: dict[str, str], keep_others: bool = False):  # noqa: A002 - the JSON key
        super().__init__(map=dict(map), keep_others=bool(keep_others))

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in self.cfg["map"] if k not in data]
        if missing:
            raise UserError(f"processor rename step: {missing} not produced by the steps before it (have "
                            f"{sorted(data)})")
        out = {k: v for k, v in data.items() if k not in self.cfg["map"]} if self.cfg["keep_others"] else {}
        out.update({new: data[old] for old, new in self.cfg["map"].items()})
        return out


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist; the processor names it: copy it beside "
                        "processor.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception with the serde message
        raise UserError(f"{path} is not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from e


@register_step("tokenize")
class TokenizeStep(ProcessorStep):
    """Text -> token ids + attention mask, padded (or truncated) to `max_length`, so the model sees a fixed shape.

    config: key (observation key, e.g. task), tokenizer (file beside processor.json), max_length, ids / mask (output
    names), pad_token (string; its id is looked up), padding_side (right | left), add_special_tokens, suffix (text
    appended first to a text that does not already end with it: "\\n" is LeRobot's SmolVLA newline step)."""

    def __init__(self, key: str, tokenizer: str, max_length: int, ids: str = "input_ids",
                 mask: str = "attention_mask", pad_token: str = "<pad>", padding_side: str = "right",
                 add_special_tokens: bool = True, suffix: str = ""):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side {padding_side!r}: use right or left")
        if "/" in tokenizer:
            raise ValueError(f"tokenizer {tokenizer!r} must be a file name beside processor.json")
        super().__init__(key=key, tokenizer=tokenizer, max_length=int(max_length), ids=ids, mask=mask,
                         pad_token=pad_token, padding_side=padding_side, add_special_tokens=bool(add_special_tokens),
                         suffix=suffix)
        self._tok = None
        self._pad_id = 0

    def files(self) -> list[str]:
        return [self.cfg["tokenizer"]]

    def bind(self, base_dir: Path) -> None:
        super().bind(base_dir)
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            if self.base_dir is None:
                raise UserError("tokenize step used before its processor directory is known")
            self._tok = _load_tokenizer(self.base_dir / self.cfg["tokenizer"])
            pad = self._tok.token_to_id(self.cfg["pad_token"])
            if pad is None:
                raise UserError(f"tokenizer {self.cfg['tokenizer']} has no pad token {self.cfg['pad_token']!r}")
            self._pad_id = int(pad)
        return self._tok

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        tok = self._tokenizer()
        suffix = self.cfg["suffix"]
        texts = [t if t.endswith(suffix) else t + suffix for t in data[self.cfg["key"]]]
        n = self.cfg["max_length"]
        ids = np.full((len(texts), n), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), n), dtype=np.int64)
        for i, enc in enumerate(tok.encode_batch(texts, add_special_tokens=self.cfg["add_special_tokens"])):
            row = list(enc.ids)[:n]
            if self.cfg["padding_side"] == "right":
                ids[i, :len(row)], mask[i, :len(row)] = row, 1
            else:
                ids[i, n - len(row):], mask[i, n - len(row):] = row, 1
        data = dict(data)
        data[self.cfg["ids"]], data[self.cfg["mask"]] = ids, mask
        return data


@register_step("kosmos2_clip_text")
class Kosmos2ClipTextStep(ProcessorStep):
    """The built-in hybrid's text: the Kosmos-2 layout with image slots and the CLIP layout (see
    `vla_export.data.preprocess`), from the two tokenizer files. config: key, kosmos_tokenizer, clip_tokenizer,
    latent_query_num, text_len, clip_text_len."""

    def __init__(self, key: str, kosmos_tokenizer: str, clip_tokenizer: str, latent_query_num: int, text_len: int,
                 clip_text_len: int):
        super().__init__(key=key, kosmos_tokenizer=kosmos_tokenizer, clip_tokenizer=clip_tokenizer,
                         latent_query_num=int(latent_query_num), text_len=int(text_len),
                         clip_text_len=int(clip_text_len))
        self._pre = None

    def files(self) -> list[str]:
        return [self.cfg["kosmos_tokenizer"], self.cfg["clip_tokenizer"]]

    def bind(self, base_dir: Path) -> None:
        super().bind(base_dir)
        self._pre = None

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if self._pre is None:
            from vla_export.data.preprocess import Preprocessor

            c = self.cfg
            self._pre = Preprocessor(
                {"image_size": 1, "image_mean": [0.0] * 3, "image_std": [1.0] * 3,
                 "kosmos_tokenizer": c["kosmos_tokenizer"], "clip_tokenizer": c["clip_tokenizer"]},
                {"kosmos": {"latent_query_num": c["latent_query_num"]}, "text_len": c["text_len"],
                 "clip_text_len": c["clip_text_len"]}, self.base_dir)
        return {**data, **self._pre.encode_text(data[self.cfg["key"]])}


@register_step("action_chunk")
class ActionChunkStep(ProcessorStep):
    """Execute an action chunk [B, chunk, D] one action per control step, as LeRobot's ACT `select_action` does:
    with `temporal_ensemble_coeff` null, queue the first `n_action_steps` actions and call the model again when the
    queue is empty; else average every chunk's prediction for the current step with weights exp(-coeff * i), i = 0
    for the oldest (ACT's Algorithm 2, online form of `ACTTemporalEnsembler`), calling the model every step."""

    def __init__(self, key: str = "action", chunk_size: int = 1, n_action_steps: int = 1,
                 temporal_ensemble_coeff: float | None = None):
        if temporal_ensemble_coeff is not None and n_action_steps != 1:
            raise ValueError("temporal ensembling runs the model every step: n_action_steps must be 1")
        if not 1 <= n_action_steps <= chunk_size:
            raise ValueError(f"n_action_steps {n_action_steps} must be in 1..chunk_size ({chunk_size})")
        super().__init__(key=key, chunk_size=int(chunk_size), n_action_steps=int(n_action_steps),
                         temporal_ensemble_coeff=temporal_ensemble_coeff)
        if temporal_ensemble_coeff is not None:
            w = np.exp(-float(temporal_ensemble_coeff) * np.arange(chunk_size, dtype=np.float32)).astype(np.float32)
            self.weights, self.weights_cumsum = w, np.cumsum(w, dtype=np.float32)
        self.reset()

    def reset(self) -> None:
        self.queue: list[np.ndarray] = []
        self.ensembled: np.ndarray | None = None
        self.count: np.ndarray | None = None

    def pending(self) -> bool:
        return bool(self.queue)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        key = self.cfg["key"]
        chunk = data.get(key)
        data = dict(data)
        if chunk is None:
            if not self.queue:
                raise UserError("action_chunk: no queued action and no model output; run the model")
            data[key] = self.queue.pop(0)
            return data
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 3 or chunk.shape[1] != self.cfg["chunk_size"]:
            raise UserError(f"action_chunk: model output {key} has shape {tuple(chunk.shape)}, expected [B, "
                            f"{self.cfg['chunk_size']}, action_dim]")
        if self.cfg["temporal_ensemble_coeff"] is None:
            self.queue = [chunk[:, i] for i in range(self.cfg["n_action_steps"])]
            data[key] = self.queue.pop(0)
            return data
        if self.ensembled is not None and self.ensembled.shape[0] != chunk.shape[0]:
            raise UserError(f"action_chunk: the ensemble holds batch {self.ensembled.shape[0]}, got "
                            f"{chunk.shape[0]}; call reset() before changing the batch size")
        w, wc = self.weights, self.weights_cumsum
        if self.ensembled is None:
            self.ensembled = chunk.copy()
            self.count = np.ones((self.cfg["chunk_size"], 1), dtype=np.int64)
        else:
            e = self.ensembled * wc[self.count - 1]
            e = e + chunk[:, :-1] * w[self.count]
            e = e / wc[self.count]
            self.count = np.minimum(self.count + 1, self.cfg["chunk_size"])
            self.ensembled = np.concatenate([e, chunk[:, -1:]], axis=1).astype(np.float32)
            self.count = np.concatenate([self.count, np.ones_like(self.count[-1:])])
        data[key] = self.ensembled[:, 0]
        self.ensembled, self.count = self.ensembled[:, 1:], self.count[1:]
        return data


@register_step("stack")
class StackStep(ProcessorStep):
    """Several arrays -> one, stacked on `axis` (cameras of one shape -> [B, n_cam, 3, H, W]). config: keys, out,
    axis. The inputs are dropped."""

    def __init__(self, keys: list[str], out: str, axis: int = 1):
        super().__init__(keys=list(keys), out=out, axis=int(axis))

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        shapes = {tuple(np.shape(data[k])) for k in self.cfg["keys"]}
        if len(shapes) > 1:
            raise UserError(f"cannot stack {self.cfg['keys']}: their shapes differ ({sorted(shapes)}); give every "
                            "camera the same size")
        out = {k: v for k, v in data.items() if k not in self.cfg["keys"]}
        out[self.cfg["out"]] = np.stack([data[k] for k in self.cfg["keys"]], axis=self.cfg["axis"])
        return out


@register_step("observation_history")
class ObservationHistoryStep(ProcessorStep):
    """The last `n_obs_steps` values of each key, stacked on axis 1: [B, ...] -> [B, n_obs_steps, ...], as LeRobot's
    `populate_queues` + `predict_action_chunk` (Diffusion Policy): the first observation of an episode fills the
    whole history with copies of itself, each later one pushes the oldest out. `observes_every_step`: the processor
    runs it (and the steps before it) on every observation, also when the action comes from the queue, because
    LeRobot's `select_action` appends to the history on every call. config: keys, n_obs_steps. reset() clears it."""

    observes_every_step = True

    def __init__(self, keys: list[str], n_obs_steps: int):
        if int(n_obs_steps) < 1:
            raise ValueError(f"n_obs_steps {n_obs_steps} must be >= 1")
        super().__init__(keys=list(keys), n_obs_steps=int(n_obs_steps))
        self.reset()

    def reset(self) -> None:
        self.held: dict[str, list[np.ndarray]] = {}

    def history(self) -> int:
        return self.cfg["n_obs_steps"]

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        n = self.cfg["n_obs_steps"]
        for key in self.cfg["keys"]:
            if key not in data:
                raise UserError(f"processor observation_history step: {key!r} not produced by the steps before it "
                                f"(have {sorted(data)})")
            x = np.asarray(data[key])
            held = self.held.get(key)
            if held and held[-1].shape != x.shape:
                raise UserError(f"observation_history: {key!r} holds frames of shape {held[-1].shape}, got "
                                f"{x.shape}; call reset() before changing the batch size")
            self.held[key] = [*held[1:], x] if held else [x] * n
            data[key] = np.stack(self.held[key], axis=1)
        return data


@register_step("noise")
class NoiseStep(ProcessorStep):
    """The initial noise a diffusion sampler exported with its noise as an input takes: `key` [B, *shape] float32.

    Drawn from numpy's PCG64 generator seeded with `seed` (re-seeded by reset(), so an episode replays given the same
    observations); this is not LeRobot's torch.randn stream, so the numbers differ from LeRobot's own draws while
    following the same distribution (standard normal). `give(noise)` sets the noise of the next model call instead
    (e.g. the same noise LeRobot's `select_action(batch, noise=...)` is given). config: key, shape, seed."""

    def __init__(self, key: str = "noise", shape: list[int] | None = None, seed: int = 0):
        if not shape or any(int(d) < 1 for d in shape):
            raise ValueError(f"noise shape {shape} must be a list of positive sizes")
        super().__init__(key=key, shape=[int(d) for d in shape], seed=int(seed))
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.cfg["seed"])
        self.given: np.ndarray | None = None

    def give(self, noise: Any) -> None:
        """Use `noise` ([B, *shape], or [*shape] for a single observation) for the next model call only."""
        if hasattr(noise, "numpy") and not isinstance(noise, np.ndarray):  # a torch tensor
            noise = noise.detach().cpu().numpy()
        noise = np.asarray(noise, dtype=np.float32)
        if noise.ndim == len(self.cfg["shape"]):
            noise = noise[None]
        if list(noise.shape[1:]) != self.cfg["shape"]:
            want = ", ".join(map(str, self.cfg["shape"]))
            raise UserError(f"noise: got shape {tuple(noise.shape)}, expected [B, {want}]")
        self.given = noise

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        batch = len(next(iter(data.values())))
        if self.given is not None:
            noise, self.given = self.given, None
            if noise.shape[0] != batch:
                raise UserError(f"noise: given for batch {noise.shape[0]}, the observation has batch {batch}")
        else:
            noise = self.rng.standard_normal((batch, *self.cfg["shape"]), dtype=np.float32)
        return {**data, self.cfg["key"]: noise}
