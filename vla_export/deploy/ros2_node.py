"""ROS 2 node `vla_policy`: camera images + an instruction in, `geometry_msgs/Twist` on `cmd_vel` out.

Topics (relative, so they remap): `image` (sensor_msgs/Image: rgb8, bgr8, rgba8, bgra8, any size; the bundle's
preprocessing resizes), `instruction` (std_msgs/String; the last value published before this node started is received
from transient-local publishers, and volatile publishers are heard too), `cmd_vel` (geometry_msgs/Twist; action names
map to Twist fields by the bundle: linear_x -> linear.x, ..., angular_z -> angular.z).

Parameters: `bundle` (directory), `backend` (auto), `max_image_age_ms` (500), `rate_hz` (0: one action per image;
> 0: act on the newest image at this rate, repeating the last action while no new frame arrived), `instruction`
(used until one arrives on the topic), `image_reliability` (best_effort | reliable), `threads` (ONNX Runtime
intra-op threads; 0 = its default).

Fail safe, because this moves a robot: a zero Twist is published when the newest good image is older than
`max_image_age_ms` (a watchdog timer, also before the first image), when inference raises or returns NaN/Inf, when
the action would be computed from an image that became too old during inference, when no instruction is known, and
for a malformed image (unsupported encoding, empty, data length not height x step, step shorter than a row). Each
reason is logged once until good input returns (then "resumed" is logged); the node never exits on bad input. On
shutdown (SIGINT/SIGTERM) it publishes one zero Twist and waits for it to be acknowledged.

Large frames: with Fast DDS's default shared-memory segment (512 KB), a best-effort frame larger than that travelling
between processes goes over UDP in fragments and is often lost (measured here: 29 of 30 640x480 rgb8 frames). The node
then keeps the robot stopped (stale image). Fix it either with `image_reliability:=reliable` (publisher must be
reliable; measured p50 12 ms for such a frame) or a Fast DDS profile with a larger shared-memory segment
(`FASTDDS_DEFAULT_PROFILES_FILE`; measured p50 6.5 ms, best effort).

Image age is measured from receipt on this node's monotonic clock, not from `header.stamp`: camera clocks are often not
synchronised with the robot's, and a zero stamp must not read as 50 years old.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from vla_export.errors import UserError

try:
    import rclpy
    from geometry_msgs.msg import Twist
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    RCLPY_IMPORT_ERROR: ImportError | None = None
except ImportError as _e:  # the node is optional: `import vla_export` must work without ROS 2
    rclpy = None
    Node = object  # type: ignore[misc,assignment]
    RCLPY_IMPORT_ERROR = _e

NODE_NAME = "vla_policy"
DEFAULTS: dict[str, Any] = {"bundle": "", "backend": "auto", "max_image_age_ms": 500.0, "rate_hz": 0.0,
                            "instruction": "", "image_reliability": "best_effort", "threads": 0}
IMAGE_RELIABILITY = ("best_effort", "reliable")
# bytes per pixel and channel order of the encodings accepted on `image`
ENCODINGS = {"rgb8": (3, (0, 1, 2)), "bgr8": (3, (2, 1, 0)), "rgba8": (4, (0, 1, 2)), "bgra8": (4, (2, 1, 0))}
# The watchdog checks image age this often (at most), so a zero Twist follows within max_image_age_ms + one period.
WATCHDOG_MAX_PERIOD_S = 0.1


class BadImage(ValueError):
    """A malformed image message; `kind` groups the log line (once per kind)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


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


def twist_from_actions(actions: np.ndarray, names: list[str], fields: dict[str, str]) -> "Twist":
    msg = Twist()
    for name, value in zip(names, np.asarray(actions, dtype=np.float64).reshape(-1), strict=True):
        group, axis = fields[name].split(".")
        setattr(getattr(msg, group), axis, float(value))
    return msg


def twist_values(msg: "Twist") -> np.ndarray:
    return np.array([msg.linear.x, msg.linear.y, msg.linear.z, msg.angular.x, msg.angular.y, msg.angular.z])


