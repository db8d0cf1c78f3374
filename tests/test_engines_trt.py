"""TensorRT stage: everything decidable without TensorRT, the CLI's refusals, and (marked) a real build + run.

CI has neither TensorRT nor a GPU: the pure functions (ONNX kind, build plan per TensorRT version, profile shapes,
sidecar, compatibility, inspector JSON) are tested directly; the `tensorrt`-marked tests build a real engine and
are skipped here by conftest with the reason."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from vla_export.cli import main
from vla_export.engines import tensorrt as trtmod
from vla_export.engines.tensorrt import (
    BuildPlan,
    TrtFeatures,
    check_engine_compatible,
    engine_sidecar,
    inspect_onnx,
    parse_range,
    plan_build,
    profile_shapes,
    resolve_plan,
    summarize_engine_layers,
)
from vla_export.errors import EXIT_UNAVAILABLE, EXIT_USER_ERROR, UserError
from vla_export.io_spec import Dim, IOSpec, TensorSpec
from vla_export.manifest import new_manifest, read_manifest, write_manifest
from vla_export.models.kosmos2_clip import io_spec, resolve_config

# Enum members of the real bindings of each version (scripts/check_trt_api.py --dump-enums), not written by hand.
ENUMS = json.loads((Path(__file__).parent / "data" / "trt_enum_members.json").read_text())
RECORDED = {"8.6": "8.6.1", "10.3": "10.3.0", "10.16": "10.16.1.11", "11": "11.4.0.106"}
TRT_VERSIONS = {short: TrtFeatures(v, frozenset(ENUMS[v]["NetworkDefinitionCreationFlag"]),
                                   frozenset(ENUMS[v]["BuilderFlag"])) for short, v in RECORDED.items()}


# -- small real ONNX models -----------------------------------------------------------------------------------------
def _spec() -> IOSpec:
    return IOSpec(inputs=[TensorSpec("x", "float32", ("batch", 16))], outputs=[TensorSpec("y", "float32", ("batch", 8))],
                  dims={"batch": Dim("batch", 1, 1, 8)})


def _write_onnx(path: Path, model: onnx.ModelProto, spec: IOSpec | None = None) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    write_manifest(path, new_manifest("export", path, backend="onnxruntime", precision="fp32", variant="onnx-fp32",
                                      io_spec=(spec or _spec()).to_json(),
                                      source={"checkpoint": "/ckpt", "checkpoint_sha256": "abc", "artifact": None,
                                              "artifact_sha256": None}))
    return path


def _matmul_model(dtype=np.float32) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(dtype), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul0")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["batch", 16])],
                              [helper.make_tensor_value_info("y", elem, ["batch", 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def fp32_onnx(tmp_path) -> Path:
    return _write_onnx(tmp_path / "model.onnx", _matmul_model())


@pytest.fixture
def fp16_onnx(tmp_path) -> Path:
    return _write_onnx(tmp_path / "model.fp16.onnx", _matmul_model(np.float16))


@pytest.fixture
def dynamic_int8_onnx(tmp_path, fp32_onnx) -> Path:
    """A real onnxruntime `quantize_dynamic` model (DynamicQuantizeLinear + MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp_path / "model.int8.onnx"
    quantize_dynamic(str(fp32_onnx), str(out), weight_type=QuantType.QInt8)
    return _write_onnx(out, onnx.load(str(out)))


def _calibration_reader(offset: float = 0.0):
    """Four random (2, 16) batches for onnxruntime's static quantization."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.items = iter([{"x": rng.standard_normal((2, 16)).astype(np.float32) + offset} for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    return Reader()


@pytest.fixture
def qdq_onnx(tmp_path, fp32_onnx) -> Path:
    """A real onnxruntime `quantize_static` Q/DQ model (symmetric int8, as TensorRT wants)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    out = tmp_path / "model.int8-static.onnx"
    quantize_static(str(fp32_onnx), str(out), _calibration_reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return _write_onnx(out, onnx.load(str(out)))


@pytest.fixture
def asymmetric_qdq_onnx(tmp_path, fp32_onnx) -> Path:
    """onnxruntime's default static quantization: uint8 activations with zero points, which TensorRT rejects."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    out = tmp_path / "model.asym.onnx"
    quantize_static(str(fp32_onnx), str(out), _calibration_reader(offset=1.0), quant_format=QuantFormat.QDQ)
    return _write_onnx(out, onnx.load(str(out)))


# -- ONNX kind ------------------------------------------------------------------------------------------------------
def test_inspect_onnx_tells_the_kinds_apart(fp32_onnx, fp16_onnx, dynamic_int8_onnx, qdq_onnx):
    assert inspect_onnx(fp32_onnx).kind == "fp32"
    assert inspect_onnx(fp16_onnx).kind == "fp16"
    dyn = inspect_onnx(dynamic_int8_onnx)
    assert dyn.kind == "int8-dynamic" and "MatMulInteger" in dyn.dynamic_quant_ops
    qdq = inspect_onnx(qdq_onnx)
    assert qdq.kind == "int8-qdq" and {"QuantizeLinear", "DequantizeLinear"} <= qdq.op_types


def test_asymmetric_qdq_is_refused_for_int8(asymmetric_qdq_onnx, qdq_onnx):
    assert inspect_onnx(qdq_onnx).asymmetric_zero_points == ()
    info = inspect_onnx(asymmetric_qdq_onnx)
    assert info.kind == "int8-qdq" and info.asymmetric_zero_points
    with pytest.raises(UserError, match="symmetric int8 only"):
        plan_build(TRT_VERSIONS["10.16"], "int8", info)


def test_inspect_onnx_refuses_missing_and_non_onnx(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        inspect_onnx(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not an onnx model at all\xff" * 10)
    with pytest.raises(UserError, match="not a readable ONNX"):
        inspect_onnx(bad)
    with pytest.raises(UserError, match="not an .onnx file"):
        inspect_onnx(tmp_path)


# -- precision -> flags per TensorRT version ------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["8.6", "10.3", "10.16", "11"])
def test_int8_plan_from_qdq_per_version(version, qdq_onnx):
    plan = plan_build(TRT_VERSIONS[version], "int8", inspect_onnx(qdq_onnx))
    if version == "8.6":
        assert plan.network_flags == ("EXPLICIT_BATCH",) and plan.builder_flags == ("INT8", "FP16")
        assert not plan.strongly_typed
    else:
        assert plan.network_flags == ("STRONGLY_TYPED",) and plan.builder_flags == () and plan.strongly_typed


def test_fp16_plan_from_fp32_onnx_per_version(fp32_onnx):
    info = inspect_onnx(fp32_onnx)
    assert plan_build(TRT_VERSIONS["8.6"], "fp16", info).builder_flags == ("FP16",)
    assert plan_build(TRT_VERSIONS["8.6"], "fp16", info).network_flags == ("EXPLICIT_BATCH",)
    for v in ("10.3", "10.16"):
        plan = plan_build(TRT_VERSIONS[v], "fp16", info)
        assert plan.builder_flags == ("FP16",) and plan.network_flags == () and not plan.strongly_typed
    with pytest.raises(UserError, match=r"no FP16 builder flag.*model\.fp16\.onnx"):
        plan_build(TRT_VERSIONS["11"], "fp16", info)


def test_fp16_plan_from_fp16_onnx_is_strongly_typed(fp16_onnx):
    for v in ("10.3", "11"):
        plan = plan_build(TRT_VERSIONS[v], "fp16", inspect_onnx(fp16_onnx))
        assert plan.strongly_typed and plan.builder_flags == () and plan.source_kind == "fp16"


def test_fp32_plan_clears_tf32(fp32_onnx):
    for v in TRT_VERSIONS.values():
        plan = plan_build(v, "fp32", inspect_onnx(fp32_onnx))
        assert plan.clear_flags == ("TF32",) and plan.builder_flags == ()


def test_plans_never_use_flags_removed_in_11(fp32_onnx, fp16_onnx, qdq_onnx):
    removed = {"FP16", "INT8", "BF16", "EXPLICIT_BATCH"}
    assert not removed & (TRT_VERSIONS["11"].builder_flags | TRT_VERSIONS["11"].network_flags)  # the recorded 11.4
    for path, precision in ((fp16_onnx, "fp16"), (qdq_onnx, "int8"), (fp32_onnx, "fp32")):
        plan = plan_build(TRT_VERSIONS["11"], precision, inspect_onnx(path))
        assert not removed & set(plan.builder_flags + plan.network_flags)


def test_every_recorded_version_gets_a_plan_whose_flags_it_has(fp32_onnx, fp16_onnx, qdq_onnx):
    """Across all recorded bindings (8.6 .. 11.4), each plan names only members that version's enums have."""
    for version, enums in ENUMS.items():
        features = TrtFeatures(version, frozenset(enums["NetworkDefinitionCreationFlag"]),
                               frozenset(enums["BuilderFlag"]))
        for path, precision in ((fp32_onnx, "fp32"), (fp16_onnx, "fp16"), (qdq_onnx, "int8")):
            plan = plan_build(features, precision, inspect_onnx(path))
            assert set(plan.network_flags) <= features.network_flags, (version, precision)
            assert set(plan.builder_flags + plan.clear_flags) <= features.builder_flags, (version, precision)


def test_too_old_tensorrt_is_refused(fp32_onnx):
    old = TrtFeatures("8.5.3.1", TRT_VERSIONS["8.6"].network_flags, TRT_VERSIONS["8.6"].builder_flags)
    with pytest.raises(UserError, match="needs TensorRT 8.6 or newer"):
        plan_build(old, "fp32", inspect_onnx(fp32_onnx))


def test_wrong_source_for_precision_is_refused(fp32_onnx, fp16_onnx, dynamic_int8_onnx, qdq_onnx):
    for v in TRT_VERSIONS.values():
        with pytest.raises(UserError, match="quantize_dynamic.*model.int8-static.onnx"):
            plan_build(v, "int8", inspect_onnx(dynamic_int8_onnx))
        with pytest.raises(UserError, match="no QuantizeLinear/DequantizeLinear"):
            plan_build(v, "int8", inspect_onnx(fp32_onnx))
        with pytest.raises(UserError, match="Q/DQ int8 model"):
            plan_build(v, "fp16", inspect_onnx(qdq_onnx))
        with pytest.raises(UserError, match="float16 weights"):
            plan_build(v, "fp32", inspect_onnx(fp16_onnx))


def test_trt11_fp16_uses_fp16_sibling(fp32_onnx, fp16_onnx):
    path, info, plan = resolve_plan(TRT_VERSIONS["11"], "fp16", fp32_onnx, inspect_onnx(fp32_onnx))
    assert path == fp16_onnx and info.kind == "fp16" and plan.strongly_typed
    fp16_onnx.unlink()
    with pytest.raises(UserError, match="model.fp16.onnx"):
        resolve_plan(TRT_VERSIONS["11"], "fp16", fp32_onnx, inspect_onnx(fp32_onnx))


# -- optimization profile -------------------------------------------------------------------------------------------
def test_profile_shapes_from_the_tiny_spec():
    spec = io_spec(resolve_config("tiny"))
    shapes = profile_shapes(spec)
    assert shapes["pixel_values"] == ((1, 3, 224, 224), (1, 3, 224, 224), (8, 3, 224, 224))
    seq = spec.dims["seq"]
    assert shapes["input_ids"] == ((1, seq.min), (1, seq.opt), (8, seq.max))
    assert shapes["clip_input_ids"][2] == (8, spec.dims["clip_seq"].max)
    custom = profile_shapes(spec, batch=(2, 4, 16), dims={"seq": (seq.opt, seq.opt, seq.opt)})
    assert custom["attention_mask"] == ((2, seq.opt), (4, seq.opt), (16, seq.opt))


def test_profile_options_are_validated():
    assert parse_range("1,1,8", "--batch") == (1, 1, 8)
    assert parse_range("4", "--batch") == (4, 4, 4)
    for bad in ("8,1,1", "0,1,2", "a,b,c", "1,2"):
        with pytest.raises(UserError, match="--batch"):
            parse_range(bad, "--batch")
    with pytest.raises(UserError, match="unknown dims"):
        profile_shapes(_spec(), dims={"seq": (1, 2, 3)})


# -- sidecar and compatibility --------------------------------------------------------------------------------------
def _sidecar(tmp_path, fp32_onnx, version="10.16.0.72", gpu=None) -> dict:
    engine = tmp_path / "model.fp32.engine"
    engine.write_bytes(b"plan bytes: only the sidecar is under test here")
    features = TRT_VERSIONS["10.16"]
    plan = plan_build(TrtFeatures(version, features.network_flags, features.builder_flags), "fp32",
                      inspect_onnx(fp32_onnx))
    sidecar = engine_sidecar(engine, read_manifest(fp32_onnx), fp32_onnx, plan, profile_shapes(_spec()),
                             settings={"workspace_gb": 4.0}, trt_version=version,
                             gpu=gpu or {"name": "NVIDIA RTX A5000", "compute_capability": "8.6"},
                             timing={"wall_s": 1.0}, layers=summarize_engine_layers({"Layers": ["a", "b"]}))
    write_manifest(engine, sidecar)
    return sidecar


def test_sidecar_round_trip_and_runner_dispatch(tmp_path, fp32_onnx):
    written = _sidecar(tmp_path, fp32_onnx)
    engine = tmp_path / "model.fp32.engine"
    back = read_manifest(engine)
    assert back == json.loads(json.dumps(written))
    assert back["backend"] == "tensorrt" and back["variant"] == "trt-fp32" and back["precision"] == "fp32"
    assert back["source"]["checkpoint"] == "/ckpt" and back["source"]["artifact"] == str(fp32_onnx.resolve())
    assert len(back["source"]["artifact_sha256"]) == 64
    assert back["settings"]["profiles"]["x"] == [[1, 16], [1, 16], [8, 16]]
    assert back["tensorrt"] == {"version": "10.16.0.72", "gpu": {"name": "NVIDIA RTX A5000", "compute_capability": "8.6"},
                                "version_compatible": False, "hardware_compatibility_level": None}
    assert back["engine"]["bytes"] == engine.stat().st_size and back["engine"]["layer_count"] == 2
    assert IOSpec.from_json(back["io_spec"]) == _spec()
    from vla_export.runtime import open_runner

    runner = open_runner(engine)  # not activated: that needs TensorRT
    assert isinstance(runner, trtmod.TensorRTRunner) and runner.precision == "fp32" and runner.device == "cuda"


def test_compatibility_refusals(tmp_path, fp32_onnx):
    sidecar = _sidecar(tmp_path, fp32_onnx)
    assert check_engine_compatible(sidecar, "10.16.0.72", "NVIDIA RTX A5000", "8.6") == []
    assert check_engine_compatible(sidecar, "10.16.0.99", "NVIDIA RTX A5000", "8.6") == []  # build number only
    with pytest.raises(UserError, match=r"built with TensorRT 10\.16\.0\.72 but this is TensorRT 8\.6\.2.*rebuild"):
        check_engine_compatible(sidecar, "8.6.2.3", "Orin", "8.7")
    with pytest.raises(UserError, match="TensorRT versions"):
        check_engine_compatible(sidecar, "10.15.1", "NVIDIA RTX A5000", "8.6")
    with pytest.raises(UserError, match=r"compute capability 8\.6 .* is 8\.7.*GPU architectures"):
        check_engine_compatible(sidecar, "10.16.0.72", "Orin", "8.7")
    warnings = check_engine_compatible(sidecar, "10.16.0.72", "NVIDIA GeForce RTX 3090", "8.6")
    assert len(warnings) == 1 and "GPU models" in warnings[0]
    with pytest.raises(UserError, match="does not record"):
        check_engine_compatible({"artifact": "x.engine"}, "10.16.0.72", "A", "8.6")


# -- engine inspector JSON ------------------------------------------------------------------------------------------
def test_inspector_json_10x_format():
    info = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "Dimensions": [1, 3, 224, 224], "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "c", "Dimensions": [1, 64, 112, 112], "Format/Datatype": "Channel major FP16 format"}]},
        {"Name": "gemm", "LayerType": "CaskGemmMatrixMultiply",
         "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear Int8 format"}]},
    ], "Bindings": ["x", "y"]}
    s = summarize_engine_layers(json.dumps(info))
    assert s["layer_count"] == 2 and [lay["precision"] for lay in s["layers"]] == ["FP16", "INT8"]
    assert s["precisions"] == {"FP16": 1, "INT8": 1} and s["io_tensors"] == ["x", "y"]


