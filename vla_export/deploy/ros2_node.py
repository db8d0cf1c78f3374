"""ROS 2 node `vla_policy`: camera images (+ joint states, an instruction) in, the policy's action out.

Inputs. A bundle that observes one camera and an instruction (the built-in hybrid, a one-camera processor):
`image` (sensor_msgs/Image: rgb8, bgr8, rgba8, bgra8, any size; the bundle's preprocessing resizes) and `instruction`
(std_msgs/String; the last value published before this node started is received from transient-local publishers,
and volatile publishers are heard too); one action per image (or per tick with `rate_hz`). A bundle whose
processor.json observes more (LeRobot ACT on an arm: `observation.images.<cam>` for several cameras,
`observation.state`): one Image subscription per camera on `images/<cam>` (remap each, e.g.
`-r images/top:=/top_camera/image_raw`), the state from sensor_msgs/JointState on `joint_states` (positions picked by
name, in the order of `state_joint_names`: the parameter, else the schema's `names` of `observation.state`, else the
output's joint names), and `instruction` when it observes a `task`. The first camera paces the policy (one action per
frame of it, with the newest of every other input), or `rate_hz` does: then every tick is one control step, so a
chunked policy (ACT) executes one action of its chunk per tick. A JointState message that lacks a configured joint is
refused (fail-safe, logged with the names it has): a publisher of part of the joints must be merged upstream
(joint_state_publisher's `source_list`).

Output, by what the actions command (the bundle processor.json's `output` block, overridable by parameters; a bundle
that declares none is a Twist policy as before):
- twist: geometry_msgs/Twist on `cmd_vel`; action names map to Twist fields by the bundle (linear_x -> linear.x, ...,
  angular_z -> angular.z). Fail-safe: zero.
- joint: std_msgs/Float64MultiArray (the action vector, e.g. for ros2_control's forward_command_controller) on
  `joint_commands`, or trajectory_msgs/JointTrajectory on `joint_trajectory` (for joint_trajectory_controller):
  `joint_names` in action order, one point, positions = the action, `time_from_start` (`time_from_start_ms`, else
  the bundle's, else 100 ms), header stamp zero ("start on receipt"). Fail-safe: hold (or zero, see below).

Parameters: `bundle` (directory), `backend` (auto), `max_image_age_ms` (500; applies to every required input: each
camera and joint_states), `rate_hz` (0: one action per image; > 0: act on the newest inputs at this rate, repeating
the last action while no new frame arrived in the one-camera mode), `instruction` (used until one arrives on the
topic), `image_reliability` (best_effort | reliable), `threads` (ONNX Runtime intra-op threads; 0 = its default);
for the output (empty or 0: the bundle's declaration): `output_type` (geometry_msgs/msg/Twist |
std_msgs/msg/Float64MultiArray | trajectory_msgs/msg/JointTrajectory; `pkg/Type` works too), `action_topic`,
`fail_safe` (zero | hold), `joint_names` and `state_joint_names` (string arrays, or one comma-separated string),
`time_from_start_ms`. A bad combination is refused at start with one line (exit 2): an unknown type, a twist that
holds, a JointTrajectory that zeroes, joint names whose count is not the action's width, a JointTrajectory without
joint names, state joint names whose count is not the state's width.

Fail safe, because this moves a robot. It applies when the newest good input is older than `max_image_age_ms` (a
watchdog timer, also before the first input), when inference raises or returns NaN/Inf, when the action would be
computed from an input that became too old during inference, when no instruction is known, after a failed self-test,
and for a malformed message (image: unsupported encoding, empty, data length not height x step, step shorter than a
row; JointState: a configured joint missing, names and positions of different lengths, a non-finite position). Each
reason is logged once until good input returns (then "resumed" is logged); the node never exits on bad input.
- zero (Twist, and Float64MultiArray when declared, e.g. joint velocities): a zero command every watchdog period and
  once on shutdown (SIGINT/SIGTERM; waiting for it to be acknowledged).
- hold (the default for joint outputs): a zero joint *position* command moves every joint to 0, i.e. it throws the
  arm. Hold republishes the last good command (the target the arm is already moving to, one control step from where
  it is) every watchdog period and once on shutdown, so the arm stops at that target and a streaming controller
  keeps a command. Before the first good action it publishes nothing: the controller keeps the position it holds
  since activation. Not the measured joint positions: joint_states may be the stale input, an arm commanded to where
  gravity has sagged it sags further each period, and a gripper commanded to its measured width around an object
  lets go of it.

Large frames: with Fast DDS's default shared-memory segment (512 KB), a best-effort frame larger than that travelling
between processes goes over UDP in fragments and is often lost (measured here: 29 of 30 640x480 rgb8 frames). The node
then keeps the robot stopped (stale image). Fix it either with `image_reliability:=reliable` (publisher must be
reliable; measured p50 12 ms for such a frame) or a Fast DDS profile with a larger shared-memory segment
(`FASTDDS_DEFAULT_PROFILES_FILE`; measured p50 6.5 ms, best effort).

Input age is measured from receipt on this node's monotonic clock, not from `header.stamp`: camera clocks are often
not synchronised with the robot's, and a zero stamp must not read as 50 years old.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from vla_export.errors import UserError
from vla_export.processors.core import (
    DEFAULT_TIME_FROM_START_S,
    FAIL_SAFES,
    FLOAT64_ARRAY_MSG,
    JOINT_TRAJECTORY_MSG,
    TWIST_MSG,
    check_output,
)

try:
    import rclpy
    from builtin_interfaces.msg import Duration as DurationMsg
    from geometry_msgs.msg import Twist
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Float64MultiArray, MultiArrayDimension, String

    RCLPY_IMPORT_ERROR: ImportError | None = None
except ImportError as _e:  # the node is optional: `import vla_export` must work without ROS 2
    rclpy = None
    Node = object  # type: ignore[misc,assignment]
    RCLPY_IMPORT_ERROR = _e
try:  # only a JointTrajectory output needs it
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    TRAJECTORY_IMPORT_ERROR: ImportError | None = None
except ImportError as _e:
    JointTrajectory = JointTrajectoryPoint = None
    TRAJECTORY_IMPORT_ERROR = _e

NODE_NAME = "vla_policy"
DEFAULTS: dict[str, Any] = {"bundle": "", "backend": "auto", "max_image_age_ms": 500.0, "rate_hz": 0.0,
                            "instruction": "", "image_reliability": "best_effort", "threads": 0,
                            "output_type": "", "action_topic": "", "fail_safe": "", "joint_names": "",
                            "state_joint_names": "", "time_from_start_ms": 0.0}
IMAGE_RELIABILITY = ("best_effort", "reliable")
# bytes per pixel and channel order of the encodings accepted on `image`
ENCODINGS = {"rgb8": (3, (0, 1, 2)), "bgr8": (3, (2, 1, 0)), "rgba8": (4, (0, 1, 2)), "bgra8": (4, (2, 1, 0))}
# The watchdog checks input age this often (at most), so the fail-safe follows within max_image_age_ms + one period.
WATCHDOG_MAX_PERIOD_S = 0.1
# where each output type is published unless `action_topic` says otherwise (relative names: they remap)
DEFAULT_ACTION_TOPICS = {TWIST_MSG: "cmd_vel", FLOAT64_ARRAY_MSG: "joint_commands",
                         JOINT_TRAJECTORY_MSG: "joint_trajectory"}
JOINT_STATES_TOPIC = "joint_states"


class BadInput(ValueError):
    """A malformed input message; `kind` groups the log line (once per kind)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class BadImage(BadInput):
    """A malformed sensor_msgs/Image."""