class PolicyNode(Node):
    """The `vla_policy` node. `policy` may be passed in (tests share one); else it is loaded from `bundle`."""

    def __init__(self, *, policy=None, context=None, parameter_overrides: list | None = None,
                 cli_args: list[str] | None = None):
        require_rclpy()
        super().__init__(NODE_NAME, context=context, parameter_overrides=parameter_overrides, cli_args=cli_args)
        for name, default in DEFAULTS.items():
            # dynamic typing: `-p max_image_age_ms:=300` (an integer) must not be refused for a double default
            self.declare_parameter(name, default, ParameterDescriptor(dynamic_typing=True))
        p = {name: self.get_parameter(name).value for name in DEFAULTS}
        self.max_image_age_s = float(p["max_image_age_ms"]) / 1e3
        self.rate_hz = float(p["rate_hz"])
        if self.max_image_age_s <= 0 or self.rate_hz < 0:
            raise UserError(f"need max_image_age_ms > 0 and rate_hz >= 0, got {p['max_image_age_ms']} / "
                            f"{p['rate_hz']}")
        if p["image_reliability"] not in IMAGE_RELIABILITY:
            raise UserError(f"image_reliability must be one of {IMAGE_RELIABILITY}, got {p['image_reliability']!r}")
        # Set when the bundle's self-test fails on this machine: the node then runs, but only ever publishes zero
        # Twists and says why, so a robot with a wrong artifact stays stopped instead of acting on bad numbers.
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
        fields = policy.twist_fields
        unmapped = [n for n in self.action_names if n not in fields]
        if unmapped:
            raise UserError(f"actions {unmapped} of the bundle have no geometry_msgs/Twist field; name actions "
                            "linear_x/linear_y/linear_z/angular_x/angular_y/angular_z in the checkpoint config")
        self.twist_fields = fields
        self.instruction = str(p["instruction"]) or None

        self._lock = threading.Lock()  # image bookkeeping + every publish decision
        self._newest_rgb: np.ndarray | None = None
        self._newest_at: float | None = None
        self._newest_seq = 0
        self._acted_seq = 0
        self._last_action: np.ndarray | None = None
        self._failing: set[str] = set()
        self._stopped = False  # after shutdown's zero Twist nothing else may be published
        self.stats: Counter[str] = Counter()  # published actions and zeros by reason
        self.warnings: Counter[str] = Counter()  # warning lines logged, by reason kind

        acting = MutuallyExclusiveCallbackGroup()
        watching = MutuallyExclusiveCallbackGroup()
        self.cmd_pub = self.create_publisher(Twist, "cmd_vel", QoSProfile(depth=10))
        # Newest frame only. Best effort (default) matches camera drivers (sensor-data QoS) and reliable publishers
        # alike; `reliable` only matches reliable publishers but survives Fast DDS dropping large best-effort frames
        # between processes (see the module docstring).
        reliability = (ReliabilityPolicy.RELIABLE if p["image_reliability"] == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        image_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=reliability)
        self.create_subscription(Image, "image", self._on_image, image_qos, callback_group=acting)
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
            self.get_logger().error(f"self-test failed: publishing only zero Twists ({self.selftest_failure})")
        self.get_logger().info(
            f"vla_policy: bundle {policy.bundle_dir} ({policy.info['artifact']}), backend {policy.backend} "
            f"({policy.provider or policy.device}): {policy.backend_reason}; actions {self.action_names} -> "
            f"{[fields[n] for n in self.action_names]}; max_image_age_ms {self.max_image_age_s * 1e3:g}, "
            f"rate_hz {self.rate_hz:g}, image {p['image_reliability']}, instruction "
            f"{repr(self.instruction) if self.instruction else '(none yet: waiting on the instruction topic)'}")

    # -- publishing ---------------------------------------------------------------------------------------------------
    def _publish_zero(self, kind: str, reason: str) -> None:
        """Stop the robot; log `reason` the first time `kind` occurs since good input was last seen. Hold _lock."""
        if self._stopped:
            return
        self.cmd_pub.publish(Twist())
        self.stats[f"zero:{kind}"] += 1
        if kind not in self._failing:
            self._failing.add(kind)
            self.warnings[kind] += 1
            self.get_logger().warning(f"publishing zero Twist: {reason}")

    def fail(self, kind: str, reason: str) -> None:
        with self._lock:
            self._publish_zero(kind, reason)

    def _publish_action(self, actions: np.ndarray, received_at: float) -> None:
        with self._lock:
            if self._stopped:
                return
            age = time.monotonic() - received_at
            if age > self.max_image_age_s:
                self._publish_zero("slow", f"the action is for an image {age * 1e3:.0f} ms old (> max_image_age_ms "
                                           f"{self.max_image_age_s * 1e3:g}): inference is too slow")
                return
            self.cmd_pub.publish(twist_from_actions(actions, self.action_names, self.twist_fields))
            self.stats["actions"] += 1
            self._last_action = actions
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

    def _on_rate_tick(self) -> None:
        with self._lock:
            rgb, at, seq = self._newest_rgb, self._newest_at, self._newest_seq
            last = self._last_action
        if rgb is None or at is None or time.monotonic() - at > self.max_image_age_s:
            return  # the watchdog is publishing zeros
        if seq != self._acted_seq:
            self._act(rgb, at, seq)
        elif last is not None and not self._failing:
            self._publish_action(last, at)

    def _act(self, rgb: np.ndarray, received_at: float, seq: int) -> None:
        self._acted_seq = seq
        if self.selftest_failure:
            self.fail("selftest", f"the bundle's self-test failed on this machine, so the robot stays stopped: "
                                  f"{self.selftest_failure}")
            return
        if not self.instruction:
            self.fail("no_instruction", "no instruction yet: publish one on 'instruction' or set the 'instruction' "
                                        "parameter")
            return
        try:
            actions = self.policy.act(rgb, self.instruction)
        except Exception as e:  # noqa: BLE001 - any inference failure must stop the robot, not the node
            first = str(e).splitlines()[0][:200] if str(e) else ""
            self.fail("inference", f"inference failed ({type(e).__name__}: {first})")
            return
        if not np.all(np.isfinite(actions)):
            self.fail("nonfinite", f"the policy returned non-finite actions {actions.tolist()}")
            return
        self._publish_action(actions, received_at)

    def _watchdog(self) -> None:
        with self._lock:
            if self._newest_at is None:
                self._publish_zero("no_image", "no image received yet on 'image'")
                return
            age = time.monotonic() - self._newest_at
            if age > self.max_image_age_s:
                self._publish_zero("stale", f"newest image is {age * 1e3:.0f} ms old (> max_image_age_ms "
                                            f"{self.max_image_age_s * 1e3:g})")

    # -- shutdown -----------------------------------------------------------------------------------------------------
    def publish_stop(self, timeout_s: float = 1.0) -> bool:
        """The last message: one zero Twist (an action still being computed is dropped), waiting up to `timeout_s`
        until reliable subscribers acknowledged it."""
        from rclpy.duration import Duration

        with self._lock:
            self._stopped = True
            self.cmd_pub.publish(Twist())
            self.stats["zero:shutdown"] += 1
        return bool(self.cmd_pub.wait_for_all_acked(Duration(seconds=timeout_s)))


def parameter_overrides(**values: Any) -> list:
    """`Parameter` overrides for the node from keyword values (None values are left out)."""
    require_rclpy()
    return [Parameter(k, value=v) for k, v in values.items() if v is not None]


def run(argv: list[str] | None = None, overrides: dict[str, Any] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; publishes one zero Twist on the way out. Returns the exit code."""
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
            node.get_logger().info(f"shutdown: published zero Twist ({'acknowledged' if acked else 'not acknowledged'}"
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
