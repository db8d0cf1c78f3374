"""TensorRT engines: build `model.<precision>.engine` from an ONNX artifact on the target device, and run it.

Engines do not move between TensorRT versions or GPU architectures, so the ONNX is what ships and the engine is
built where it runs. One code path serves TensorRT 8.6 (Jetson Orin, JetPack 6.0) through 11.x: features are
probed by name (`getattr(trt.BuilderFlag, "FP16", None)`), never by enum integer (they moved between majors).

Everything that can be decided without TensorRT is a pure function, testable on any machine:
`inspect_onnx` (what kind of ONNX this is), `plan_build` (TensorRT features x precision x ONNX kind -> flags or a refusal),
`check_engine_compatible` (sidecar vs running TensorRT/GPU), `summarize_engine_layers` (inspector JSON of 10.x or
11.x -> per-layer precision). The build is a chain of small loaders in Polygraphy's spirit:
`network_from_onnx_path` -> `create_config` -> `engine_bytes_from_network` -> saved by `build_engine`.

`tensorrt` is imported lazily: `import vla_export.engines.tensorrt` works on a machine without it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_export.errors import BackendUnavailable, UserError
from vla_export.io_spec import IOSpec
from vla_export.manifest import (
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
from vla_export.runtime.tensorrt import (  # noqa: F401 - re-exported: the builder and its callers use one copy
    INSTALL_HINT,
    TRT2TORCH_NAMES,
    CapturingLogger,
    TensorRTRunner,
    check_engine_compatible,
    gpu_info,
    import_tensorrt,
    trt_to_torch_dtype,
    trt_version_tuple,
)

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_BATCH_PROFILE = (1, 1, 8)
DEFAULT_WORKSPACE_GB = 4.0
TIMING_CACHE_NAME = "timing.cache"


# ORT `quantize_dynamic` ops: TensorRT parses none of them (onnx-tensorrt operators.md).
DYNAMIC_QUANT_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul",
                               "QLinearConv"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})




# -- what kind of ONNX is this (no TensorRT, no weights loaded) -------------------------------------------------------
@dataclass(frozen=True)
class OnnxInfo:
    path: str
    op_types: frozenset[str]
    float16_elements: int  # initializer elements stored as float16
    float32_elements: int
    opset: int | None = None
    # Q/DQ zero points TensorRT rejects: uint8 or non-zero (TensorRT quantization is symmetric int8 only)
    asymmetric_zero_points: tuple[str, ...] = ()

    @property
    def dynamic_quant_ops(self) -> list[str]:
        return sorted(self.op_types & DYNAMIC_QUANT_OPS)

    @property
    def has_qdq(self) -> bool:
        return bool(self.op_types & QDQ_OPS)

    @property
    def is_fp16(self) -> bool:
        """Weights mostly float16: a half-precision export (`model.fp16.onnx`)."""
        return self.float16_elements > self.float32_elements

    @property
    def kind(self) -> str:
        if self.dynamic_quant_ops:
            return "int8-dynamic"
        if self.has_qdq:
            return "int8-qdq"
        return "fp16" if self.is_fp16 else "fp32"


def inspect_onnx(path: str | os.PathLike) -> OnnxInfo:
    """Op types and weight dtypes of an ONNX file, read without its external data (cheap on the 7 GB model)."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise UserError(f"ONNX file {path} does not exist; create it with `vla-export export` (model.onnx) or "
                        "`vla-export quantize` (model.fp16.onnx, model.int8-static.onnx), or check the path")
    if path.is_dir() or path.suffix != ".onnx":
        raise UserError(f"{path} is not an .onnx file; pass an ONNX artifact from `vla-export export`/`quantize`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError/ValueError variants for non-ONNX bytes
        raise UserError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:160] if str(e) else e!r})") from e
    ops: set[str] = set()
    f16 = f32 = 0
    zero_points: set[str] = set()
    initializers = {}

    def walk(graph):
        nonlocal f16, f32
        for init in graph.initializer:
            initializers[init.name] = init
            n = int(np.prod(init.dims)) if len(init.dims) else 1
            if init.data_type == onnx.TensorProto.FLOAT16:
                f16 += n
            elif init.data_type == onnx.TensorProto.FLOAT:
                f32 += n
        for node in graph.node:
            ops.add(node.op_type)
            if node.op_type in QDQ_OPS and len(node.input) > 2 and node.input[2]:
                zero_points.add(node.input[2])
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        ops.update(node.op_type for node in fn.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    asymmetric = sorted(name for name in zero_points if name in initializers
                        and _nonsymmetric_zero_point(initializers[name]))
    return OnnxInfo(path=str(path), op_types=frozenset(ops), float16_elements=f16, float32_elements=f32, opset=opset,
                    asymmetric_zero_points=tuple(asymmetric))


def _nonsymmetric_zero_point(init) -> bool:
    import onnx
    from onnx import numpy_helper

    if init.data_type == onnx.TensorProto.UINT8:
        return True
    if init.data_location == onnx.TensorProto.EXTERNAL:  # not loaded; the dtype check above is all we can do
        return False
    return bool(np.any(numpy_helper.to_array(init) != 0))


def check_source_for_precision(info: OnnxInfo, precision: str) -> None:
    """Refusals that need no TensorRT (exit 2 before any availability check): the wrong ONNX for the precision."""
    name = Path(info.path).name
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if info.dynamic_quant_ops:
        raise UserError(f"{name} is an onnxruntime quantize_dynamic model ({', '.join(info.dynamic_quant_ops)}), which "
                        "TensorRT cannot parse; for --precision int8 pass the static Q/DQ model model.int8-static.onnx "
                        "(`vla-export quantize model.onnx --mode static`)")
    if precision == "int8" and not info.has_qdq:
        raise UserError(f"{name} has no QuantizeLinear/DequantizeLinear nodes; TensorRT int8 here is explicit "
                        "quantization only: pass model.int8-static.onnx (`vla-export quantize model.onnx --mode static`)")
    if precision == "int8" and info.asymmetric_zero_points:
        raise UserError(f"{name} has asymmetric Q/DQ (uint8 or non-zero zero points, e.g. "
                        f"{info.asymmetric_zero_points[0]}); TensorRT takes symmetric int8 only: re-quantize with "
                        "`vla-export quantize model.onnx --mode static` (QInt8, symmetric)")
    if precision != "int8" and info.has_qdq:
        raise UserError(f"{name} is a Q/DQ int8 model; build it with --precision int8, or pass model.onnx "
                        f"(or model.fp16.onnx) for --precision {precision}")
    if precision == "fp32" and info.is_fp16:
        raise UserError(f"{name} holds float16 weights; --precision fp32 needs the fp32 export model.onnx")


# -- precision -> builder/network flags, per TensorRT version (pure) -------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    trt_version: str
    precision: str
    source_kind: str  # fp32 | fp16 | int8-qdq: the ONNX this plan builds from
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag member names
    builder_flags: tuple[str, ...]  # BuilderFlag member names to set
    clear_flags: tuple[str, ...] = ()  # BuilderFlag member names to clear
    strongly_typed: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class NeedsFp16Onnx(UserError):
    """TensorRT 11 cannot lower an fp32 ONNX to fp16: the fp16 export is required."""


MIN_TRT_VERSION = (8, 6)  # execute_async_v3 / set_input_shape / named I/O tensors; JetPack 6.0's TensorRT


@dataclass(frozen=True)
class TrtFeatures:
    """What one TensorRT offers, by name: its version and the members of the two flag enums the plan uses.

    Enum integers moved between majors (STRONGLY_TYPED 1 -> 0), and members come and go (EXPLICIT_BATCH and the
    precision BuilderFlags are gone in 11), so the plan asks "is there a member called X", never "is the version >= N".
    `from_module` reads a live `tensorrt`; tests use the member lists recorded from the real bindings wheels of each
    version (`scripts/check_trt_api.py --dump-enums`)."""

    version: str
    network_flags: frozenset[str]  # NetworkDefinitionCreationFlag member names
    builder_flags: frozenset[str]  # BuilderFlag member names

    @classmethod
    def from_module(cls, trt) -> TrtFeatures:
        return cls(str(trt.__version__), frozenset(trt.NetworkDefinitionCreationFlag.__members__),
                   frozenset(trt.BuilderFlag.__members__))

    @property
    def strongly_typed(self) -> bool:
        return "STRONGLY_TYPED" in self.network_flags


def plan_build(features: TrtFeatures, precision: str, onnx_info: OnnxInfo) -> BuildPlan:
    """How to build `precision` from this ONNX on this TensorRT, or a UserError saying which ONNX to pass instead.

    Decided by the enum members this TensorRT has (`TrtFeatures`), which gives, per line:
    - 8.6 (no STRONGLY_TYPED): networks are EXPLICIT_BATCH; precision comes from flags (FP16; INT8+FP16 for a Q/DQ
      network: "int8 is not configured in the builder" otherwise).
    - 10.x (STRONGLY_TYPED and the FP16 flag): Q/DQ and fp16 ONNX build strongly typed, with no precision flags
      (flags are rejected there); fp16 from an fp32 ONNX builds weakly typed + BuilderFlag.FP16, letting TensorRT
      pick fp16 kernels.
    - 11.x (no FP16 flag, always strongly typed): the ONNX dtypes are the precision, so fp16 needs the fp16 ONNX.
    fp32 clears TF32 (on by default for fp32 tensors) so an fp32 engine computes in fp32.
    """
    check_source_for_precision(onnx_info, precision)
    version = features.version
    if trt_version_tuple(version)[:2] < MIN_TRT_VERSION:
        raise UserError(f"TensorRT {version} is too old: vla-export needs TensorRT "
                        f"{'.'.join(map(str, MIN_TRT_VERSION))} or newer (execute_async_v3, named I/O tensors)")
    kind = onnx_info.kind
    flags = features.builder_flags
    clear_tf32 = ("TF32",) if "TF32" in flags else ()
    if not features.strongly_typed:
        net = ("EXPLICIT_BATCH",) if "EXPLICIT_BATCH" in features.network_flags else ()
        wanted = {"int8": ("INT8", "FP16"), "fp16": ("FP16",), "fp32": ()}[precision]
        missing = [f for f in wanted if f not in flags]
        if missing:
            raise UserError(f"TensorRT {version} has neither strongly typed networks nor BuilderFlag."
                            f"{'/'.join(missing)}: it cannot build {precision}; report this with the version number")
        if precision == "int8":
            return BuildPlan(version, precision, kind, net, wanted,
                             notes=("weakly typed Q/DQ network: INT8+FP16 flags (no STRONGLY_TYPED before 10.0)",))
        if precision == "fp16":
            return BuildPlan(version, precision, kind, net, wanted,
                             notes=("weakly typed: FP16 flag lets TensorRT choose fp16 kernels per layer",))
        return BuildPlan(version, precision, kind, net, (), clear_flags=clear_tf32)
    strong = ("STRONGLY_TYPED",)
    if precision == "int8":
        return BuildPlan(version, precision, kind, strong, (), strongly_typed=True,
                         notes=("explicit quantization: Q/DQ nodes set int8; strongly typed, no precision flags",))
    if precision == "fp16":
        if kind == "fp16":
            return BuildPlan(version, precision, kind, strong, (), strongly_typed=True,
                             notes=("fp16 ONNX built strongly typed: the ONNX dtypes are the precision",))
        if "FP16" not in flags:
            name = Path(onnx_info.path).name
            raise NeedsFp16Onnx(f"TensorRT {version} has no FP16 builder flag (networks are strongly typed), so "
                                f"{name} (fp32) would build an fp32 engine; pass the fp16 export "
                                f"{fp16_sibling(Path(onnx_info.path)).name} (`vla-export quantize {name} --mode fp16`)")
        return BuildPlan(version, precision, kind, (), ("FP16",),
                         notes=("weakly typed fp32 ONNX + BuilderFlag.FP16 (deprecated from 10.12, removed in 11)",))
    return BuildPlan(version, precision, kind, strong, (), clear_flags=clear_tf32, strongly_typed=True,
                     notes=("fp32 ONNX strongly typed; TF32 cleared",))


def fp16_sibling(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + ".fp16.onnx")


def resolve_plan(features: TrtFeatures, precision: str, onnx_path: Path,
                 info: OnnxInfo) -> tuple[Path, OnnxInfo, BuildPlan]:
    """`plan_build`, except that where there is no FP16 flag (11.x) an fp16 build given `model.onnx` uses
    `model.fp16.onnx` beside it."""
    try:
        return onnx_path, info, plan_build(features, precision, info)
    except NeedsFp16Onnx:
        sibling = fp16_sibling(onnx_path)
        if not sibling.exists():
            raise
        sib_info = inspect_onnx(sibling)
        if sib_info.kind != "fp16":
            raise
        return sibling, sib_info, plan_build(features, precision, sib_info)


# -- optimization profile from the IO spec ---------------------------------------------------------------------------
def parse_range(text: str | None, option: str) -> tuple[int, int, int] | None:
    """`"1,1,8"` -> (1, 1, 8); a single value N -> (N, N, N)."""
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"{option} {text!r}: expected MIN,OPT,MAX integers, e.g. {option} 1,1,8") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not (1 <= vals[0] <= vals[1] <= vals[2]):
        raise UserError(f"{option} {text!r}: expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, e.g. {option} 1,1,8")
    return vals  # type: ignore[return-value]


