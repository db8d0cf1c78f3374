"""`vla-export`: the command line. It only wires stages together; each stage's commands live in its package.

Every command prints one line `error: ...` and exits non-zero on bad input (exit codes in `vla_export.errors`).
"""

from __future__ import annotations

import importlib
import sys

import click

from vla_export import __version__
from vla_export.errors import UserError

ARGV_KEY = "vla_export.argv"

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
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


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