def require_rclpy() -> None:
    if rclpy is None:
        raise UserError(f"the ROS 2 node needs rclpy and the message packages ({RCLPY_IMPORT_ERROR}); install them "
                        "with pip install 'vla-export[ros]'")


def image_to_rgb(height: int, width: int, encoding: str, step: int, data: Any) -> np.ndarray:
    """HxWx3 RGB uint8 from the fields of a sensor_msgs/Image, or BadImage saying what is wrong."""
    enc = str(encoding).lower()
    if enc not in ENCODINGS:
        raise BadImage("encoding", f"unsupported image encoding {encoding!r}; publish one of {', '.join(ENCODINGS)}")
    channels, order = ENCODINGS[enc]
    if height <= 0 or width <= 0:
        raise BadImage("empty", f"empty image ({width}x{height})")
    if step < width * channels:
        raise BadImage("step", f"image step {step} is shorter than a row ({width} px x {channels} bytes)")
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if buf.size != height * step:
        raise BadImage("size", f"image data has {buf.size} bytes, expected height x step = {height} x {step} = "
                               f"{height * step}")
    pixels = buf.reshape(height, step)[:, :width * channels].reshape(height, width, channels)
    return np.ascontiguousarray(pixels[:, :, list(order)])


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = "rgb8") -> dict[str, Any]:
    """The sensor_msgs/Image fields that carry an HxWx3 RGB uint8 frame in `encoding` (for publishers and tests)."""
    channels, order = ENCODINGS[encoding]
    h, w, _ = rgb.shape
    out = np.empty((h, w, channels), dtype=np.uint8)
    out[:, :, list(order)] = rgb
    if channels == 4:
        out[:, :, 3] = 255
    return {"height": h, "width": w, "encoding": encoding, "is_bigendian": 0, "step": w * channels,
            "data": out.tobytes()}