def profile_shapes(spec: IOSpec, batch: tuple[int, int, int] | None = None,
                   dims: dict[str, tuple[int, int, int]] | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape per input: batch defaults to 1/1/8, other dynamic dims to the spec's range."""
    overrides = dict(dims or {})
    if batch is not None or ("batch" in spec.dims and spec.dims["batch"].dynamic):
        overrides.setdefault("batch", batch or DEFAULT_BATCH_PROFILE)
    unknown = sorted(set(overrides) - set(spec.dims))
    if unknown:
        raise UserError(f"unknown dims {unknown} in the profile; this model's dims are {sorted(spec.dims)}")
    fixed = [n for n in overrides if not spec.dims[n].dynamic and len(set(overrides[n])) > 1]
    if fixed:
        raise UserError(f"dims {fixed} are fixed in this model ({spec.dims[fixed[0]].reason or 'not dynamic'}); "
                        "drop their range options")
    try:
        return spec.profile_shapes(**overrides)
    except ValueError as e:
        raise UserError(f"bad optimization profile: {e}") from e


# -- engine inspector JSON (10.x and 11.x formats) -------------------------------------------------------------------
_PRECISION_RE = re.compile(r"\b(FP32|FP16|BF16|FP8|FP4|INT8|INT4|INT32|INT64|UINT8|BOOL|Float|Half|Int8|Int32|Int64|"
                           r"Bool|UInt8)\b", re.IGNORECASE)
_CANON = {"float": "FP32", "half": "FP16"}


def _tensor_precision(tensor: Any) -> str | None:
    if not isinstance(tensor, dict):
        return None
    for key in ("DataType", "Datatype", "Data Type", "Format/Datatype", "Precision", "Type"):
        value = tensor.get(key)
        if isinstance(value, str):
            m = _PRECISION_RE.search(value)
            if m:
                word = m.group(1)
                return _CANON.get(word.lower(), word.upper())
    return None


def summarize_engine_layers(info: Any) -> dict[str, Any]:
    """Layer count, each layer's name/type/output precision, and a precision histogram, from the inspector JSON.

    10.x: `{"Layers": [ {Name, LayerType, Inputs: [{"Format/Datatype": "Row major linear FP16 format"}], Outputs}
    ], "Bindings": [...]}`; 11.x splits Format/Datatype and has "I/O Tensors" instead of "Bindings"; without
    DETAILED verbosity layers are bare names. Unknown shapes degrade to `precision: null`, never an exception."""
    if isinstance(info, str):
        try:
            info = json.loads(info)
        except json.JSONDecodeError:
            return {"layer_count": None, "layers": [], "precisions": {}, "io_tensors": []}
    layers_raw = info.get("Layers", []) if isinstance(info, dict) else info if isinstance(info, list) else []
    layers = []
    for layer in layers_raw:
        if isinstance(layer, str):
            layers.append({"name": layer, "type": None, "precision": None})
            continue
        if not isinstance(layer, dict):
            continue
        outs = layer.get("Outputs") or []
        ins = layer.get("Inputs") or []
        precision = next((p for p in map(_tensor_precision, [*outs, *ins]) if p), None) or _tensor_precision(layer)
        layers.append({"name": layer.get("Name"), "type": layer.get("LayerType") or layer.get("Layer Type"),
                       "precision": precision})
    io = []
    if isinstance(info, dict):
        for item in info.get("I/O Tensors") or info.get("Bindings") or []:
            io.append(item if isinstance(item, (str, dict)) else str(item))
    return {"layer_count": len(layers), "layers": layers,
            "precisions": dict(Counter(lay["precision"] or "unknown" for lay in layers)), "io_tensors": io}


# -- the build chain (needs TensorRT) --------------------------------------------------------------------------------



def _flag(enum_type, name: str, trt_version: str):
    member = getattr(enum_type, name, None)
    if member is None:
        raise UserError(f"TensorRT {trt_version} has no {enum_type.__name__}.{name}; the build plan does not fit this "
                        "version: report this with the version number")
    return member


def network_from_onnx_path(trt, builder, logger, onnx_path: Path, plan: BuildPlan):
    """Parse the ONNX by absolute path, so TensorRT finds `model.onnx.data` beside it; errors name their nodes."""
    net_flags = 0
    for name in plan.network_flags:
        net_flags |= 1 << int(_flag(trt.NetworkDefinitionCreationFlag, name, plan.trt_version))
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(Path(onnx_path).resolve()))
    if not ok or parser.num_errors:
        errs = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = e.node_name() if hasattr(e, "node_name") else e.node()
            op = e.node_operator() if hasattr(e, "node_operator") else "?"
            errs.append(f"[{e.code()}] node {node!r} ({op}): {e.desc()}")
        detail = "; ".join(errs) or "; ".join(logger.errors()) or "no parser errors reported"
        raise UserError(f"TensorRT cannot parse {Path(onnx_path).name}: {detail[:600]}")
    return network, parser


