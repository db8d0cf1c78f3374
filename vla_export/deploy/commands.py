"""`vla-export bundle` and `vla-export ros2-node`: ship an artifact, and drive a robot with it."""

from __future__ import annotations

from pathlib import Path

import click

from vla_export.errors import UserError


@click.command("bundle")
@click.option("--artifact", type=click.Path(path_type=Path), default=None,
              help="Artifact to ship (.onnx, .engine, .pt2) with its manifest beside it.")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("dist/policy"),
              show_default=True, help="Bundle directory (replaced atomically if it is a bundle already).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint for the preprocessing config and tokenizers [default: the manifest's source].")
@click.option("--validation", type=click.Path(path_type=Path), default=None,
              help="validation.json to take the artifact's rows from [default: beside the artifact].")
@click.option("--profile", type=click.Path(path_type=Path), default=None,
              help="profile.json to take the artifact's rows from [default: beside the artifact].")
@click.option("--force", is_flag=True,
              help="Bundle a modified, stale or failed artifact anyway (the reasons are recorded in bundle.json).")
@click.option("--verify", "verify_dir", type=click.Path(path_type=Path), default=None,
              help="Only verify an existing bundle: re-hash every file, exit 2 naming the first bad one.")
@click.option("--extra", multiple=True, type=click.Path(path_type=Path),
              help="Another artifact of the same checkpoint to ship beside it (repeatable), e.g. the static-QDQ or "
                   "fp16 ONNX that `vla-export trt --bundle` builds engines from on the target.")
@click.option("--episodes", type=click.Path(path_type=Path), default=None,
              help="Episodes whose validation frames form the bundle's self-test set [default: the checkpoint's "
                   "training episodes, else seeded noise frames].")
@click.option("--with-weights", is_flag=True,
              help="Also ship model.safetensors, so `vla-export aoti --bundle` can compile on the target.")
def bundle_command(artifact, out_dir, checkpoint, validation, profile, force, verify_dir, extra, episodes,
                   with_weights):
    """Copy an artifact and everything needed to run it (preprocessing, tokenizers, numbers) into one directory.

    No training files travel (no weights, optimizer or episodes). bundle.json records the sha256 of every file,
    action names/units and their Twist fields, and the artifact's validation and profile rows ("not validated"
    when validation.json has none). A modified, stale or failed artifact is refused unless --force.

    \b
    Example:
      vla-export bundle --artifact artifacts/model.int8.onnx -o dist/policy
      vla-export bundle --verify dist/policy
    """
    from vla_export.deploy.bundle import make_bundle, verify_bundle

    if verify_dir is not None:
        info = verify_bundle(verify_dir)
        click.echo(f"{verify_dir}: ok ({len(info['files'])} files, {info['total_bytes'] / 2**20:.1f} MiB, artifact "
                   f"{info['artifact']}, {_validation_line(info)})")
        return
    if artifact is None:
        raise UserError("pass --artifact PATH to make a bundle, or --verify DIR to check one")
    info = make_bundle(artifact, out_dir, checkpoint=checkpoint, validation=validation, profile=profile, force=force,
                       log=lambda msg: click.echo(msg, err=True), extra=list(extra), episodes=episodes,
                       with_weights=with_weights)
    if info.get("forced"):
        click.echo(f"warning: bundled despite: {'; '.join(info['forced'])}", err=True)
    click.echo(f"{out_dir}: {info['artifact']} ({info['backend']}, {info['precision']}), {len(info['files'])} files, "
               f"{info['total_bytes'] / 2**20:.1f} MiB, {_validation_line(info)}")


def _validation_line(info: dict) -> str:
    val = info.get("validation")
    if not isinstance(val, dict):
        return str(val)
    return "validation: " + ", ".join(f"{r.get('id')} {r.get('status')}" for r in val.get("rows", []))


@click.command("ros2-node", context_settings={"ignore_unknown_options": True})
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle directory.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "aoti", "torch"]), default="auto",
              show_default=True, help="Runtime for the bundle's artifact (auto: the fastest this machine runs).")
