"""Export a checkpoint to ONNX (fp32), check it, and gate it on parity with PyTorch before it is published.

Phases, each timed with its peak RSS (`manifest.measured`): load the checkpoint; compute the PyTorch reference
outputs (kept: they are small; once, at the largest batch, shared by the smaller batches' cases) so the torch
weights can be freed before ONNX Runtime loads them again; export
(`torch.onnx.export(dynamo=True)`, the TorchScript exporter only if that fails); save (external data above a size
threshold, streamed tensor by tensor by onnx_ir: no second in-memory copy of the weights, no 2 GB protobuf limit);
check by path (`onnx.checker.check_model(path, full_check=True)`: never `onnx.load` of a multi-GB model); load the
staged file in ONNX Runtime (CPU) and compare with the reference; publish only if the gate passes.

Memory: after the save, `release_weights` frees the weights' memory explicitly. `del model` alone does not: the
dynamo exporter's onnx_ir graph wraps the parameters themselves, and onnxscript's module-level rewrite rules keep the
last graph they matched (`SimplePatternMatcher._graph`), so the weights outlived every `del` and ONNX Runtime's load
came on top of them (full preset: peak 14.8 GB, 2x the weights).

Export-hostile model code: none needs patching for the built-in architecture (its Kosmos-2 image-embedding
placement is already static in shape, see `models/kosmos2_clip.py`). `export_patches()` is the one place to add a
patch if an architecture ever needs one; the export runs inside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_export import manifest as mf
from vla_export.errors import GateFailed, UserError
from vla_export.io_spec import NUMPY_DTYPES, IOSpec
from vla_export.validate.metrics import compare_outputs, concat_outputs

MIN_OPSET = 18
DEFAULT_OPSET = 18
DEFAULT_TOL = 1e-5
DEFAULT_THRESHOLD = 10**9
PROTOBUF_SAFE_BYTES = 1_800_000_000  # headroom under protobuf's 2 GiB message limit for the graph itself
ARTIFACT_NAME = "model.onnx"
FAILED_MANIFEST = "model.onnx.failed.json"
# Options that shape the artifact: a re-run with the same checkpoint and these is a no-op.
REQUESTED_KEYS = ("opset", "exporter", "external_data_threshold", "tol", "n_inputs", "batch_sizes", "rollout_steps",
                  "seed", "episodes", "arch", "preset", "rename", "trust_checkpoint")


@dataclass
class ExportOptions:
    opset: int = DEFAULT_OPSET
    exporter: str = "auto"  # auto: dynamo, TorchScript only if dynamo fails | dynamo | torchscript
    external_data_threshold: int = DEFAULT_THRESHOLD  # bytes of initializers above which weights go to .onnx.data
    tol: float = DEFAULT_TOL  # parity gate: MAE of every output, every case
    n_inputs: int = 16
    batch_sizes: tuple[int, ...] = (1, 4)
    rollout_steps: int = 5  # recurrent heads: closed-loop steps with the state fed back
    seed: int = 0
    episodes: str | None = None
    # legacy .pth checkpoints: what they are
    arch: str | None = None
    preset: str | None = None
    rename: dict[str, str] = field(default_factory=dict)
    trust_checkpoint: bool = False
    force: bool = False
    quiet: bool = False
    threads: int | None = None  # torch and ONNX Runtime intra-op threads; None: the cores other jobs leave free

    def requested(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["episodes"] = str(Path(self.episodes).resolve()) if self.episodes else None
        return {k: d[k] for k in REQUESTED_KEYS}


@dataclass
class ExportResult:
    artifact: Path
    manifest: dict[str, Any]
    up_to_date: bool = False


# -- patches -----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def export_patches(model) -> Iterator[None]:
    """Context for export-hostile code paths (after Optimum's ModelPatcher). Empty: nothing needs patching today."""
    yield


# -- progress ----------------------------------------------------------------------------------------------------------
class Phases:
    """Runs named phases with a spinner, records wall time and peak RSS per phase."""

    def __init__(self, console):
        self.console = console
        self.timing: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, label: str, spinner: bool = True) -> Iterator[None]:
        status = self.console.status(f"{label}...") if spinner else contextlib.nullcontext()
        with status, mf.measured() as m:
            yield
        self.timing[name] = dict(m)
        self.console.print(f"[green]✓[/] {label}: {m['wall_s']:.1f} s, peak RSS {m['peak_rss_bytes'] / 2**30:.2f} GiB",
                           soft_wrap=True)


