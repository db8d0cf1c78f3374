"""`vla-export trt` and `vla-export aoti`: compiled artifacts for a target device."""

from __future__ import annotations

import contextlib
import os
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


def bundle_onnx_for(bundle_dir: Path, precision: str) -> Path:
    """The ONNX in a bundle that TensorRT builds a `precision` engine from (see `trt --help` for which)."""
    from vla_export.deploy.bundle import bundle_artifacts, verify_bundle

    held = bundle_artifacts(verify_bundle(bundle_dir))
    by_variant = {e.get("variant"): name for name, e in held.items() if e.get("backend") == "onnxruntime"}
    # fp16: the fp16 ONNX first (TensorRT 11 is strongly typed and takes precision from the graph), else fp32 with
    # the FP16 flag (8.6/10.x); int8: only Q/DQ, since TensorRT parses none of quantize_dynamic's integer ops.
    wanted = {"fp16": ("ort-fp16", "onnx-fp32"), "int8": ("ort-int8-static",), "fp32": ("onnx-fp32",)}[precision]
    for variant in wanted:
        if variant in by_variant:
            return bundle_dir / by_variant[variant]
    hint = {"fp16": "artifacts/model.fp16.onnx", "int8": "artifacts/model.int8-static.onnx",
            "fp32": "artifacts/model.onnx"}[precision]
    raise UserError(f"bundle {bundle_dir} holds no ONNX TensorRT can build a {precision} engine from (it holds "
                    f"{', '.join(held)}); re-bundle with `vla-export bundle ... --extra {hint}`")


def _add_to_bundle(bundle_dir: Path, path: Path, manifest: dict, console) -> None:
    from vla_export.deploy.bundle import add_artifact

    info = add_artifact(bundle_dir, path, manifest)
    console.print(f"added {path.name} to bundle {bundle_dir} ({len(info['files'])} files, re-hashed); judge it here "
                  f"with `vla-export verify {bundle_dir} --artifact {path.name}`")


@click.command("trt")
@click.argument("onnx_path", type=click.Path(path_type=Path), required=False)
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Build from a bundle's ONNX on this (target) device and add the engine to the bundle.")
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
def trt_command(onnx_path, bundle_dir, precision, out_dir, batch, seq, dims, workspace_gb, timing_cache):
    """Build a TensorRT engine from an ONNX artifact, on the device that will run it.

    Writes model.<precision>.engine and model.<precision>.engine.json (TensorRT version, GPU, profiles, per-layer
    precision). Input errors exit 2 on every machine; without TensorRT or a CUDA GPU it exits 4 (skipped).

    \b
    Example:
      vla-export trt artifacts/model.onnx --precision fp16
      vla-export trt artifacts/model.int8-static.onnx --precision int8 --batch 1,1,8
      vla-export trt --bundle dist/policy --precision fp16      # on the Jetson / workstation itself
    """
    from vla_export.engines.tensorrt import EngineBuildRequest, build_engine, parse_range

    if (onnx_path is None) == (bundle_dir is None):
        raise UserError("pass either ONNX_PATH or --bundle DIR (build from the bundle's ONNX and add the engine)")
    if bundle_dir is not None:
        if out_dir is not None:
            raise UserError("--bundle writes the engine into the bundle; drop -o/--output")
        onnx_path = bundle_onnx_for(Path(bundle_dir), precision)
        out_dir = Path(bundle_dir)
        if timing_cache is None:  # not inside the bundle: every file there is hashed and shipped
            timing_cache = _cache_dir() / f"{Path(bundle_dir).resolve().name}.timing.cache"
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
    if bundle_dir is not None:
        _add_to_bundle(Path(bundle_dir), path, manifest, console)


def _cache_dir() -> Path:
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vla-export" / "trt-timing"
    base.mkdir(parents=True, exist_ok=True)
    return base


@click.command("aoti")
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Compile on this (target) machine from a bundle made with --with-weights, and add the package.")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("artifacts"),
              show_default=True, help="Output directory.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device the package is compiled for (and runs on).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Weights and compute dtype; float inputs are cast to it.")
