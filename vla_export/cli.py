"""`vla-export`: the command line. It only wires stages together; each stage's commands live in its package.

Every command prints one line `error: ...` and exits non-zero on bad input (exit codes in `vla_export.errors`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

import click

from vla_export import __version__
from vla_export.errors import UserError

ARGV_KEY = "vla_export.argv"
# `scripts/time_demo.py` sets this: every command appends one JSON line (its name, process start and end, exit code),
# so the phases of `make demo`, parallel ones included, are timed from outside the stages without changing them.
PHASE_LOG_ENV = "VLA_EXPORT_PHASE_LOG"

# Each module defines COMMANDS: a list of click commands. Order here is the order of `--help`: the pipeline.
COMMAND_MODULES = [
    "vla_export.data.commands",  # episodes, checkpoint
    "vla_export.export.commands",  # export
    "vla_export.quantize.commands",  # quantize
    "vla_export.engines.commands",  # trt, aoti
    "vla_export.validate.commands",  # validate, profile, report
    "vla_export.deploy.commands",  # bundle, ros2-node
    "vla_export.fleet.commands",  # fleet (Ray is imported only when it runs)
]


def command_line() -> str:
    """The running command as one shell line: `vla-export` and the arguments it was given."""
    import shlex

    ctx = click.get_current_context(silent=True)
    args = ctx.meta.get(ARGV_KEY) if ctx is not None else None
    return "vla-export " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if args is None else args))


class StageGroup(click.Group):
    """Keeps commands in pipeline order and turns UserError into one line and an exit code."""

    def list_commands(self, ctx):
        return list(self.commands)

    def parse_args(self, ctx, args):
        # The arguments as given, for the commands that record how to reproduce their output (report.md): not
        # sys.argv, which is another program's when vla-export runs inside Python (`main([...])`, CliRunner).
        ctx.meta[ARGV_KEY] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        log = os.environ.get(PHASE_LOG_ENV)
        argv = ctx.meta.get(ARGV_KEY, [])
        code = 1  # an exception that is not a UserError
        try:
            result = super().invoke(ctx)
            code = 0
            return result
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            code = e.exit_code
            sys.exit(e.exit_code)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            raise
        finally:
            if log:
                _log_phase(log, argv, code)


def _log_phase(log_path: str, argv: list[str], code: int) -> None:
    """Append {command, argv, start, end, wall_s, exit} to `log_path`. The start is the process's own start time, so
    interpreter start-up and imports count as part of the phase."""
    import psutil

    start, end = psutil.Process().create_time(), time.time()
    record = {"command": argv[0] if argv else "", "argv": argv, "start": round(start, 3), "end": round(end, 3),
              "wall_s": round(end - start, 2), "exit": code}
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="vla-export")
def main():
    """Turn a VLA policy checkpoint into validated, profiled, deployable artifacts.

    \b
    Pipeline (make demo runs all of it on the built-in demo):
      episodes synth -> checkpoint -> export -> quantize -> trt | aoti -> validate -> profile -> report -> bundle
    """


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _e:  # a stage package without commands yet
        if _e.name != _name:
            raise
        continue
    for _cmd in _module.COMMANDS:
        main.add_command(_cmd)


if __name__ == "__main__":
    main()
