"""vla-export's LeRobot v3 reader (no LeRobot import) against LeRobot's own `LeRobotDataset[i]`, item by item, on
datasets LeRobot itself wrote (LeRobotDataset.create + add_frame + save_episode + finalize): videos and images."""

from __future__ import annotations

import numpy as np
import pytest

from tests.lerobot.datasets import REPO_ID, frame_pixels, write_dataset

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot", reason="needs LeRobot 0.4: scripts/lerobot_env.sh")

CAMS = ("observation.images.top", "observation.images.wrist")
IMAGE_HW, STATE_DIM, ACTION_DIM, LENGTHS = (24, 32), 3, 2, (6, 4, 5)


@pytest.fixture(scope="module", params=["video", "image"])
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param) / "ds"
    return write_dataset(root, cams=CAMS, image_hw=IMAGE_HW, state_dim=STATE_DIM, action_dim=ACTION_DIM,
                         lengths=LENGTHS, use_videos=request.param == "video"), request.param


def test_reader_equals_lerobot_dataset_item_by_item(dataset):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from vla_export.data.episodes import list_episodes, load_episode

    root, kind = dataset
    theirs = LeRobotDataset(REPO_ID, root=root, video_backend="pyav")
    refs = list_episodes(root)
    assert [r.index for r in refs] == list(range(len(LENGTHS)))
    i, worst_vs_lerobot, worst_vs_recorded = 0, 0.0, 0.0
    for ref in refs:
        ep = load_episode(ref)
        assert len(ep) == LENGTHS[ref.index] and ep.camera_keys == list(CAMS)
        for t in range(len(ep)):
            item = theirs[i]
            i += 1
            assert (int(item["episode_index"]), int(item["frame_index"])) == (ref.index, t)
            np.testing.assert_array_equal(ep.observations["observation.state"][t], item["observation.state"].numpy())
            np.testing.assert_array_equal(ep.actions[t], item["action"].numpy())
            assert ep.tasks([t]) == [item["task"]]
            for c, cam in enumerate(CAMS):
                ours = ep.observations[cam][t]  # RGB uint8 HxWx3; LeRobot: float CHW = uint8 / 255
                want = item[cam].numpy()
                assert want.shape == (3, *IMAGE_HW) and ours.shape == (*IMAGE_HW, 3)
                diff = np.abs(ours.transpose(2, 0, 1).astype(np.float32) / 255 - want).max()
                worst_vs_lerobot = max(worst_vs_lerobot, float(diff))
                recorded = frame_pixels(c, ref.index, t, IMAGE_HW).astype(np.float64)
                err = np.abs(ours - recorded).mean()
                worst_vs_recorded = max(worst_vs_recorded, float(err))
                if kind == "video" and t + 1 < len(ep):  # the frame of this timestamp, not a neighbour's
                    assert err < np.abs(ours - frame_pixels(c, ref.index, t + 1, IMAGE_HW).astype(np.float64)).mean()
    assert i == len(theirs)
    # Both decode the same stream with FFmpeg (PyAV here, PyAV through torchvision's VideoReader in LeRobot) and
    # convert YUV -> RGB with the same swscale defaults, so the frames are identical, not merely close; PNG is
    # lossless. Against the recorded pixels, only the video codec's loss (AV1, yuv420p, crf 30) remains.
    assert worst_vs_lerobot == 0.0
    if kind == "image":
        assert worst_vs_recorded == 0.0
    else:
        assert worst_vs_recorded < 8.0, worst_vs_recorded


def test_tasks_per_frame_and_split_by_episode(dataset):
    from vla_export.data.episodes import list_episodes, load_episode, split_episodes

    root, _ = dataset
    ep = load_episode(list_episodes(root)[0])
    # write_dataset switches the task on an episode's last frame: the text follows the frame, as in LeRobot
    assert ep.tasks(slice(None)) == ["pick the cube"] * (LENGTHS[0] - 1) + ["stack the cups"]
    train, val = split_episodes(list_episodes(root), 0.34, seed=0)
    assert len(val) == 1 and not set(train) & set(val) and sorted(train + val) == list_episodes(root)


def test_a_broken_dataset_is_one_clear_line(dataset, tmp_path):
    import json
    import shutil

    from vla_export.data.episodes import list_episodes, load_episode
    from vla_export.errors import UserError

    root, kind = dataset
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    info = json.loads((copy / "meta" / "info.json").read_text())
    (copy / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(UserError, match="format v2.1; vla-export reads v3.0"):
        list_episodes(copy)
    (copy / "meta" / "info.json").write_text(json.dumps(info))
    if kind == "video":
        for mp4 in (copy / "videos").rglob("*.mp4"):
            mp4.unlink()
        with pytest.raises(UserError, match="video file .* is missing"):
            load_episode(list_episodes(copy)[0])