@click.option("--force", is_flag=True, help="Recompile even if an up-to-date package exists.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Compiled code by graph fingerprint: a checkpoint of an architecture and config compiled before "
              "(other weights) skips the compile [default: $VLA_EXPORT_AOTI_CACHE, else no cache].")
def aoti_command(checkpoint, bundle_dir, out_dir, device, dtype, force, cache_dir):
    """Compile a checkpoint ahead of time with AOTInductor into model.<device>.<dtype>.pt2.

    The package has the IO spec's dynamic batch and text lengths and runs without the model code
    (torch._inductor.aoti_load_package). Its weights go beside it (model.<device>.<dtype>.weights.safetensors), so
    the compiled code serves any checkpoint of the same config (--cache). Re-running with the same checkpoint and
    settings is a no-op.

    \b
    Example:
      vla-export aoti checkpoints/demo -o artifacts --device cpu --dtype fp32
      vla-export aoti checkpoints/demo -o artifacts --device cuda --dtype fp16
      vla-export aoti --bundle dist/policy --device cuda --dtype fp16   # on the target itself
    """
    from vla_export.engines.aoti import compile_aoti
    from vla_export.manifest import write_manifest

    console = _console()
    if (checkpoint is None) == (bundle_dir is None):
        raise UserError("pass either CHECKPOINT or --bundle DIR (compile from a bundle made with --with-weights)")
    if bundle_dir is not None:
        from vla_export.deploy.bundle import verify_bundle

        info = verify_bundle(bundle_dir)
        if not info.get("weights"):
            raise UserError(f"bundle {bundle_dir} carries no weights, and AOTInductor compiles from them; re-bundle "
                            "with `vla-export bundle ... --with-weights`")
        out_dir = Path(bundle_dir)
        with bundle_checkpoint(Path(bundle_dir), info) as checkpoint:
            path, manifest, built = compile_aoti(checkpoint, out_dir, device=device, dtype=dtype, force=force,
                                                 console=console, cache_dir=cache_dir)
            manifest["source"] |= {"checkpoint": str(Path(bundle_dir).resolve()), "checkpoint_in_bundle": True}
            write_manifest(path, manifest)
        _add_to_bundle(Path(bundle_dir), path, manifest, console)
        _report_aoti(console, path, manifest, built, dtype)
        return
    path, manifest, built = compile_aoti(checkpoint, out_dir, device=device, dtype=dtype, force=force,
                                         console=console, cache_dir=cache_dir)
    _report_aoti(console, path, manifest, built, dtype)


@contextlib.contextmanager
def bundle_checkpoint(bundle_dir: Path, info: dict):
    """The checkpoint inside a bundle made with --with-weights, as a directory of just its files (hard links, so
    the full model's 7 GB are not copied): hashing the bundle directory itself would count bundle.json and the
    artifacts, which change when a package is added."""
    import shutil
    import tempfile

    from vla_export.checkpoint import read_config
    from vla_export.deploy.bundle import CONFIG_FILE, _preprocessing_files

    names = [CONFIG_FILE, info["weights"], *_preprocessing_files(bundle_dir, read_config(bundle_dir))]
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.checkpoint-", dir=bundle_dir.resolve().parent))
    try:
        for name in names:
            try:
                os.link(bundle_dir / name, tmp / name)
            except OSError:  # another filesystem or no hard links: copy
                shutil.copyfile(bundle_dir / name, tmp / name)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report_aoti(console, path: Path, manifest: dict, built: bool, dtype: str) -> None:
    if not built:
        console.print(f"{path} is up to date (same checkpoint sha256 and settings); --force recompiles")
        return
    parity = manifest["compile_check"]["parity_vs_eager_same_dtype"]
    worst = max(m["mae"] for per_batch in parity.values() for m in per_batch.values())
    compiled = ("code from the cache" if manifest.get("compiled_code_from_cache")
                else f"compile {manifest['timing']['compile_s']:.1f} s")
    console.print(f"wrote {path} ({manifest['total_bytes'] / 1e6:.1f} MB with its weights) in "
                  f"{manifest['timing']['wall_s']:.1f} s ({compiled}, peak RSS "
                  f"{manifest['timing']['peak_rss_bytes'] / 2**30:.2f} GiB); MAE vs eager {dtype}: {worst:.2e}")


COMMANDS = [trt_command, aoti_command]