def create_config(trt, builder, network, plan: BuildPlan, profiles: dict[str, tuple[tuple[int, ...], ...]],
                  workspace_gb: float, timing_cache_bytes: bytes | None):
    """Builder config: workspace, DETAILED profiling verbosity, precision flags, one optimization profile, cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in plan.builder_flags:
        config.set_flag(_flag(trt.BuilderFlag, name, plan.trt_version))
    for name in plan.clear_flags:
        member = getattr(trt.BuilderFlag, name, None)
        if member is not None:
            config.clear_flag(member)
    network_inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    missing = sorted(set(network_inputs) - set(profiles))
    if missing:
        raise UserError(f"the ONNX has inputs {missing} that its IO spec does not declare; re-export the model")
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        if name in network_inputs:  # an input the exporter folded away (unused) has no binding
            profile.set_shape(name, min=lo, opt=opt, max=hi)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache_bytes is not None:
        try:
            cache = config.create_timing_cache(timing_cache_bytes)
        except Exception:  # a cache from another GPU/version: start afresh rather than fail the build
            cache = None
        # The cache header records the GPU; a foreign cache is refused (False): fall back to an empty one.
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
    return config, cache


def engine_bytes_from_network(builder, network, config, logger) -> bytes:
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        reason = "; ".join(logger.errors())[:600] or "TensorRT logged no error"
        raise UserError(f"TensorRT failed to build the engine: {reason}")
    return bytes(plan)


def inspect_engine(trt, logger, engine_bytes: bytes) -> dict[str, Any]:
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        return {"layer_count": None, "layers": [], "precisions": {}, "io_tensors": [],
                "error": "; ".join(logger.errors())[:300]}
    inspector = engine.create_engine_inspector()
    try:
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception as e:  # the inspector's output is informative only
        return {"layer_count": getattr(engine, "num_layers", None), "layers": [], "precisions": {},
                "io_tensors": [], "error": str(e)[:300]}
    summary = summarize_engine_layers(info)
    if summary["layer_count"] in (None, 0) and hasattr(engine, "num_layers"):
        summary["layer_count"] = int(engine.num_layers)
    return summary





def engine_path_for(out_dir: Path, precision: str) -> Path:
    return Path(out_dir) / f"model.{precision}.engine"


@dataclass
class EngineBuildRequest:
    onnx_path: Path
    precision: str
    out_dir: Path
    batch: tuple[int, int, int] | None = None
    dims: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    timing_cache: Path | None = None  # default: <out_dir>/timing.cache


def validate_request(req: EngineBuildRequest) -> tuple[OnnxInfo, dict[str, Any], IOSpec]:
    """Every check that needs no TensorRT: file, ONNX kind vs precision, manifest, profile. Raises UserError."""
    info = inspect_onnx(req.onnx_path)
    check_source_for_precision(info, req.precision)
    source_manifest = read_manifest(req.onnx_path)
    if "io_spec" not in source_manifest:
        raise UserError(f"{req.onnx_path.name}.json has no io_spec; re-export the model with vla-export")
    spec = IOSpec.from_json(source_manifest["io_spec"])
    profile_shapes(spec, req.batch, req.dims)
    if req.workspace_gb <= 0:
        raise UserError(f"--workspace-gb {req.workspace_gb}: must be positive")
    return info, source_manifest, spec


def engine_sidecar(engine_file: Path, source_manifest: dict[str, Any], onnx_path: Path, plan: BuildPlan,
                   profiles: dict[str, tuple[tuple[int, ...], ...]], settings: dict[str, Any], trt_version: str,
                   gpu: dict[str, str], timing: dict[str, Any], layers: dict[str, Any]) -> dict[str, Any]:
    """The `.engine.json` sidecar: what `TensorRTRunner`/`open_runner` and `check_engine_compatible` read back."""
    src = source_manifest.get("source") or {}
    return new_manifest(
        "trt", engine_file,
        backend="tensorrt", precision=plan.precision, variant=f"trt-{plan.precision}", device="cuda",
        io_spec=source_manifest["io_spec"],
        source={"checkpoint": src.get("checkpoint"), "checkpoint_sha256": src.get("checkpoint_sha256"),
                "artifact": str(Path(onnx_path).resolve()),
                "artifact_sha256": sha256_files(artifact_files(onnx_path))},
        settings={"precision": plan.precision,
                  "profiles": {k: [list(s) for s in v] for k, v in profiles.items()},
                  "build_plan": plan.to_json(), "profiling_verbosity": "DETAILED", **settings},
        tensorrt={"version": trt_version, "gpu": dict(gpu), "version_compatible": False,
                  "hardware_compatibility_level": None},
        timing=dict(timing),
        engine={"bytes": Path(engine_file).stat().st_size, **layers},
    )


def build_engine(req: EngineBuildRequest, console=None) -> tuple[Path, dict[str, Any]]:
    """Build, inspect and publish `model.<precision>.engine` + its sidecar.

    Order: input checks (UserError, exit 2) before availability (BackendUnavailable, exit 4), so a wrong file is
    reported as wrong on every machine, also one that cannot build engines."""
    info, source_manifest, spec = validate_request(req)
    trt = import_tensorrt()
    trt_version = str(trt.__version__)
    onnx_path, info, plan = resolve_plan(TrtFeatures.from_module(trt), req.precision, Path(req.onnx_path), info)
    if onnx_path != Path(req.onnx_path):
        source_manifest = read_manifest(onnx_path)
        if console is not None:
            console.print(f"TensorRT {trt_version} has no FP16 flag: building from {onnx_path.name} (strongly typed)")
    profiles = profile_shapes(spec, req.batch, req.dims)
    out_dir = Path(req.out_dir)
    cache_path = Path(req.timing_cache) if req.timing_cache else out_dir / TIMING_CACHE_NAME
    cache_in = cache_path.read_bytes() if cache_path.exists() else b""
    engine_name = engine_path_for(out_dir, req.precision).name

    logger = CapturingLogger(trt)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    with staging_dir(out_dir) as tmp:
        with measured() as timing:
            try:
                builder = trt.Builder(logger)
            except TypeError as e:  # "factory function returned nullptr": CUDA could not initialise
                raise BackendUnavailable(f"TensorRT {trt_version} cannot initialise CUDA ({e}); {INSTALL_HINT}") from e
            t0 = time.perf_counter()
            network, _parser = network_from_onnx_path(trt, builder, logger, onnx_path, plan)
            parse_s = time.perf_counter() - t0
            config, _cache = create_config(trt, builder, network, plan, profiles, req.workspace_gb, cache_in)
            t1 = time.perf_counter()
            engine_bytes = engine_bytes_from_network(builder, network, config, logger)
            build_s = time.perf_counter() - t1
        staged = tmp / engine_name
        staged.write_bytes(engine_bytes)
        layers = inspect_engine(trt, logger, engine_bytes)
        new_cache = bytes(config.get_timing_cache().serialize())
        manifest = engine_sidecar(
            staged, source_manifest, onnx_path, plan, profiles,
            settings={"workspace_gb": req.workspace_gb, "timing_cache": str(cache_path),
                      "timing_cache_reused": bool(cache_in)},
            trt_version=trt_version, gpu=gpu_info(),
            timing={**timing, "parse_s": round(parse_s, 3), "build_s": round(build_s, 3)}, layers=layers)
        write_manifest(staged, manifest)
        final = publish([staged, manifest_path(staged)], out_dir)[0]
    if new_cache:
        tmp_cache = cache_path.with_name(f".{cache_path.name}.tmp")
        tmp_cache.write_bytes(new_cache)
        os.replace(tmp_cache, cache_path)
    return final, manifest