def test_inspector_json_11x_format_and_names_only():
    info = {"Layers": [{"Name": "ln", "LayerType": "Normalization",
                        "Outputs": [{"Name": "h", "Format": "Row major linear", "DataType": "Half"}]},
                       {"Name": "mystery", "LayerType": "Reformat", "Outputs": [{"Name": "z"}]}],
            "I/O Tensors": [{"Name": "x", "IOMode": "Input", "DataType": "Float", "Dimensions": [-1, 16]}]}
    s = summarize_engine_layers(info)
    assert [lay["precision"] for lay in s["layers"]] == ["FP16", None]
    assert s["precisions"] == {"FP16": 1, "unknown": 1} and s["io_tensors"][0]["IOMode"] == "Input"
    names_only = summarize_engine_layers({"Layers": ["a", "b", "c"]})
    assert names_only["layer_count"] == 3 and names_only["precisions"] == {"unknown": 3}
    assert summarize_engine_layers("not json")["layer_count"] is None


def test_trt_dtype_map_names_are_torch_dtypes():
    import torch

    for trt_name, torch_name in trtmod.TRT2TORCH_NAMES.items():
        assert isinstance(getattr(torch, torch_name), torch.dtype), trt_name
    assert trtmod.TRT2TORCH_NAMES["HALF"] == "float16" and trtmod.TRT2TORCH_NAMES["INT64"] == "int64"


