"""Robot episodes: one HDF5 file per episode (or a LeRobot v3 dataset), a loader that checks them, a split by
episode, a synthetic generator.

An episode is named observations + actions + task text, keyed as LeRobot keys them (and as processor.json declares
what a policy observes): cameras `observation.images.<cam>` [T, H, W, 3] uint8 RGB, vectors such as
`observation.state` [T, S] float32, `actions` [T, D] float32 (any width), the task text.

HDF5 layouts, told apart by their dataset names:
- named: datasets `observation.images.<cam>` (one or more), `observation.state` (and any other `observation.<key>`
  [T, S] vector), `actions` [T, D]; attribute `instruction` (the task text).
- the original robot data's (read unchanged): dataset `images` [T, H, W, 3] uint8, dataset `actions` [T, >=2] float
  (linear_x, linear_y, angular_z), attribute `instruction`. It is one camera, `observation.image` (LeRobot's key for
  a dataset's only camera). Files without the attribute (the original recordings had one fixed task) get
  `DEFAULT_INSTRUCTION`.
A directory holding `meta/info.json` is a LeRobot v3 dataset instead (`vla_export.data.lerobot_dataset`); its episodes
load into the same `Episode`.

The synthetic episodes stand in for the original recordings (which are not distributed): a holonomic mobile robot
(linear_x forward, linear_y left, angular_z yaw) tracks a slowly moving cup among box obstacles, seen through a
forward camera rendered with numpy, driven by a simple controller whose commands are the recorded actions. The model
predicts the first `action_dim` (2) columns, as the original did, so both are made to carry signal: the robot
strafes toward the target's bearing (linear_y) and drives toward it, slowing with distance and near obstacles
(linear_x). Instructions matter: in some episodes two cups (red and blue) are in view and the instruction names the
one to track (25%); "slowly"/"quickly" scale the speed (x0.5/x1.5).

Same seed, same arrays: episode i is a function of (seed, i) only. `synth_episodes` writes each file atomically, a
`.synth` marker first (so a rerun may replace its own files but never a user's) and `.complete` last.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vla_export.errors import UserError

EPISODE_SUFFIXES = (".h5", ".hdf5")
COMPLETE_MARKER = ".complete"
SYNTH_MARKER = ".synth"  # written first: a rerun may replace these files, even after an interrupted run
DEFAULT_INSTRUCTION = "Navigate around obstacles to track the target cup"
ACTION_NAMES = ["linear_x", "linear_y", "angular_z"]
OBSERVATION_PREFIX = "observation."
CAMERA_PREFIX = "observation.images."
SINGLE_CAMERA = "observation.image"  # the camera of an (images, actions, instruction) file
STATE_KEY = "observation.state"

# 96x96 keeps 72 episodes at ~70 MB and is still finer than the tiny model's patch grids once resized to 224
# (Kosmos 16x16 patches of 14 px, CLIP 7x7 of 32 px): a far cup (~8 px wide here) still covers a patch. Larger
# stored images would only slow loading and resizing; the model's input size comes from the checkpoint.
DEFAULT_IMAGE_SIZE = 96
# ~36 frames of 0.25 s: 9 s of driving, long enough for the approach, an obstacle pass and the slow-down.
DEFAULT_FRAMES = 36
DT_S = 0.25

CUP_COLOURS = {"red": (205, 40, 35), "blue": (35, 70, 210)}
SPEED_WORDS = {"slowly": 0.5, "": 1.0, "quickly": 1.5}
V_MAX = 0.4  # m/s at speed scale 1: the robot rarely catches the cup within an episode, so speed words show
# A 60 degree lens: the cup spans more pixels than through a wide angle one, which the tiny model needs.
FOV_RAD = math.radians(60.0)
CAMERA_HEIGHT_M = 0.35
# A large cup (a bin, really) and few two-cup scenes: sized so `tiny` learns the task from scratch on 2 CPU cores in
# ~2 minutes to half the predict-the-mean error (smaller cups or more distractors left it near the baseline).
CUP_RADIUS_M, CUP_HEIGHT_M = 0.25, 0.5
STOP_DISTANCE_M = 0.7
OBSTACLE_RANGE_M = 1.6


def is_camera_key(key: str) -> bool:
    return key == SINGLE_CAMERA or key.startswith(CAMERA_PREFIX)


@dataclass
class Episode:
    """One episode. Built either from `images` (one camera, the original layout: it becomes `observation.image`) or
    from named `observations`; `images` is then the first camera (None for an episode without one)."""

    name: str
    images: np.ndarray | None  # [T, H, W, 3] uint8: the first camera
    actions: np.ndarray  # [T, A] float32
    instruction: str  # the task text
    # the cups in view, when the file says (synthetic episodes do): ("red", "blue") is a two-cup scene, where the
    # instruction's colour decides which cup to track (`vla_export.validate.instruction`)
    cup_colours: tuple[str, ...] = ()
    # every observation by key: cameras [T, H, W, 3] uint8, vectors [T, S] float32
    observations: dict[str, np.ndarray] = field(default_factory=dict)
    # the task text per frame where it changes within the episode (LeRobot datasets allow it); empty: `instruction`
    frame_tasks: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.observations:
            if self.images is None:
                raise ValueError("an episode needs images or named observations")
            self.observations = {SINGLE_CAMERA: self.images}
        elif self.images is None and self.camera_keys:
            self.images = self.observations[self.camera_keys[0]]

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def camera_keys(self) -> list[str]:
        return [k for k in self.observations if is_camera_key(k)]

    def tasks(self, index) -> list[str]:
        """The task text of the frames `index` (a slice or indices) selects."""
        n = len(np.arange(len(self))[index])
        return list(np.asarray(self.frame_tasks, dtype=object)[index]) if self.frame_tasks else [self.instruction] * n


# -- files -----------------------------------------------------------------------------------------------------------
def list_episodes(directory: str | os.PathLike) -> list:
    """The episodes of a directory, sorted: its HDF5 files by name, or a LeRobot v3 dataset's episodes by index
    (`lerobot_dataset.LeRobotEpisode`). `load_episode` reads either."""
    from vla_export.data import lerobot_dataset

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"episode directory {directory} does not exist; create one with "
                        f"`vla-export episodes synth -o {directory}` or pass the directory of your .h5 episodes "
                        "(or of a LeRobot v3 dataset)")
    if lerobot_dataset.is_lerobot_dataset(directory):
        return lerobot_dataset.list_episodes(directory)
    paths = sorted(p for p in directory.iterdir() if p.suffix in EPISODE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise UserError(f"episode directory {directory} has no .h5/.hdf5 files (nor meta/info.json of a LeRobot "
                        f"dataset); create episodes with `vla-export episodes synth -o {directory}`")
    return paths


def _text_attr(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_camera(path, key: str, frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"episode {path}: {key} is {frames.dtype} {tuple(frames.shape)}, expected uint8 "
                        "[T,H,W,3] RGB frames")
    if min(frames.shape[1:3]) < 8:
        raise UserError(f"episode {path}: {key} frames are {frames.shape[1]}x{frames.shape[2]} pixels, too small "
                        "to use (need at least 8x8)")


def check_episode(path, observations: dict[str, np.ndarray], actions: np.ndarray) -> tuple[dict, np.ndarray]:
    """Observations and actions checked (one UserError line naming `path`) and cast: vectors and actions float32."""
    if actions.ndim != 2 or actions.shape[1] < 1 or not np.issubdtype(actions.dtype, np.number):
        raise UserError(f"episode {path}: actions are {actions.dtype} {tuple(actions.shape)}, expected float "
                        "[T, action_dim]")
    out = {}
    for key, value in observations.items():
        if is_camera_key(key):
            _check_camera(path, key, value)
        else:
            if value.ndim != 2 or not np.issubdtype(value.dtype, np.number):
                raise UserError(f"episode {path}: {key} is {value.dtype} {tuple(value.shape)}, expected a float "
                                "[T, S] vector per frame")
            value = value.astype(np.float32, copy=False)
            if not np.isfinite(value).all():
                raise UserError(f"episode {path}: {key} contains NaN or Inf; fix or drop this episode")
        if value.shape[0] != actions.shape[0]:
            raise UserError(f"episode {path}: {value.shape[0]} frames of {key} but {actions.shape[0]} actions; "
                            "each frame needs one action")
        out[key] = value
    if actions.shape[0] == 0:
        raise UserError(f"episode {path} has no frames; an episode needs at least one")
    actions = actions.astype(np.float32, copy=False)
    if not np.isfinite(actions).all():
        raise UserError(f"episode {path}: actions contain NaN or Inf; fix or drop this episode")
    return out, actions


def load_episode(path) -> Episode:
    """Read and check one episode (an HDF5 file, either layout, or a `LeRobotEpisode`); every problem is one
    UserError line naming it."""
    import h5py

    from vla_export.data.lerobot_dataset import LeRobotEpisode

    if isinstance(path, LeRobotEpisode):
        return path.load()
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise UserError(f"episode {path} does not exist; check the path") from None
    except OSError as e:
        raise UserError(f"episode {path} is not a readable HDF5 file ({str(e).splitlines()[0][:120]})") from e
    with f:
        named = sorted(k for k in f.keys() if k.startswith(OBSERVATION_PREFIX))
        if named and "images" in f:
            raise UserError(f"episode {path} has both 'images' and {named}: use one layout (named "
                            "observation.images.<cam> datasets, or the single 'images')")
        for key in (["actions"] if named else ["images", "actions"]):
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise UserError(f"episode {path} has no '{key}' dataset (expected images [T,H,W,3] uint8, or named "
                                "observation.images.<cam> / observation.state datasets, and actions [T,>=2] float32)")
        for key in named:
            if not isinstance(f[key], h5py.Dataset):
                raise UserError(f"episode {path}: {key} is a group, not a dataset; store each observation as one "
                                "[T, ...] dataset")
        observations = {k: f[k][()] for k in named} if named else {SINGLE_CAMERA: f["images"][()]}
        actions = f["actions"][()]
        instruction = _text_attr(f.attrs.get("instruction", DEFAULT_INSTRUCTION))
        cups = _text_attr(f.attrs.get("cup_colours", ""))
    if not named:
        # the original layout's own checks and words: two action columns at least (linear_x, linear_y)
        images = observations[SINGLE_CAMERA]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"episode {path}: images are {images.dtype} {tuple(images.shape)}, expected uint8 "
                            "[T,H,W,3] RGB frames")
        if actions.ndim != 2 or actions.shape[1] < 2 or not np.issubdtype(actions.dtype, np.floating):
            raise UserError(f"episode {path}: actions are {actions.dtype} {tuple(actions.shape)}, expected float32 "
                            "[T,>=2] (linear_x, linear_y, angular_z)")
        if images.shape[0] == 0 or images.shape[0] != actions.shape[0]:
            raise UserError(f"episode {path}: {images.shape[0]} images but {actions.shape[0]} actions; each frame "
                            "needs one action and an episode at least one frame")
    observations, actions = check_episode(path, observations, actions)
    cup_colours = tuple(c for c in cups.split(",") if c)
    return Episode(name=path.stem, images=None, actions=actions, instruction=instruction, cup_colours=cup_colours,
                   observations=observations)


def split_episodes(paths: list, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Deterministic train/val split BY EPISODE (frames of one episode are never on both sides). `paths`: what
    `list_episodes` gives (file paths, or a LeRobot dataset's episodes)."""
    from vla_export.data.lerobot_dataset import LeRobotEpisode

    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    paths = sorted(p if isinstance(p, LeRobotEpisode) else Path(p) for p in paths)
    if len(paths) < 2 and val_fraction > 0:
        raise UserError(f"need at least 2 episodes to hold one out for validation, got {len(paths)}")
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(paths) * val_fraction)) if val_fraction > 0 else 0
    val_idx = set(order[:n_val])
    train = [p for i, p in enumerate(paths) if i not in val_idx]
    val = [p for i, p in enumerate(paths) if i in val_idx]
    return train, val


