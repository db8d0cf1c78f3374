"""A local LeRobot dataset (format v3.0) as episodes, read the way LeRobot reads it, without importing LeRobot.

Layout (LeRobot 0.4 `LeRobotDataset`): `meta/info.json` (codebase_version, fps, features, data_path / video_path
templates), `meta/tasks.parquet` (task text -> task_index), `meta/episodes/chunk-*/file-*.parquet` (one row per
episode: length, `dataset_from_index`/`dataset_to_index` into the frame rows, the data file's chunk/file index and,
per camera stored as video, its file and `from_timestamp` in it), `data/chunk-*/file-*.parquet` (one row per frame:
`observation.state`, `action`, `timestamp`, `frame_index`, `episode_index`, `index`, `task_index`, and cameras
stored as images: PNG bytes), `videos/<camera>/chunk-*/file-*.mp4` (episodes one after another in one file).

As LeRobot does: an episode's frames are rows `dataset_from_index..dataset_to_index` (read here from its data file by
`index`); a video frame is the decoded frame whose time is nearest to `from_timestamp + timestamp`, and must be within
`TOLERANCE_S` of it (LeRobot's default `tolerance_s`); the task of a frame is `meta/tasks` row `task_index`. Parquet
through pyarrow, video through PyAV (LeRobot's `pyav` backend; torchcodec would need a system FFmpeg), images
through Pillow. Frames stay RGB uint8 HxWx3 (LeRobot hands them out as float CHW / 255: the same values).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla_export.errors import UserError

INFO_FILE = Path("meta") / "info.json"
TASKS_FILE = Path("meta") / "tasks.parquet"
EPISODES_DIR = Path("meta") / "episodes"
ACTION_KEY = "action"
TOLERANCE_S = 1e-4  # LeRobotDataset's default tolerance_s: a video frame this far from the frame's timestamp at most
CAMERA_DTYPES = ("video", "image")
INSTALL = "pip install 'vla-export[lerobot-data]' (pyarrow and av)"


def is_lerobot_dataset(directory: str | os.PathLike) -> bool:
    return (Path(directory) / INFO_FILE).is_file()


@dataclass(frozen=True, order=True)
class LeRobotEpisode:
    """One episode of a local LeRobot dataset: what `list_episodes` gives for a dataset directory."""

    root: Path
    index: int

    @property
    def name(self) -> str:
        return f"episode_{self.index:06d}"  # LeRobot's own episode naming (images/<cam>/episode-000000)

    stem = name

    def __str__(self) -> str:
        return f"{self.root} episode {self.index}"

    def load(self):
        return open_dataset(self.root).episode(self.index)


def list_episodes(directory: str | os.PathLike) -> list[LeRobotEpisode]:
    dataset = open_dataset(directory)
    return [LeRobotEpisode(dataset.root, i) for i in dataset.episode_indices]


def open_dataset(directory: str | os.PathLike) -> LeRobotDatasetReader:
    root = Path(directory).resolve()
    info = root / INFO_FILE
    # keyed by the info file's mtime: a dataset rewritten in place is read again
    return _open(root, info.stat().st_mtime_ns if info.exists() else 0)


@functools.lru_cache(maxsize=4)
def _open(root: Path, _mtime_ns: int) -> LeRobotDatasetReader:
    return LeRobotDatasetReader(root)


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"reading a LeRobot dataset needs pyarrow ({e}); {INSTALL}") from e
    return pq


def _read_table(path: Path, columns: list[str] | None = None):
    pq = _pyarrow()
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid / ArrowKeyError are ValueError / KeyError
        raise UserError(f"{path} is not a readable LeRobot parquet file ({str(e).splitlines()[0][:160]})") from e


class LeRobotDatasetReader:
    """The metadata of one dataset directory, and its episodes as `Episode`s."""

    def __init__(self, root: Path):
        from vla_export.manifest import read_json

        self.root = root
        self.info = read_json(root / INFO_FILE, missing="a LeRobot dataset directory has meta/info.json",
                              invalid="re-write the dataset with LeRobot")
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3."):
            raise UserError(f"{root} is a LeRobot dataset of format {version or 'unknown'}; vla-export reads v3.0 "
                            "(convert it with LeRobot's `lerobot.datasets.v30.convert_dataset_v21_to_v30`)")
        self.fps = float(self.info.get("fps") or 0)
        self.features: dict[str, dict[str, Any]] = self.info.get("features") or {}
        if ACTION_KEY not in self.features:
            raise UserError(f"{root}: the dataset has no '{ACTION_KEY}' feature; task data needs recorded actions")
        self.camera_keys = [k for k, f in self.features.items() if f.get("dtype") in CAMERA_DTYPES]
        self.vector_keys = [k for k, f in self.features.items()
                            if k.startswith("observation.") and f.get("dtype") not in CAMERA_DTYPES + ("string",)]
        self.tasks = self._read_tasks()
        episodes = sorted((root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))
        if not episodes:
            raise UserError(f"{root} has no {EPISODES_DIR}/chunk-*/file-*.parquet; the dataset was not finalised "
                            "(LeRobotDataset.finalize()) or is incomplete")
        self.episodes: dict[int, dict[str, Any]] = {}
        for path in episodes:
            for row in _read_table(path).to_pylist():
                self.episodes[int(row["episode_index"])] = row
        self.episode_indices = sorted(self.episodes)

    def _read_tasks(self) -> dict[int, str]:
        path = self.root / TASKS_FILE
        if not path.is_file():
            raise UserError(f"{self.root} has no {TASKS_FILE}; the dataset is incomplete")
        table = _read_table(path)
        # pandas writes the task text as the frame's index: the one string column beside task_index
        text = [c for c in table.column_names if c != "task_index" and str(table.schema.field(c).type) in
                ("string", "large_string")]
        if "task_index" not in table.column_names or len(text) != 1:
            raise UserError(f"{path}: expected a task_index column and one text column, got {table.column_names}")
        return dict(zip(table.column("task_index").to_pylist(), table.column(text[0]).to_pylist(), strict=True))

    def _file(self, template_key: str, **fields) -> Path:
        template = self.info.get(template_key)
        if not template:
            raise UserError(f"{self.root / INFO_FILE} has no {template_key}")
        return self.root / template.format(**fields)

    def episode(self, index: int):
        from vla_export.data.episodes import Episode, check_episode

        if index not in self.episodes:
            raise UserError(f"{self.root} has no episode {index} (episodes {self.episode_indices[:3]}...)")
        meta = self.episodes[index]
        start, stop = int(meta["dataset_from_index"]), int(meta["dataset_to_index"])
        path = self._file("data_path", chunk_index=meta["data/chunk_index"], file_index=meta["data/file_index"])
        if not path.is_file():
            raise UserError(f"{self.root}: episode {index}'s data file {path} is missing")
        table = _read_table(path)
        rows = np.asarray(table.column("index").to_numpy())
        pick = np.flatnonzero((rows >= start) & (rows < stop))
        pick = pick[np.argsort(rows[pick], kind="stable")]
        if len(pick) != stop - start:
            raise UserError(f"{path} holds {len(pick)} of episode {index}'s {stop - start} frames "
                            f"(index {start}..{stop - 1}); the dataset is incomplete")
        table = table.take(pick)
        where = f"{self.root} episode {index}"
        observations: dict[str, np.ndarray] = {}
        timestamps = np.asarray(table.column("timestamp").to_numpy(), dtype=np.float64)
        for key in self.camera_keys:
            if self.features[key]["dtype"] == "video":
                observations[key] = self._video_frames(key, meta, timestamps, where)
            else:
                observations[key] = self._image_frames(table.column(key).to_pylist(), key, where)
        for key in self.vector_keys:
            observations[key] = _vectors(table, key)
        task_ids = table.column("task_index").to_pylist()
        missing = sorted({t for t in task_ids if t not in self.tasks})
        if missing:
            raise UserError(f"{where}: task_index {missing} not in {TASKS_FILE}")
        texts = tuple(self.tasks[t] for t in task_ids)
        observations, actions = check_episode(where, observations, _vectors(table, ACTION_KEY))
        return Episode(name=LeRobotEpisode(self.root, index).name, images=None, actions=actions,
                       instruction=texts[0], observations=observations,
                       frame_tasks=texts if len(set(texts)) > 1 else ())

    def _image_frames(self, cells: list, key: str, where: str) -> np.ndarray:
        """PNG (or any Pillow format) cells {bytes, path} -> [T, H, W, 3] uint8, as LeRobot's `load_image_as_numpy`
        (PIL `convert("RGB")`)."""
        import io

        from PIL import Image

        frames = []
        for cell in cells:
            data = (cell or {}).get("bytes")
            source = io.BytesIO(data) if data else (self.root / cell["path"] if cell and cell.get("path") else None)
            if source is None:
                raise UserError(f"{where}: a frame of {key} has neither image bytes nor a path")
            with Image.open(source) as image:
                frames.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        return np.stack(frames)

    def _video_frames(self, key: str, meta: dict[str, Any], timestamps: np.ndarray, where: str) -> np.ndarray:
        """The frame nearest to each `from_timestamp + timestamp` of the episode's video file, within TOLERANCE_S
        (LeRobot's `decode_video_frames` with backend pyav: seek to the key frame before the first, decode on)."""
        try:
            import av
        except ImportError as e:
            raise UserError(f"decoding {key} of a LeRobot dataset needs PyAV ({e}); {INSTALL}") from e
        path = self._file("video_path", video_key=key, chunk_index=meta[f"videos/{key}/chunk_index"],
                          file_index=meta[f"videos/{key}/file_index"])
        if not path.is_file():
            raise UserError(f"{where}: video file {path} of {key} is missing")
        query = float(meta[f"videos/{key}/from_timestamp"]) + timestamps
        times, frames = [], []
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                container.seek(int(query.min() / stream.time_base), stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    times.append(float(frame.pts * stream.time_base))
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if times[-1] >= query.max():
                        break
        except av.error.FFmpegError as e:
            raise UserError(f"{where}: cannot decode {path} ({str(e)[:160]})") from e
        if not frames:
            raise UserError(f"{where}: {path} holds no frames at {query.min():.3f} s and later")
        times = np.asarray(times)
        nearest = np.abs(query[:, None] - times[None, :]).argmin(axis=1)
        off = np.abs(times[nearest] - query)
        if (off >= TOLERANCE_S).any():
            worst = int(off.argmax())
            raise UserError(f"{where}: {key} has no video frame within {TOLERANCE_S} s of {query[worst]:.4f} s "
                            f"(nearest {times[nearest[worst]]:.4f} s in {path}); the timestamps and the video "
                            "disagree")
        return np.stack([frames[i] for i in nearest])


def _vectors(table, key: str) -> np.ndarray:
    """A fixed-size list column -> [T, S] (a scalar column -> [T, 1])."""
    column = table.column(key).combine_chunks()
    if hasattr(column, "flatten") and str(column.type).startswith(("list", "fixed_size_list", "large_list")):
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False))
        return values.reshape(len(column), -1)
    return np.asarray(column.to_numpy(zero_copy_only=False)).reshape(len(column), -1)

