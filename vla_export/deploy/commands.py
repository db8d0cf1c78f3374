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
def bundle_command(artifact, out_dir, checkpoint, validation, profile, force, verify_dir):
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
                       log=lambda msg: click.echo(msg, err=True))
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
              help="Publish a zero Twist when the newest image is older than this.")
@click.option("--rate-hz", type=float, default=0.0, show_default=True,
              help="Act at this rate on the newest image; 0 = one action per image.")
@click.option("--instruction", default="", help="Instruction used until one arrives on the 'instruction' topic.")
@click.option("--image-reliability", type=click.Choice(["best_effort", "reliable"]), default="best_effort",
              show_default=True, help="QoS of the image subscription (reliable: large frames across processes).")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: its default, one per core).")
@click.argument("ros_args", nargs=-1, type=click.UNPROCESSED)
def ros2_node_command(bundle, backend, max_image_age_ms, rate_hz, instruction, image_reliability, threads, ros_args):
    """Run the ROS 2 node vla_policy: image + instruction in, geometry_msgs/Twist on cmd_vel out.

    Publishes a zero Twist when images stop (older than --max-image-age-ms), on inference errors, on malformed
    images, and once on shutdown (Ctrl-C). Extra arguments go to ROS (e.g. --ros-args -r image:=/camera/image_raw).

    \b
    Example:
      vla-export ros2-node --bundle dist/policy --instruction "Navigate around obstacles to track the target cup"
      vla-export ros2-node --bundle dist/policy --rate-hz 10 --ros-args -r image:=/camera/color/image_raw
    """
    from vla_export.deploy.bundle import read_bundle

    read_bundle(bundle)  # a wrong path is one line here, before ROS starts
    try:
        from vla_export.deploy import ros2_node
    except ImportError as e:  # pragma: no cover - ros2_node guards its own imports
        raise UserError(f"the ROS 2 node cannot be imported ({e}); pip install 'vla-export[ros]'") from e
    ros2_node.require_rclpy()
    code = ros2_node.run(["vla-export", *ros_args], overrides={
        "bundle": str(bundle), "backend": backend, "max_image_age_ms": float(max_image_age_ms),
        "rate_hz": float(rate_hz), "instruction": instruction, "image_reliability": image_reliability,
        "threads": int(threads)})
    if code:
        raise SystemExit(code)


COMMANDS = [bundle_command, ros2_node_command]
