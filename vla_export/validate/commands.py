"""CLI: `vla-export validate`, `vla-export profile`, `vla-export report`."""

from __future__ import annotations

import click

from vla_export.errors import UserError
from vla_export.validate.validate import DEFAULT_TOLERANCES

_TOL = {p: f"{t['parity_mae']:g}" for p, t in DEFAULT_TOLERANCES.items()}
_RTOL = {p: f"{t['parity_rel_l2']:g}" for p, t in DEFAULT_TOLERANCES.items()}


def _console():
    from rich.console import Console

    return Console(width=max(Console().width, 200))


def _command_line() -> str:
    from vla_export.cli import command_line

    return command_line()


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers like 1,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} needs positive integers, got {text!r}")
    return values


@click.command("validate")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--tol", type=float, default=None, show_default=_TOL["fp32"],
              help="Parity MAE budget for full-precision (fp32) artifacts.")
@click.option("--tol-fp16", type=float, default=None, show_default=_TOL["fp16"], help="Parity MAE budget for fp16 artifacts.")
@click.option("--tol-int8", type=float, default=None, show_default=_TOL["int8"], help="Parity MAE budget for int8 artifacts.")
@click.option("--max-task-mae-increase", type=float, default=None,
              show_default=f"{DEFAULT_TOLERANCES['fp32']['task_mae_increase']:g}",
              help="Largest allowed rise of the task action MAE over the reference's (absolute, action units).")
@click.option("--rtol", type=float, default=None, show_default=_RTOL["fp32"],
              help="Relative L2 error budget (||out - ref|| / ||ref|| of actions) for fp32 artifacts.")
@click.option("--rtol-fp16", type=float, default=None, show_default=_RTOL["fp16"],
              help="Relative L2 error budget for fp16 artifacts.")
@click.option("--rtol-int8", type=float, default=None, show_default=_RTOL["int8"],
              help="Relative L2 error budget for int8 artifacts.")
@click.option("--max-task-mae-rel-increase", type=float, default=None,
              show_default=f"{DEFAULT_TOLERANCES['fp32']['task_mae_rel_increase']:g}",
              help="Largest allowed rise of the task action MAE as a share of the reference's own task MAE.")
@click.option("--episodes", type=click.Path(), default=None,
              help="Episode directory: parity on its frames, task MAE against its actions, LSTM rollouts per episode.")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True)
@click.option("--max-frames", type=int, default=None, help="Cap the number of task frames (quick runs on big models).")
@click.option("-n", "n", type=int, default=16, show_default=True, help="Parity inputs (the same N run at every --batch size).")
@click.option("--batch", "batch", default="1,4", show_default=True, help="Batch sizes for parity.")
@click.option("-o", "--output", type=click.Path(), default=None, help="validation.json path [ARTIFACTS/validation.json]")
@click.option("--ray", "use_ray", is_flag=True,
              help="Spread the task predictions over a Ray cluster (Ray Data, one ORT session per actor); "
                   "pip install 'vla-export[ray]'.")