def joint_positions(names: Any, positions: Any, wanted: list[str]) -> np.ndarray:
    """The positions of joints `wanted`, in that order, from a sensor_msgs/JointState's name/position fields (any
    order, extra joints ignored), as float32 (what the policy's state is); BadInput saying what is wrong."""
    names = [str(n) for n in names]
    values = np.asarray(positions, dtype=np.float64).reshape(-1)
    if len(names) != values.size:
        raise BadInput("joint_state", f"JointState has {len(names)} names but {values.size} positions")
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise BadInput("joint_names", f"JointState lacks joints {missing} (it has {names}); publish every joint of "
                                      "state_joint_names in one message")
    picked = values[[index[n] for n in wanted]]
    if not np.all(np.isfinite(picked)):
        bad = [n for n, v in zip(wanted, picked.tolist(), strict=True) if not np.isfinite(v)]
        raise BadInput("joint_nonfinite", f"JointState has non-finite positions for {bad}")
    return picked.astype(np.float32)


def camera_topic(key: str) -> str:
    """The relative topic a camera observation is subscribed on: `observation.images.top` -> `images/top`, a valid
    ROS 2 name (tokens of letters, digits and single underscores, not starting with a digit)."""
    tokens = key.removeprefix("observation.").split(".")
    out = []
    for token in tokens:
        token = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_]", "_", token)) or "_"
        out.append(f"_{token}" if token[0].isdigit() else token)
    return "/".join(out)


def names_parameter(value: Any, name: str) -> list[str]:
    """A string-array parameter given as an array or as one comma-separated string ("" -> [])."""
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
        return [n.strip() for n in value if n.strip()]
    raise UserError(f"parameter {name} must be a string array or a comma-separated string, got {value!r}")


def twist_from_actions(actions: np.ndarray, names: list[str], fields: dict[str, str]) -> "Twist":
    msg = Twist()
    for name, value in zip(names, np.asarray(actions, dtype=np.float64).reshape(-1), strict=True):
        group, axis = fields[name].split(".")
        setattr(getattr(msg, group), axis, float(value))
    return msg


def twist_values(msg: "Twist") -> np.ndarray:
    return np.array([msg.linear.x, msg.linear.y, msg.linear.z, msg.angular.x, msg.angular.y, msg.angular.z])


def float64_array_from_actions(actions: np.ndarray) -> "Float64MultiArray":
    values = np.asarray(actions, dtype=np.float64).reshape(-1)
    msg = Float64MultiArray()
    msg.layout.dim = [MultiArrayDimension(label="actions", size=values.size, stride=values.size)]
    msg.data = values.tolist()
    return msg


def joint_trajectory_from_actions(actions: np.ndarray, joint_names: list[str], time_from_start_s: float
                                  ) -> "JointTrajectory":
    """One point at `time_from_start_s`, positions = the action; header stamp zero: the controller starts it on
    receipt (no clock shared with this node needed)."""
    msg = JointTrajectory()
    msg.joint_names = list(joint_names)
    sec = int(time_from_start_s)
    msg.points = [JointTrajectoryPoint(positions=np.asarray(actions, dtype=np.float64).reshape(-1).tolist(),
                                       time_from_start=DurationMsg(sec=sec, nanosec=int(round(
                                           (time_from_start_s - sec) * 1e9))))]
    return msg


@dataclass(frozen=True)
class Output:
    """What the node publishes and what it does on bad input (resolved from the bundle and the parameters)."""

    kind: str  # twist | joint
    msg_type: str
    fail_safe: str  # zero | hold
    topic: str
    joint_names: tuple[str, ...] = ()
    time_from_start_s: float = DEFAULT_TIME_FROM_START_S

    @property
    def type_name(self) -> str:
        return self.msg_type.rsplit("/", 1)[-1]


