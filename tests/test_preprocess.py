"""Preprocessing: tokenizer special ids, the token layout the model expects, images, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vla_export.checkpoint import make_config
from vla_export.data.episodes import load_episode, synth_episodes, synth_instructions
from vla_export.data.preprocess import Preprocessor, build_tokenizers
from vla_export.errors import UserError
from vla_export.models.kosmos2_clip import CLIP_SPECIAL_TOKENS, KOSMOS_SPECIAL_TOKENS, io_spec


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A checkpoint directory's preprocessing half: config.json + tokenizers (no weights needed)."""
    d = tmp_path_factory.mktemp("ckpt")
    config = make_config("kosmos2-clip-hybrid", "tiny", {"head": "lstm"})
    (d / "config.json").write_text(json.dumps(config))
    build_tokenizers(d, synth_instructions(), 512)
    return d


@pytest.fixture(scope="module")
def pre(ckpt_dir):
    return Preprocessor.from_checkpoint(ckpt_dir)


def test_tokenizer_special_ids_and_vocab(ckpt_dir):
    from tokenizers import Tokenizer

    k = Tokenizer.from_file(str(ckpt_dir / "kosmos_tokenizer.json"))
    c = Tokenizer.from_file(str(ckpt_dir / "clip_tokenizer.json"))
    assert [k.token_to_id(t) for t in KOSMOS_SPECIAL_TOKENS] == list(range(len(KOSMOS_SPECIAL_TOKENS)))
    assert [c.token_to_id(t) for t in CLIP_SPECIAL_TOKENS] == list(range(len(CLIP_SPECIAL_TOKENS)))
    assert k.get_vocab_size() <= 512 and c.get_vocab_size() <= 512
    ids = k.encode("Track the RED cup slowly", add_special_tokens=False).ids
    assert 3 not in ids  # every word known, case-insensitive: no <unk>


def test_vocab_is_cut_to_size(tmp_path):
    build_tokenizers(tmp_path, [f"w{i}" for i in range(100)], 20)
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "kosmos_tokenizer.json")).get_vocab_size() == 20
    with pytest.raises(UserError, match="no room"):
        build_tokenizers(tmp_path, ["a"], 5)


def test_layout_matches_spec_examples(pre, ckpt_dir):
    cfg = json.loads((ckpt_dir / "config.json").read_text())["model_config"]
    spec = io_spec(cfg)
    ex = spec.example_inputs(batch=1, seed=0)
    feeds = pre(np.zeros((40, 50, 3), np.uint8), "Navigate around obstacles to track the blue cup")
    spec.check_feeds({**feeds, **spec.initial_state(1)})
    for name in ("input_ids", "attention_mask", "image_embeds_position_mask", "clip_input_ids",
                 "clip_attention_mask"):
        assert feeds[name].shape == ex[name].shape and feeds[name].dtype == np.int64, name
    q = cfg["kosmos"]["latent_query_num"]
    ids, exi = feeds["input_ids"][0], ex["input_ids"][0]
    # image span identical: <s> <image> <image_token>*Q </image>
    assert np.array_equal(ids[:3 + q], exi[:3 + q])
    assert np.array_equal(feeds["image_embeds_position_mask"], ex["image_embeds_position_mask"])
    n = int(feeds["attention_mask"][0].sum())
    assert ids[n - 1] == 2 and (ids[n:] == 1).all() and (feeds["attention_mask"][0][:n] == 1).all()
    assert 3 + q + 2 < n  # the words are there
    m = int(feeds["clip_attention_mask"][0].sum())
    cids = feeds["clip_input_ids"][0]
    assert cids[0] == 2 and cids[m - 1] == 3 and (cids[m:] == 0).all()


def test_long_instruction_is_truncated_keeping_end_token(pre):
    feeds = pre(np.zeros((8, 8, 3), np.uint8), " ".join(["cup"] * 100))
    assert feeds["attention_mask"].sum() == feeds["attention_mask"].shape[1]
    assert feeds["input_ids"][0, -1] == 2
    assert feeds["clip_input_ids"][0, -1] == 3


def test_images_resize_normalise_and_batch(pre):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    one = pre(a, "track the red cup")
    assert one["pixel_values"].shape == (1, 3, 224, 224) and one["pixel_values"].dtype == np.float32
    both = pre([a, b], ["track the red cup", "track the blue cup slowly"])
    assert both["pixel_values"].shape == (2, 3, 224, 224)
    assert np.array_equal(both["pixel_values"][0], one["pixel_values"][0])  # deterministic, batch-independent
    assert not np.array_equal(both["input_ids"][0], both["input_ids"][1])
    # a uniform grey image maps to (v/255 - mean) / std exactly, whatever the resize
    grey = pre(np.full((31, 17, 3), 128, np.uint8), "x")["pixel_values"][0]
    want = (128 / 255 - np.array(pre.mean)) / np.array(pre.std)
    assert np.allclose(grey.reshape(3, -1).mean(1), want, atol=1e-5)
    assert np.allclose(grey.reshape(3, -1).std(1), 0, atol=1e-5)


@pytest.mark.parametrize("image, message", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((8, 8), np.uint8), "HxWx3"),
    (np.zeros((8, 8, 4), np.uint8), "HxWx3"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    ([], "RGB uint8"),
])
def test_bad_images_raise_one_clear_error(pre, image, message):
    with pytest.raises(UserError, match=message):
        pre(image, "track the red cup")


def test_instruction_count_must_match(pre):
    with pytest.raises(UserError, match="2 images but 3 instructions"):
        pre(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b", "c"])


def test_missing_tokenizer_file(tmp_path):
    config = make_config("kosmos2-clip-hybrid", "tiny", {})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="kosmos_tokenizer.json does not exist"):
        Preprocessor.from_checkpoint(tmp_path)


def test_episode_frames_fast_path_equals_per_frame_call(pre, tmp_path):
    ep = load_episode(synth_episodes(tmp_path, count=1, seed=0, frames=3, image_size=48)[0])
    fast = pre.preprocess_frames(ep.images, ep.instruction)
    for t in range(3):
        one = pre(ep.images[t], ep.instruction)
        for k in one:
            assert np.array_equal(fast[k][t], one[k][0]), k