@click.option("--max-image-age-ms", type=float, default=500.0, show_default=True,
              help="Apply the fail-safe when the newest input (each camera, joint_states) is older than this.")
@click.option("--rate-hz", type=float, default=0.0, show_default=True,
              help="Act at this rate on the newest inputs; 0 = one action per frame of the (first) camera.")
@click.option("--instruction", default="", help="Instruction used until one arrives on the 'instruction' topic.")
@click.option("--image-reliability", type=click.Choice(["best_effort", "reliable"]), default="best_effort",
              show_default=True, help="QoS of the image subscriptions (reliable: large frames across processes).")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: its default, one per core).")
# The output options default to None and are then not passed, so the bundle's `output` block (or a launch file's
# `--ros-args -p ...`) decides; the node validates every value, the same way for this command and for a launch file.
@click.option("--output-type", default=None,
              help="Message the action is published as: geometry_msgs/msg/Twist, std_msgs/msg/Float64MultiArray or "
                   "trajectory_msgs/msg/JointTrajectory [default: the bundle's output block, else Twist].")
@click.option("--action-topic", default=None,
              help="Topic of the action [default: cmd_vel, joint_commands or joint_trajectory by type].")
@click.option("--fail-safe", default=None,
              help="On stale or bad input: zero (publish zeros) or hold (republish the last good command) "
                   "[default: the bundle's; zero for Twist, hold for joints].")
@click.option("--joint-names", default=None,
              help="Comma-separated joint names, one per action value in action order (JointTrajectory needs them) "
                   "[default: the bundle's].")
@click.option("--state-joint-names", default=None,
              help="Comma-separated JointState names whose positions fill observation.state, in order [default: "
                   "the bundle's state names, else the joint names].")
@click.option("--time-from-start-ms", type=float, default=None,
              help="time_from_start of a JointTrajectory point [default: the bundle's, else 100].")
@click.argument("ros_args", nargs=-1, type=click.UNPROCESSED)
def ros2_node_command(bundle, backend, max_image_age_ms, rate_hz, instruction, image_reliability, threads, output_type,
                      action_topic, fail_safe, joint_names, state_joint_names, time_from_start_ms, ros_args):
    """Run the ROS 2 node vla_policy: camera images (+ joint states, an instruction) in, the policy's action out.

    A one-camera bundle reads sensor_msgs/Image on image and the instruction; a bundle observing more reads one image
    topic per camera (images/<cam>) and sensor_msgs/JointState on joint_states. The action goes out as the bundle's
    processor.json output block says (each field overridable by the options below): geometry_msgs/Twist on cmd_vel
    (no block), std_msgs/Float64MultiArray on joint_commands or trajectory_msgs/JointTrajectory on joint_trajectory. Fail-safe
    when inputs stop (older than --max-image-age-ms), on inference errors, on malformed messages and once on shutdown
    (Ctrl-C): a Twist publishes zero; a joint output holds (republishes the last good command; a zero position would
    move every joint to 0). Extra arguments go to ROS (e.g. --ros-args -r image:=/camera/image_raw).

    \b
    Example:
      vla-export ros2-node --bundle dist/policy --instruction "Navigate around obstacles to track the target cup"
      vla-export ros2-node --bundle dist/policy --rate-hz 10 --ros-args -r image:=/camera/color/image_raw
      vla-export ros2-node --bundle dist/act --rate-hz 30 --output-type trajectory_msgs/msg/JointTrajectory \\
        --joint-names j1,j2,j3,j4,j5,gripper --ros-args -r images/top:=/top/image_raw
    """
    from vla_export.deploy.bundle import read_bundle

    read_bundle(bundle)  # a wrong path is one line here, before ROS starts
    try:
        from vla_export.deploy import ros2_node
    except ImportError as e:  # pragma: no cover - ros2_node guards its own imports
        raise UserError(f"the ROS 2 node cannot be imported ({e}); pip install 'vla-export[ros]'") from e
    ros2_node.require_rclpy()
    output = {"output_type": output_type, "action_topic": action_topic, "fail_safe": fail_safe,
              "joint_names": joint_names, "state_joint_names": state_joint_names,
              "time_from_start_ms": None if time_from_start_ms is None else float(time_from_start_ms)}
    code = ros2_node.run(["vla-export", *ros_args], overrides={
        "bundle": str(bundle), "backend": backend, "max_image_age_ms": float(max_image_age_ms),
        "rate_hz": float(rate_hz), "instruction": instruction, "image_reliability": image_reliability,
        "threads": int(threads), **{k: v for k, v in output.items() if v is not None}})
    if code:
        raise SystemExit(code)


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("verify"), show_default=True,
              help="Where verify.json and verify.md go.")
