"""AOTInductor packages: the model compiled ahead of time into `model.<device>.<dtype>.pt2`, and its runner.

`torch.export.export(model, kwargs=feeds, dynamic_shapes=spec.torch_dynamic_shapes())` traces the policy with the
spec's dynamic dims (batch, text lengths); `torch._inductor.aoti_compile_and_package` compiles that program into a
package that `load_aoti_package` runs without the model code.

The package takes the spec's inputs as keyword arguments (it was exported from kwargs; positional calls raise "kwarg
keyword mismatch") in the compile dtype: float inputs are cast to it, as `TorchRunner` does for eager.

The weights stay out of the compiled code: the package is compiled with `package_constants_in_so=False` and runtime
constant folding, and the weights go beside it as `model.<device>.<dtype>.weights.safetensors`, loaded by
`load_aoti_package`. The code then depends on the graph alone (`graph_fingerprint`), so a compile cache (`--cache DIR`)
serves every checkpoint of one architecture and config: the demo compiles a random-weight checkpoint of its config
while it trains, and the trained checkpoint's package takes that code with its own weights (parity is checked against
the eager model either way).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from vla_export.errors import UserError
from vla_export.io_spec import IOSpec
from vla_export.manifest import (
    aoti_weights_path,
    artifact_files,
    manifest_path,
    measured,
    new_manifest,
    publish,
    read_manifest,
    sha256_files,
    staging_dir,
    write_manifest,
)
from vla_export.runtime.pytorch import (  # noqa: F401 - AotiRunner re-exported beside the compiler
    DEVICES,
    TORCH_DTYPES,
    AotiRunner,
    check_device,
    load_aoti_package,
    outputs_as_dict,
    to_device_feeds,
)

DTYPES = ("fp32", "fp16", "bf16")
EXAMPLE_BATCH = 2  # torch.export specialises dims traced at size 0/1; trace at 2, the Dim says 1..max
# Weights outside the compiled code. Without runtime folding, Inductor folds weight transposes into new constants at
# compile time, and a package given other weights computed with the compile's (max abs error 1.1 on the demo model).
EXTERNAL_WEIGHTS_CONFIG = {"aot_inductor.package_constants_in_so": False,
                           "aot_inductor.use_runtime_constant_folding": True}
CACHE_ENV = "VLA_EXPORT_AOTI_CACHE"  # default for --cache


def package_name(device: str, dtype: str) -> str:
    return f"model.{device}.{dtype}.pt2"


def torch_dtype(dtype: str):
    import torch

    if dtype not in TORCH_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, TORCH_DTYPES[dtype])





def compile_settings(device: str, dtype: str, spec: IOSpec) -> dict[str, Any]:
    """Every option that shapes the package; equal settings + equal checkpoint sha -> the same artifact."""
    import torch

    return {
        "device": device,
        "dtype": dtype,
        "dynamic_dims": {n: [d.min, d.max] for n, d in spec.dims.items() if d.dynamic},
        "example_batch": EXAMPLE_BATCH,
        "inductor_mode": "default",
        "weights": "external",  # beside the package (EXTERNAL_WEIGHTS_CONFIG), read by open_runner
        "torch": torch.__version__,
    }


def program_weights(program) -> dict:
    """The exported program's parameters, buffers and tensor constants by name, as the package loads them; tensors
    that share storage (tied weights) are copied, which safetensors requires."""
    import torch

    seen: set[int] = set()
    out = {}
    for name, t in [*program.state_dict.items(), *program.constants.items()]:
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        if t.untyped_storage().data_ptr() in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def graph_fingerprint(program, settings: dict[str, Any]) -> str:
    """sha256 of what the compiled code depends on: the graph, its signature and dynamic-dim ranges, every weight's
    name, shape and dtype (not its values), and the compile settings (torch version included)."""
    h = hashlib.sha256()
    h.update(program.graph_module.code.encode())
    h.update(str(program.graph_signature).encode())
    h.update(str(sorted((str(k), str(v)) for k, v in program.range_constraints.items())).encode())
    weights = program_weights(program)
    h.update(json.dumps([(n, list(t.shape), str(t.dtype)) for n, t in sorted(weights.items())]).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def up_to_date(package: Path, checkpoint_sha: str, settings: dict[str, Any]) -> bool:
    """The published package was built from this checkpoint with these settings, and is intact."""
    mpath = manifest_path(package)
    if not package.exists() or not mpath.exists():
        return False
    try:
        m = read_manifest(package)
    except UserError:
        return False
    return (m.get("source", {}).get("checkpoint_sha256") == checkpoint_sha and m.get("settings") == settings
            and m.get("files", {}).get(package.name) == package.stat().st_size
            and m.get("sha256") == sha256_files(artifact_files(package)))


def export_program(model, spec: IOSpec, device: str, dtype: str):
    """`torch.export` of the model in `dtype` on `device`, with the spec's dynamic dims, from keyword inputs."""
    import torch

    tdtype = torch_dtype(dtype)
    model = model.to(device=device, dtype=tdtype).eval()
    feeds = to_device_feeds(spec.example_inputs(batch=EXAMPLE_BATCH, seed=0), device, tdtype)
    with torch.no_grad():
        return torch.export.export(model, args=(), kwargs=feeds, dynamic_shapes=spec.torch_dynamic_shapes())


