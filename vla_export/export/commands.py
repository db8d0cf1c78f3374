"""`vla-export export`: checkpoint -> ONNX fp32, checked and parity-gated."""

from __future__ import annotations

import re

import click

from vla_export.errors import UserError
from vla_export.export.onnx_export import (
    DEFAULT_OPSET,
    DEFAULT_TOL,
    ExportOptions,
    export_checkpoint,
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """`1GB`, `500MB`, `1GiB`, `0`, `123456` -> bytes (decimal units; `i` for binary)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UserError(f"cannot read size {text!r}: use e.g. 1GB, 500MB, 1GiB or a number of bytes")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_renames(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--rename {item!r}: use OLD_PREFIX=NEW_PREFIX (e.g. module.=)")
        old, new = item.split("=", 1)
        out[old] = new
    return out


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UserError(f"--batch-sizes {text!r}: use positive integers separated by commas, e.g. 1,4")
    return values


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("-o", "--output", "out_dir", default="artifacts", show_default=True, help="output directory")
@click.option("--episodes", type=click.Path(path_type=str), default=None,
              help="episodes directory: parity runs on its validation frames (else on the spec's example inputs)")
@click.option("--n-inputs", default=16, show_default=True, help="inputs the parity gate runs")
@click.option("--batch-sizes", default="1,4", show_default=True, help="batch sizes the parity gate runs")
@click.option("--rollout-steps", default=5, show_default=True, help="recurrent heads: closed-loop steps checked")
@click.option("--tol", default=DEFAULT_TOL, show_default=True, type=float, help="parity gate: max MAE per output")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, help="ONNX opset (18 or newer)")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="auto: torch.onnx dynamo exporter, the TorchScript exporter only if it fails")
@click.option("--external-data-threshold", default="1GB", show_default=True,
              help="weights above this size go to model.onnx.data (0: always)")
@click.option("--seed", default=0, show_default=True, help="seed of the example inputs")
@click.option("--force", is_flag=True, help="re-export even if the artifact is up to date")
@click.option("--trust-checkpoint", is_flag=True, help="allow a legacy .pth that pickles arbitrary objects")
@click.option("--arch", default=None, help="legacy .pth: architecture name or package.module:factory")
@click.option("--preset", default=None, help="legacy .pth: preset (tiny|small|full)")
@click.option("--rename", multiple=True, help="OLD=NEW state-dict key prefix rename, e.g. module.= (repeatable)")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch and ONNX Runtime intra-op threads  [default: the cores other jobs leave idle]")
@click.option("-q", "--quiet", is_flag=True, help="print only errors")
def export_cmd(checkpoint, out_dir, episodes, n_inputs, batch_sizes, rollout_steps, tol, opset, exporter,
               external_data_threshold, seed, force, trust_checkpoint, arch, preset, rename, threads, quiet):
    """Export a checkpoint to ONNX (fp32), check it and gate it on parity with PyTorch.

    Writes OUT/model.onnx (+ model.onnx.data above the external-data threshold) and OUT/model.onnx.json.
    Nothing is published unless onnx.checker passes and ONNX Runtime matches PyTorch within --tol
    (batch sizes --batch-sizes, another text length, and for recurrent heads a closed-loop rollout).
    A re-run with the same checkpoint and settings prints "up to date" and does nothing.

    \b
    Example:
      vla-export export checkpoints/demo -o artifacts --episodes data/episodes
      vla-export export old_run.pth --preset full --rename module.= -o artifacts --external-data-threshold 0
    """
    opts = ExportOptions(
        opset=opset, exporter=exporter, external_data_threshold=parse_size(external_data_threshold), tol=tol,
        n_inputs=n_inputs, batch_sizes=parse_batches(batch_sizes), rollout_steps=rollout_steps, seed=seed,
        episodes=episodes, arch=arch, preset=preset, rename=parse_renames(rename), trust_checkpoint=trust_checkpoint,
        force=force, quiet=quiet, threads=threads)
    export_checkpoint(checkpoint, out_dir, opts)


COMMANDS = [export_cmd]