def resolve_output(declared: dict[str, Any] | None, action_names: list[str], twist_fields: dict[str, str], *,
                   output_type: str = "", action_topic: str = "", fail_safe: str = "",
                   joint_names: list[str] | tuple = (), time_from_start_ms: float = 0.0) -> Output:
    """The output: the bundle's declaration (processor.json `output`, None when it has none: a Twist policy), each
    non-empty parameter replacing its field; refused with one line (UserError) when the combination is unsafe or does
    not fit the action's width."""
    merged = dict(declared or {})
    if output_type:
        merged["msg_type"] = output_type
    if fail_safe:
        merged["fail_safe"] = fail_safe
    if joint_names:
        merged["joint_names"] = list(joint_names)
    if time_from_start_ms:
        merged["time_from_start_s"] = float(time_from_start_ms) / 1e3
    source = "the bundle's output + the node's parameters" if declared else "the node's parameters"
    out = check_output(merged, source)
    dim = len(action_names)
    if out["kind"] == "twist":
        unmapped = [n for n in action_names if n not in twist_fields]
        if unmapped:
            raise UserError(f"actions {unmapped} of the bundle have no geometry_msgs/Twist field; name actions "
                            "linear_x/linear_y/linear_z/angular_x/angular_y/angular_z in the checkpoint config, or "
                            "publish them as a joint command (output_type:=std_msgs/msg/Float64MultiArray)")
    names = out["joint_names"]
    if names and len(names) != dim:
        raise UserError(f"joint_names has {len(names)} names {names} but the policy's action has {dim} values "
                        f"({action_names}); give one joint name per action value, in action order")
    if out["msg_type"] == JOINT_TRAJECTORY_MSG:
        if not names:
            raise UserError("a JointTrajectory output needs joint names: set -p joint_names:=\"[j1, j2, ...]\" (one "
                            "per action value, in action order) or declare output.joint_names in the bundle")
        if JointTrajectory is None:
            raise UserError(f"a JointTrajectory output needs trajectory_msgs ({TRAJECTORY_IMPORT_ERROR}); install it "
                            "with pip install 'vla-export[ros]'")
    return Output(out["kind"], out["msg_type"], out["fail_safe"], action_topic or DEFAULT_ACTION_TOPICS[out["msg_type"]],
                  tuple(names), out["time_from_start_s"])


@dataclass(frozen=True)
class Received:
    """The newest good value of one input, when it arrived (monotonic s) and how many have arrived."""

    value: np.ndarray
    at: float
    seq: int


