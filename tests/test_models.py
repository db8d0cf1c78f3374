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


def test_image_embeddings_equal_kosmos2_model_own(tiny):
    """The image embeddings the policy computes from Kosmos-2's submodules (`kosmos_image_features`: one code path
    for transformers 4.x and 5.x, whose get_image_features return different things) equal the ones Kosmos2Model's
    own forward places into the text (`image_embeds`, a field of its output in both)."""
    model, spec = tiny
    f = _torch_feeds(spec, batch=2, seed=4)
    with torch.no_grad():
        hidden, ours = model.kosmos_image_features(f["pixel_values"])
        out = model.kosmos(pixel_values=f["pixel_values"], input_ids=f["input_ids"],
                           attention_mask=f["attention_mask"],
                           image_embeds_position_mask=f["image_embeds_position_mask"])
    torch.testing.assert_close(ours, out.image_embeds, rtol=0, atol=1e-6)
    assert hidden.shape[1] == model.kosmos.vision_model.config.image_size ** 2 // (
        model.kosmos.vision_model.config.patch_size ** 2) + 1  # class token + the patch grid


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


def test_action_normalization_is_inside_the_graph(tiny):
    """The head predicts standardised actions; mean/std buffers de-normalise them in forward (so in every export)."""
    model, spec = tiny
    f = _torch_feeds(spec, batch=2, seed=3)
    mean, std = torch.tensor([0.2, -0.1]), torch.tensor([0.15, 0.05])
    with torch.no_grad():
        raw = model(**f)
        model.set_action_normalization(mean, std)
        scaled = model(**f)
        model.set_action_normalization(torch.zeros(2), torch.ones(2))
    raw, scaled = (raw[0], scaled[0]) if isinstance(raw, tuple) else (raw, scaled)
    torch.testing.assert_close(scaled, raw * std + mean, rtol=1e-5, atol=1e-6)
    assert {"action_mean", "action_std"} <= set(model.state_dict())


def test_spatial_branch_reads_where_the_patches_are():
    """Each head's pooled coordinates are the attention-weighted patch positions: a head that attends to one patch
    returns that patch's (x, y), left to right in row-major order."""
    pool = kosmos2_clip.SpatialPool(patch_dim=8, query_dim=4, grid=4, heads=1, out_dim=8, patch_size=2)
    assert pool.coords.shape == (16, 2)
    assert pool.coords[0].tolist() == [-1.0, -1.0] and pool.coords[3].tolist() == [1.0, -1.0]
    assert pool.coords[12].tolist() == [-1.0, 1.0]
    # keys that read only the red channel's patch mean, a query that asks for it: attention finds the red patch
    with torch.no_grad():
        for layer in (pool.key, pool.query):
            layer.weight.zero_()
            layer.bias.zero_()
        pool.key.weight[0, 8] = 10.0  # key dim 0 <- the patch's mean red
        pool.query.bias[0] = 10.0
    for row, col in ((1, 3), (2, 0)):
        pixels = torch.zeros(1, 3, 8, 8)
        pixels[0, 0, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = 1.0  # one red 2x2 patch in an 8x8 image
        where, _ = pool.locate(torch.randn(1, 16, 8), pool.patch_colour(pixels), torch.randn(1, 4))
        torch.testing.assert_close(where[0, 0, 0], torch.tensor([-1 + 2 * col / 3, -1 + 2 * row / 3]),
                                   atol=1e-3, rtol=0)
    assert "spatial.coords" not in kosmos2_clip.Kosmos2ClipPolicy(
        kosmos2_clip.resolve_config("tiny")).state_dict()  # derived, not a weight


def _legacy_state(model) -> dict:
    """The original scripts' layout: no spatial branch (nor its skip path), no normalisation buffers."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("spatial.", "spatial_skip.")) and k not in ("action_mean", "action_std")}


def test_original_layout_pth_loads_with_identity_normalization(tmp_path):
    from vla_export.checkpoint import load_checkpoint

    cfg = kosmos2_clip.resolve_config("tiny", {"spatial_heads": 0, "action_norm": False})
    torch.manual_seed(0)
    original, spec = build_model(ARCH, cfg)
    assert original.spatial is None and original.action_mean is None
    path = tmp_path / "best_model.pth"
    torch.save({"epoch": 1, "model_state_dict": original.state_dict()}, path)
    loaded = load_checkpoint(path, preset="tiny")
    assert loaded.model.spatial is None and loaded.model.action_mean is None
    assert loaded.config["model_config"]["spatial_heads"] == 0
    assert loaded.model.state_dict().keys() == original.state_dict().keys()
    f = _torch_feeds(spec, batch=2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**f), original(**f), rtol=0, atol=0)
    # the demo preset builds the spatial branch and the buffers; the original layout is its subset, same shapes
    demo, _ = build_model(ARCH, kosmos2_clip.resolve_config("tiny"))
    assert demo.spatial is not None
    legacy = _legacy_state(demo)
    assert {k: tuple(v.shape) for k, v in legacy.items()} == {k: tuple(v.shape) for k, v in
                                                               original.state_dict().items()}


def test_native_checkpoint_written_before_the_new_layout_loads(tmp_path):
    """config.json of an older native checkpoint has neither key: it builds the original layout."""
    import json

    from vla_export.checkpoint import load_checkpoint, make_config, save_checkpoint

    config = make_config(ARCH, "tiny", {"spatial_heads": 0, "action_norm": False})
    model, _ = build_model(ARCH, config["model_config"])
    for key in ("spatial_heads", "action_norm"):
        del config["model_config"][key]
    out = save_checkpoint(model, tmp_path / "old", config)
    assert "spatial_heads" not in json.loads((out / "config.json").read_text())["model_config"]
    loaded = load_checkpoint(out)
    assert loaded.model.spatial is None and loaded.model.action_mean is None


def test_demo_checkpoint_made_before_the_skip_path_loads_as_it_was(tmp_path):
    """A demo checkpoint of the previous recipe (spatial heads, no `spatial_skip` key or tensors): native directory
    and .pth both build it without the skip path and give its outputs exactly."""
    import json

    from vla_export.checkpoint import load_checkpoint, make_config, save_checkpoint

    config = make_config(ARCH, "tiny", {"spatial_skip": False})
    torch.manual_seed(0)
    model, spec = build_model(ARCH, config["model_config"])
    assert model.spatial is not None and model.spatial_skip is None
    del config["model_config"]["spatial_skip"]
    out = save_checkpoint(model, tmp_path / "before", config)
    assert "spatial_skip" not in json.loads((out / "config.json").read_text())["model_config"]
    path = tmp_path / "before.pth"
    torch.save({"epoch": 1, "model_state_dict": model.state_dict()}, path)
    f = _torch_feeds(spec, batch=2, seed=5)
    for loaded in (load_checkpoint(out), load_checkpoint(path, preset="tiny")):
        assert loaded.model.spatial is not None and loaded.model.spatial_skip is None
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(**f), model(**f), rtol=0, atol=0)
    # the current demo preset has the path
    demo, _ = build_model(ARCH, kosmos2_clip.resolve_config("tiny"))
    assert demo.spatial_skip is not None