def test_build_plan_serialises():
    plan = BuildPlan("10.3.0", "fp16", "fp32", (), ("FP16",))
    assert json.loads(json.dumps(plan.to_json()))["builder_flags"] == ["FP16"]


# -- the CLI: input errors (exit 2) before availability (exit 4) ---------------------------------------------------
def _trt_missing() -> bool:
    import torch

    return importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available()


@pytest.mark.skipif(not _trt_missing(), reason="TensorRT and a GPU are present: the missing-backend path cannot run")
def test_cli_without_tensorrt_exits_4_with_one_line(fp32_onnx):
    result = CliRunner().invoke(main, ["trt", str(fp32_onnx), "--precision", "fp16"])
    assert result.exit_code == EXIT_UNAVAILABLE, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "pip install 'vla-export[trt]'" in lines[0] and "built on the device" in lines[0]
    assert not list(fp32_onnx.parent.glob("*.engine*")) and not list(fp32_onnx.parent.glob(".staging-*"))


def test_cli_input_errors_exit_2_before_availability(tmp_path, fp32_onnx, dynamic_int8_onnx):
    cases = [
        (["trt", str(tmp_path / "missing.onnx")], "does not exist"),
        (["trt", str(dynamic_int8_onnx), "--precision", "int8"], "quantize_dynamic"),
        (["trt", str(fp32_onnx), "--precision", "int8"], "model.int8-static.onnx"),
        (["trt", str(fp32_onnx), "--batch", "8,1,1"], "--batch"),
        (["trt", str(fp32_onnx), "--dim", "nope=1,2,3"], "unknown dims"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == EXIT_USER_ERROR, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    no_manifest = tmp_path / "bare" / "model.onnx"
    no_manifest.parent.mkdir()
    onnx.save(_matmul_model(), str(no_manifest))
    result = CliRunner().invoke(main, ["trt", str(no_manifest)])
    assert result.exit_code == EXIT_USER_ERROR and "no manifest" in result.output


def test_dynamic_model_refused_without_importing_tensorrt(dynamic_int8_onnx):
    """The refusal happens in plain Python: a subprocess shows tensorrt was never imported."""
    import subprocess
    import sys

    code = (f"import sys\nfrom vla_export.engines.tensorrt import inspect_onnx, check_source_for_precision\n"
            f"from vla_export.errors import UserError\n"
            f"try:\n    check_source_for_precision(inspect_onnx({str(dynamic_int8_onnx)!r}), 'int8')\n"
            f"except UserError as e:\n    print('refused', 'tensorrt' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "refused False"


# -- real TensorRT (skipped without it and a GPU) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """The tiny policy exported to ONNX with its dynamic dims, plus a manifest, as `vla-export export` writes it."""
    import torch

    from vla_export.models import build_model

    torch.manual_seed(0)
    model, spec = build_model("kosmos2-clip-hybrid", resolve_config("tiny"))
    out = tmp_path_factory.mktemp("trt") / "model.onnx"
    feeds = {k: torch.from_numpy(v) for k, v in spec.example_inputs(batch=2).items()}
    program = torch.onnx.export(model, (), kwargs=feeds, dynamic_shapes=spec.torch_dynamic_shapes(), dynamo=True,
                                input_names=spec.input_names, output_names=spec.output_names, opset_version=18)
    program.save(str(out))
    write_manifest(out, new_manifest("export", out, backend="onnxruntime", precision="fp32", variant="onnx-fp32",
                                     io_spec=spec.to_json(), source={"checkpoint": None, "checkpoint_sha256": None}))
    return out


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_real_build_and_run_matches_onnxruntime(tiny_onnx, tmp_path, precision, tol):
    import tensorrt as trt

    from vla_export.runtime import OrtRunner, open_runner

    if precision == "fp16" and getattr(trt.BuilderFlag, "FP16", None) is None:
        pytest.skip("TensorRT 11 builds fp16 only from an fp16 ONNX (quantize stage)")
    result = CliRunner().invoke(main, ["trt", str(tiny_onnx), "--precision", precision, "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    engine = tmp_path / f"model.{precision}.engine"
    sidecar = read_manifest(engine)
    assert sidecar["engine"]["layer_count"] and sidecar["tensorrt"]["version"] == trt.__version__
    assert (tmp_path / "timing.cache").stat().st_size > 0
    spec = IOSpec.from_json(sidecar["io_spec"])
    with OrtRunner(tiny_onnx, spec) as ort_runner, open_runner(engine) as trt_runner:
        for batch in (1, 5):
            feeds = io_spec(resolve_config("tiny")).example_inputs(batch=batch, seed=batch)
            ref, out = ort_runner.infer(feeds), trt_runner.infer(feeds)
            assert np.abs(ref["actions"] - out["actions"]).mean() < tol
        assert all(t > 0 for t in trt_runner.time_prepared(feeds, warmup=3, iters=5))
