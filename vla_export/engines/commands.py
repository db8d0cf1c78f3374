"""`vla-export trt` and `vla-export aoti`: compiled artifacts for a target device."""

from __future__ import annotations

from pathlib import Path

import click

from vla_export.errors import UserError


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _dims(values: tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    from vla_export.engines.tensorrt import parse_range

    out = {}
    for item in values:
        name, sep, rng = item.partition("=")
        if not sep or not name:
            raise UserError(f"--dim {item!r}: expected NAME=MIN,OPT,MAX, e.g. --dim clip_seq=2,16,77")
        out[name] = parse_range(rng, f"--dim {name}=")
    return out


@click.command("trt")
@click.argument("onnx_path", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp16", "int8", "fp32"]), default="fp16", show_default=True,
              help="fp16: model.onnx (TensorRT 8.6/10.x) or model.fp16.onnx (required on 11.x); "
                   "int8: model.int8-static.onnx (Q/DQ) only.")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: the ONNX file's directory].")
@click.option("--batch", default=None, help="Batch MIN,OPT,MAX of the optimization profile [default: 1,1,8].")
@click.option("--seq", default=None, help="Kosmos-2 token length MIN,OPT,MAX [default: the IO spec's range].")
@click.option("--dim", "dims", multiple=True, metavar="NAME=MIN,OPT,MAX",
              help="Range of any other dynamic dim of the IO spec (repeatable), e.g. clip_seq=2,16,77.")
@click.option("--workspace-gb", type=float, default=4.0, show_default=True, help="Builder workspace memory limit.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache file, read and updated [default: <output>/timing.cache].")
def trt_command(onnx_path, precision, out_dir, batch, seq, dims, workspace_gb, timing_cache):
    """Build a TensorRT engine from an ONNX artifact, on the device that will run it.

    Writes model.<precision>.engine and model.<precision>.engine.json (TensorRT version, GPU, profiles, per-layer
    precision). Input errors exit 2 on every machine; without TensorRT or a CUDA GPU it exits 4 (skipped).

    \b
    Example:
      vla-export trt artifacts/model.onnx --precision fp16
      vla-export trt artifacts/model.int8-static.onnx --precision int8 --batch 1,1,8
    """
    from vla_export.engines.tensorrt import EngineBuildRequest, build_engine, parse_range

    dim_ranges = _dims(dims)
    if seq is not None:
        dim_ranges["seq"] = parse_range(seq, "--seq")
    req = EngineBuildRequest(onnx_path=Path(onnx_path), precision=precision,
                             out_dir=Path(out_dir) if out_dir else Path(onnx_path).parent,
                             batch=parse_range(batch, "--batch"), dims=dim_ranges, workspace_gb=workspace_gb,
                             timing_cache=timing_cache)
    console = _console()
    path, manifest = build_engine(req, console=console)
    eng = manifest["engine"]
    console.print(f"wrote {path} ({manifest['total_bytes'] / 1e6:.1f} MB, {eng.get('layer_count')} layers, "
                  f"precisions {eng.get('precisions')}) in {manifest['timing']['wall_s']:.1f} s with TensorRT "
                  f"{manifest['tensorrt']['version']} on {manifest['tensorrt']['gpu']['name']}")


@click.command("aoti")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("artifacts"),
              show_default=True, help="Output directory.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device the package is compiled for (and runs on).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Weights and compute dtype; float inputs are cast to it.")
@click.option("--force", is_flag=True, help="Recompile even if an up-to-date package exists.")
def aoti_command(checkpoint, out_dir, device, dtype, force):
    """Compile a checkpoint ahead of time with AOTInductor into model.<device>.<dtype>.pt2.

    The package has the IO spec's dynamic batch and text lengths and runs without the model code
    (torch._inductor.aoti_load_package). Re-running with the same checkpoint and settings is a no-op.

    \b
    Example:
      vla-export aoti checkpoints/demo -o artifacts --device cpu --dtype fp32
      vla-export aoti checkpoints/demo -o artifacts --device cuda --dtype fp16
    """
    from vla_export.engines.aoti import compile_aoti

    console = _console()
    path, manifest, built = compile_aoti(checkpoint, out_dir, device=device, dtype=dtype, force=force,
                                         console=console)
    if not built:
        console.print(f"{path} is up to date (same checkpoint sha256 and settings); --force recompiles")
        return
    parity = manifest["compile_check"]["parity_vs_eager_same_dtype"]
    worst = max(m["mae"] for per_batch in parity.values() for m in per_batch.values())
    console.print(f"wrote {path} ({manifest['total_bytes'] / 1e6:.1f} MB) in {manifest['timing']['wall_s']:.1f} s "
                  f"(compile {manifest['timing']['compile_s']:.1f} s, peak RSS "
                  f"{manifest['timing']['peak_rss_bytes'] / 2**30:.2f} GiB); MAE vs eager {dtype}: {worst:.2e}")


COMMANDS = [trt_command, aoti_command]