@click.option("--artifact", default=None, help="Verify only this artifact of the bundle [default: all it holds].")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "aoti", "torch"]), default="auto",
              show_default=True, help="Runtime for the artifact (auto: the fastest this machine runs).")
@click.option("--tol", type=float, default=None, help="fp32 parity MAE budget [default: the bundle's].")
@click.option("--tol-fp16", type=float, default=None, help="fp16 parity MAE budget [default: the bundle's].")
@click.option("--tol-int8", type=float, default=None, help="int8 parity MAE budget [default: the bundle's].")
@click.option("--rtol", type=float, default=None, help="fp32 relative L2 budget [default: the bundle's].")
@click.option("--rtol-fp16", type=float, default=None, help="fp16 relative L2 budget [default: the bundle's].")
@click.option("--rtol-int8", type=float, default=None, help="int8 relative L2 budget [default: the bundle's].")
@click.option("--rate-hz", type=float, default=10.0, show_default=True,
              help="Control rate: the p99 of preprocess + inference + postprocess must fit in 1000/rate ms.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed steps before the timed ones.")
@click.option("--iters", type=int, default=30, show_default=True, help="Timed steps for the latency split.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: its default, one per core).")
def verify_command(bundle, out_dir, artifact, backend, tol, tol_fp16, tol_int8, rtol, rtol_fp16, rtol_int8, rate_hz,
                   warmup, iters, threads):
    """Judge a bundle's artifacts on this machine against the reference outputs that travelled with it.

    Re-hashes the bundle, runs its self-test set (stored inputs and raw frames with their fp32 PyTorch reference
    outputs) through each artifact and through Policy end to end, measures the latency split (preprocess,
    inference, postprocess: p50/p99) against --rate-hz, and writes verify.json + verify.md. Exit 0 passed, 3 a
    budget failed (named), 2 a bad bundle, 4 nothing in the bundle can run here.

    \b
    Example:
      vla-export verify dist/policy --out verify/
      vla-export verify dist/policy --artifact model.fp16.engine --rate-hz 30
    """
    from vla_export.deploy.bundle import read_bundle
    from vla_export.deploy.selftest import SelfTest
    from vla_export.deploy.verify import raise_if_failed, run_verify, summary_line

    tolerances = None
    if any(v is not None for v in (tol, tol_fp16, tol_int8, rtol, rtol_fp16, rtol_int8)):
        from vla_export.validate.validate import resolve_tolerances

        read_bundle(bundle)  # a wrong path is one line before the self-test set is read
        tolerances = resolve_tolerances(tol, tol_fp16, tol_int8, rtol=rtol, rtol_fp16=rtol_fp16, rtol_int8=rtol_int8,
                                        base=SelfTest(Path(bundle)).budgets)
    report = run_verify(bundle, out_dir, tolerances=tolerances, rate_hz=rate_hz, backend=backend, artifact=artifact,
                        warmup=warmup, iters=iters, threads=threads or None,
                        log=lambda msg: click.echo(msg, err=True))
    feats = report["machine"].get("cpu_features") or {}
    click.echo(f"machine: {report['machine'].get('cpu')} ({', '.join(feats.get('flags', []))}; int8 kernels "
               f"{feats.get('int8_kernels')})")
    for r in report["results"]:
        if r.get("judged_elsewhere"):
            click.echo(f"note: {r['artifact']}: {r['judged_elsewhere']}")
    click.echo(summary_line(report))
    click.echo(f"wrote {Path(out_dir) / 'verify.md'} and verify.json")
    raise_if_failed(report)


COMMANDS = [bundle_command, verify_command, ros2_node_command]
