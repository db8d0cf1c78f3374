"""Episodes: synthetic generator determinism, the loader's checks, the split by episode."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from vla_export.data.episodes import (
    COMPLETE_MARKER,
    DEFAULT_INSTRUCTION,
    SINGLE_CAMERA,
    Episode,
    list_episodes,
    load_episode,
    split_episodes,
    synth_episodes,
    write_episode,
)
from vla_export.errors import UserError


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("eps")
    paths = synth_episodes(out, count=4, seed=3, frames=6, image_size=32)
    return out, paths


def test_synth_writes_valid_episodes_and_marker(small_set):
    out, paths = small_set
    assert (out / COMPLETE_MARKER).exists()
    assert list_episodes(out) == paths
    ep = load_episode(paths[0])
    assert ep.images.shape == (6, 32, 32, 3) and ep.images.dtype == np.uint8
    assert ep.actions.shape == (6, 3) and ep.actions.dtype == np.float32
    assert "cup" in ep.instruction
    # no temporary files left behind
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_synth_is_deterministic_by_seed(small_set, tmp_path):
    _, paths = small_set
    again = synth_episodes(tmp_path / "a", count=4, seed=3, frames=6, image_size=32)
    other = synth_episodes(tmp_path / "b", count=4, seed=4, frames=6, image_size=32)
    for p, q in zip(paths, again, strict=True):
        a, b = load_episode(p), load_episode(q)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.actions, b.actions)
        assert a.instruction == b.instruction
    assert not np.array_equal(load_episode(paths[0]).images, load_episode(other[0]).images)
    assert not np.array_equal(load_episode(paths[0]).actions, load_episode(other[0]).actions)


def test_synth_uses_several_instructions(tmp_path):
    paths = synth_episodes(tmp_path, count=16, seed=0, frames=2, image_size=16)
    assert len({load_episode(p).instruction for p in paths}) >= 4


def test_split_is_by_episode_and_deterministic():
    paths = [f"/x/episode_{i:04d}.h5" for i in range(20)]
    train, val = split_episodes(paths, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16
    assert not set(train) & set(val)
    assert (train, val) == split_episodes(list(reversed(paths)), 0.2, seed=1)
    assert split_episodes(paths, 0.2, seed=2)[1] != val


def test_list_episodes_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_episodes(tmp_path / "missing")
    with pytest.raises(UserError, match=r"no \.h5/\.hdf5 files"):
        list_episodes(tmp_path)


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)


@pytest.mark.parametrize("datasets, message", [
    ({"actions": np.zeros((3, 3), np.float32)}, "no 'images' dataset"),
    ({"images": np.zeros((3, 8, 8, 3), np.uint8)}, "no 'actions' dataset"),
    ({"images": np.zeros((3, 8, 8, 3), np.float32), "actions": np.zeros((3, 3), np.float32)}, "uint8"),
    ({"images": np.zeros((3, 8, 8, 4), np.uint8), "actions": np.zeros((3, 3), np.float32)}, "RGB"),
    ({"images": np.zeros((3, 8, 8, 3), np.uint8), "actions": np.zeros((3, 1), np.float32)}, r"\[T,>=2\]"),
    ({"images": np.zeros((3, 8, 8, 3), np.uint8), "actions": np.zeros((4, 3), np.float32)}, "3 images but 4"),
    ({"images": np.zeros((2, 8, 8, 3), np.uint8), "actions": np.full((2, 3), np.nan, np.float32)}, "NaN"),
])
def test_load_episode_rejects_invalid_files(tmp_path, datasets, message):
    path = tmp_path / "bad.h5"
    _write(path, **datasets)
    with pytest.raises(UserError, match=message):
        load_episode(path)


def test_load_episode_not_hdf5_and_default_instruction(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="not a readable HDF5"):
        load_episode(bad)
    # the original recordings carried no instruction attribute: the fixed task's instruction applies
    plain = tmp_path / "plain.h5"
    _write(plain, images=np.zeros((2, 8, 8, 3), np.uint8), actions=np.zeros((2, 3), np.float64))
    ep = load_episode(plain)
    assert ep.instruction == DEFAULT_INSTRUCTION and ep.actions.dtype == np.float32


def test_write_episode_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    ep = Episode("e", rng.integers(0, 256, (2, 9, 9, 3), dtype=np.uint8), np.ones((2, 3), np.float32),
                 "track the red cup")
    got = load_episode(write_episode(tmp_path / "e.h5", ep))
    assert np.array_equal(got.images, ep.images) and got.instruction == ep.instruction


def test_synth_refuses_to_overwrite_foreign_episodes(tmp_path):
    _write(tmp_path / "recording.h5", images=np.zeros((1, 8, 8, 3), np.uint8), actions=np.zeros((1, 3), np.float32))
    with pytest.raises(UserError, match="not written by `episodes synth`"):
        synth_episodes(tmp_path, count=1, frames=1, image_size=16)
    assert (tmp_path / "recording.h5").exists()


def test_synth_rerun_replaces_its_own_episodes(tmp_path):
    synth_episodes(tmp_path, count=3, frames=1, image_size=16)
    assert len(synth_episodes(tmp_path, count=2, frames=1, image_size=16)) == len(list_episodes(tmp_path)) == 2


# -- named observations: several cameras, a state vector, actions of any width -------------------------------------
def _named_episode(rng, frames=3, actions=5):
    obs = {"observation.images.top": rng.integers(0, 256, (frames, 12, 16, 3), dtype=np.uint8),
           "observation.images.wrist": rng.integers(0, 256, (frames, 10, 10, 3), dtype=np.uint8),
           "observation.state": rng.standard_normal((frames, 7)).astype(np.float32)}
    return Episode("named", None, rng.standard_normal((frames, actions)).astype(np.float32), "stack the cups",
                   observations=obs)


def test_named_episode_roundtrip_keeps_every_camera_state_and_action(tmp_path):
    ep = _named_episode(np.random.default_rng(1))
    path = write_episode(tmp_path / "named.h5", ep)
    with h5py.File(path) as f:
        assert "images" not in f and {"observation.images.top", "observation.state", "actions"} <= set(f)
    got = load_episode(path)
    assert sorted(got.observations) == sorted(ep.observations)
    for key, value in ep.observations.items():
        assert got.observations[key].dtype == value.dtype and np.array_equal(got.observations[key], value), key
    assert np.array_equal(got.actions, ep.actions) and got.actions.shape == (3, 5)
    assert got.instruction == "stack the cups" and got.tasks(slice(0, 2)) == ["stack the cups"] * 2
    assert got.camera_keys == ["observation.images.top", "observation.images.wrist"]
    assert np.array_equal(got.images, ep.observations["observation.images.top"])  # the first camera


def test_original_layout_is_one_camera_and_is_written_back_unchanged(tmp_path):
    plain = tmp_path / "plain.h5"
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    _write(plain, images=images, actions=np.zeros((2, 3), np.float32))
    ep = load_episode(plain)
    assert list(ep.observations) == [SINGLE_CAMERA] and ep.camera_keys == [SINGLE_CAMERA]
    assert np.array_equal(ep.observations[SINGLE_CAMERA], images) and ep.images is ep.observations[SINGLE_CAMERA]
    again = write_episode(tmp_path / "again.h5", ep)
    with h5py.File(again) as f:  # older readers of the original layout still take what is written for one camera
        assert sorted(f) == ["actions", "images"] and f.attrs["instruction"] == DEFAULT_INSTRUCTION


@pytest.mark.parametrize("datasets, message", [
    ({"images": np.zeros((2, 8, 8, 3), np.uint8), "observation.state": np.zeros((2, 3), np.float32),
      "actions": np.zeros((2, 3), np.float32)}, "both 'images' and"),
    ({"observation.images.top": np.zeros((2, 8, 8, 3), np.uint8)}, "no 'actions' dataset"),
    ({"observation.images.top": np.zeros((2, 8, 8, 3), np.float32), "actions": np.zeros((2, 3), np.float32)},
     "observation.images.top is float32"),
    ({"observation.state": np.zeros((2,), np.float32), "actions": np.zeros((2, 3), np.float32)},
     r"expected a float \[T, S\] vector"),
    ({"observation.state": np.full((2, 3), np.nan, np.float32), "actions": np.zeros((2, 3), np.float32)}, "NaN"),
    ({"observation.state": np.zeros((3, 3), np.float32), "actions": np.zeros((2, 3), np.float32)},
     "3 frames of observation.state but 2 actions"),
])
def test_load_named_episode_rejects_invalid_files(tmp_path, datasets, message):
    path = tmp_path / "bad.h5"
    _write(path, **datasets)
    with pytest.raises(UserError, match=message):
        load_episode(path)


def test_split_of_named_episodes_is_by_episode(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(5):
        write_episode(tmp_path / f"ep_{i}.h5", _named_episode(rng, frames=2))
    paths = list_episodes(tmp_path)
    train, val = split_episodes(paths, 0.2, seed=0)
    assert len(val) == 1 and sorted(train + val) == paths


def test_episodes_info_lists_named_observations(tmp_path):
    import json

    from click.testing import CliRunner

    from vla_export.cli import main

    rng = np.random.default_rng(3)
    for i in range(2):
        write_episode(tmp_path / f"e{i}.h5", _named_episode(rng))
    res = CliRunner().invoke(main, ["episodes", "info", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["observations"] == ["observation.images.top", "observation.images.wrist", "observation.state"]
    assert info["image_sizes"] == ["10x10", "12x16"] and info["action_columns"] == 5
    res = CliRunner().invoke(main, ["episodes", "info", str(tmp_path)])
    assert "| a0 |" in res.output and "linear_x" not in res.output  # the mobile robot's names are not this data's