def _console(quiet: bool):
    from rich.console import Console

    return Console(quiet=quiet, highlight=False)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so the RSS seen by
    ONNX Runtime's load does not still carry the torch weights."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def weight_tensors(model) -> list:
    """A module's parameters and buffers, to empty them with `release_weights` once the ONNX file holds them."""
    return list(itertools.chain(model.parameters(), model.buffers()))


def release_weights(ir_model, tensors: list) -> int:
    """Free the weights once the ONNX file holds them; returns the bytes of torch storage released.

    Drops the graph's constant tensors (the optimizer's folded copies live there) and points every torch weight at
    an empty storage, so the old one is freed. `del` frees nothing here: the exporter's graph wraps the parameter
    objects themselves, and objects this stage does not own keep that graph alive (onnxscript's module-level
    rewrite rules hold the last graph they matched, with the initializers the optimizer replaced). Emptying the
    tensors in place frees the memory whoever holds them. (Not `storage.resize_(0)`: the checkpoint loader reads
    into the weights through numpy, which marks their storages non-resizable.) Nothing in this process reads those
    weights again: the graph is saved, the model deleted and its reference outputs already computed."""
    for value in ir_model.graph.initializers.values():
        value.const_value = None
    seen, released = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            released += storage.nbytes()
        # A buffer made as a view keeps its base tensor alive, and with it the storage (transformers 4.x registers
        # `position_ids = torch.arange(n).expand((1, -1))`: the (n,) arange owns the memory, referenced from C++
        # only), so the base is emptied too; it shares this weight's storage, so nothing else owns it.
        base = t._base
        t.data = t.new_empty(0)
        if base is not None:
            base.data = base.new_empty(0)
    return released


