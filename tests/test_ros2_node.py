"""The ROS 2 node with real rclpy (Fast DDS, loopback discovery only, one ROS domain per test): Twist equals
Policy.act on the same frame, a zero Twist when images stop / are malformed / inference fails, one on shutdown; for
an arm (two cameras + joint_states in), Float64MultiArray / JointTrajectory equal to Policy.act on the same
observation, holding the last command on stale or bad input, and bad output settings refused with one line, as
node parameters and as `vla-export ros2-node` options."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.plugin_arch import ARM_CAMERAS, ARM_JOINTS, arm_processor

pytestmark = pytest.mark.ros

try:
    import rclpy
    from geometry_msgs.msg import Twist
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Float64MultiArray, String
    from trajectory_msgs.msg import JointTrajectory
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"rclpy cannot be imported ({e}); pip install 'vla-export[ros]'", allow_module_level=True)

INSTRUCTION = "Navigate around obstacles to track the red cup"
TIMEOUT_S = 20.0  # upper bound of every wait; a loaded 2-core machine needs far less
_DOMAIN_COUNTER = [0]


def _domain_id() -> int:
    """A ROS domain for one test, distinct across tests and (very likely) across concurrent test processes."""
    _DOMAIN_COUNTER[0] += 1
    return 1 + (os.getpid() * 7 + _DOMAIN_COUNTER[0]) % 100


@pytest.fixture(scope="module", autouse=True)
def loopback_only():
    """Discovery on this host only; set before any rclpy.init (the middleware reads it there)."""
    saved = {k: os.environ.get(k) for k in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOCALHOST_ONLY", "ROS_STATIC_PEERS")}
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.pop("ROS_LOCALHOST_ONLY", None)  # deprecated in Kilted; would conflict with the range above
    os.environ.pop("ROS_STATIC_PEERS", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from vla_export.deploy.tiny import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("ros2"), head="lstm")


@pytest.fixture(scope="module")
def frames():
    from vla_export.data.episodes import synth_episode

    return synth_episode(0, seed=1, frames=6, image_size=64).images


def expected_actions(bundle, images) -> np.ndarray:
    """Policy.act over `images` in order from a fresh state: what the node must publish, frame by frame."""
    from vla_export.deploy import Policy

    policy = Policy.load(bundle, backend="onnxruntime")
    return np.stack([policy.act(im, INSTRUCTION) for im in images])


def image_msg(rgb: np.ndarray, encoding: str = "rgb8", pad: int = 0) -> Image:
    from vla_export.deploy.ros2_node import rgb_to_image_fields

    f = rgb_to_image_fields(rgb, encoding)
    msg = Image()
    msg.height, msg.width, msg.encoding, msg.is_bigendian = f["height"], f["width"], f["encoding"], 0
    if pad:  # rows padded to a longer step, as some drivers align them
        rows = np.frombuffer(f["data"], np.uint8).reshape(f["height"], f["step"])
        rows = np.concatenate([rows, np.full((f["height"], pad), 7, np.uint8)], axis=1)
        msg.step, msg.data = f["step"] + pad, rows.tobytes()
    else:
        msg.step, msg.data = f["step"], f["data"]
    return msg


def _spin(executor):
    try:
        executor.spin()
    except Exception:  # noqa: BLE001 - executor torn down at the end of a test
        pass


class NodeHarness:
    """The node under test (its own context) and a test node (another context) on one fresh ROS domain: the shared
    start-up, the received-message log and the tear-down of `Harness` (Twist) and `ArmHarness` (joint commands)."""

    def _start_test_side(self, name: str) -> None:
        self.domain = _domain_id()
        self.received: list[tuple[float, object]] = []
        self.lock = threading.Lock()
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=self.domain)
        self.test_node = Node(name, context=self.ctx)

    def _start_node(self, bundle: Path, params: dict) -> None:
        """Spin the test node, then start the node under test on the same domain."""
        from vla_export.deploy.ros2_node import PolicyNode, parameter_overrides

        self.test_exec = SingleThreadedExecutor(context=self.ctx)
        self.test_exec.add_node(self.test_node)
        threading.Thread(target=_spin, args=(self.test_exec,), daemon=True).start()
        self.node_ctx = rclpy.Context()
        rclpy.init(context=self.node_ctx, domain_id=self.domain)
        self.node = PolicyNode(context=self.node_ctx,
                               parameter_overrides=parameter_overrides(bundle=str(bundle), **params))
        self.node_exec = MultiThreadedExecutor(num_threads=3, context=self.node_ctx)
        self.node_exec.add_node(self.node)
        threading.Thread(target=_spin, args=(self.node_exec,), daemon=True).start()

    def _record(self, value) -> None:
        with self.lock:
            self.received.append((time.monotonic(), value))

    def mark(self) -> int:
        with self.lock:
            return len(self.received)

    def close(self) -> None:
        for ex in (self.node_exec, self.test_exec):
            ex.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.test_node.destroy_node()
        rclpy.try_shutdown(context=self.node_ctx)
        rclpy.try_shutdown(context=self.ctx)


def harnesses(cls, bundle: Path):
    """Fixture body: a factory of `cls` harnesses on `bundle`, each closed at the end of the test."""
    made = []

    def make(**params):
        h = cls(bundle, **params)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


class Harness(NodeHarness):
    """The node on the Twist bundle, with a test node publishing images and the instruction and listening on
    cmd_vel."""

    def __init__(self, bundle: Path, latched_instruction: str | None = INSTRUCTION, twist_reliable: bool = True,
                 **params):
        # the test side first, so the latched instruction exists before the node subscribes
        self._start_test_side("vla_policy_test")
        self.image_pub = self.test_node.create_publisher(Image, "image", QoSProfile(depth=10))
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.instruction_pub = self.test_node.create_publisher(String, "instruction", latched)
        # Reliable by default (no action may be missed). Timing tests listen best effort: a reliable reader holds
        # every later sample back until a lost one is repaired, which Fast DDS does on its heartbeat (seconds),
        # and that is DDS repair latency, not the node's reaction time (seen: one zero held back 2.3 s).
        twist_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE if twist_reliable
                               else ReliabilityPolicy.BEST_EFFORT)
        self.test_node.create_subscription(Twist, "cmd_vel", self._on_twist, twist_qos)
        if latched_instruction is not None:
            self.instruction_pub.publish(String(data=latched_instruction))
        self._start_node(bundle, params)
        wait_for(lambda: self.image_pub.get_subscription_count() > 0 and self.received, "discovery")

    def _on_twist(self, msg: Twist) -> None:
        from vla_export.deploy.ros2_node import twist_values

        self._record(twist_values(msg))

    def since(self, mark: int) -> list[tuple[float, np.ndarray]]:
        with self.lock:
            return list(self.received[mark:])

    def next_action(self, mark: int) -> np.ndarray:
        """The first non-zero Twist received after `mark` (zeros before it come from the watchdog)."""
        found = wait_for(lambda: [v for _, v in self.since(mark) if np.any(v != 0)], "an action Twist")
        return found[0]

    def next_zero(self, mark: int) -> float:
        found = wait_for(lambda: [t for t, v in self.since(mark) if not np.any(v != 0)], "a zero Twist")
        return found[0]


def stop_process_and_listener(proc, executor, node, ctx) -> None:
    """Tear-down of the tests that run the node as its own process: kill it if it is still running, then the
    listening node and its context."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    executor.shutdown(timeout_sec=2.0)
    node.destroy_node()
    rclpy.try_shutdown(context=ctx)


