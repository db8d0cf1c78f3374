"""The reference policy: presets, forward shapes, IO spec against the real forward, index-based image placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_export.errors import UserError
from vla_export.io_spec import IOSpec
from vla_export.models import build_model, get_architecture, kosmos2_clip

ARCH = kosmos2_clip.ARCH_NAME


def _torch_feeds(spec, **kw):
    return {k: torch.from_numpy(v) for k, v in spec.example_inputs(**kw).items()}


@pytest.fixture(scope="module", params=["mlp", "lstm"])
def tiny(request):
    cfg = kosmos2_clip.resolve_config("tiny", {"head": request.param})
    torch.manual_seed(0)
    return build_model(ARCH, cfg)


def test_full_preset_parameter_count_on_meta():
    cfg = kosmos2_clip.resolve_config("full")
    with torch.device("meta"):
        model, spec = build_model(ARCH, cfg)
    assert sum(p.numel() for p in model.parameters()) == 1_817_467_907
    assert spec.tensor("pixel_values").shape == ("batch", 3, 224, 224)


def test_presets_sizes():
    with torch.device("meta"):
        tiny_model, _ = build_model(ARCH, kosmos2_clip.resolve_config("tiny"))
        small_model, _ = build_model(ARCH, kosmos2_clip.resolve_config("small"))
    assert sum(p.numel() for p in tiny_model.parameters()) < 5_000_000
    assert 30_000_000 <= sum(p.numel() for p in small_model.parameters()) <= 80_000_000


def test_overrides_reach_the_model():
    cfg = kosmos2_clip.resolve_config("tiny", {"action_dim": 3, "clip": {"projection_dim": 32}})
    model, spec = build_model(ARCH, cfg)
    assert model.clip.config.projection_dim == 32
    assert spec.concrete_shape("actions", batch=2) == (2, 3)
    with pytest.raises(ValueError, match="unknown preset"):
        kosmos2_clip.resolve_config("huge")


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_matches_io_spec(tiny, batch):
    model, spec = tiny
    feeds = _torch_feeds(spec, batch=batch, seed=batch)
    spec.check_feeds({k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        out = model(**feeds)
    out = out if isinstance(out, tuple) else (out,)
    assert [o.name for o in spec.outputs] == spec.output_names
    assert len(out) == len(spec.outputs)
    for t, o in zip(spec.outputs, out, strict=True):
        assert tuple(o.shape) == spec.concrete_shape(t.name, batch=batch)
        assert str(o.dtype) == f"torch.{t.dtype}"


def test_text_length_may_vary(tiny):
    model, spec = tiny
    short = spec.dims["seq"].opt - 5
    feeds = _torch_feeds(spec, batch=2, seed=0, seq=short)
    with torch.no_grad():
        out = model(**feeds)
    first = out[0] if isinstance(out, tuple) else out
    assert first.shape[0] == 2


def test_example_inputs_are_deterministic(tiny):
    _, spec = tiny
    a, b, c = spec.example_inputs(batch=2, seed=7), spec.example_inputs(batch=2, seed=7), spec.example_inputs(
        batch=2, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["pixel_values"], c["pixel_values"])


def test_index_placement_equals_kosmos2_boolean_scatter(tiny):
    """The policy's gather+where placement of image embeddings equals Kosmos2Model's own forward."""
    model, spec = tiny
    f = _torch_feeds(spec, batch=3, seed=2)
    with torch.no_grad():
        ours = model.kosmos_features(f["pixel_values"], f["input_ids"], f["attention_mask"],
                                     f["image_embeds_position_mask"])
        hidden = model.kosmos(pixel_values=f["pixel_values"], input_ids=f["input_ids"],
                              attention_mask=f["attention_mask"],
                              image_embeds_position_mask=f["image_embeds_position_mask"]).last_hidden_state
    w = f["attention_mask"].float().unsqueeze(-1)
    ref = (hidden * w).sum(1) / w.sum(1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_lstm_state_changes_the_output():
    cfg = kosmos2_clip.resolve_config("tiny", {"head": "lstm"})
    model, spec = build_model(ARCH, cfg)
    f = _torch_feeds(spec, batch=2, seed=1)
    with torch.no_grad():
        a1, h1, c1 = model(**f)
        a2, _, _ = model(**{**f, "h": h1, "c": c1})
    assert spec.state == {"h_out": "h", "c_out": "c"}
    assert not torch.allclose(a1, a2)


def test_spec_json_round_trip(tiny):
    _, spec = tiny
    again = IOSpec.from_json(spec.to_json())
    assert again.to_json() == spec.to_json()
    assert again.profile_shapes()["pixel_values"][2][0] == spec.dims["batch"].max


def test_profile_shapes_and_overrides(tiny):
    _, spec = tiny
    shapes = spec.profile_shapes(batch=(1, 2, 4))
    lo, opt, hi = shapes["input_ids"]
    assert (lo[0], opt[0], hi[0]) == (1, 2, 4)
    assert lo[1] <= opt[1] <= hi[1]
    with pytest.raises(ValueError):
        spec.profile_shapes(batch=(4, 2, 1))


def test_check_feeds_names_every_problem(tiny):
    _, spec = tiny
    feeds = spec.example_inputs(batch=1)
    feeds["input_ids"] = feeds["input_ids"].astype(np.int32)
    del feeds["pixel_values"]
    with pytest.raises(ValueError, match="missing inputs.*pixel_values.*input_ids: dtype int32"):
        spec.check_feeds(feeds)


def test_plugin_architecture_and_unknown_name():
    arch = get_architecture("tests.plugin_arch:build")
    model, spec = arch.build({"width": 4})
    assert spec.input_names == ["x"]
    with pytest.raises(UserError, match="unknown architecture"):
        get_architecture("no-such-arch")
    with pytest.raises(UserError, match="cannot load architecture factory"):
        get_architecture("tests.no_such_module:build")


def test_towers_load_local_pretrained_directories(tmp_path, tiny):
    """A user with real Kosmos-2/CLIP weights points the config at local HF directories (offline)."""
    model, _ = tiny
    model.kosmos.save_pretrained(tmp_path / "kosmos")
    model.clip.save_pretrained(tmp_path / "clip")
    cfg = dict(model.cfg, kosmos_pretrained=str(tmp_path / "kosmos"), clip_pretrained=str(tmp_path / "clip"))
    again, _ = build_model(ARCH, cfg)
    for name, tensor in model.kosmos.state_dict().items():
        assert torch.equal(tensor, again.kosmos.state_dict()[name]), name
    for name, tensor in model.clip.state_dict().items():
        assert torch.equal(tensor, again.clip.state_dict()[name]), name