def parity_vs_eager(model, package_path: Path, spec: IOSpec, device: str, dtype: str,
                    batches=(1, 3)) -> dict[str, Any]:
    """Package vs the eager model at the same dtype, at two batch sizes (neither is the traced one)."""
    import torch

    from vla_export.validate.metrics import error_metrics

    tdtype = torch_dtype(dtype)
    loaded = load_aoti_package(package_path, aoti_weights_path(package_path), device)
    result = {}
    max_batch = spec.dims["batch"].max if "batch" in spec.dims else 1
    for b in sorted({min(b, max_batch) for b in batches}):
        feeds = to_device_feeds(spec.example_inputs(batch=b, seed=100 + b), device, tdtype)
        with torch.inference_mode():
            ref = outputs_as_dict(model(**feeds), spec.output_names)
            got = outputs_as_dict(loaded(**feeds), spec.output_names)
        result[f"batch{b}"] = {n: error_metrics(ref[n].float().cpu().numpy(), got[n].float().cpu().numpy())
                               for n in spec.output_names}
    return result


def compile_aoti(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, device: str = "cpu",
                 dtype: str = "fp32", force: bool = False, console=None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any], bool]:
    """Compile `checkpoint` into `<out_dir>/model.<device>.<dtype>.pt2` + its weights file + manifest. Returns
    (path, manifest, built).

    `built` is False when an up-to-date package (same checkpoint sha256 and settings) was already there.
    `cache_dir`: compiled code by `graph_fingerprint`; a hit skips the compile (default: $VLA_EXPORT_AOTI_CACHE)."""
    import torch

    from vla_export.checkpoint import checkpoint_sha256, load_checkpoint, load_spec

    checkpoint = Path(checkpoint)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    spec, _config = load_spec(checkpoint)  # validates the checkpoint before any device check
    check_device(device)
    if device == "cpu" and dtype == "fp16":
        # Inductor's CPU fp16 codegen works but is slow and rarely what anyone deploys; allowed, said once.
        if console is not None:
            console.print("note: fp16 on CPU compiles, but CPUs run it slower than fp32 or bf16")
    out_dir = Path(out_dir)
    package = out_dir / package_name(device, dtype)
    cache_dir = cache_dir or os.environ.get(CACHE_ENV) or None
    settings = compile_settings(device, dtype, spec)
    ckpt_sha = checkpoint_sha256(checkpoint)
    if not force and up_to_date(package, ckpt_sha, settings):
        return package, read_manifest(package), False
    if cache_dir:
        _check_cache_dir(Path(cache_dir))

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                        console=console, transient=False, disable=console is None)
    with staging_dir(out_dir) as tmp, progress:
        staged = tmp / package.name
        with measured() as timing:
            step = progress.add_task("load checkpoint", total=None)
            ckpt = load_checkpoint(checkpoint, device=device)
            model, spec = ckpt.model, ckpt.spec
            progress.update(step, description="torch.export (dynamic dims)")
            t0 = time.perf_counter()
            program = export_program(model, spec, device, dtype)
            export_s = time.perf_counter() - t0
            fingerprint = graph_fingerprint(program, settings)
            cached = Path(cache_dir) / f"{fingerprint}.pt2" if cache_dir else None
            t1 = time.perf_counter()
            from_cache = cached is not None and cached.is_file()
            if from_cache:
                progress.update(step, description=f"compiled code from the cache ({cached.parent})")
                shutil.copyfile(cached, staged)
            else:
                progress.update(step, description="AOTInductor compile (minutes on the full model)")
                written = torch._inductor.aoti_compile_and_package(program, package_path=str(staged),
                                                                   inductor_configs=EXTERNAL_WEIGHTS_CONFIG)
                if Path(written) != staged:
                    os.replace(written, staged)
                if cached is not None:
                    _store_in_cache(staged, cached)
            compile_s = time.perf_counter() - t1
            from safetensors.torch import save_file

            save_file(program_weights(program), str(aoti_weights_path(staged)))
            progress.update(step, description="parity vs eager")
            parity = parity_vs_eager(model, staged, spec, device, dtype)
            progress.update(step, description="done")
        manifest = new_manifest(
            "aoti", staged,
            backend="aoti", precision=dtype, device=device, variant=f"aoti-{device}-{dtype}",
            io_spec=spec.to_json(),
            source={"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": ckpt_sha, "artifact": None,
                    "artifact_sha256": None},
            settings=settings,
            timing={**timing, "export_s": round(export_s, 3), "compile_s": round(compile_s, 3)},
            compile_check={"parity_vs_eager_same_dtype": parity},
            graph_fingerprint=fingerprint,
            compiled_code_from_cache=str(cached) if from_cache else None,
        )
        write_manifest(staged, manifest)
        final = publish([*artifact_files(staged), manifest_path(staged)], out_dir)[0]
    return final, manifest, True


def _check_cache_dir(cache_dir: Path) -> None:
    """Before minutes of compiling: the cache directory exists (made if not) and is writable."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the AOTI cache directory {cache_dir}: {e.strerror}; pass a writable --cache "
                        f"DIR (or unset {CACHE_ENV})") from e
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise UserError(f"the AOTI cache directory {cache_dir} is not writable; pass a writable --cache DIR (or unset "
                        f"{CACHE_ENV})")


def _store_in_cache(package: Path, cached: Path) -> None:
    """Copy compiled code into the cache under a temporary name, then rename: a reader never sees half a file."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    shutil.copyfile(package, tmp)
    os.replace(tmp, cached)