def wait_for(predicate, what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def harness_factory(bundle):
    yield from harnesses(Harness, bundle)


# -- tests ------------------------------------------------------------------------------------------------------------
def test_twist_equals_policy_act_for_every_frame(bundle, frames, harness_factory):
    # the instruction was published (latched) before the node existed; the node still receives it
    h = harness_factory(max_image_age_ms=5000)
    wait_for(lambda: h.node.instruction == INSTRUCTION, "the latched instruction")
    # camera-like variety: encodings, a padded row step, a different size (the bundle's preprocessing resizes)
    images = [frames[0], frames[1], frames[2], frames[3], np.repeat(frames[4], 2, axis=1), frames[5]]
    encodings = [("rgb8", 0), ("bgr8", 0), ("rgba8", 0), ("rgb8", 16), ("bgr8", 0), ("bgra8", 0)]
    want = expected_actions(bundle, images)
    for rgb, (enc, pad), expected in zip(images, encodings, want, strict=True):
        mark = h.mark()
        h.image_pub.publish(image_msg(rgb, enc, pad))
        got = h.next_action(mark)
        np.testing.assert_allclose(got[:2], expected, rtol=0, atol=1e-5)  # linear.x, linear.y
        assert np.all(got[2:] == 0)  # no other action drives the Twist
    assert h.node.stats["actions"] == len(images)
    # a volatile publisher (the common default) is heard too; a new instruction starts a new episode
    volatile = h.test_node.create_publisher(String, "instruction", QoSProfile(depth=1))
    wait_for(lambda: volatile.get_subscription_count() > 0, "the volatile instruction subscription")
    volatile.publish(String(data="Navigate around obstacles to track the blue cup"))
    wait_for(lambda: h.node.instruction == "Navigate around obstacles to track the blue cup", "the new instruction")
    assert h.node.policy.state is None  # recurrent state reset


@pytest.mark.parametrize("rate_hz", [0.0, 20.0])
def test_zero_twist_when_images_stop_then_resume(bundle, frames, harness_factory, rate_hz):
    max_age_ms = 400.0
    h = harness_factory(max_image_age_ms=max_age_ms, rate_hz=rate_hz, twist_reliable=False)
    wait_for(lambda: h.node.instruction == INSTRUCTION, "the latched instruction")
    period_s = max(h.node.watchdog_period_s, 1.0 / rate_hz if rate_hz else 0.0)
    for i, rgb in enumerate(frames[:3], start=1):
        mark = h.mark()
        h.image_pub.publish(image_msg(rgb))
        wait_for(lambda i=i: h.node._newest_seq >= i, "the node receiving the frame")
        h.next_action(mark)
    # Age counts from the node's receipt of its newest image (the node cannot know of a frame still in DDS; seen
    # here: a frame delivered 4.4 s after publish, so the publish time is not the node's reference).
    received_at = h.node._newest_at
    stale_warnings = h.node.warnings["stale"]  # a frame held up in DDS may already have made one stale episode
    mark = h.mark()
    zero_at = h.next_zero(mark)  # no more images: the watchdog stops the robot
    delay = zero_at - received_at
    # not before the image is too old, and within max age + one period (+ scheduling slack on a loaded machine)
    assert max_age_ms / 1e3 - 0.02 <= delay <= max_age_ms / 1e3 + period_s + 0.3, delay
    if rate_hz:  # while the image was fresh the last action was repeated at rate_hz
        assert sum(np.any(v != 0) for _, v in h.since(0)) > 3
    assert h.node.warnings["stale"] == stale_warnings + 1  # logged once for this stop, not once per zero
    # good input again: actions resume
    mark = h.mark()
    h.image_pub.publish(image_msg(frames[3]))
    h.next_action(mark)


def test_malformed_image_or_failing_inference_gives_zero_and_node_keeps_serving(bundle, frames, harness_factory):
    h = harness_factory(max_image_age_ms=5000)  # the watchdog stays quiet: every zero here is the bad input's
    wait_for(lambda: h.node.instruction == INSTRUCTION, "the latched instruction")
    want = expected_actions(bundle, frames[:3])

    mark = h.mark()
    h.image_pub.publish(image_msg(frames[0]))
    np.testing.assert_allclose(h.next_action(mark)[:2], want[0], rtol=0, atol=1e-5)

    short = image_msg(frames[1])
    short.data = bytes(short.data)[:-5]  # data length != height x step
    mono = image_msg(frames[1])
    mono.encoding, mono.step = "mono16", mono.width * 2  # unsupported encoding
    narrow = image_msg(frames[1])
    narrow.step = narrow.width  # step shorter than a row
    for bad, kind in [(short, "size"), (short, "size"), (mono, "encoding"), (narrow, "step")]:
        mark = h.mark()
        h.image_pub.publish(bad)
        h.next_zero(mark)
        assert h.node.stats[f"zero:{kind}"] >= 1
    assert h.node.stats["zero:size"] == 2 and h.node.warnings["size"] == 1  # logged once per kind
    assert h.node.stats["actions"] == 1

    # inference raising (the runner closed under the node) stops the robot; reopening it resumes
    h.node.policy.runner.deactivate()
    mark = h.mark()
    h.image_pub.publish(image_msg(frames[1]))
    h.next_zero(mark)
    assert h.node.stats["zero:inference"] == 1
    h.node.policy.runner.activate()
    # malformed frames and the failed call never touched the LSTM state: frame 1 is still the second step
    mark = h.mark()
    h.image_pub.publish(image_msg(frames[1]))
    np.testing.assert_allclose(h.next_action(mark)[:2], want[1], rtol=0, atol=1e-5)


def test_selftest_failure_keeps_the_robot_stopped(tmp_path, frames):
    """A bundle whose artifact fails its self-test here: the node runs, publishes only zero Twists and says why."""
    from vla_export.deploy.tiny import build_tiny_bundle
    from vla_export.validate.validate import resolve_tolerances

    # fp32 parity of 1e-12: ORT reorders float sums (~1e-8 here), so this artifact fails on every machine
    failing = build_tiny_bundle(tmp_path, head="lstm", budgets=resolve_tolerances(tol=1e-12))
    h = Harness(failing, max_image_age_ms=5000)
    try:
        assert h.node.selftest_failure and "self-test" in h.node.selftest_failure
        for image in frames[:3]:
            mark = h.mark()
            h.image_pub.publish(image_msg(image))
            h.next_zero(mark)
        time.sleep(0.2)
        assert h.node.stats["zero:selftest"] >= 3 and h.node.stats["actions"] == 0
        assert all(not np.any(v != 0) for _, v in h.since(0))
        assert h.node.warnings["selftest"] == 1  # said once, not per frame
    finally:
        h.close()


def test_entry_point_publishes_zero_twist_on_shutdown(bundle, frames):
    """`vla-policy-node` (what a launch file runs) in its own process: SIGINT -> one zero Twist, exit 0."""
    domain = _domain_id()
    exe = shutil.which("vla-policy-node", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "vla_export.deploy.ros2_node"]
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain))
    proc = subprocess.Popen([*cmd, "--ros-args", "-p", f"bundle:={bundle}", "-p", "max_image_age_ms:=60000",
                             "-p", f"instruction:={INSTRUCTION}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = Node("vla_policy_shutdown_test", context=ctx)
    received: list[np.ndarray] = []

    def on_twist(msg):
        from vla_export.deploy.ros2_node import twist_values

        received.append(twist_values(msg))

    node.create_subscription(Twist, "cmd_vel", on_twist, QoSProfile(depth=100))
    pub = node.create_publisher(Image, "image", QoSProfile(depth=1))
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    try:
        deadline = time.monotonic() + 60.0  # process start: imports, bundle verification, ONNX Runtime session
        while not any(np.any(v != 0) for v in received):
            assert proc.poll() is None, f"node exited early:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no action Twist from the node process"
            if pub.get_subscription_count() > 0:
                pub.publish(image_msg(frames[0]))
            executor.spin_once(timeout_sec=0.2)
        n = len(received)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + TIMEOUT_S
        while not any(not np.any(v != 0) for v in received[n:]):
            assert time.monotonic() < deadline, "no zero Twist after SIGINT"
            executor.spin_once(timeout_sec=0.1)
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, out
        assert "shutdown: published zero Twist" in out
        for _ in range(5):
            executor.spin_once(timeout_sec=0.05)
        assert not np.any(received[-1] != 0)  # nothing moved the robot after the stop
    finally:
        stop_process_and_listener(proc, executor, node, ctx)


def test_image_decoding_rejects_malformed_messages():
    from vla_export.deploy.ros2_node import BadImage, image_to_rgb, rgb_to_image_fields

    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    for enc in ("rgb8", "bgr8", "rgba8", "bgra8"):
        f = rgb_to_image_fields(rgb, enc)
        np.testing.assert_array_equal(image_to_rgb(f["height"], f["width"], enc, f["step"], f["data"]), rgb)
    with pytest.raises(BadImage, match="unsupported image encoding 'yuv422'"):
        image_to_rgb(2, 3, "yuv422", 6, bytes(12))
    with pytest.raises(BadImage, match="expected height x step"):
        image_to_rgb(2, 3, "rgb8", 9, bytes(17))
    with pytest.raises(BadImage, match="shorter than a row"):
        image_to_rgb(2, 3, "rgb8", 8, bytes(16))
    with pytest.raises(BadImage, match="empty"):
        image_to_rgb(0, 3, "rgb8", 9, b"")


# -- a joint-space policy (tests.plugin_arch:build_arm): two cameras + joint state -> 6 joint targets -------------
FLOAT64_ARRAY, JOINT_TRAJECTORY = "std_msgs/msg/Float64MultiArray", "trajectory_msgs/msg/JointTrajectory"
ARM_ARCH = "tests.plugin_arch:build_arm"


@pytest.fixture(scope="module")
def arm_bundle(tmp_path_factory):
    """checkpoint (action names = the joints) -> export (parity gate) -> bundle, seconds on a CPU."""
    import torch

    from vla_export.checkpoint import make_config, save_checkpoint
    from vla_export.deploy.bundle import make_bundle
    from vla_export.export.onnx_export import ExportOptions, export_checkpoint
    from vla_export.models import build_model

    root = tmp_path_factory.mktemp("arm")
    config = make_config(ARM_ARCH, None, {"width": 8, "action_dim": 6}, action_names=ARM_JOINTS,
                         action_units=["rad"] * 6)
    torch.manual_seed(0)
    model, _ = build_model(ARM_ARCH, config["model_config"])
    ckpt = save_checkpoint(model, root / "ckpt", config)
    artifact = export_checkpoint(ckpt, root / "artifacts", ExportOptions(n_inputs=2, batch_sizes=(1,), quiet=True))
    make_bundle(Path(artifact.artifact), root / "bundle")
    return root / "bundle"


def arm_observations(n: int, seed: int = 4) -> list[dict]:
    """Camera frames at sizes other than the model's, joint positions exact in float32 (JointState carries float64)."""
    rng = np.random.default_rng(seed)
    return [{"observation.images.top": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
             "observation.images.wrist": rng.integers(0, 256, (40, 40, 3), dtype=np.uint8),
             "observation.state": rng.uniform(-1.5, 1.5, 6).astype(np.float32)} for _ in range(n)]


def joint_state_msg(positions: np.ndarray, names: list[str] = ARM_JOINTS):
    """A JointState as joint_state_broadcaster sends it: its own joint order, more joints than the policy uses."""
    from sensor_msgs.msg import JointState

    order = list(reversed(range(len(names))))
    msg = JointState()
    msg.name = [names[i] for i in order] + ["base_yaw"]
    msg.position = [float(positions[i]) for i in order] + [0.7]
    return msg


def command_values(msg) -> np.ndarray:
    if hasattr(msg, "points"):  # JointTrajectory
        return np.array(msg.points[0].positions)
    return np.array(msg.data)


class ArmHarness(NodeHarness):
    """The node on an arm bundle, with a test node publishing the cameras and joint_states and listening on the
    command topic."""

    def __init__(self, bundle: Path, msg_type: str = FLOAT64_ARRAY, **params):
        self._start_test_side("vla_policy_arm_test")
        self.camera_pubs = {cam: self.test_node.create_publisher(Image, f"images/{cam.rsplit('.', 1)[1]}",
                                                                 QoSProfile(depth=10)) for cam in ARM_CAMERAS}
        self.state_pub = self.test_node.create_publisher(JointState, "joint_states", QoSProfile(depth=10))
        if msg_type == FLOAT64_ARRAY:
            self.topic = "joint_commands"
            self.test_node.create_subscription(Float64MultiArray, self.topic, self._on_command, QoSProfile(depth=100))
        else:
            self.topic = "joint_trajectory"
            self.test_node.create_subscription(JointTrajectory, self.topic, self._on_command, QoSProfile(depth=100))
        self._start_node(bundle, params)
        inputs = {"/images/top", "/images/wrist", "/joint_states"}
        # matched on both sides: a best-effort sample sent before the node's reader matched this writer is lost
        wait_for(lambda: all(p.get_subscription_count() > 0 for p in [*self.camera_pubs.values(), self.state_pub])
                 and all(s.get_publisher_count() > 0 for s in self.node.subscriptions if s.topic_name in inputs)
                 and self.test_node.count_publishers(self.topic) > 0, "discovery")

    def _on_command(self, msg) -> None:
        self._record(msg)

    def since(self, mark: int) -> list:
        with self.lock:
            return [m for _, m in self.received[mark:]]

    def received_count(self, key: str) -> int:
        latest = self.node._latest[key]
        return 0 if latest is None else latest.seq

    def publish_observation(self, obs: dict) -> int:
        """joint_states and the wrist camera first (the node keeps their newest), then the top camera, which paces
        the policy; returns the mark before the top frame."""
        self.deliver(self.state_pub, joint_state_msg(obs["observation.state"]), "observation.state")
        self.deliver(self.camera_pubs[ARM_CAMERAS[1]], image_msg(obs[ARM_CAMERAS[1]]), ARM_CAMERAS[1])
        mark = self.mark()
        self.camera_pubs[ARM_CAMERAS[0]].publish(image_msg(obs[ARM_CAMERAS[0]], "bgr8"))
        return mark

    def deliver(self, pub, msg, key: str) -> None:
        """Publish until the node has it: the node subscribes best effort, and right after discovery a sample can
        be lost before the node's side has matched this publisher."""
        n = self.received_count(key)
        deadline = time.monotonic() + TIMEOUT_S
        while self.received_count(key) <= n:
            assert time.monotonic() < deadline, f"the node never received {key}"
            pub.publish(msg)
            wait_until = time.monotonic() + 0.2
            while self.received_count(key) <= n and time.monotonic() < wait_until:
                time.sleep(0.005)

    def next_command(self, mark: int):
        return wait_for(lambda: self.since(mark), "a command")[0]


@pytest.fixture
def arm_factory(arm_bundle):
    yield from harnesses(ArmHarness, arm_bundle)


def expected_arm_actions(bundle, observations) -> np.ndarray:
    from vla_export.deploy import Policy

    policy = Policy.load(bundle, backend="onnxruntime")
    return np.stack([policy.act(obs) for obs in observations])


def test_arm_float64_array_equals_policy_act_and_nothing_before_the_first_action(arm_bundle, arm_factory):
    h = arm_factory(max_image_age_ms=5000)
    assert h.node.observation_mode and h.node.output.fail_safe == "hold"
    assert h.node.input_topics == {"observation.images.top": "images/top", "observation.images.wrist": "images/wrist",
                                   "observation.state": "joint_states"}
    # no input yet: hold with no good command publishes nothing (a zero would throw the arm to 0)
    wait_for(lambda: h.node.stats["hold:no_input"] >= 3, "the watchdog's hold")
    assert h.since(0) == []
    observations = arm_observations(3)
    want = expected_arm_actions(arm_bundle, observations)
    for obs, expected in zip(observations, want, strict=True):
        msg = h.next_command(h.publish_observation(obs))
        assert [(d.label, d.size, d.stride) for d in msg.layout.dim] == [("actions", 6, 6)]
        np.testing.assert_allclose(command_values(msg), expected, rtol=0, atol=1e-5)
    assert h.node.stats["actions"] == 3
    # shutdown with hold: the last good command once more (the arm stays at its target), never a zero
    mark = h.mark()
    h.node.publish_stop()
    np.testing.assert_array_equal(command_values(h.next_command(mark)), command_values(h.node._last_msg))
    assert h.node.stop_summary == "holding: republished the last good Float64MultiArray"


def test_arm_at_a_rate_every_tick_is_a_control_step(arm_bundle, arm_factory):
    """rate_hz: Policy.act on the newest inputs every tick (a chunked policy pops one action per tick), without new
    frames as long as the inputs are fresh."""
    h = arm_factory(max_image_age_ms=5000, rate_hz=20.0)
    obs = arm_observations(1, seed=7)[0]
    h.deliver(h.camera_pubs[ARM_CAMERAS[0]], image_msg(obs[ARM_CAMERAS[0]]), ARM_CAMERAS[0])
    mark = h.publish_observation(obs)
    frames = h.received_count(ARM_CAMERAS[0])  # no frame is published after this
    wait_for(lambda: h.node.stats["actions"] >= frames + 3, "actions at 20 Hz without new frames")
    want = expected_arm_actions(arm_bundle, [obs])[0]
    for msg in h.since(mark):  # a stateless policy: the same action every tick
        np.testing.assert_allclose(command_values(msg), want, rtol=0, atol=1e-5)


def test_arm_joint_trajectory_names_and_time_from_start(arm_bundle, arm_factory):
    renamed = [f"arm_{n}" for n in ARM_JOINTS]  # the robot's names for the policy's joints, as a parameter
    h = arm_factory(msg_type=JOINT_TRAJECTORY, max_image_age_ms=5000, output_type=JOINT_TRAJECTORY,
                    joint_names=renamed, time_from_start_ms=250)
    obs = arm_observations(1, seed=5)
    msg = h.next_command(h.publish_observation(obs[0]))
    assert list(msg.joint_names) == renamed and len(msg.points) == 1
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (0, 0)  # start on receipt
    tfs = msg.points[0].time_from_start
    assert (tfs.sec, tfs.nanosec) == (0, 250_000_000)
    np.testing.assert_allclose(command_values(msg), expected_arm_actions(arm_bundle, obs)[0], rtol=0, atol=1e-5)
    # the state was still read by the bundle's names (observation.state's schema), not the renamed output joints
    assert h.node.state_joint_names == ARM_JOINTS


@pytest.mark.parametrize("fail_safe", ["hold", "zero"])
def test_arm_stale_camera_holds_the_last_command(arm_bundle, arm_factory, fail_safe):
    """The cameras stop while joint_states keep coming: hold republishes the last action (zero, which a velocity-
    controlled arm may declare, publishes zeros); a JointState lacking a joint is bad input too."""
    h = arm_factory(max_image_age_ms=1000, fail_safe=fail_safe)
    observations = arm_observations(2, seed=6)
    streaming = threading.Event()

    def stream_joint_states():  # 50 Hz all along, as a robot's joint_state_broadcaster would
        while not streaming.is_set():
            h.state_pub.publish(joint_state_msg(observations[0]["observation.state"]))
            time.sleep(0.02)

    threading.Thread(target=stream_joint_states, daemon=True).start()
    try:
        last = command_values(h.next_command(h.publish_observation(observations[0])))
        mark = h.mark()
        states_before = h.received_count("observation.state")
        wait_for(lambda: len(h.since(mark)) >= 3, "the fail-safe repeating")
        assert h.node.stats[f"{fail_safe}:stale"] >= 3 and h.node.warnings["stale"] == 1  # logged once
        assert "images/top" in h.node.reasons["stale"] and "images/wrist" in h.node.reasons["stale"]
        assert h.received_count("observation.state") > states_before  # the state kept coming: the cameras are stale
        want = last if fail_safe == "hold" else np.zeros(6)
        for msg in h.since(mark):
            np.testing.assert_array_equal(command_values(msg), want)
        assert h.node.stats["actions"] == 1
        # good input again: the policy acts again
        mark = h.publish_observation(observations[1])
        wait_for(lambda: [m for m in h.since(mark) if not np.array_equal(command_values(m), want)], "an action")
    finally:
        streaming.set()
    time.sleep(0.1)  # the last streamed JointState is in
    # a JointState without the gripper: refused (the state it gives is not the policy's), fail-safe at once
    mark = h.mark()
    h.state_pub.publish(joint_state_msg(observations[1]["observation.state"][:5], ARM_JOINTS[:5]))
    wait_for(lambda: h.node.stats[f"{fail_safe}:joint_names"] == 1, "the refused JointState")
    wait_for(lambda: h.since(mark), "the fail-safe command")
    want = command_values(h.node._last_msg) if fail_safe == "hold" else np.zeros(6)
    for msg in h.since(mark):
        np.testing.assert_array_equal(command_values(msg), want)


@pytest.mark.parametrize(("params", "message"), [
    (["output_type:=std_msgs/msg/Int32"], "output msg_type 'std_msgs/msg/Int32' is not supported"),
    (['joint_names:=[a, b, c]'], "joint_names has 3 names"),
    ([f"output_type:={JOINT_TRAJECTORY}", "fail_safe:=zero"], "cannot zero on bad input"),
    (["output_type:=geometry_msgs/Twist"], "cannot carry a joint output"),
    (['state_joint_names:=[a, b]'], "state_joint_names has 2 names"),
])
def test_arm_bad_output_config_is_one_line_and_exit_2(arm_bundle, capsys, monkeypatch, params, message):
    from vla_export.deploy.ros2_node import run

    monkeypatch.setenv("ROS_DOMAIN_ID", str(_domain_id()))
    argv = ["vla-policy-node", "--ros-args", "-p", f"bundle:={arm_bundle}"]
    for p in params:
        argv += ["-p", p]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.mark.parametrize(("options", "message"), [
    (["--output-type", "std_msgs/msg/Int32"], "output msg_type 'std_msgs/msg/Int32' is not supported"),
    (["--fail-safe", "sometimes"], "fail_safe must be one of zero, hold"),
    (["--output-type", JOINT_TRAJECTORY, "--fail-safe", "zero"], "cannot zero on bad input"),
    (["--joint-names", "a,b,c"], "joint_names has 3 names"),
    (["--state-joint-names", "a,b"], "state_joint_names has 2 names"),
    (["--time-from-start-ms", "-5"], "time_from_start_ms must be > 0"),
    (["--action-topic", "arm commands"], "cannot publish on action_topic 'arm commands'"),
])
def test_cli_bad_output_option_is_one_line_and_exit_2(arm_bundle, monkeypatch, options, message):
    """Each value reaches the node, which refuses it with the same line as the parameter (one validator)."""
    from click.testing import CliRunner

    from vla_export.cli import main

    monkeypatch.setenv("ROS_DOMAIN_ID", str(_domain_id()))
    result = CliRunner().invoke(main, ["ros2-node", "--bundle", str(arm_bundle), *options])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_cli_output_options_reach_the_node(arm_bundle):
    """`vla-export ros2-node` in its own process with every output option set: a JointTrajectory on the given topic
    with the given joint names and time, computed from JointStates read by --state-joint-names (the robot's names,
    not the bundle's: without the option no command would come); SIGINT -> hold (the last command again), exit 0."""
    domain = _domain_id()
    renamed = [f"arm_{n}" for n in ARM_JOINTS]
    robot_state_names = [f"{n}_joint" for n in ARM_JOINTS]
    exe = shutil.which("vla-export", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-c", "from vla_export.cli import main; main()"]
    proc = subprocess.Popen([*cmd, "ros2-node", "--bundle", str(arm_bundle), "--max-image-age-ms", "60000",
                             "--output-type", JOINT_TRAJECTORY, "--action-topic", "arm/trajectory", "--fail-safe",
                             "hold", "--joint-names", ",".join(renamed), "--state-joint-names",
                             ",".join(robot_state_names), "--time-from-start-ms", "250"],
                            env=dict(os.environ, ROS_DOMAIN_ID=str(domain)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = Node("vla_policy_cli_test", context=ctx)
    received: list = []
    node.create_subscription(JointTrajectory, "arm/trajectory", received.append, QoSProfile(depth=100))
    cameras = {cam: node.create_publisher(Image, f"images/{cam.rsplit('.', 1)[1]}", QoSProfile(depth=1))
               for cam in ARM_CAMERAS}
    states = node.create_publisher(JointState, "joint_states", QoSProfile(depth=1))
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    obs = arm_observations(1, seed=11)[0]
    try:
        deadline = time.monotonic() + 60.0  # process start: imports, bundle verification, ONNX Runtime session
        while not received:
            assert proc.poll() is None, f"node exited early:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no JointTrajectory from the node process"
            # the same observation until a command comes (best effort: a sample before matching is lost); the top
            # camera last, as it paces the policy
            if all(p.get_subscription_count() > 0 for p in [states, *cameras.values()]):
                states.publish(joint_state_msg(obs["observation.state"], robot_state_names))
                cameras[ARM_CAMERAS[1]].publish(image_msg(obs[ARM_CAMERAS[1]]))
                cameras[ARM_CAMERAS[0]].publish(image_msg(obs[ARM_CAMERAS[0]]))
            executor.spin_once(timeout_sec=0.2)
        msg = received[0]
        assert list(msg.joint_names) == renamed
        tfs = msg.points[0].time_from_start
        assert (tfs.sec, tfs.nanosec) == (0, 250_000_000)
        want = expected_arm_actions(arm_bundle, [obs])[0]
        np.testing.assert_allclose(command_values(msg), want, rtol=0, atol=1e-5)
        n = len(received)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + TIMEOUT_S
        while len(received) == n:  # hold: the last command once more on shutdown, never a zero
            assert time.monotonic() < deadline, "nothing published on SIGINT"
            executor.spin_once(timeout_sec=0.1)
        np.testing.assert_allclose(command_values(received[-1]), want, rtol=0, atol=1e-5)
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, out
        assert "on 'arm/trajectory' (fail-safe hold, time_from_start 0.25 s)" in out, out
        assert "shutdown: holding: republished the last good JointTrajectory" in out, out
    finally:
        stop_process_and_listener(proc, executor, node, ctx)


def test_output_resolution_refuses_unsafe_combinations():
    from vla_export.deploy.ros2_node import camera_topic, joint_positions, resolve_output
    from vla_export.errors import UserError
    from vla_export.processors.core import check_output

    twist = {"linear_x": "linear.x", "angular_z": "angular.z"}
    # no declaration: a Twist policy, zero on bad input, as before joint outputs existed
    out = resolve_output(None, ["linear_x", "angular_z"], twist)
    assert (out.kind, out.msg_type, out.fail_safe, out.topic) == ("twist", "geometry_msgs/msg/Twist", "zero", "cmd_vel")
    out = resolve_output(None, ["a0", "a1"], {}, output_type="std_msgs/Float64MultiArray")
    assert (out.kind, out.fail_safe, out.topic) == ("joint", "hold", "joint_commands")
    with pytest.raises(UserError, match="no geometry_msgs/Twist field"):
        resolve_output(None, ["a0", "a1"], {})
    with pytest.raises(UserError, match="a twist output cannot hold"):
        resolve_output(None, ["linear_x"], twist, fail_safe="hold")
    with pytest.raises(UserError, match="needs joint names"):
        resolve_output(None, ["a0", "a1"], {}, output_type=JOINT_TRAJECTORY)
    declared = check_output({"kind": "joint", "joint_names": ["j0", "j1"]})
    assert declared == {"kind": "joint", "msg_type": FLOAT64_ARRAY, "fail_safe": "hold", "joint_names": ["j0", "j1"],
                        "time_from_start_s": 0.1}
    out = resolve_output(declared, ["a0", "a1"], {}, output_type=JOINT_TRAJECTORY, action_topic="arm/commands")
    assert (out.msg_type, out.joint_names, out.topic) == (JOINT_TRAJECTORY, ("j0", "j1"), "arm/commands")
    with pytest.raises(UserError, match="unknown keys"):
        check_output({"kind": "joint", "joints": ["j0"]})
    with pytest.raises(UserError, match="time_from_start_s must be a number > 0"):
        check_output({"kind": "joint", "time_from_start_s": 0})
    assert camera_topic("observation.images.top") == "images/top"
    assert camera_topic("observation.images.2nd-cam") == "images/_2nd_cam"
    assert camera_topic("observation.image") == "image"
    np.testing.assert_array_equal(joint_positions(["b", "a", "c"], [2.0, 1.0, 3.0], ["a", "b"]), [1.0, 2.0])
    with pytest.raises(ValueError, match=r"lacks joints \['d'\]"):
        joint_positions(["a"], [1.0], ["a", "d"])


def test_processor_output_block_round_trips_as_data(tmp_path):
    from vla_export.errors import UserError
    from vla_export.processors import Processor

    proc = arm_processor()
    proc.save(tmp_path)
    data = json.loads((tmp_path / "processor.json").read_text())
    assert data["output"] == {"kind": "joint", "msg_type": FLOAT64_ARRAY, "fail_safe": "hold",
                              "joint_names": ARM_JOINTS, "time_from_start_s": 0.1}
    assert Processor.load(tmp_path).output == data["output"]
    data["output"]["fail_safe"] = "sometimes"
    (tmp_path / "processor.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="output fail_safe 'sometimes' is not one of zero, hold"):
        Processor.load(tmp_path)