class PolicyNode(Node):
    """The `vla_policy` node. `policy` may be passed in (tests share one); else it is loaded from `bundle`."""

    def __init__(self, *, policy=None, context=None, parameter_overrides: list | None = None,
                 cli_args: list[str] | None = None):
        require_rclpy()
        super().__init__(NODE_NAME, context=context, parameter_overrides=parameter_overrides, cli_args=cli_args)
        for name, default in DEFAULTS.items():
            # dynamic typing: `-p max_image_age_ms:=300` (an integer) must not be refused for a double default, and
            # joint_names may be a string array or one comma-separated string
            self.declare_parameter(name, default, ParameterDescriptor(dynamic_typing=True))
        # an empty value on the command line (`-p fail_safe:=`) reads as None: the default, as if not given
        p = {name: DEFAULTS[name] if (value := self.get_parameter(name).value) is None else value
             for name in DEFAULTS}
        self.max_image_age_s = float(p["max_image_age_ms"]) / 1e3
        self.rate_hz = float(p["rate_hz"])
        if self.max_image_age_s <= 0 or self.rate_hz < 0:
            raise UserError(f"need max_image_age_ms > 0 and rate_hz >= 0, got {p['max_image_age_ms']} / "
                            f"{p['rate_hz']}")
        if p["image_reliability"] not in IMAGE_RELIABILITY:
            raise UserError(f"image_reliability must be one of {IMAGE_RELIABILITY}, got {p['image_reliability']!r}")
        joint_names = names_parameter(p["joint_names"], "joint_names")
        state_joint_names = names_parameter(p["state_joint_names"], "state_joint_names")
        # refuse a bad value before the minutes a bundle can take to load (combinations are judged once it is)
        if p["output_type"]:
            check_output({"msg_type": p["output_type"]}, "parameter output_type")
        if p["fail_safe"] not in ("", *FAIL_SAFES):
            raise UserError(f"fail_safe must be one of {', '.join(FAIL_SAFES)} (or empty: the bundle's), got "
                            f"{p['fail_safe']!r}")
        if float(p["time_from_start_ms"]) < 0:
            raise UserError(f"time_from_start_ms must be > 0 (0: the bundle's, else 100 ms), got "
                            f"{p['time_from_start_ms']}")
        # Set when the bundle's self-test fails on this machine: the node then runs, but only ever applies its
        # fail-safe and says why, so a robot with a wrong artifact does not act on bad numbers.
        self.selftest_failure: str | None = None
        if policy is None:
            from vla_export.deploy.policy import Policy, SelfTestFailed

            if not p["bundle"]:
                raise UserError("parameter 'bundle' is not set; run with --ros-args -p bundle:=dist/policy")
            try:
                policy = Policy.load(str(p["bundle"]), backend=str(p["backend"]), threads=int(p["threads"]) or None)
            except SelfTestFailed as e:
                self.selftest_failure = str(e)
                policy = Policy.load(str(p["bundle"]), backend=str(p["backend"]), verify=False,
                                     threads=int(p["threads"]) or None)  # opened for its names only; never acts
        elif getattr(policy, "selftest", None) and policy.selftest.get("passed") is False:
            self.selftest_failure = f"{policy.info['artifact']} failed the bundle's self-test on this machine"
        self.policy = policy
        self.action_names = policy.action_names
        processor = getattr(policy, "processor", None)
        self.output = resolve_output(processor.output if processor is not None else None, self.action_names,
                                     policy.twist_fields, output_type=str(p["output_type"]),
                                     action_topic=str(p["action_topic"]), fail_safe=str(p["fail_safe"]),
                                     joint_names=joint_names, time_from_start_ms=float(p["time_from_start_ms"]))
        self.twist_fields = policy.twist_fields
        self.instruction = str(p["instruction"]) or None

        # One camera (+ instruction): the `image` topic, as before processors existed. Anything more: the
        # observation mode, one subscription per camera and the state from joint_states.
        self.observation_mode = processor is not None and not (
            len(processor.image_keys) == 1
            and set(processor.observation) <= {processor.image_keys[0], processor.text_key})
        self.text_key = processor.text_key if processor is not None else None
        self.input_topics: dict[str, str] = {}  # observation key -> topic, observation mode only
        self.state_key: str | None = None
        self.state_joint_names: list[str] = []
        self.pacing_key: str | None = None
        if self.observation_mode:
            self._configure_observation(processor, state_joint_names)
        elif state_joint_names:
            raise UserError("state_joint_names is set but this policy observes no state (only one camera"
                            f"{' and an instruction' if self.text_key else ''})")

        self._lock = threading.Lock()  # input bookkeeping + every publish decision
        self._newest_rgb: np.ndarray | None = None
        self._newest_at: float | None = None
        self._newest_seq = 0
        self._acted_seq = 0
        self._latest: dict[str, Received | None] = {key: None for key in self.input_topics}
        self._last_action: np.ndarray | None = None
        self._last_msg: Any = None  # the last good command: what hold republishes
        self._failing: set[str] = set()
        self._stopped = False  # after shutdown's last message nothing else may be published
        self.stats: Counter[str] = Counter()  # published actions, and fail-safe events by mode:reason
        self.warnings: Counter[str] = Counter()  # warning lines logged, by reason kind
        self.reasons: dict[str, str] = {}  # the last reason logged for each kind

        acting = MutuallyExclusiveCallbackGroup()
        watching = MutuallyExclusiveCallbackGroup()
        msg_class = {TWIST_MSG: Twist, FLOAT64_ARRAY_MSG: Float64MultiArray,
                     JOINT_TRAJECTORY_MSG: JointTrajectory}[self.output.msg_type]
        try:
            self.cmd_pub = self.create_publisher(msg_class, self.output.topic, QoSProfile(depth=10))
        except Exception as e:  # noqa: BLE001 - rclpy's InvalidTopicNameException and friends
            raise UserError(f"cannot publish on action_topic {self.output.topic!r}: {str(e).splitlines()[0]}") from e
        # Newest frame only. Best effort (default) matches camera drivers (sensor-data QoS) and reliable publishers
        # alike; `reliable` only matches reliable publishers but survives Fast DDS dropping large best-effort frames
        # between processes (see the module docstring).
        reliability = (ReliabilityPolicy.RELIABLE if p["image_reliability"] == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        image_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=reliability)
        if not self.observation_mode:
            self.create_subscription(Image, "image", self._on_image, image_qos, callback_group=acting)
        else:
            for key, topic in self.input_topics.items():
                if key == self.state_key:
                    # best effort matches joint_state_broadcaster (reliable) and sensor-data publishers alike
                    state_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                                           reliability=ReliabilityPolicy.BEST_EFFORT)
                    self.create_subscription(JointState, topic, self._on_joint_state, state_qos,
                                             callback_group=acting)
                else:
                    self.create_subscription(Image, topic, partial(self._on_camera, key), image_qos,
                                             callback_group=acting)
        if not self.observation_mode or self.text_key:
            latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
            # A transient-local subscription does not match volatile publishers, so listen with both. Same group as
            # inference: a new instruction resets the recurrent state, which must not race a running act().
            self.create_subscription(String, "instruction", self._on_instruction, latched, callback_group=acting)
            self.create_subscription(String, "instruction", self._on_instruction, QoSProfile(depth=1),
                                     callback_group=acting)
        self.watchdog_period_s = min(WATCHDOG_MAX_PERIOD_S, self.max_image_age_s / 4)
        self.create_timer(self.watchdog_period_s, self._watchdog, callback_group=watching)
        if self.rate_hz > 0:
            self.create_timer(1.0 / self.rate_hz, self._on_rate_tick, callback_group=acting)
        if self.selftest_failure:
            self.get_logger().error(f"self-test failed: {self._fail_safe_words()} only "
                                    f"({self.selftest_failure})")
        o = self.output
        mapping = ([self.twist_fields[n] for n in self.action_names] if o.kind == "twist"
                   else list(o.joint_names) or "(no joint names)")
        inputs = (f"inputs {self.input_topics}{' + instruction' if self.text_key else ''}" if self.observation_mode
                  else "inputs image + instruction")
        self.get_logger().info(
            f"vla_policy: bundle {policy.bundle_dir} ({policy.info['artifact']}), backend {policy.backend} "
            f"({policy.provider or policy.device}): {policy.backend_reason}; actions {self.action_names} -> "
            f"{mapping} as {o.msg_type} on {o.topic!r} (fail-safe {o.fail_safe}"
            f"{f', time_from_start {o.time_from_start_s:g} s' if o.msg_type == JOINT_TRAJECTORY_MSG else ''}); "
            f"{inputs}; max_image_age_ms {self.max_image_age_s * 1e3:g}, rate_hz {self.rate_hz:g}, image "
            f"{p['image_reliability']}"
            + ("" if self.observation_mode and not self.text_key else ", instruction " + (
                repr(self.instruction) if self.instruction else "(none yet: waiting on the instruction topic)")))

    def _configure_observation(self, processor, state_joint_names: list[str]) -> None:
        """Topics for every camera and the state of a processor that observes more than one camera + text."""
        cameras = processor.image_keys
        states = processor.keys_of("state")
        if len(states) > 1:
            raise UserError(f"this policy observes several state vectors {states}; the node fills one, "
                            "observation.state, from joint_states")
        topics = {key: camera_topic(key) for key in cameras}
        if len(set(topics.values())) != len(topics):
            raise UserError(f"cameras {cameras} map to clashing topics {list(topics.values())}; rename the cameras")
        if states:
            self.state_key = states[0]
            schema = processor.observation[self.state_key]
            names = (state_joint_names or list(schema.get("names") or [])
                     or list(self.output.joint_names))
            width = (schema.get("shape") or [None])[0]
            if not names:
                raise UserError(f"this policy observes {self.state_key} but no joint names say which JointState "
                                "positions fill it: set -p state_joint_names:=\"[j1, j2, ...]\"")
            if width is not None and len(names) != int(width):
                raise UserError(f"state_joint_names has {len(names)} names {names} but {self.state_key} has "
                                f"{width} values; give one joint name per state value, in order")
            if len(set(names)) != len(names):
                raise UserError(f"state_joint_names repeat a name: {names}")
            self.state_joint_names = names
            topics[self.state_key] = JOINT_STATES_TOPIC
        elif state_joint_names:
            raise UserError(f"state_joint_names is set but this policy observes no state ({sorted(processor.observation)})")
        self.input_topics = topics
        # the first camera paces the policy (rate_hz 0); a policy without cameras acts on each joint state
        self.pacing_key = cameras[0] if cameras else self.state_key

    # -- publishing ---------------------------------------------------------------------------------------------------
    def _fail_safe_words(self) -> str:
        if self.output.fail_safe == "zero":
            return f"publishing zero {self.output.type_name}s"
        return "holding the last good command"

    def _zero_msg(self) -> Any:
        if self.output.msg_type == TWIST_MSG:
            return Twist()
        return float64_array_from_actions(np.zeros(len(self.action_names)))

    def _action_msg(self, actions: np.ndarray) -> Any:
        if self.output.msg_type == TWIST_MSG:
            return twist_from_actions(actions, self.action_names, self.twist_fields)
        if self.output.msg_type == FLOAT64_ARRAY_MSG:
            return float64_array_from_actions(actions)
        return joint_trajectory_from_actions(actions, list(self.output.joint_names), self.output.time_from_start_s)

    def _publish_fail_safe(self, kind: str, reason: str) -> None:
        """The fail-safe for `kind` (zero, or hold: republish the last good command, nothing before the first); log
        `reason` the first time `kind` occurs since good input was last seen. Hold _lock."""
        if self._stopped:
            return
        if self.output.fail_safe == "zero":
            self.cmd_pub.publish(self._zero_msg())
            self.stats[f"zero:{kind}"] += 1
            what = f"publishing zero {self.output.type_name}"
        else:
            self.stats[f"hold:{kind}"] += 1
            if self._last_msg is not None:
                self.cmd_pub.publish(self._last_msg)
                self.stats["held"] += 1  # republished commands
                what = "holding: republishing the last good command"
            else:
                what = "holding: no good command yet, publishing nothing"
        if kind not in self._failing:
            self._failing.add(kind)
            self.warnings[kind] += 1
            self.reasons[kind] = reason
            self.get_logger().warning(f"{what}: {reason}")

    def fail(self, kind: str, reason: str) -> None:
        with self._lock:
            self._publish_fail_safe(kind, reason)

    def _publish_action(self, actions: np.ndarray, received_at: float) -> None:
        with self._lock:
            if self._stopped:
                return
            age = time.monotonic() - received_at
            if age > self.max_image_age_s:
                what = "an image" if not self.observation_mode else "inputs"
                self._publish_fail_safe("slow", f"the action is for {what} {age * 1e3:.0f} ms old (> "
                                                f"max_image_age_ms {self.max_image_age_s * 1e3:g}): inference is "
                                                "too slow")
                return
            msg = self._action_msg(actions)
            self.cmd_pub.publish(msg)
            self.stats["actions"] += 1
            self._last_action = actions
            self._last_msg = msg
            if self._failing:
                self.get_logger().info(f"resumed: good input again (after {', '.join(sorted(self._failing))})")
                self._failing.clear()

    # -- callbacks ----------------------------------------------------------------------------------------------------
    def _on_instruction(self, msg: "String") -> None:
        text = str(msg.data)
        if text != self.instruction:
            self.get_logger().info(f"instruction: {text!r}")
            self.instruction = text
            self.policy.reset()  # a new task is a new episode for the recurrent state

    def _on_image(self, msg: "Image") -> None:
        received_at = time.monotonic()
        try:
            rgb = image_to_rgb(msg.height, msg.width, msg.encoding, msg.step, msg.data)
        except BadImage as e:
            self.fail(e.kind, str(e))
            return
        with self._lock:
            self._newest_rgb, self._newest_at = rgb, received_at
            self._newest_seq += 1
            seq = self._newest_seq
        if self.rate_hz == 0:
            self._act(rgb, received_at, seq)

    def _on_camera(self, key: str, msg: "Image") -> None:
        received_at = time.monotonic()
        try:
            rgb = image_to_rgb(msg.height, msg.width, msg.encoding, msg.step, msg.data)
        except BadImage as e:
            self.fail(e.kind, f"{self.input_topics[key]}: {e}")
            return
        self._received(key, rgb, received_at)

    def _on_joint_state(self, msg: "JointState") -> None:
        received_at = time.monotonic()
        try:
            q = joint_positions(msg.name, msg.position, self.state_joint_names)
        except BadInput as e:
            self.fail(e.kind, f"{JOINT_STATES_TOPIC}: {e}")
            return
        self._received(self.state_key, q, received_at)

    def _received(self, key: str, value: np.ndarray, received_at: float) -> None:
        with self._lock:
            before = self._latest[key]
            self._latest[key] = Received(value, received_at, 1 if before is None else before.seq + 1)
        if self.rate_hz == 0 and key == self.pacing_key:
            self._act_on_observation()

    def _on_rate_tick(self) -> None:
        if self.observation_mode:
            self._act_on_observation()  # every tick is a control step (a chunked policy pops one action per call)
            return
        with self._lock:
            rgb, at, seq = self._newest_rgb, self._newest_at, self._newest_seq
            last = self._last_action
        if rgb is None or at is None or time.monotonic() - at > self.max_image_age_s:
            return  # the watchdog applies the fail-safe
        if seq != self._acted_seq:
            self._act(rgb, at, seq)
        elif last is not None and not self._failing:
            self._publish_action(last, at)

    def _ready_to_act(self) -> bool:
        if self.selftest_failure:
            self.fail("selftest", f"the bundle's self-test failed on this machine, so the robot is not driven by it: "
                                  f"{self.selftest_failure}")
            return False
        if not self.instruction and (self.text_key or not self.observation_mode):
            self.fail("no_instruction", "no instruction yet: publish one on 'instruction' or set the 'instruction' "
                                        "parameter")
            return False
        return True

    def _infer(self, *args) -> np.ndarray | None:
        """policy.act(*args), or None after applying the fail-safe for an exception or non-finite actions."""
        try:
            actions = self.policy.act(*args)
        except Exception as e:  # noqa: BLE001 - any inference failure must trigger the fail-safe, not stop the node
            first = str(e).splitlines()[0][:200] if str(e) else ""
            self.fail("inference", f"inference failed ({type(e).__name__}: {first})")
            return None
        if not np.all(np.isfinite(actions)):
            self.fail("nonfinite", f"the policy returned non-finite actions {actions.tolist()}")
            return None
        return actions

    def _act(self, rgb: np.ndarray, received_at: float, seq: int) -> None:
        self._acted_seq = seq
        if not self._ready_to_act():
            return
        actions = self._infer(rgb, self.instruction)
        if actions is not None:
            self._publish_action(actions, received_at)

    def _act_on_observation(self) -> None:
        """One control step on the newest value of every input, when all of them are fresh (else the watchdog
        applies the fail-safe)."""
        with self._lock:
            latest = dict(self._latest)
        now = time.monotonic()
        if any(r is None or now - r.at > self.max_image_age_s for r in latest.values()):
            return
        if not self._ready_to_act():
            return
        obs: dict[str, Any] = {key: r.value for key, r in latest.items()}
        if self.text_key:
            obs[self.text_key] = self.instruction
        actions = self._infer(obs)
        if actions is not None:
            self._publish_action(actions, min(r.at for r in latest.values()))  # as old as its oldest input

    def _watchdog(self) -> None:
        with self._lock:
            if not self.observation_mode:
                if self._newest_at is None:
                    self._publish_fail_safe("no_image", "no image received yet on 'image'")
                    return
                age = time.monotonic() - self._newest_at
                if age > self.max_image_age_s:
                    self._publish_fail_safe("stale", f"newest image is {age * 1e3:.0f} ms old (> max_image_age_ms "
                                                     f"{self.max_image_age_s * 1e3:g})")
                return
            missing = [self.input_topics[k] for k, r in self._latest.items() if r is None]
            if missing:
                self._publish_fail_safe("no_input", f"nothing received yet on {missing}")
                return
            now = time.monotonic()
            stale = {self.input_topics[k]: now - r.at for k, r in self._latest.items()
                     if now - r.at > self.max_image_age_s}
            if stale:
                ages = ", ".join(f"{topic} {age * 1e3:.0f} ms" for topic, age in stale.items())
                self._publish_fail_safe("stale", f"newest input too old: {ages} (> max_image_age_ms "
                                                 f"{self.max_image_age_s * 1e3:g})")

    # -- shutdown -----------------------------------------------------------------------------------------------------
    def publish_stop(self, timeout_s: float = 1.0) -> bool:
        """The last message (an action still being computed is dropped): a zero command, or for hold the last good
        command again (nothing when there was none), waiting up to `timeout_s` until reliable subscribers
        acknowledged it. `stop_summary` says which."""
        from rclpy.duration import Duration

        with self._lock:
            self._stopped = True
            if self.output.fail_safe == "zero":
                self.cmd_pub.publish(self._zero_msg())
                self.stats["zero:shutdown"] += 1
                self.stop_summary = f"published zero {self.output.type_name}"
            elif self._last_msg is not None:
                self.cmd_pub.publish(self._last_msg)
                self.stats["hold:shutdown"] += 1
                self.stop_summary = f"holding: republished the last good {self.output.type_name}"
            else:
                self.stop_summary = "holding: no command was ever published, so none was sent"
        return bool(self.cmd_pub.wait_for_all_acked(Duration(seconds=timeout_s)))