@click.option("--ray-address", default=None, help="Ray cluster for --ray (host:port, 'auto') [default: a local one].")
@click.option("--ray-actors", type=int, default=2, show_default=True, help="Actors (ORT sessions) for --ray.")
def validate_cmd(paths, tol, tol_fp16, tol_int8, max_task_mae_increase, rtol, rtol_fp16, rtol_int8,
                 max_task_mae_rel_increase, episodes, split, max_frames, n, batch, output, use_ray, ray_address,
                 ray_actors):
    """Check every artifact against the PyTorch fp32 reference of its source checkpoint.

    Finds artifacts through their manifests (default: artifacts/), rebuilds each source checkpoint's model once,
    and runs every artifact (ONNX Runtime per execution provider, TensorRT, AOTInductor) on the same inputs:
    parity (MAE, max abs, relative L2, cosine) at batch 1 and 4, LSTM rollouts, task action MAE with --episodes.
    Each budget is checked twice, absolutely (--tol*, --max-task-mae-increase) and relative to the reference's
    scale (--rtol*, --max-task-mae-rel-increase); both must hold. Fails an artifact whose files changed since it was built, or whose checkpoint changed (stale). A backend this
    machine cannot run is skipped, not failed. Exits 0 only if every artifact passes; numbers go to validation.json.

    \b
    Example:
      vla-export validate artifacts --episodes data/episodes
      vla-export validate artifacts/model.int8.onnx --tol-int8 0.03 --max-task-mae-increase 0.005
      vla-export validate artifacts --episodes data/episodes --ray --ray-address auto
    """
    from vla_export.validate.validate import raise_on_failure, resolve_tolerances, results_table, validate

    run = validate
    if use_ray:
        if not episodes:
            raise UserError("--ray spreads the task evaluation over a cluster: it needs --episodes DIR")
        from functools import partial

        from vla_export.fleet.ray_validate import validate_with_ray

        run = partial(validate_with_ray, address=ray_address, actors=ray_actors)
    report = run(list(paths) or ["artifacts"],
                 tolerances=resolve_tolerances(tol, tol_fp16, tol_int8, max_task_mae_increase, rtol=rtol,
                                               rtol_fp16=rtol_fp16, rtol_int8=rtol_int8,
                                               max_task_mae_rel_increase=max_task_mae_rel_increase), n=n,
                 batch_sizes=_int_list(batch, "--batch"), episodes_dir=episodes, split=split,
                 max_frames=max_frames, output=output, command=_command_line())
    _console().print(results_table(report))
    for r in report.get("results", []):
        if r.get("judged_elsewhere"):
            click.echo(f"note: {r['id']}: {r['judged_elsewhere']}; judged here")
    feats = report.get("machine", {}).get("cpu_features") or {}
    click.echo(f"machine: {report.get('machine', {}).get('cpu')} ({', '.join(feats.get('flags', []))}; int8 kernels "
               f"{feats.get('int8_kernels')})")
    click.echo(f"wrote {report['path']}")
    raise_on_failure(report)


@click.command("profile")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--warmup", type=int, default=50, show_default=True, help="Untimed calls before timing.")
@click.option("--iters", type=int, default=100, show_default=True, help="Timed calls per batch size.")
@click.option("--batch", "batch", default="1,8", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--threads", type=int, default=None, help="CPU threads for ORT and PyTorch [library default].")
@click.option("--isolate/--in-process", default=True, show_default=True,
              help="One Python process per row, so memory numbers do not mix.")
@click.option("--no-eager", is_flag=True, help="Skip the eager PyTorch rows.")
@click.option("-o", "--output", type=click.Path(), default=None, help="profile.json path [ARTIFACTS/profile.json]")
def profile_cmd(paths, warmup, iters, batch, threads, isolate, no_eager, output):
    """Measure latency, throughput, load time, memory and size of every artifact on each device it runs on here.

    Adds the eager PyTorch model of each source checkpoint (fp32 on CPU; fp32 and fp16 on CUDA when present).
    GPU rows are timed with CUDA events, CPU rows with perf_counter around synchronous calls, after warm-up.
    Speed-ups are only computed against the eager row of the same device in the same run.

    \b
    Example:
      vla-export profile artifacts
      vla-export profile artifacts --warmup 10 --iters 50 --batch 1,8 --threads 2
    """
    from vla_export.validate.profile import profile, profile_table

    result = profile(list(paths) or ["artifacts"], warmup=warmup, iters=iters, batches=_int_list(batch, "--batch"),
                     threads=threads, isolate=isolate, include_eager=not no_eager, output=output,
                     command=_command_line())
    _console().print(profile_table(result))
    click.echo(f"wrote {result['path']}")


@click.command("report")
@click.argument("artifacts_dir", default="artifacts", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None, help="Directory for report.md/.json/.png [ARTIFACTS_DIR]")
def report_cmd(artifacts_dir, output):
    """Write report.md, report.json and report.png from profile.json and validation.json, and print the table.

    Ranks artifacts by batch-1 p50 latency within each device, beside their parity and task MAE and verdicts,
    with the machine, versions and the commands to reproduce.

    \b
    Example:
      vla-export report artifacts
    """
    from vla_export.validate.report import build_report, report_table

    report = build_report(artifacts_dir, output)
    _console().print(report_table(report))
    click.echo(f"wrote {report['files']['markdown']}, {report['files']['plot']}")


COMMANDS = [validate_cmd, profile_cmd, report_cmd]
