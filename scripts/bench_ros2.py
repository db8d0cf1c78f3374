#!/usr/bin/env python
"""Latency from image publish to Twist receipt through the ROS 2 node, next to `Policy.act` alone.

The node runs in its own process (`python -m vla_export.deploy.ros2_node`, as a launch file would start it); this
process publishes one camera frame at a time on `image` and waits for the Twist on `cmd_vel` (closed loop: one frame
in flight, so this is latency, not throughput). `Policy.act` is timed first, in this process, on the same frames,
while the node is not running, so the two rows do not compete for the CPU. The difference of the p50s is what the
middleware (serialisation, DDS over loopback, executor wake-ups, image decoding) costs.

Timing: time.perf_counter around synchronous calls (CPU backends); warm-up first. On a CUDA backend Policy.act
returns numpy actions, which already waits for the device.

Example:
    .venv/bin/python scripts/bench_ros2.py --preset tiny --frames 200
    .venv/bin/python scripts/bench_ros2.py --bundle dist/policy --frames 500 --width 640 --height 480
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

INSTRUCTION = "Navigate around obstacles to track the red cup"


def camera_frames(n_distinct: int, width: int, height: int) -> list[np.ndarray]:
    """Synthetic episode frames scaled (nearest) to a camera's size."""
    from vla_export.data.episodes import synth_episode

    images = synth_episode(0, seed=0, frames=n_distinct, image_size=96).images
    rows = (np.arange(height) * 96 // height).clip(0, 95)
    cols = (np.arange(width) * 96 // width).clip(0, 95)
    return [np.ascontiguousarray(im[rows][:, cols]) for im in images]


def time_policy(bundle: Path, backend: str, frames: list[np.ndarray], n: int, warmup: int, threads: int,
                pace_ms: float = 0.0) -> tuple[list[float], str]:
    """Policy.act per frame, back to back (`pace_ms` 0) or with an untimed pause between calls, as frames arrive
    from a camera. The pause matters on a busy CPU: ONNX Runtime's pool threads spin after each run, competing with
    the caller's preprocessing when calls follow each other directly."""
    from vla_export.deploy import Policy

    policy = Policy.load(bundle, backend=backend, threads=threads or None)
    for i in range(warmup):
        policy.act(frames[i % len(frames)], INSTRUCTION)
    policy.reset()
    times = []
    for i in range(n):
        if pace_ms:
            time.sleep(pace_ms / 1e3)
        t0 = time.perf_counter()
        policy.act(frames[i % len(frames)], INSTRUCTION)
        times.append((time.perf_counter() - t0) * 1e3)
    desc = f"{policy.backend} ({policy.provider or policy.device})"
    policy.close()
    return times, desc


def time_node(bundle: Path, backend: str, frames: list[np.ndarray], n: int, warmup: int, timeout_s: float,
              retry_s: float, reliability: str, threads: int) -> tuple[list[float], int]:
    import rclpy
    from geometry_msgs.msg import Twist
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import Image

    from vla_export.deploy.ros2_node import rgb_to_image_fields

    domain = 1 + (os.getpid() % 100)
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    env.pop("ROS_LOCALHOST_ONLY", None)
    os.environ.update(ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    proc = subprocess.Popen([sys.executable, "-m", "vla_export.deploy.ros2_node", "--ros-args",
                             "-p", f"bundle:={bundle}", "-p", f"backend:={backend}",
                             "-p", "max_image_age_ms:=600000", "-p", f"instruction:={INSTRUCTION}",
                             "-p", f"image_reliability:={reliability}", "-p", f"threads:={threads}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = Node("bench_ros2", context=ctx)
    got: list[float] = []
    node.create_subscription(Twist, "cmd_vel", lambda msg: got.append(time.perf_counter()), QoSProfile(depth=100))
    pub = node.create_publisher(Image, "image", QoSProfile(depth=1))
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    msgs = []
    dropped = [0]
    for rgb in frames:
        f = rgb_to_image_fields(rgb, "rgb8")
        m = Image()
        m.height, m.width, m.encoding, m.is_bigendian, m.step, m.data = (f["height"], f["width"], f["encoding"], 0,
                                                                         f["step"], f["data"])
        msgs.append(m)

    def one(i: int, wait_s: float = timeout_s) -> float:
        """Publish frame i and wait for its Twist. The image topic is best effort (as cameras publish it), so a
        frame can be lost on the way; after `retry_s` with no answer it is counted as dropped and sent again."""
        give_up = time.perf_counter() + wait_s
        while True:
            mark = len(got)
            t0 = time.perf_counter()
            pub.publish(msgs[i % len(msgs)])
            retry = t0 + retry_s
            while len(got) == mark and time.perf_counter() < min(retry, give_up):
                executor.spin_once(timeout_sec=0.001)
            if len(got) > mark:
                return (got[mark] - t0) * 1e3
            if time.perf_counter() >= give_up:
                raise RuntimeError(f"no Twist within {wait_s} s of frame {i}")
            dropped[0] += 1
            time.sleep(retry_s)  # a late answer to the dropped frame must not be taken for the next one
            executor.spin_once(timeout_sec=0.01)

    try:
        deadline = time.monotonic() + 120
        while pub.get_subscription_count() == 0 or not got:  # node up: it publishes zeros until the first image
            if proc.poll() is not None:
                raise RuntimeError(f"node exited: {proc.stdout.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError("node did not come up within 120 s")
            executor.spin_once(timeout_sec=0.1)
        # first frames: discovery of the image subscription can drop best-effort samples; retry until answered
        while True:
            try:
                one(0, wait_s=2.0)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.2)
        executor.spin_once(timeout_sec=0.05)  # drain watchdog zeros queued before the first image
        for i in range(warmup):
            one(i)
        dropped[0] = 0
        return [one(i) for i in range(n)], dropped[0]
    except Exception:
        proc.send_signal(signal.SIGINT)
        print(proc.communicate(timeout=20)[0][-3000:], file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory [default: build one for --preset]")
    ap.add_argument("--preset", default="tiny", help="preset of the bundle built when --bundle is not given")
    ap.add_argument("--head", default="lstm", choices=["mlp", "lstm"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--frames", type=int, default=200, help="timed frames per row (>= 200 for a p99)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--timeout-s", type=float, default=30.0, help="per-frame wait bound")
    ap.add_argument("--image-reliability", default="reliable", choices=["best_effort", "reliable"],
                    help="the node's image QoS; Fast DDS drops most best-effort frames over 512 KB between processes")
    ap.add_argument("--pace-ms", type=float, default=5.0,
                    help="untimed pause between frames for the paced Policy.act row (the node sees such gaps)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads, both rows (0: default)")
    ap.add_argument("--retry-s", type=float, default=1.0,
                    help="resend a frame not answered within this (best-effort image topic: frames can be lost)")
    ap.add_argument("--json", type=Path, help="write the numbers here as JSON too")
    args = ap.parse_args()

    from vla_export.validate.metrics import latency_stats

    tmp = None
    bundle = args.bundle
    if bundle is None:
        from vla_export.deploy.tiny import build_tiny_bundle

        tmp = tempfile.TemporaryDirectory(prefix="bench_ros2_")
        print(f"building a {args.preset} bundle ({args.head} head) in {tmp.name} ...", flush=True)
        bundle = build_tiny_bundle(tmp.name, head=args.head, preset=args.preset)
    frames = camera_frames(16, args.width, args.height)

    act_ms, backend = time_policy(bundle, args.backend, frames, args.frames, args.warmup, args.threads)
    paced_ms, _ = time_policy(bundle, args.backend, frames, args.frames, args.warmup, args.threads, args.pace_ms)
    e2e_ms, dropped = time_node(bundle, args.backend, frames, args.frames, args.warmup, args.timeout_s,
                                args.retry_s, args.image_reliability, args.threads)
    rows = {"Policy.act (in process, back to back)": latency_stats(act_ms),
            f"Policy.act (in process, {args.pace_ms:g} ms between frames)": latency_stats(paced_ms),
            "image publish -> Twist receipt (ROS 2 node)": latency_stats(e2e_ms)}
    print(f"\nbundle {bundle}, backend {backend}, {args.width}x{args.height} rgb8 frames "
          f"({args.width * args.height * 3 / 1e3:.0f} kB, image QoS {args.image_reliability}), ORT threads "
          f"{args.threads or 'default'}, {args.frames} timed "
          f"(+{args.warmup} warm-up), CPU: {os.cpu_count()} cores\n")
    print("| path | mean ms | std | min | p50 ms | p99 ms | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in rows.items():
        print(f"| {name} | {s['mean_ms']:.2f} | {s['std_ms']:.2f} | {s['min_ms']:.2f} | {s['p50_ms']:.2f} | "
              f"{s['p99_ms']:.2f} | {s['max_ms']:.2f} |")
    a = rows[f"Policy.act (in process, {args.pace_ms:g} ms between frames)"]
    e = rows["image publish -> Twist receipt (ROS 2 node)"]
    print(f"\nframes unanswered within --retry-s and resent: {dropped} of {args.frames}")
    print(f"middleware cost (p50 difference vs paced Policy.act): {e['p50_ms'] - a['p50_ms']:.2f} ms; "
          f"ratio e2e/act p50: "
          f"{e['p50_ms'] / a['p50_ms']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(bundle), "backend": backend, "frames": args.frames,
                                         "size": [args.width, args.height], "rows": rows,
                                         "dropped_frames": dropped,
                                         "image_reliability": args.image_reliability,
                                         "threads": args.threads}, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
