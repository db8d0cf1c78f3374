"""Small LeRobot v3 datasets written by LeRobot itself (LeRobotDataset.create + add_frame + save_episode +
finalize), for the reader and task-data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO_ID = "vla-export/tiny"
FPS = 10


def write_dataset(root: Path, *, cams: tuple[str, ...], image_hw: tuple[int, int], state_dim: int, action_dim: int,
                  lengths: tuple[int, ...], use_videos: bool, seed: int = 0,
                  tasks: tuple[str, ...] = ("pick the cube", "stack the cups")) -> Path:
    """A dataset of len(lengths) episodes of smooth random frames (a codec keeps them close), random state/actions;
    episode i's task is tasks[i % len(tasks)], and its last frame switches to the next task (a per-frame task)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    h, w = image_hw
    kind = "video" if use_videos else "image"
    features = {**{k: {"dtype": kind, "shape": (h, w, 3), "names": ["height", "width", "channels"]} for k in cams},
                "observation.state": {"dtype": "float32", "shape": (state_dim,), "names": None},
                "action": {"dtype": "float32", "shape": (action_dim,), "names": None}}
    ds = LeRobotDataset.create(REPO_ID, FPS, features, root=root, use_videos=use_videos, image_writer_threads=0)
    rng = np.random.default_rng(seed)
    for e, n in enumerate(lengths):
        for t in range(n):
            frame = {key: frame_pixels(c, e, t, image_hw) for c, key in enumerate(cams)}
            frame["observation.state"] = rng.standard_normal(state_dim).astype(np.float32)
            frame["action"] = rng.standard_normal(action_dim).astype(np.float32)
            frame["task"] = tasks[(e + (t == n - 1)) % len(tasks)]
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    return root


def frame_pixels(camera: int, episode: int, t: int, image_hw: tuple[int, int]) -> np.ndarray:
    """The RGB uint8 frame `write_dataset` records: smooth gradients (what a lossy codec keeps well) that shift with
    t, so a frame taken from the wrong time is far from the right one."""
    yy, xx = np.mgrid[0:image_hw[0], 0:image_hw[1]]
    base = (xx * 2 + yy + 23 * t + 40 * camera + 60 * episode).astype(np.float64)
    wave = 127.5 + 100 * np.sin(base / 25.0)
    return np.stack([wave, 255 - wave, np.full_like(wave, 30 + 20 * t % 200)], axis=-1).round().astype(np.uint8)