def auto_threads() -> int:
    """Intra-op threads for torch and ONNX Runtime: the cores this process may use that other jobs leave idle.

    Both runtimes spin-wait in their thread pools, so one thread more than the free cores stalls every op on a
    preempted thread. Measured on a 2-core machine under load ~5 (small preset, per sample): eager torch 1.3-2.0 s
    with 2 threads vs 0.15-0.18 s with 1; ONNX Runtime 0.12-0.16 s vs 0.07-0.08 s. On an idle machine every core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)  # the load average counts this process too
    except OSError:
        return cores
    return max(1, min(cores, math.floor(cores - others + 0.5)))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- inputs ------------------------------------------------------------------------------------------------------------
def _take(feeds: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[index]) for k, v in feeds.items()}


def parity_inputs(spec: IOSpec, checkpoint_path: Path, opts: ExportOptions) -> tuple[dict[str, np.ndarray], str]:
    """N inputs: validation frames of the episodes when given, else the spec's deterministic examples.

    Recurrent state inputs the task data lacks come from the examples (random, not zeros: a zero state would not
    exercise the recurrent weights)."""
    examples = spec.example_inputs(batch=opts.n_inputs, seed=opts.seed)
    if not opts.episodes:
        return examples, "examples"
    try:
        from vla_export.data.task import load_task_data
    except ImportError as e:
        raise UserError(f"--episodes needs vla_export.data.task, which is not available here ({e})") from e
    task = load_task_data(checkpoint_path, opts.episodes, split="val", max_frames=opts.n_inputs)
    feeds = {k: np.asarray(v) for k, v in task.feeds.items() if k in spec.input_names}
    n = len(next(iter(feeds.values()))) if feeds else 0
    if n == 0:
        raise UserError(f"no validation frames in {opts.episodes}; add episodes or drop --episodes")
    for name in spec.input_names:
        if name not in feeds:
            if name not in spec.state.values():
                raise UserError(f"task data from {opts.episodes} lacks model input {name!r}; check the checkpoint's "
                                "preprocessing matches its architecture")
            feeds[name] = examples[name][np.arange(n) % opts.n_inputs]
    try:
        spec.check_feeds(feeds)
    except ValueError as e:
        raise UserError(f"task data from {opts.episodes} does not match the model's IO spec: {e}") from e
    return feeds, "episodes"


def alt_dim_values(spec: IOSpec) -> dict[str, int]:
    """A value other than `opt` for each dynamic non-batch dim (longer if allowed, else shorter)."""
    out = {}
    for name, d in spec.dims.items():
        if name == "batch" or not d.dynamic or d.min == d.max:
            continue
        step = max(1, (d.max - d.opt) // 3)
        out[name] = d.opt + step if d.opt + step <= d.max else max(d.min, d.opt - max(1, (d.opt - d.min) // 2))
    return out


@dataclass
class ParityCase:
    name: str
    batch: int
    feeds: list[dict[str, np.ndarray]]  # one feed dict per call
    rollout: bool = False  # feed the state outputs back into the next call
    dims: dict[str, int] = field(default_factory=dict)  # non-default sizes of dynamic dims this case uses
    # Whose PyTorch outputs serve as this case's reference (None: its own), and which of their rows match its rows.
    reference: str | None = None
    reference_rows: np.ndarray | None = None


def _batch_major(spec: IOSpec) -> bool:
    return all(t.shape and t.shape[0] == "batch" for t in (*spec.inputs, *spec.outputs))


def parity_cases(spec: IOSpec, feeds: dict[str, np.ndarray], opts: ExportOptions) -> list[ParityCase]:
    """The gate's cases: every batch size over the N inputs, another size of each dynamic non-batch dim, and for
    recurrent models a closed-loop rollout at every batch size.

    A smaller batch's case reuses the rows of the largest batch's PyTorch outputs as its reference (same inputs,
    same rollout streams; rows are independent): eager PyTorch's batch-1 and batch-4 outputs differ by <= ~6e-8
    (measured, small preset: max abs 6.1e-08, MAE 2.3e-08), far below the 1e-5 gate, and the reference costs half
    the forwards. Each ONNX case still runs at its own batch size."""
    n = len(next(iter(feeds.values())))
    shared = _batch_major(spec)
    largest = max(opts.batch_sizes)
    cases = []
    rows_of_largest = _batch_rows(n, largest)
    first_position = {int(r): i for i, r in reversed(list(enumerate(rows_of_largest)))}
    for b in opts.batch_sizes:
        rows = _batch_rows(n, b)
        calls = [_take(feeds, rows[i:i + b]) for i in range(0, len(rows), b)]
        case = ParityCase(f"batch {b}", b, calls)
        if shared and b != largest:
            case.reference = f"batch {largest}"
            case.reference_rows = np.array([first_position[int(r)] for r in rows])
        cases.append(case)
    alt = alt_dim_values(spec)
    if alt:
        b = min(2, spec.dims["batch"].max) if "batch" in spec.dims else 1
        label = ", ".join(f"{k}={v}" for k, v in alt.items())
        cases.append(ParityCase(f"batch {b}, {label}", b, [spec.example_inputs(batch=b, seed=opts.seed + 1, **alt)],
                                dims=alt))
    if spec.state and opts.rollout_steps > 0:
        # Stream j takes consecutive frames; each step's state comes from the previous step's outputs. Streams
        # 0..b-1 are the same at every batch size, so the largest batch's rollout holds every smaller one's.
        def rollout_name(b: int) -> str:
            return f"rollout batch {b} x {opts.rollout_steps} steps"

        for b in opts.batch_sizes:
            calls = []
            for k in range(opts.rollout_steps):
                rows = (np.arange(b) * opts.rollout_steps + k) % n
                calls.append({name: v for name, v in _take(feeds, rows).items() if name not in spec.state.values()})
            case = ParityCase(rollout_name(b), b, calls, rollout=True)
            if shared and b != largest:
                case.reference = rollout_name(largest)
                case.reference_rows = (np.arange(opts.rollout_steps)[:, None] * largest + np.arange(b)).reshape(-1)
            cases.append(case)
    return cases


def _batch_rows(n: int, b: int) -> np.ndarray:
    """Row of the N inputs in each position of the batch-`b` calls, concatenated (wrapping to fill the last)."""
    return np.concatenate([np.arange(i, i + b) % n for i in range(0, n, b)])


def reference_outputs(infer, spec: IOSpec, cases: list[ParityCase]) -> list[dict[str, np.ndarray]]:
    """Each case's reference: its own outputs, or the matching rows of the case it names as its reference."""
    own = {c.name: run_case(infer, spec, c) for c in cases if c.reference is None}
    return [own[c.name] if c.reference is None
            else {k: np.ascontiguousarray(v[c.reference_rows]) for k, v in own[c.reference].items()}
            for c in cases]