def parameter_overrides(**values: Any) -> list:
    """`Parameter` overrides for the node from keyword values (None values are left out)."""
    require_rclpy()
    return [Parameter(k, value=v) for k, v in values.items() if v is not None]


def run(argv: list[str] | None = None, overrides: dict[str, Any] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; publishes its last message on the way out (`publish_stop`). Returns the
    exit code."""
    require_rclpy()
    from rclpy.signals import SignalHandlerOptions

    context = rclpy.Context()
    rclpy.init(args=argv, context=context, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    node = executor = None
    try:
        try:
            node = PolicyNode(context=context, parameter_overrides=parameter_overrides(**(overrides or {})))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        executor = MultiThreadedExecutor(num_threads=3, context=context)
        executor.add_node(node)
        while not stop.is_set() and context.ok():
            executor.spin_once(timeout_sec=0.1)
        return 0
    finally:
        if node is not None:
            acked = node.publish_stop()
            node.get_logger().info(f"shutdown: {node.stop_summary} ({'acknowledged' if acked else 'not acknowledged'}"
                                   " by every subscriber)")
        if executor is not None:
            executor.shutdown(timeout_sec=2.0)  # callbacks still running publish nothing now (_stopped)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    """Entry point `vla-policy-node` (for launch files): `vla-policy-node --ros-args -p bundle:=dist/policy`."""
    try:
        return run(sys.argv if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