def write_episode(path: str | os.PathLike, episode: Episode) -> Path:
    """Write one episode atomically (temporary name in the same directory, then rename): the original layout for a
    one-camera `observation.image` episode (so older readers still take it), else the named layout."""
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    single = list(episode.observations) == [SINGLE_CAMERA]
    with h5py.File(tmp, "w") as f:
        for key, value in episode.observations.items():
            name = "images" if single else key
            if is_camera_key(key):
                f.create_dataset(name, data=np.ascontiguousarray(value, dtype=np.uint8), chunks=(1, *value.shape[1:]))
            else:
                f.create_dataset(name, data=np.asarray(value, dtype=np.float32))
        f.create_dataset("actions", data=np.asarray(episode.actions, dtype=np.float32))
        f.attrs["instruction"] = episode.instruction
        if single:
            f.attrs["action_names"] = ",".join(ACTION_NAMES[: episode.actions.shape[1]])
        if episode.cup_colours:
            f.attrs["cup_colours"] = ",".join(episode.cup_colours)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# -- synthetic episodes ------------------------------------------------------------------------------------------------
def instruction_for(colour: str, speed_word: str, two_cups: bool) -> str:
    if colour == "red" and not two_cups and not speed_word:
        return DEFAULT_INSTRUCTION
    adverb = f" {speed_word}" if speed_word else ""
    return f"Navigate around obstacles to track the {colour} cup{adverb}"


