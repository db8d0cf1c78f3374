"""The ROS 2 node with real rclpy (Fast DDS, loopback discovery only, one ROS domain per test): Twist equals
Policy.act on the same frame, a zero Twist when images stop / are malformed / inference fails, one on shutdown."""

from __future__ import annotations

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

pytestmark = pytest.mark.ros

try:
    import rclpy
    from geometry_msgs.msg import Twist
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
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


class Harness:
    """The node under test (its own context) and a test node (another context) on one fresh ROS domain."""

    def __init__(self, bundle: Path, latched_instruction: str | None = INSTRUCTION, twist_reliable: bool = True,
                 **params):
        from vla_export.deploy.ros2_node import PolicyNode, parameter_overrides

        self.domain = _domain_id()
        self.received: list[tuple[float, np.ndarray]] = []
        self.lock = threading.Lock()
        # the test side first, so the latched instruction exists before the node subscribes
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=self.domain)
        self.test_node = Node("vla_policy_test", context=self.ctx)
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
        wait_for(lambda: self.image_pub.get_subscription_count() > 0 and self.received, "discovery")

    def _on_twist(self, msg: Twist) -> None:
        from vla_export.deploy.ros2_node import twist_values

        with self.lock:
            self.received.append((time.monotonic(), twist_values(msg)))

    def mark(self) -> int:
        with self.lock:
            return len(self.received)

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

    def close(self) -> None:
        for ex in (self.node_exec, self.test_exec):
            ex.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.test_node.destroy_node()
        rclpy.try_shutdown(context=self.node_ctx)
        rclpy.try_shutdown(context=self.ctx)


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
    made = []

    def make(**params):
        h = Harness(bundle, **params)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


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
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)


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
