"""CLI: `vla-export fleet` (needs the optional extra: pip install 'vla-export[ray]')."""

from __future__ import annotations

from pathlib import Path

import click

from vla_export.errors import BackendUnavailable, GateFailed


@click.command("fleet")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), required=True,
              help="Targets file (YAML or JSON): name -> the Ray resource its node advertises, and settings.")
@click.option("--address", default=None,
              help="Ray cluster to use (host:port of the head, 'auto', or ray://host:10001) [default: a local one].")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("fleet"), show_default=True,
              help="Directory for fleet.md/json/png and the result store.")
@click.option("--store", "store_dir", type=click.Path(path_type=Path), default=None,
              help="Result store shared between runs [default: OUT/store].")
@click.option("--force", is_flag=True, help="Run every target again even where a stored result matches.")
@click.option("--timeout", "timeout_s", type=float, default=None,
              help="Fail a target still running after this many seconds (default: no limit).")
def fleet_command(bundle, targets_file, address, out_dir, store_dir, force, timeout_s):
    """Build, verify and profile BUNDLE on every target device at once, through a Ray cluster.

    Each target is a Ray node (or nodes) that advertises a custom resource. There, where it applies, a TensorRT
    engine and an AOTInductor package are built, then the bundle is verified and profiled; the numbers and the
    engines come back into a content-addressed store (bundle sha256 + the target's hardware and software), so a
    rerun skips what exists. A target whose node dies is reported failed with its reason; the others complete.
    Exit 0 when every target passed, 3 when any failed, 4 when none failed but some could not run a step here.

    \b
    Example (one head, one worker per device; then the fleet call from any machine that reaches the head):
      ray start --head --port 6379 --resources '{"target:rtx-a5000": 1}'        # on the workstation
      ray start --address WORKSTATION:6379 --resources '{"target:orin-nx": 1}'  # on the Jetson
      vla-export fleet dist/policy --targets targets.yaml --address WORKSTATION:6379 -o fleet
    """
    from vla_export.fleet import require_ray
    from vla_export.fleet.run import run_fleet
    from vla_export.fleet.targets import load_targets
    from vla_export.validate.commands import _command_line

    targets = load_targets(targets_file)  # a wrong targets file is exit 2, with or without Ray
    require_ray()
    fleet = run_fleet(bundle, targets, out_dir, address=address, store_dir=store_dir, force=force,
                      timeout_s=timeout_s, command=_command_line())
    for r in fleet["targets"]:
        how = " (stored result reused)" if r.get("cached") else ""
        click.echo(f"{r['name']}: {r['status']}{how}" + (f": {r['reason']}" if r.get("reason") else ""))
    click.echo(f"wrote {fleet['files']['markdown']}, {fleet['files']['json']}, {fleet['files']['plot']}")
    failed = [r["name"] for r in fleet["targets"] if r["status"] == "failed"]
    skipped = [r["name"] for r in fleet["targets"] if r["status"] == "skipped"]
    if failed:
        raise GateFailed(f"{len(failed)} of {len(targets)} targets failed: {', '.join(failed)} (reasons in "
                         f"{fleet['files']['markdown']})")
    if skipped:
        raise BackendUnavailable(f"{len(skipped)} of {len(targets)} targets could not verify here: "
                                 f"{', '.join(skipped)} (reasons in {fleet['files']['markdown']})")


COMMANDS = [fleet_command]