def synth_instructions() -> list[str]:
    """Every instruction the generator can write (tokenizers without episodes are built from these)."""
    out = []
    for two in (False, True):
        for colour in CUP_COLOURS:
            for word in SPEED_WORDS:
                text = instruction_for(colour, word, two)
                if text not in out:
                    out.append(text)
    return out


def _relative(robot: np.ndarray, point: np.ndarray) -> tuple[float, float]:
    """(forward, left) of a world point in the robot frame."""
    dx, dy = point[0] - robot[0], point[1] - robot[1]
    c, s = math.cos(robot[2]), math.sin(robot[2])
    return c * dx + s * dy, -s * dx + c * dy


def _controller(target_rel, obstacles_rel, speed: float) -> np.ndarray:
    """Holonomic pursuit: velocity toward the target, scaled down near it and near obstacles in view ahead.

    Smooth in the scene (tanh/exp, no sign switches), so the commands are a learnable function of the image."""
    fwd, left = target_rel
    dist = math.hypot(fwd, left)
    bearing = math.atan2(left, fwd)
    approach = float(np.clip((dist - STOP_DISTANCE_M) / 1.5, 0.0, 1.0))
    v = V_MAX * speed * approach
    vx = v * math.cos(bearing)
    vy = v * math.sin(bearing)
    slow = 1.0
    for (ofwd, oleft, radius) in obstacles_rel:
        # only obstacles the camera sees ahead, within range
        if ofwd <= 0.05 or ofwd >= OBSTACLE_RANGE_M or abs(math.atan2(oleft, ofwd)) > FOV_RAD / 2:
            continue
        closeness = 1.0 - ofwd / OBSTACLE_RANGE_M
        near = math.exp(-((max(abs(oleft) - radius, 0.0) / 0.35) ** 2))
        vy -= 0.25 * speed * closeness * near * math.tanh(oleft / 0.25)  # sidestep away from it
        slow *= 1.0 - 0.6 * closeness * near  # and brake while passing it
    vx *= slow
    wz = float(np.clip(0.4 * bearing, -1.0, 1.0))  # gentle turning: the cup stays off-centre, so linear_y shows
    return np.array([vx, vy, wz], dtype=np.float64)


