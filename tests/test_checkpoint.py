"""Checkpoints: native round trip, the original scripts' .pth files, and one clear error per kind of bad file."""

from __future__ import annotations

import argparse
import collections
import json

import pytest
import torch

from vla_export.checkpoint import (
    checkpoint_sha256,
    load_checkpoint,
    load_spec,
    make_config,
    save_checkpoint,
)
from vla_export.errors import UserError
from vla_export.models import build_model

ARCH = "kosmos2-clip-hybrid"


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = make_config(ARCH, "tiny", {})
    model, _ = build_model(ARCH, config["model_config"])
    return model, config


@pytest.fixture(scope="module")
def native(tmp_path_factory, tiny_model):
    model, config = tiny_model
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "demo", config)


def test_native_round_trip_is_bit_exact(native, tiny_model):
    model, config = tiny_model
    loaded = load_checkpoint(native)
    ours, theirs = model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert loaded.config == json.loads((native / "config.json").read_text())
    assert loaded.config["model_config"] == config["model_config"]
    assert loaded.action_names == ["linear_x", "linear_y"]
    assert loaded.sha256 == checkpoint_sha256(native)
    spec, _ = load_spec(native)
    assert spec.to_json() == loaded.spec.to_json()
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in native.iterdir())


def _write_original_pth(path, model, **extra):
    """Exactly how the original training scripts saved: a dict with an argparse.Namespace under `args`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    args = argparse.Namespace(lr=1e-4, batch_size=8, epochs=20, use_lstm=False, data_dir="data/episodes")
    torch.save({"epoch": 12, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "val_mae": 0.212, "args": args, **extra}, path)


def test_legacy_pth_loads_with_weights_only(tmp_path, tiny_model):
    model, _ = tiny_model
    path = tmp_path / "best_model.pth"
    _write_original_pth(path, model)
    loaded = load_checkpoint(path, preset="tiny")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])
    legacy = loaded.config["training"]["legacy"]
    assert legacy["epoch"] == 12 and legacy["val_mae"] == 0.212 and legacy["args"]["batch_size"] == 8


@pytest.mark.parametrize("key", ["state_dict", "model", None])
def test_legacy_alternative_layouts(tmp_path, tiny_model, key):
    model, _ = tiny_model
    path = tmp_path / "x.pth"
    torch.save(model.state_dict() if key is None else {key: model.state_dict()}, path)
    assert load_checkpoint(path, preset="tiny").model is not None


def test_rename_map_for_other_module_names(tmp_path, tiny_model):
    model, _ = tiny_model
    path = tmp_path / "ddp.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(UserError, match="missing keys"):
        load_checkpoint(path, preset="tiny")
    load_checkpoint(path, preset="tiny", rename={"module.": ""})


class Arbitrary:  # any class other than argparse.Namespace must not be unpickled without trust
    pass


def test_arbitrary_pickle_needs_trust(tmp_path, tiny_model):
    model, _ = tiny_model
    path = tmp_path / "evil.pth"
    _write_original_pth(path, model, extra=Arbitrary())
    with pytest.raises(UserError, match="--trust-checkpoint"):
        load_checkpoint(path, preset="tiny")
    assert load_checkpoint(path, preset="tiny", trust=True).model is not None


def test_error_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


def test_error_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        load_checkpoint(path, preset="tiny")
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="not a vla-export checkpoint"):
        load_checkpoint(tmp_path / "dir")


def test_error_unexpected_and_missing_keys(tmp_path, tiny_model):
    model, _ = tiny_model
    state = collections.OrderedDict(model.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["action_head.bias"]
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"1 missing keys \(first: action_head.bias\).*1 unexpected keys"):
        load_checkpoint(path, preset="tiny")


def test_error_shape_mismatch_names_tensor_and_shapes(tmp_path, tiny_model):
    model, _ = tiny_model
    state = dict(model.state_dict())
    state["action_head.weight"] = torch.zeros(3, 64)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"action_head.weight has shape \(3, 64\).*expects \(2, 64\)"):
        load_checkpoint(path, preset="tiny")


def test_error_nan_weights(tmp_path, tiny_model):
    model, _ = tiny_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fusion.0.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="fusion.0.weight contains NaN"):
        load_checkpoint(path, preset="tiny")


def test_error_native_without_weights(tmp_path, native):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((native / "config.json").read_text())
    with pytest.raises(UserError, match="no model.safetensors"):
        load_checkpoint(broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_checkpoint(broken)