def run_case(infer, spec: IOSpec, case: ParityCase) -> dict[str, np.ndarray]:
    outs = []
    state = spec.initial_state(case.batch) if case.rollout else {}
    for feeds in case.feeds:
        out = infer(feeds | state)
        if case.rollout:
            state = {inp: out[o].astype(NUMPY_DTYPES[spec.tensor(inp).dtype]) for o, inp in spec.state.items()}
        outs.append(out)
    return concat_outputs(outs)


# -- export ------------------------------------------------------------------------------------------------------------
@dataclass
class Exported:
    ir_model: Any  # onnx_ir.Model
    exporter: str
    fallback_reason: str | None


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    # torch.onnx's ConversionError puts the real cause under "## Exception summary"
    m = re.search(r"## Exception summary\s+(.+?)\n", text)
    line = m.group(1) if m else (text.splitlines()[0] if text else type(e).__name__)
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    return f"{type(e).__name__}: {line[:limit]}"


def _error_chain(e: BaseException) -> str:
    parts = []
    while e is not None and len(parts) < 8:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


_OP_RE = re.compile(r"(?:op='|operator ')(aten(?:\.|::)\w+)")


def _unsupported_op(*errors: BaseException) -> str | None:
    for e in errors:
        m = _OP_RE.search(_error_chain(e))
        if m:
            return m.group(1).replace("::", ".")
    return None


def _module_of_op(model, kwargs: dict, op: str) -> str:
    """`path (package.Class)` of the innermost module whose forward calls `op` (from torch.export's node metadata)."""
    import torch

    root = f"{type(model).__module__}.{type(model).__qualname__}"
    try:
        ep = torch.export.export(model, (), kwargs=kwargs, strict=False)
    except Exception:  # the op may be what breaks tracing too; the root module is all we know then
        return f"the model ({root})"
    short = op.split(".", 1)[1]
    for node in ep.graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and target.split(".")[0] == short:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, cls = list(stack.values())[-1]
                cls = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
                return f"module {path or '<root>'} ({cls})"
    return f"the model ({root})"