def _render(robot, objects, size: int, scene: dict, rng: np.random.Generator) -> np.ndarray:
    """A pinhole camera view: wall and floor, then boxes and cups painted far to near, plus sensor noise."""
    h = w = size
    focal = (w / 2) / math.tan(FOV_RAD / 2)
    horizon = h * scene["horizon"]
    img = np.empty((h, w, 3), dtype=np.float32)
    rows = np.arange(h, dtype=np.float32)[:, None]
    wall = np.asarray(scene["wall"], dtype=np.float32)
    floor = np.asarray(scene["floor"], dtype=np.float32)
    depth_shade = np.clip((rows - horizon) / (h - horizon), 0, 1)  # floor brightens toward the robot
    img[:] = np.where(rows[..., None] < horizon, wall, floor * (0.75 + 0.35 * depth_shade[..., None]))
    cols = np.arange(w, dtype=np.float32)[None, :]
    rel = []
    for obj in objects:
        fwd, left = _relative(robot, obj["pos"])
        rel.append((fwd, left, obj))
    for fwd, left, obj in sorted(rel, key=lambda r: -r[0]):
        if fwd < 0.15:
            continue
        u = w / 2 - focal * left / fwd
        half = focal * obj["radius"] / fwd
        bottom = horizon + focal * CAMERA_HEIGHT_M / fwd
        top = horizon - focal * (obj["height"] - CAMERA_HEIGHT_M) / fwd
        if u + half < 0 or u - half > w:
            continue
        inside = (np.abs(cols - u) <= max(half, 0.6)) & (rows >= top) & (rows <= bottom)
        colour = np.asarray(obj["colour"], dtype=np.float32)
        if obj["kind"] == "cup":
            # a cup: lighter rim at the top, shaded sides
            side = 1.0 - 0.35 * (np.abs(cols - u) / max(half, 0.6)) ** 2
            shade = np.where(rows <= top + max(1.0, 0.15 * (bottom - top)), 1.25, 1.0) * side
        else:
            shade = np.where(cols < u, 0.85, 1.0) * np.ones_like(rows)
        img = np.where(inside[..., None], np.clip(colour * shade[..., None], 0, 255), img)
    img = img * scene["gain"] + rng.normal(0.0, 3.0, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def synth_episode(index: int, seed: int = 0, frames: int = DEFAULT_FRAMES,
                  image_size: int = DEFAULT_IMAGE_SIZE) -> Episode:
    """One procedural episode; a function of (seed, index) only, so `count` does not change earlier episodes."""
    rng = np.random.default_rng([seed, index])
    colour = ["red", "blue"][int(rng.integers(2))]
    speed_word = list(SPEED_WORDS)[int(rng.integers(len(SPEED_WORDS)))]
    two_cups = bool(rng.random() < 0.25)
    speed = SPEED_WORDS[speed_word]
    instruction = instruction_for(colour, speed_word, two_cups)

    robot = np.array([0.0, 0.0, rng.uniform(-0.15, 0.15)])
    dist, bearing = rng.uniform(2.0, 4.5), rng.uniform(-0.4, 0.4)
    target = {"kind": "cup", "pos": np.array([dist * math.cos(bearing), dist * math.sin(bearing)]),
              "radius": CUP_RADIUS_M, "height": CUP_HEIGHT_M, "colour": CUP_COLOURS[colour]}
    heading = rng.uniform(-math.pi, math.pi)
    target_vel = rng.uniform(0.1, 0.3) * np.array([math.cos(heading), math.sin(heading)])
    objects = [target]
    cup_colours = (colour,)
    if two_cups:
        other = "blue" if colour == "red" else "red"
        ob = bearing + rng.choice([-1, 1]) * rng.uniform(0.25, 0.45)
        od = rng.uniform(2.0, 4.5)
        objects.append({"kind": "cup", "pos": np.array([od * math.cos(ob), od * math.sin(ob)]),
                        "radius": CUP_RADIUS_M, "height": CUP_HEIGHT_M, "colour": CUP_COLOURS[other]})
        cup_colours = (colour, other)
    obstacles = []
    for _ in range(int(rng.integers(1, 4))):
        # beside the path to the cup, not on it: the robot must pass them, but the cup stays in view
        along = rng.uniform(0.25, 0.8)
        normal = np.array([-target["pos"][1], target["pos"][0]]) / np.linalg.norm(target["pos"])
        pos = target["pos"] * along + normal * rng.choice([-1, 1]) * rng.uniform(0.35, 0.8)
        tone = rng.uniform(70, 150)
        obstacles.append({"kind": "box", "pos": pos, "radius": rng.uniform(0.12, 0.3), "height": rng.uniform(0.3, 0.8),
                          "colour": (tone + 25, tone, tone - 30)})
    objects += obstacles
    wall_tone = rng.uniform(170, 205)
    scene = {"wall": (wall_tone, wall_tone * 0.97, wall_tone * 0.9), "floor": (rng.uniform(90, 130),) * 3,
             "horizon": rng.uniform(0.42, 0.48), "gain": rng.uniform(0.9, 1.1)}

    images = np.empty((frames, image_size, image_size, 3), dtype=np.uint8)
    actions = np.empty((frames, 3), dtype=np.float32)
    for t in range(frames):
        images[t] = _render(robot, objects, image_size, scene, rng)
        target_rel = _relative(robot, target["pos"])
        obstacles_rel = [(*_relative(robot, o["pos"]), o["radius"]) for o in obstacles]
        act = _controller(target_rel, obstacles_rel, speed)
        actions[t] = act + rng.normal(0.0, 0.01, 3)  # actuator/command noise
        c, s = math.cos(robot[2]), math.sin(robot[2])
        robot = robot + DT_S * np.array([c * act[0] - s * act[1], s * act[0] + c * act[1], act[2]])
        target["pos"] = target["pos"] + DT_S * target_vel
    return Episode(name=f"episode_{index:04d}", images=images, actions=actions, instruction=instruction,
                   cup_colours=cup_colours)


def synth_episodes(out_dir: str | os.PathLike, count: int = 72, seed: int = 0, frames: int = DEFAULT_FRAMES,
                   image_size: int = DEFAULT_IMAGE_SIZE, progress: bool = False) -> list[Path]:
    """Write `count` synthetic episodes (episode_0000.h5, ...) and a `.complete` marker; same seed, same arrays."""
    from vla_export.manifest import check_writable_dir

    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if frames < 1:
        raise UserError(f"--frames must be at least 1, got {frames}")
    if image_size < 16:
        raise UserError(f"--image-size must be at least 16 pixels, got {image_size}")
    out_dir = check_writable_dir(out_dir)
    marker = out_dir / COMPLETE_MARKER
    owner = out_dir / SYNTH_MARKER
    existing = [p for p in out_dir.iterdir() if p.suffix in EPISODE_SUFFIXES]
    if existing and not owner.exists() and not marker.exists():
        # never delete episodes this generator did not write (a user's recordings)
        raise UserError(f"{out_dir} already holds {len(existing)} episode files not written by `episodes synth`; "
                        "choose an empty or new -o directory")
    marker.unlink(missing_ok=True)
    owner.write_text("episode files here were written by `vla-export episodes synth`\n")
    # episodes from an earlier, larger run would silently join this data set
    for stale in existing:
        stale.unlink()
    paths = []
    indices = range(count)
    if progress:
        from rich.progress import track

        indices = track(indices, description=f"synthesising {count} episodes")
    for i in indices:
        ep = synth_episode(i, seed=seed, frames=frames, image_size=image_size)
        paths.append(write_episode(out_dir / f"{ep.name}.h5", ep))
    import json

    from vla_export.manifest import write_text_atomic

    write_text_atomic(marker, json.dumps({"count": count, "seed": seed, "frames": frames,
                                          "image_size": image_size}) + "\n")
    return paths
