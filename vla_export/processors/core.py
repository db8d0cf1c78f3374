"""Processors: named steps stored as data, from a robot observation to the model's feeds and from its outputs to actions.

A processor is part of an architecture's contract (model + IO spec + processor). It travels as data in the checkpoint
and in the bundle, so the robot needs neither the training code nor a plug-in's Python:

  processor.json         {"format", "observation": {key: {"type", "shape"}}, "preprocessor": [step...],
                          "postprocessor": [step...], "action": {"key", "dim"}, "files": [...],
                          "output": {"kind", "msg_type", "fail_safe", "joint_names", "time_from_start_s"}}
                         each step {"name": <registered name>, "config": {...plain JSON...}}
  processor.safetensors  every step's tensors (normalisation stats ...), keyed `<pipeline>.<index>.<tensor>`
  files                  what steps name (tokenizer JSON), copied beside processor.json

Observation keys follow LeRobot's: `observation.images.<camera>` (RGB uint8 HxWx3, or float CHW in [0, 1]),
`observation.state` (float vector), `task` (instruction text). The preprocessor maps a dict of those, one frame or a
batch, to the IO spec's feeds; the postprocessor maps the model's outputs (`actions`, maybe a chunk) back to one
action per frame in robot units, keeping whatever runtime state it needs (an action queue, a temporal ensemble)
until `reset()`.

`output` (optional) says what the actions command, for the ROS 2 node: `kind` twist (a base's velocities: a zero
command stops it, so `fail_safe` is zero) or joint (an arm's joint targets: a zero command moves every joint to 0, so
`fail_safe` is hold by default), the message type, the joint names in action order and a trajectory point's
`time_from_start_s`. See `check_output` and vla_export/deploy/ros2_node.py.

Steps are looked up by registered name only: a processor.json never makes vla-export import a module it names.
A step written in Python (the documented hook) subclasses `ProcessorStep`, registers with `@register_step("name")`,
and its module must be imported before the processor is loaded (`Policy.load(..., step_modules=["mypkg.steps"])`
or a plain import); an unknown name is refused with one line saying so.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from vla_export.errors import UserError

PROCESSOR_FILE = "processor.json"
STATE_FILE = "processor.safetensors"
PROCESSOR_FORMAT = "vla-export-processor"
PIPELINES = ("preprocessor", "postprocessor")
OBSERVATION_TYPES = {"image": 3, "state": 1, "text": 0}  # rank of one unbatched value
# What a policy's actions command (processor.json `output`): the ROS 2 message types each kind may be published as.
TWIST_MSG, FLOAT64_ARRAY_MSG, JOINT_TRAJECTORY_MSG = ("geometry_msgs/msg/Twist", "std_msgs/msg/Float64MultiArray",
                                                      "trajectory_msgs/msg/JointTrajectory")
OUTPUT_MSG_TYPES = {"twist": (TWIST_MSG,), "joint": (FLOAT64_ARRAY_MSG, JOINT_TRAJECTORY_MSG)}
FAIL_SAFES = ("zero", "hold")
OUTPUT_KEYS = ("kind", "msg_type", "fail_safe", "joint_names", "time_from_start_s")
DEFAULT_TIME_FROM_START_S = 0.1

_REGISTRY: dict[str, type[ProcessorStep]] = {}


def msg_type_name(name: str) -> str:
    """A ROS 2 message type as `pkg/msg/Type`; `pkg/Type` (the ROS 1 / short spelling) is accepted."""
    parts = str(name).strip().split("/")
    return f"{parts[0]}/msg/{parts[1]}" if len(parts) == 2 else "/".join(parts)


def check_output(output: dict[str, Any], source: str = PROCESSOR_FILE) -> dict[str, Any]:
    """The `output` block with its defaults filled in, or UserError (one line) naming what is wrong.

    Defaults: kind from msg_type (else twist), msg_type the kind's first (Twist, Float64MultiArray), fail_safe zero
    for twist and hold for joint. Refused: a twist that holds (repeating a velocity keeps the base moving) and a
    JointTrajectory that zeroes (a zero position target moves every joint to 0)."""
    if not isinstance(output, dict):
        raise UserError(f"{source}: output must be a JSON object with keys {list(OUTPUT_KEYS)}, got "
                        f"{type(output).__name__}")
    unknown = sorted(set(output) - set(OUTPUT_KEYS))
    if unknown:
        raise UserError(f"{source}: output has unknown keys {unknown}; known: {list(OUTPUT_KEYS)}")
    msg_type = msg_type_name(output["msg_type"]) if output.get("msg_type") else None
    known = [t for types in OUTPUT_MSG_TYPES.values() for t in types]
    if msg_type is not None and msg_type not in known:
        raise UserError(f"{source}: output msg_type {output['msg_type']!r} is not supported; use one of "
                        f"{', '.join(known)}")
    kind = output.get("kind") or next((k for k, types in OUTPUT_MSG_TYPES.items() if msg_type in types), "twist")
    if kind not in OUTPUT_MSG_TYPES:
        raise UserError(f"{source}: output kind {kind!r} is not one of {', '.join(OUTPUT_MSG_TYPES)}")
    msg_type = msg_type or OUTPUT_MSG_TYPES[kind][0]
    if msg_type not in OUTPUT_MSG_TYPES[kind]:
        raise UserError(f"{source}: output msg_type {msg_type} cannot carry a {kind} output; use "
                        f"{' or '.join(OUTPUT_MSG_TYPES[kind])}")
    fail_safe = output.get("fail_safe") or ("zero" if kind == "twist" else "hold")
    if fail_safe not in FAIL_SAFES:
        raise UserError(f"{source}: output fail_safe {fail_safe!r} is not one of {', '.join(FAIL_SAFES)}")
    if kind == "twist" and fail_safe == "hold":
        raise UserError(f"{source}: a twist output cannot hold on bad input (repeating a velocity keeps the robot "
                        "moving); use fail_safe zero")
    if msg_type == JOINT_TRAJECTORY_MSG and fail_safe == "zero":
        raise UserError(f"{source}: a JointTrajectory output cannot zero on bad input (a zero position target moves "
                        "every joint to 0); use fail_safe hold, or Float64MultiArray for joint velocities")
    names = output.get("joint_names") or []
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{source}: output joint_names must be a list of non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise UserError(f"{source}: output joint_names repeat a name: {list(names)}")
    if kind == "twist" and names:
        raise UserError(f"{source}: joint_names are for a joint output, but the output kind is twist")
    try:
        given = output.get("time_from_start_s")
        time_from_start_s = float(DEFAULT_TIME_FROM_START_S if given is None else given)
    except (TypeError, ValueError):
        time_from_start_s = -1.0
    if not np.isfinite(time_from_start_s) or time_from_start_s <= 0:
        raise UserError(f"{source}: output time_from_start_s must be a number > 0, got "
                        f"{output.get('time_from_start_s')!r}")
    return {"kind": kind, "msg_type": msg_type, "fail_safe": fail_safe, "joint_names": list(names),
            "time_from_start_s": time_from_start_s}


def register_step(name: str) -> Callable[[type[ProcessorStep]], type[ProcessorStep]]:
    """Class decorator: make a `ProcessorStep` subclass loadable from processor.json under `name`."""

    def wrap(cls: type[ProcessorStep]) -> type[ProcessorStep]:
        old = _REGISTRY.get(name)
        # the same class defined again (a reloaded module) replaces itself; another class may not take the name
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"processor step name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_steps() -> dict[str, type[ProcessorStep]]:
    return dict(_REGISTRY)


class ProcessorStep:
    """One step: `__call__(data) -> data` on a dict of batched values (numpy arrays, lists of strings).

    Subclasses keep their settings in `self.cfg` (plain JSON, written to processor.json as is), their tensors in
    `state_dict()` (written to processor.safetensors), and name the files they read in `files()` (resolved against
    the processor's directory by `bind`). Post-processing steps that hold runtime state implement `reset()`, and
    `pending()` when they can produce the next action without running the model."""

    registry_name: ClassVar[str] = ""
    # True for a step that must see every observation, also those answered from a queued action without running the
    # model (an observation history, as LeRobot's Diffusion Policy keeps): `Processor.observe` runs it.
    observes_every_step: ClassVar[bool] = False

    def __init__(self, **cfg: Any):
        self.cfg = cfg
        self.base_dir: Path | None = None

    def config(self) -> dict[str, Any]:
        return dict(self.cfg)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise UserError(f"processor step {self.registry_name!r} holds no tensors but the file gives "
                            f"{sorted(state)[:3]}")

    def files(self) -> list[str]:
        return []

    def bind(self, base_dir: Path) -> None:
        """Called once the processor's directory is known (after load, or before use of a fresh processor)."""
        self.base_dir = Path(base_dir)

    def reset(self) -> None:
        pass

    def pending(self) -> bool:
        return False

    def history(self) -> int:
        """How many consecutive observations (this one included) the step's output depends on: 1, or an
        observation history's length. Task data feeds each frame with that many frames of its episode."""
        return 1

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"


class Processor:
    """Observation -> feeds (`preprocess`), outputs -> actions (`postprocess`), stored as data (`save`/`load`)."""

    def __init__(self, observation: dict[str, dict[str, Any]], preprocessor: list[ProcessorStep],
                 postprocessor: list[ProcessorStep] | None = None, action_key: str = "action",
                 output_key: str = "actions", action_dim: int | None = None, base_dir: str | os.PathLike | None = None,
                 output: dict[str, Any] | None = None):
        for key, info in observation.items():
            if info.get("type") not in OBSERVATION_TYPES:
                raise UserError(f"processor observation {key!r} has type {info.get('type')!r}; use one of "
                                f"{sorted(OBSERVATION_TYPES)}")
        self.observation = {k: dict(v) for k, v in observation.items()}
        self.preprocessor = list(preprocessor)
        self.postprocessor = list(postprocessor or [])
        self.action_key = action_key
        self.output_key = output_key
        self.action_dim = action_dim
        # what the actions command on a robot (check_output); None: undeclared (the ROS 2 node then assumes a Twist)
        self.output = check_output(output) if output is not None else None
        if self.output and self.output["joint_names"] and action_dim is not None \
                and len(self.output["joint_names"]) != action_dim:
            raise UserError(f"processor output names {len(self.output['joint_names'])} joints "
                            f"{self.output['joint_names']} but the action has {action_dim} values")
        self.base_dir = Path(base_dir) if base_dir is not None else None
        if self.base_dir is not None:
            self.bind(self.base_dir)

    # -- schema ------------------------------------------------------------------------------------------------------
    def keys_of(self, kind: str) -> list[str]:
        return [k for k, v in self.observation.items() if v["type"] == kind]

    @property
    def image_keys(self) -> list[str]:
        return self.keys_of("image")

    @property
    def text_key(self) -> str | None:
        keys = self.keys_of("text")
        return keys[0] if keys else None

    def bind(self, base_dir: str | os.PathLike) -> None:
        self.base_dir = Path(base_dir)
        for step in self.steps():
            step.bind(self.base_dir)

    def steps(self) -> list[ProcessorStep]:
        return [*self.preprocessor, *self.postprocessor]

    def files(self) -> list[str]:
        return sorted({f for s in self.steps() for f in s.files()})

    # -- running -----------------------------------------------------------------------------------------------------
    def batch_observation(self, observation: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The observation with a batch axis on every declared key, and whether it was a single frame."""
        if not isinstance(observation, dict):
            raise UserError(f"observation must be a dict with keys {sorted(self.observation)}, got "
                            f"{type(observation).__name__}")
        missing = [k for k in self.observation if k not in observation]
        if missing:
            raise UserError(f"observation lacks {missing}; this policy needs {sorted(self.observation)}")
        out: dict[str, Any] = {}
        singles = set()
        for key, info in self.observation.items():
            value = observation[key]
            if info["type"] == "text":
                if isinstance(value, str):
                    out[key], single = [value], True
                elif isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
                    out[key], single = list(value), False
                else:
                    raise UserError(f"observation {key!r} must be a string (or a list of strings), got "
                                    f"{type(value).__name__}")
            else:
                if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a torch tensor
                    value = value.detach().cpu().numpy()
                if not isinstance(value, np.ndarray):
                    value = np.asarray(value)
                rank = OBSERVATION_TYPES[info["type"]]
                if value.ndim == rank:
                    out[key], single = value[None], True
                elif value.ndim == rank + 1:
                    out[key], single = value, False
                else:
                    raise UserError(f"observation {key!r}: shape {tuple(value.shape)}, expected rank {rank} (one "
                                    f"frame) or {rank + 1} (a batch) for a {info['type']}")
            singles.add(single)
        batch = {len(v) for v in out.values()}
        text = self.text_key
        if text is not None and len(out[text]) == 1 and len(batch) > 1:  # one instruction for the whole batch
            out[text] = out[text] * max(batch)
            batch = {len(v) for v in out.values()}
        if len(batch) > 1:
            raise UserError(f"observation values have different batch sizes {sorted(batch)}; give one frame per key "
                            "or the same number of each")
        return out, singles == {True}

    def preprocess(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        """Model feeds (numpy, batched) for one observation or a batch; keys are the IO spec's input names."""
        data, _ = self.batch_observation(observation)
        for step in self.preprocessor:
            data = step(data)
        return data

    def observe(self, observation: dict[str, Any]) -> None:
        """An observation that gets no model call (its action is queued): run the preprocessor up to its last step
        that `observes_every_step` (an observation history), so that step still sees it; nothing when none does."""
        last = max((i for i, s in enumerate(self.preprocessor) if s.observes_every_step), default=None)
        data, _ = self.batch_observation(observation)
        if last is None:
            return
        for step in self.preprocessor[:last + 1]:
            data = step(data)

    def history(self) -> int:
        """Consecutive observations one model call depends on (the longest observation history; 1 without one)."""
        return max((s.history() for s in self.preprocessor), default=1)

    def pending(self) -> bool:
        """True when the postprocessor can give the next action without a model call (a queued action chunk)."""
        return any(s.pending() for s in self.postprocessor)

    def postprocess(self, outputs: dict[str, np.ndarray] | None) -> np.ndarray:
        """One action per frame, [B, action_dim] float32, from the model's outputs (None: from queued actions)."""
        data: dict[str, Any] = {} if outputs is None else dict(outputs)
        if outputs is not None and self.output_key in data and self.action_key not in data:
            data[self.action_key] = data.pop(self.output_key)
        for step in self.postprocessor:
            data = step(data)
        if self.action_key not in data:
            raise UserError(f"the postprocessor produced no {self.action_key!r} (got {sorted(data)}); the model's "
                            f"outputs need {self.output_key!r}")
        return np.asarray(data[self.action_key], dtype=np.float32)

    def step(self, observation: dict[str, Any], infer: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
             ) -> np.ndarray:
        """One control step: run the model only when no queued action is left. Returns [B, action_dim]."""
        if self.pending():
            self.observe(observation)  # refuses bad input and feeds an observation history, without a model call
            return self.postprocess(None)
        return self.postprocess(infer(self.preprocess(observation)))

    def reset(self) -> None:
        for s in self.steps():
            s.reset()

    # -- storage -----------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROCESSOR_FORMAT,
            "format_version": 1,
            "observation": self.observation,
            "preprocessor": [{"name": s.registry_name, "config": s.config()} for s in self.preprocessor],
            "postprocessor": [{"name": s.registry_name, "config": s.config()} for s in self.postprocessor],
            "action": {"key": self.action_key, "output": self.output_key, "dim": self.action_dim},
            "state_file": STATE_FILE,
            "files": self.files(),
            **({"output": self.output} if self.output is not None else {}),
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        flat = {}
        for pipe in PIPELINES:
            for i, s in enumerate(getattr(self, pipe)):
                for k, v in s.state_dict().items():
                    flat[f"{pipe}.{i}.{k}"] = np.ascontiguousarray(v)
        return flat

    def save(self, out_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> list[str]:
        """Write processor.json, processor.safetensors and the files steps name (from `source_dir`, default the
        processor's own directory) into `out_dir`; returns the file names written."""
        from safetensors.numpy import save_file

        out_dir = Path(out_dir)
        src = Path(source_dir) if source_dir is not None else self.base_dir
        written = [PROCESSOR_FILE, STATE_FILE]
        for name in self.files():
            if src is None or not (src / name).is_file():
                raise UserError(f"processor file {name} not found in {src}; put it beside the processor")
            if (src / name).resolve() != (out_dir / name).resolve():
                shutil.copyfile(src / name, out_dir / name)
            written.append(name)
        save_file(self.state_dict(), str(out_dir / STATE_FILE), metadata={"format": PROCESSOR_FORMAT})
        (out_dir / PROCESSOR_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return written

    @classmethod
    def from_json(cls, data: dict[str, Any], state: dict[str, np.ndarray] | None = None,
                  base_dir: str | os.PathLike | None = None, source: str = PROCESSOR_FILE) -> Processor:
        if data.get("format") != PROCESSOR_FORMAT:
            raise UserError(f"{source} is not a vla-export processor (format={data.get('format')!r})")
        state = state or {}
        pipes: dict[str, list[ProcessorStep]] = {}
        for pipe in PIPELINES:
            pipes[pipe] = []
            for i, entry in enumerate(data.get(pipe) or []):
                name = entry.get("name")
                if name not in _REGISTRY:
                    raise UserError(f"{source}: {pipe} step {i} is {name!r}, which is not a registered processor "
                                    f"step (known: {', '.join(sorted(_REGISTRY))}); import the module that registers "
                                    "it (vla_export.processors.register_step) before loading")
                try:
                    step = _REGISTRY[name](**(entry.get("config") or {}))
                except (TypeError, ValueError, KeyError) as e:
                    raise UserError(f"{source}: {pipe} step {i} ({name}) has a bad config: {e}") from e
                prefix = f"{pipe}.{i}."
                step.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
                pipes[pipe].append(step)
        action = data.get("action") or {}
        return cls(data.get("observation") or {}, pipes["preprocessor"], pipes["postprocessor"],
                   action_key=action.get("key", "action"), output_key=action.get("output", "actions"),
                   action_dim=action.get("dim"), base_dir=base_dir, output=_checked_output(data, source))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Processor:
        """The processor stored in `directory` (a checkpoint or a bundle): JSON + safetensors, nothing executed."""
        from safetensors.numpy import load_file

        directory = Path(directory)
        path = directory / PROCESSOR_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{directory} has no {PROCESSOR_FILE}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from e
        state_path = directory / data.get("state_file", STATE_FILE)
        try:
            state = load_file(str(state_path)) if state_path.exists() else {}
        except Exception as e:  # safetensors raises its own SafetensorError
            raise UserError(f"{state_path} is not a readable safetensors file ({str(e)[:160]})") from e
        return cls.from_json(data, state, base_dir=directory, source=str(path))


def _checked_output(data: dict[str, Any], source: str) -> dict[str, Any] | None:
    return check_output(data["output"], source) if data.get("output") is not None else None


def has_processor(directory: str | os.PathLike) -> bool:
    return (Path(directory) / PROCESSOR_FILE).is_file()


def processor_files(directory: str | os.PathLike) -> list[str]:
    """Every file the stored processor of `directory` consists of (json, safetensors, the files its steps name)."""
    directory = Path(directory)
    try:
        data = json.loads((directory / PROCESSOR_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{directory / PROCESSOR_FILE} is not readable JSON ({e})") from e
    names = [PROCESSOR_FILE, data.get("state_file", STATE_FILE), *(data.get("files") or [])]
    for name in names:
        if "/" in name or name in (".", "..") or not (directory / name).is_file():
            raise UserError(f"{directory}: processor file {name!r} is missing or not a plain file name inside the "
                            "directory; re-save the processor")
    return names