def export_model(model, spec: IOSpec, opts: ExportOptions, arch: str, work_dir: Path) -> Exported:
    """torch -> onnx_ir model: dynamo first; TorchScript only if dynamo fails (or is asked for)."""
    import torch

    example = {k: torch.from_numpy(v) for k, v in spec.example_inputs(batch=min(2, _max_batch(spec)),
                                                                       seed=opts.seed).items()}
    dynamo_error = None
    if opts.exporter in ("auto", "dynamo"):
        try:
            # optimize=False: the optimizer folds a Transpose into every Linear weight, a new array per weight. Run
            # after the torch model is gone (optimize_onnx), each original is freed as its copy is made: peak ~1x
            # the weights instead of 2x.
            with export_patches(model), torch.no_grad(), _quiet_exporter():
                program = torch.onnx.export(
                    model, (), kwargs=example, dynamo=True, dynamic_shapes=spec.torch_dynamic_shapes(),
                    input_names=spec.input_names, output_names=spec.output_names, opset_version=opts.opset,
                    optimize=False, verbose=False)
            return Exported(program.model, "dynamo", None)
        except Exception as e:  # torch.export / ONNX translation raise many types
            dynamo_error = e
            if opts.exporter == "dynamo":
                raise _export_failure(model, example, arch, e, None) from e
    ts_dir = work_dir / "torchscript"
    ts_dir.mkdir()
    try:
        with export_patches(model), torch.no_grad(), _quiet_exporter():
            torch.onnx.export(
                model, (), str(ts_dir / ARTIFACT_NAME), kwargs=example, dynamo=False, input_names=spec.input_names,
                output_names=spec.output_names, opset_version=opts.opset, dynamic_axes=spec.dynamic_axes(),
                do_constant_folding=True, verbose=False)
    except OSError:
        raise
    except Exception as e:
        raise _export_failure(model, example, arch, dynamo_error, e) from e
    import onnx_ir as ir

    reason = _first_line(dynamo_error) if dynamo_error is not None else "TorchScript exporter requested"
    return Exported(ir.load(ts_dir / ARTIFACT_NAME), "torchscript", reason)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporters' chatter (deprecation notices, axis-renaming notes, missing torchvision ops): the
    outcome is checked and reported by this stage."""
    import logging
    import warnings

    import torch

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    # The TorchScript exporter prints the whole graph to stdout when it fails, log switch or not.
    jit_log = torch._C._jit_onnx_log
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        torch._C._jit_onnx_log = lambda *args: None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch._C._jit_onnx_log = jit_log
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_failure(model, example, arch: str, dynamo_error, ts_error) -> UserError:
    errors = [e for e in (dynamo_error, ts_error) if e is not None]
    op = _unsupported_op(*errors)
    which = " and ".join(n for n, e in (("dynamo (torch.onnx.export dynamo=True)", dynamo_error),
                                         ("TorchScript", ts_error)) if e is not None)
    if op:
        where = _module_of_op(model, example, op)
        return UserError(f"cannot export {arch} to ONNX: operator {op} in {where} has no ONNX lowering in the "
                         f"{which} exporter; rewrite that module with supported ops or register a custom "
                         "translation (torch.onnx.export custom_translation_table)")
    detail = "; ".join(f"{n}: {_first_line(e)}" for n, e in (("dynamo", dynamo_error), ("torchscript", ts_error))
                       if e is not None)
    return UserError(f"cannot export {arch} to ONNX ({detail})")


def _max_batch(spec: IOSpec) -> int:
    return spec.dims["batch"].max if "batch" in spec.dims else 1


def optimize_onnx(ir_model) -> None:
    """The optimization `torch.onnx.export(optimize=True)` runs (constant folding, fusions), in place."""
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis

        onnxscript_apis.optimize(ir_model)
    except (ImportError, AttributeError):  # torch moved its private shim: the public optimizer does the folding
        import onnxscript.optimizer

        onnxscript.optimizer.optimize_ir(ir_model)


def initializer_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def save_onnx(ir_model, path: Path, external: bool, console=None) -> None:
    """Write the model; with `external`, every initializer goes to `<name>.data` beside it, streamed."""
    import onnx_ir as ir

    if not external:
        ir.save(ir_model, path)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("saving {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(path.name + ".data", total=None)

        def callback(tensor, info):
            progress.update(task, total=info.total, completed=info.index + 1)

        ir.save(ir_model, path, external_data=path.name + ".data", callback=callback)


def dynamic_dims_report(ir_model, spec: IOSpec) -> dict[str, dict[str, Any]]:
    """Per spec dim: declared dynamic? exported dynamic? and why not."""
    graph_inputs = {v.name: v for v in ir_model.graph.inputs}
    report = {}
    for name, d in spec.dims.items():
        exported = None
        for t in spec.inputs:
            v = graph_inputs.get(t.name)
            if v is None or v.shape is None:
                continue
            for axis, dim_name in t.dim_names():
                if dim_name == name:
                    exported = not isinstance(v.shape[axis], int)
        entry: dict[str, Any] = {"declared_dynamic": d.dynamic, "dynamic": bool(exported), "min": d.min,
                                 "opt": d.opt, "max": d.max}
        if not d.dynamic:
            entry["reason"] = d.reason or "declared static by the IO spec"
        elif exported is False:
            entry["reason"] = "the exporter specialised it to the example size"
        report[name] = entry
    return report


def check_onnx(path: Path) -> None:
    import onnx

    try:
        # By path: works past protobuf's 2 GB limit and reads no external weights.
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise UserError(f"exported ONNX model fails onnx.checker: {str(e).splitlines()[0][:300]}") from e


# -- the stage ---------------------------------------------------------------------------------------------------------
def _up_to_date(out_dir: Path, ckpt_path: Path, requested: dict[str, Any]) -> dict[str, Any] | None:
    from vla_export.checkpoint import checkpoint_sha256

    artifact = out_dir / ARTIFACT_NAME
    if not mf.manifest_path(artifact).exists() or not artifact.exists():
        return None
    try:
        old = mf.read_manifest(artifact)
    except UserError:
        return None
    if old.get("status") != "passed" or old.get("stage") != "export":
        return None
    if {k: old.get("settings", {}).get(k) for k in REQUESTED_KEYS} != requested:
        return None
    if any(not (out_dir / name).exists() or (out_dir / name).stat().st_size != size
           for name, size in old.get("files", {}).items()):
        return None
    if old.get("source", {}).get("checkpoint_sha256") != checkpoint_sha256(ckpt_path):
        return None
    return old


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                      opts: ExportOptions | None = None) -> ExportResult:
    """Export, check, gate and publish `out_dir/model.onnx` (+ `.onnx.data`) and its manifest."""
    opts = opts or ExportOptions()
    if opts.opset < MIN_OPSET:
        raise UserError(f"--opset {opts.opset} is too old: use {MIN_OPSET} or newer")
    if not opts.batch_sizes or min(opts.batch_sizes) < 1 or opts.n_inputs < 1:
        raise UserError("--batch-sizes and --n-inputs must be positive")
    console = _console(opts.quiet)
    ckpt_path = Path(checkpoint).resolve()
    out_dir = mf.check_writable_dir(out_dir)
    requested = opts.requested()
    artifact = out_dir / ARTIFACT_NAME
    if not opts.force and ckpt_path.exists():
        old = _up_to_date(out_dir, ckpt_path, requested)
        if old is not None:
            console.print(f"{artifact} is up to date (same checkpoint sha256 and settings); --force re-exports",
                          soft_wrap=True)
            return ExportResult(artifact, old, up_to_date=True)

    phases = Phases(console)
    threads = opts.threads or auto_threads()
    with mf.measured() as total, torch_threads(threads):
        result = _run(ckpt_path, out_dir, opts, requested, console, phases, threads)
    result.manifest["timing"] = {"wall_s": total["wall_s"], "peak_rss_bytes": total["peak_rss_bytes"],
                                 "phases": phases.timing, "threads": threads}
    mf.write_manifest(result.artifact, result.manifest)
    console.print(f"[bold]wrote[/] {result.artifact} ({result.manifest['total_bytes'] / 2**20:.1f} MiB in "
                  f"{len(result.manifest['files'])} file(s)) in {total['wall_s']:.1f} s, peak RSS "
                  f"{total['peak_rss_bytes'] / 2**30:.2f} GiB", soft_wrap=True)
    return result


def _run(ckpt_path: Path, out_dir: Path, opts: ExportOptions, requested: dict, console, phases: Phases,
         threads: int) -> ExportResult:
    from vla_export.checkpoint import load_checkpoint
    from vla_export.runtime import OrtRunner, TorchRunner

    with phases("load", f"loading checkpoint {ckpt_path.name}"):
        ckpt = load_checkpoint(ckpt_path, trust=opts.trust_checkpoint, arch=opts.arch, preset=opts.preset,
                               rename=opts.rename or None)
    spec, arch, sha = ckpt.spec, ckpt.arch, ckpt.sha256
    model = ckpt.model
    ckpt.model = None

    with phases("reference", "PyTorch reference outputs"):
        feeds, input_source = parity_inputs(spec, ckpt_path, opts)
        cases = parity_cases(spec, feeds, opts)
        torch_runner = TorchRunner(model, spec, name="pytorch-fp32").activate()
        references = reference_outputs(torch_runner.infer, spec, cases)
        torch_runner.deactivate()
        del torch_runner
    weights = weight_tensors(model)

    with mf.staging_dir(out_dir) as stage:
        staged = stage / ARTIFACT_NAME
        with phases("export", "exporting to ONNX"):
            exported = export_model(model, spec, opts, arch, stage)
        # From here the ONNX graph is the only owner of the weights.
        del model
        release_memory()
        if exported.exporter == "dynamo":
            with phases("optimize", "optimizing the ONNX graph (constant folding, fusions)"):
                optimize_onnx(exported.ir_model)
                release_memory()
        init_bytes = initializer_bytes(exported.ir_model)
        # A single protobuf file cannot pass 2 GB, whatever the threshold says.
        external = init_bytes > min(opts.external_data_threshold, PROTOBUF_SAFE_BYTES)
        dyn = dynamic_dims_report(exported.ir_model, spec)
        with phases("save", f"saving {'with external data' if external else 'single file'}", spinner=False):
            save_onnx(exported.ir_model, staged, external, console)
        exporter_used, fallback_reason = exported.exporter, exported.fallback_reason
        release_weights(exported.ir_model, weights)
        del exported, weights
        release_memory()
        shutil.rmtree(stage / "torchscript", ignore_errors=True)

        with phases("check", "onnx.checker (full check, by path)"):
            check_onnx(staged)

        with phases("ort_load", "loading in ONNX Runtime (CPU)"):
            ort_runner = OrtRunner(staged, spec, name="onnxruntime-cpu", threads=threads).activate()
        with phases("parity", "parity against PyTorch"):
            rows, parity = [], {"input_source": input_source, "tol": opts.tol, "cases": {}}
            for case, ref in zip(cases, references, strict=True):
                static = [d for d in case.dims if not dyn.get(d, {}).get("dynamic")]
                if static:
                    parity["cases"][case.name] = {"skipped": f"{', '.join(static)} exported static: "
                                                  + "; ".join(dyn[d].get("reason", "") for d in static if d in dyn)}
                    continue
                try:
                    metrics = compare_outputs(ref, run_case(ort_runner.infer, spec, case))
                except Exception as e:  # ORT rejecting a shape the spec allows is a failed export, not a crash
                    metrics = {n: {"mae": float("inf"), "max_abs": float("inf"), "rel_l2": float("inf"),
                                   "finite": False, "error": _first_line(e)} for n in spec.output_names}
                parity["cases"][case.name] = {"batch": case.batch, "calls": len(case.feeds),
                                              "rollout": case.rollout, "dims": case.dims,
                                              "reference": case.reference or case.name, "outputs": metrics}
                for out_name, m in metrics.items():
                    ok = m["finite"] and m["mae"] <= opts.tol
                    rows.append((case.name, out_name, m, ok))
            ort_runner.deactivate()
        failures = [r for r in rows if not r[3]]
        parity["max_mae"] = max(r[2]["mae"] for r in rows)
        parity["max_abs"] = max(r[2]["max_abs"] for r in rows)
        parity["max_rel_l2"] = max(r[2]["rel_l2"] for r in rows)
        parity["passed"] = not failures
        print_parity_table(console, rows, opts.tol, force=bool(failures))

        manifest_fields = dict(
            backend="onnxruntime", precision="fp32", variant="onnx-fp32", io_spec=spec.to_json(),
            source={"checkpoint": str(ckpt_path), "checkpoint_sha256": sha, "artifact": None,
                    "artifact_sha256": None, "architecture": arch},
            settings={**requested, "exporter_used": exporter_used, "exporter_fallback_reason": fallback_reason,
                      "dynamic_dims": dyn, "external_data": external, "initializer_bytes": init_bytes,
                      "optimize": exporter_used == "dynamo", "reference": "PyTorch eager fp32: each case's own inputs, computed at the "
                      "largest batch and shared by the smaller batches' cases (rows are independent)"},
            metrics={"parity": parity},
        )
        if failures:
            case, out_name, m, _ = failures[0]
            why = m["error"] if "error" in m else f"MAE {m['mae']:.3g} > tol {opts.tol:g}"
            failure = (f"parity gate failed: {out_name} {why} ({case}; {len(failures)} of {len(rows)} checks "
                       "failed)")
            report = mf.new_manifest("export", staged, **manifest_fields, status="failed", failure=failure)
            mf.write_manifest(out_dir / FAILED_MANIFEST.removesuffix(mf.MANIFEST_SUFFIX), report)
            raise GateFailed(f"{failure}; nothing published, report in {out_dir / FAILED_MANIFEST}")

        files = mf.artifact_files(staged)
        # An older manifest must not describe the new files, nor an older .onnx.data linger beside a single file.
        final = out_dir / ARTIFACT_NAME
        mf.manifest_path(final).unlink(missing_ok=True)
        mf.publish(files, out_dir)
        if not external:
            (out_dir / (ARTIFACT_NAME + ".data")).unlink(missing_ok=True)
        (out_dir / FAILED_MANIFEST).unlink(missing_ok=True)
    m = mf.new_manifest("export", final, **manifest_fields, status="passed")
    return ExportResult(final, m)


def print_parity_table(console, rows, tol: float, force: bool = False) -> None:
    from rich.table import Table

    table = Table(title=f"ONNX Runtime (CPU) vs PyTorch fp32, gate MAE <= {tol:g}")
    for col in ("case", "output", "MAE", "max abs", "rel L2", "gate"):
        table.add_column(col, justify="right" if col not in ("case", "output") else "left")
    for case, out_name, m, ok in rows:
        table.add_row(case, out_name, f"{m['mae']:.3g}", f"{m['max_abs']:.3g}", f"{m['rel_l2']:.3g}",
                      "[green]pass[/]" if ok else "[red]FAIL[/]")
    if force and console.quiet:
        from rich.console import Console

        Console(stderr=True).print(table)
    else:
        console.print(table)
