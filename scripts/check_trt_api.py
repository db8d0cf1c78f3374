#!/usr/bin/env python
"""Check vla-export's TensorRT code against the real Python bindings of each TensorRT version, without TensorRT.

TensorRT's libraries cannot be installed on this project's machines (the registry's `tensorrt-cu12`/`-cu13`
packages download them from NVIDIA's index at install time), but the bindings wheels do install: `tensorrt-bindings`
8.6 and `tensorrt-cu12-bindings` 10.x/11.x, about 1.3 MB each. Their extension module takes only 9 to 12 C entry
points from libnvinfer, libnvonnxparser and libnvinfer_plugin (`createInferBuilder_INTERNAL`, `getPluginRegistry`,
...); every other TensorRT call is a C++ virtual call through an object those entry points return. Linked against
stub libraries whose entry points return NULL, the *real* binding module of that version imports: its classes,
methods, properties, enum members and pybind11 signatures, as NVIDIA shipped them. Anything that would reach the
library fails the way it does when CUDA cannot start: `trt.Builder(logger)` raises "TypeError: factory function
returned nullptr".

Checks, per version:
  plans     `plan_build(TrtFeatures.from_module(trt), precision, kind)` for each precision x ONNX kind; every flag
            a plan names resolves on that version's enums (and the network-flag bits are computed as the code does)
  surface   every TensorRT attribute the TensorRT code (engines/ and runtime/tensorrt.py) touches (read from its AST, types followed
            through the bindings' own signatures) exists, unless the code probes it with hasattr/getattr; every
            call fits one of the bound signatures (positional count and keyword names)
  calls     CapturingLogger subclasses the real trt.ILogger and logs; init_libnvinfer_plugins accepts it;
            trt.Builder/trt.Runtime raise TypeError when the library cannot start (the path that exits 4)
  dtypes    which TRT2TORCH_NAMES members exist

What this does not check: anything TensorRT computes (parsing, building, running). Those need the libraries and a
GPU: the `tensorrt`-marked tests.

    python scripts/check_trt_api.py                       # default versions, Markdown table, JSON
    python scripts/check_trt_api.py --versions 8.6.1,11.4.0.106 --out trt_api.json
    python scripts/check_trt_api.py --dump-enums tests/data/trt_enum_members.json
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The TensorRT code: the engine builder and, below it in the runtime layer, the engine runner.
TRT_SOURCES = (REPO / "vla_export" / "engines" / "tensorrt.py", REPO / "vla_export" / "runtime" / "tensorrt.py")
# 8.6: JetPack 6.0 (Jetson Orin); 10.3: JetPack 6.1/6.2; 10.13 and 10.16: after the precision flags' deprecation
# (10.12), newest 10.x; 11.0 and 11.4: first and newest 11.x.
DEFAULT_VERSIONS = ("8.6.1", "10.3.0", "10.13.3.9", "10.16.1.11", "11.0.0.114", "11.4.0.106")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vla-export" / "trt-bindings"

# Variables whose TensorRT type the code's naming implies: parameters (functions take these objects as arguments)
# and results of vla-export's own functions (`config, cache = create_config(...)`).
NAME_TYPES = {"builder": "Builder", "network": "INetworkDefinition", "config": "IBuilderConfig"}
# Attributes every version must offer, so that a refactor that defeats the type-following is noticed.
CORE_ACCESSES = frozenset({
    "Builder.create_network", "Builder.create_builder_config", "Builder.create_optimization_profile",
    "Builder.build_serialized_network", "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.set_flag",
    "IBuilderConfig.set_timing_cache", "IBuilderConfig.create_timing_cache", "IBuilderConfig.get_timing_cache",
    "IBuilderConfig.add_optimization_profile", "IOptimizationProfile.set_shape", "OnnxParser.parse_from_file",
    "OnnxParser.get_error", "Runtime.deserialize_cuda_engine", "ICudaEngine.create_execution_context",
    "ICudaEngine.get_tensor_name", "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_dtype",
    "IExecutionContext.set_input_shape", "IExecutionContext.get_tensor_shape", "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3", "EngineInspector.get_engine_information", "ITimingCache.serialize",
})


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- fetch a bindings wheel and make it importable ------------------------------------------------------------------
# Marks a finished cache entry; renamed when the stub recipe changes, so older entries are rebuilt.
READY = "ready-v2"


def dist_for(version: str) -> str:
    return "tensorrt-bindings" if int(version.split(".")[0]) < 10 else "tensorrt-cu12-bindings"


def prepare(version: str, cache: Path) -> Path:
    """`cache/<version>/` with `site/` (the unpacked wheel) and `libs/` (stubs under the sonames it needs)."""
    root = cache / version
    if (root / READY).exists():
        return root
    for tool in ("gcc", "nm", "readelf"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` is needed to build the stub libraries and is not on PATH")
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{dist_for(version)}=={version}"
    def cached():
        return [w for w in wheels.glob(f"{dist_for(version).replace('-', '_')}-{version}-*.whl")]

    found = cached()
    if not found:
        log(f"downloading {spec}")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                               "-d", str(wheels), spec], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {spec} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        found = cached()
    tmp = cache / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "libs").mkdir(parents=True)
    with zipfile.ZipFile(found[0]) as zf:
        zf.extractall(tmp / "site")
    ext = next((tmp / "site").glob("tensorrt*/tensorrt*.so"))
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(ext)], capture_output=True, text=True,
                        check=True).stdout
    # Strong undefined symbols only (weak ones, "w", may stay unresolved). Versioned ones (GLIBC_, CXXABI_), the
    # CPython API and libdl come from the process; the rest is TensorRT's.
    undefined = [line.split()[1] for line in nm.splitlines() if line.split()[:1] == ["U"]]
    symbols = sorted({s for s in undefined if "@" not in s and not re.match(r"_?Py", s)
                      and not s.startswith(("dl", "__cxa"))})
    (tmp / "stub.c").write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
    needed = re.findall(r"\[(libnv[^\]]+)\]", subprocess.run(["readelf", "-d", str(ext)], capture_output=True,
                                                             text=True, check=True).stdout)
    for soname in needed:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp / "libs" / soname), f"-Wl,-soname,{soname}",
                        str(tmp / "stub.c")], check=True)
    (tmp / "stubbed_symbols.txt").write_text("\n".join(symbols) + "\n")
    (tmp / READY).write_text(version + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def import_bindings(root: Path):
    """The real bindings module, importable as `tensorrt` (stub libraries loaded first, by soname)."""
    for lib in sorted(glob.glob(str(root / "libs" / "*"))):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    sys.path.insert(0, str(root / "site"))
    name = next(p.name for p in (root / "site").iterdir() if p.is_dir() and p.name.startswith("tensorrt")
                and not p.name.endswith(".dist-info"))
    trt = importlib.import_module(name)
    sys.modules["tensorrt"] = trt
    return trt


# -- pybind11 signatures -------------------------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def signatures(obj, name: str) -> list[dict]:
    """Each bound overload of `obj` (named `name` in its docstring): params [(name, has_default)], return type."""
    doc = getattr(obj, "__doc__", None) or ""
    sigs = []
    for line in doc.splitlines():
        m = re.match(rf"^\s*(?:\d+\.\s+)?{re.escape(name)}\((.*)\)\s*->\s*(.+?)\s*$", line)
        if not m or m.group(1).strip() in ("*args, **kwargs",):
            continue
        params = []
        for p in _split_top(m.group(1)):
            pname = p.split(":", 1)[0].split("=", 1)[0].strip()
            params.append((pname, "=" in p))
        sigs.append({"params": params, "returns": m.group(2)})
    return sigs


def fits(sig: dict, n_positional: int, keywords: list[str]) -> bool:
    params = sig["params"]
    if any(p.startswith("*") for p, _ in params):
        return True
    if n_positional > len(params):
        return False
    rest = params[n_positional:]
    names = {p for p, _ in rest}
    if any(k not in names for k in keywords):
        return False
    return all(has_default or p in keywords for p, has_default in rest)


# -- following TensorRT types through the TensorRT code (TRT_SOURCES) ------------------------------------------------
class SurfaceChecker(ast.NodeVisitor):
    """Resolves `trt.X`, `<TensorRT object>.attr` and calls on them, with types from the bindings' signatures."""

    MODULE = ("module",)

    def __init__(self, trt):
        self.trt = trt
        self.accesses: list[dict] = []
        self.call_problems: list[dict] = []
        self.env_stack: list[dict] = [{"trt": self.MODULE}]
        self.probed_stack: list[set] = [set()]
        self.class_env: dict | None = None

    # types: MODULE, ("class", cls), ("inst", cls), ("method", cls, name), ("func", obj, name), None
    def _trt_class(self, annotation: str):
        """`tensorrt.tensorrt.ICudaEngine` -> ICudaEngine; some are left as C++ names: `nvinfer1::IEngineInspector`
        (8.6) is bound as `EngineInspector`, `nvonnxparser::IParserError` as `ParserError`."""
        m = re.search(r"(?:tensorrt(?:_bindings)?\.tensorrt\.|\w+::)([A-Za-z_]\w*)$", annotation.strip())
        if not m:
            return None
        for name in (m.group(1), m.group(1)[1:] if m.group(1).startswith("I") else None):
            cls = getattr(self.trt, name, None) if name else None
            if isinstance(cls, type):
                return ("inst", cls)
        return None

    def lookup(self, key: str):
        if key.startswith("self.") and self.class_env is not None and key in self.class_env:
            return self.class_env[key]
        for env in reversed(self.env_stack):
            if key in env:
                return env[key]
        return None

    def bind(self, key: str, typ) -> None:
        if key in ("trt", "self.trt"):  # `trt = import_tensorrt()`: always the module
            return
        if typ is None and key in NAME_TYPES:
            typ = ("inst", getattr(self.trt, NAME_TYPES[key]))
        if key.startswith("self.") and self.class_env is not None:
            if typ is not None or key not in self.class_env:  # `self.context = None` on release keeps the type
                self.class_env[key] = typ
        else:
            self.env_stack[-1][key] = typ

    @staticmethod
    def key_of(node) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        return None

    def type_of(self, node):
        key = self.key_of(node)
        if key == "self.trt":
            return self.MODULE
        if key is not None and (isinstance(node, ast.Name) or self.lookup(key) is not None):
            return self.lookup(key)
        if isinstance(node, ast.Attribute):
            return self.attribute(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        self.visit(node)  # comprehensions, subscripts, ...: no TensorRT type, but look inside
        return None

    def attribute(self, node: ast.Attribute):
        base = self.type_of(node.value)
        if base is None:
            return None
        if base == self.MODULE:
            owner, owner_name = self.trt, "tensorrt"
        elif base[0] in ("class", "inst"):
            owner, owner_name = base[1], base[1].__name__
        else:
            return None
        present = hasattr(owner, node.attr)
        probed = node.attr in self.probed_stack[-1]
        self.accesses.append({"access": f"{owner_name}.{node.attr}", "line": node.lineno, "present": present,
                              "probed": probed})
        if not present:
            return None
        value = getattr(owner, node.attr)
        if isinstance(value, type):
            return ("class", value)
        if base[0] == "inst" and callable(value) and not isinstance(value, property):
            return ("method", owner, node.attr)
        if base == self.MODULE and callable(value):
            return ("func", value, node.attr)
        return None

    def call(self, node: ast.Call):
        target = self.type_of(node.func)
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            self.visit(arg)
        if target is None:
            return None
        n_args = n_pos = len(node.args)
        keywords = [k.arg for k in node.keywords if k.arg]
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return None
        if target[0] == "class":
            cls = target[1]
            sigs = signatures(cls.__init__, "__init__")
            label, n_pos = f"{cls.__name__}()", n_pos + 1  # `self`
            result = ("inst", cls)
        elif target[0] == "method":
            cls, name = target[1], target[2]
            sigs = signatures(getattr(cls, name), name)
            label, n_pos = f"{cls.__name__}.{name}()", n_pos + 1
            result = self._trt_class(sigs[0]["returns"]) if sigs else None
        elif target[0] == "func":
            sigs = signatures(target[1], target[2])
            label, result = f"tensorrt.{target[2]}()", None
        else:
            return None
        if sigs and not any(fits(s, n_pos, keywords) for s in sigs):
            self.call_problems.append({"call": label, "line": node.lineno, "positional": n_args,
                                       "keywords": keywords,
                                       "signatures": [[p for p, _ in s["params"]] for s in sigs]})
        return result

    # statements
    def visit_Call(self, node):
        self.call(node)

    def visit_Attribute(self, node):
        self.attribute(node)

    def visit_Assign(self, node):
        typ = self.type_of(node.value)
        for target in node.targets:
            key = self.key_of(target)
            if key is not None:
                self.bind(key, typ)
            elif isinstance(target, ast.Tuple):  # `config, cache = create_config(...)`: names may imply types
                for elt in target.elts:
                    if self.key_of(elt) is not None:
                        self.bind(self.key_of(elt), None)
            else:
                self.visit(target)

    def visit_ClassDef(self, node):
        for base in node.bases:
            self.type_of(base)
        outer, self.class_env = self.class_env, {}
        for stmt in node.body:
            self.visit(stmt)
        self.class_env = outer

    def visit_FunctionDef(self, node):
        env = {}
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            if arg.arg in NAME_TYPES:
                env[arg.arg] = ("inst", getattr(self.trt, NAME_TYPES[arg.arg]))
            elif arg.arg == "trt":
                env["trt"] = self.MODULE
        probed = {n.args[1].value for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                  and n.func.id in ("hasattr", "getattr") and len(n.args) >= 2
                  and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)}
        self.env_stack.append(env)
        self.probed_stack.append(self.probed_stack[-1] | probed)
        for stmt in node.body:
            self.visit(stmt)
        self.env_stack.pop()
        self.probed_stack.pop()


def check_surface(trt, sources: tuple[Path, ...] | list[Path] = TRT_SOURCES) -> dict:
    checker = SurfaceChecker(trt)
    for source in sources:  # one checker: types bound in one file (a runner's fields) stay per class/function
        checker.visit(ast.parse(source.read_text(), str(source)))
    by_access: dict[str, dict] = {}
    for a in checker.accesses:
        entry = by_access.setdefault(a["access"], {"lines": [], "present": a["present"], "probed": True})
        entry["lines"].append(a["line"])
        entry["probed"] = entry["probed"] and a["probed"]
    missing = sorted(k for k, v in by_access.items() if not v["present"] and not v["probed"])
    absent_probed = sorted(k for k, v in by_access.items() if not v["present"] and v["probed"])
    uncovered = sorted(CORE_ACCESSES - set(by_access))
    return {"checked": len(by_access), "accesses": {k: {**v, "lines": sorted(set(v["lines"]))}
                                                    for k, v in sorted(by_access.items())},
            "missing": missing, "absent_but_probed": absent_probed, "core_not_reached": uncovered,
            "call_problems": checker.call_problems,
            "ok": not missing and not uncovered and not checker.call_problems}


# -- the other checks --------------------------------------------------------------------------------------------------
def check_plans(trt) -> dict:
    from vla_export.engines.tensorrt import OnnxInfo, TrtFeatures, _flag, plan_build
    from vla_export.errors import UserError

    features = TrtFeatures.from_module(trt)
    kinds = {"fp32": OnnxInfo("model.onnx", frozenset({"MatMul"}), 0, 10),
             "fp16": OnnxInfo("model.fp16.onnx", frozenset({"MatMul"}), 10, 0),
             "int8-qdq": OnnxInfo("model.int8-static.onnx", frozenset({"QuantizeLinear", "DequantizeLinear"}), 0, 10)}
    rows, problems = [], []
    for precision, kind in (("fp32", "fp32"), ("fp16", "fp32"), ("fp16", "fp16"), ("int8", "int8-qdq")):
        try:
            plan = plan_build(features, precision, kinds[kind])
        except UserError as e:
            rows.append({"precision": precision, "onnx": kind, "refused": str(e)})
            continue
        try:
            bits = 0
            for name in plan.network_flags:
                bits |= 1 << int(_flag(trt.NetworkDefinitionCreationFlag, name, plan.trt_version))
            for name in plan.builder_flags:
                _flag(trt.BuilderFlag, name, plan.trt_version)
        except UserError as e:
            problems.append(str(e))
            bits = None
        rows.append({"precision": precision, "onnx": kind, "network_flags": list(plan.network_flags),
                     "network_flag_bits": bits, "builder_flags": list(plan.builder_flags),
                     "clear_flags": list(plan.clear_flags), "strongly_typed": plan.strongly_typed})
    return {"plans": rows, "problems": problems, "ok": not problems}


def check_calls(trt) -> dict:
    """Calls that need no GPU: the logger subclass, plugin init, and how a failed factory surfaces."""
    from vla_export.engines.tensorrt import CapturingLogger

    out: dict = {}
    logger = CapturingLogger(trt)
    logger.log(trt.ILogger.Severity.ERROR, "an error")
    logger.log(trt.ILogger.Severity.INFO, "filtered out")
    out["logger_errors"] = logger.errors()
    out["init_libnvinfer_plugins"] = type(trt.init_libnvinfer_plugins(logger, "")).__name__
    for factory in ("Builder", "Runtime"):
        try:
            getattr(trt, factory)(logger)
            out[factory] = "constructed (unexpected with stub libraries)"
        except Exception as e:
            out[factory] = f"{type(e).__name__}: {e}"
    out["ok"] = (out["logger_errors"] == ["an error"] and out["init_libnvinfer_plugins"] == "bool"
                 and all(out[f].startswith("TypeError") for f in ("Builder", "Runtime")))
    return out


def enum_members(trt) -> dict:
    return {name: list(getattr(trt, name).__members__)
            for name in ("NetworkDefinitionCreationFlag", "BuilderFlag", "DataType")}


def probe(root: Path, sources: tuple[Path, ...] | list[Path] = TRT_SOURCES) -> dict:
    trt = import_bindings(root)
    sys.path.insert(0, str(REPO))
    from vla_export.engines.tensorrt import TRT2TORCH_NAMES

    result = {"version": str(trt.__version__), "module": trt.__name__,
              "stubbed_symbols": (root / "stubbed_symbols.txt").read_text().split(),
              "plans": check_plans(trt), "surface": check_surface(trt, sources), "calls": check_calls(trt),
              "dtypes": {n: hasattr(trt.DataType, n) for n in TRT2TORCH_NAMES}, "enums": enum_members(trt)}
    result["ok"] = all(result[k]["ok"] for k in ("plans", "surface", "calls"))
    return result


def run_version(version: str, cache: Path) -> dict:
    root = prepare(version, cache)
    proc = subprocess.run([sys.executable, __file__, "--probe", str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"version": version, "ok": False, "error": " | ".join(tail)}
    return json.loads(proc.stdout)


def markdown(results: list[dict]) -> str:
    lines = ["| TensorRT | surface names checked | missing | absent, probed | call mismatches | fp32 | fp16 from fp32 "
             "ONNX | fp16 from fp16 ONNX | int8 from Q/DQ | failed factory | ok |", "|" + "---|" * 11]

    def plan_cell(r, precision, onnx):
        row = next((p for p in r["plans"]["plans"] if p["precision"] == precision and p["onnx"] == onnx), None)
        if row is None:
            return "?"
        if "refused" in row:
            return "refused: needs fp16 ONNX" if "fp16" in row["refused"] else "refused"
        flags = "+".join(row["builder_flags"]) or "no precision flag"
        return f"{'strong' if row['strongly_typed'] else 'weak'}, {flags}"

    for r in results:
        if "error" in r:
            lines.append(f"| {r['version']} | error: {r['error'][:120]} |" + " |" * 9 + " NO |")
            continue
        s = r["surface"]
        lines.append(f"| {r['version']} | {s['checked']} | {', '.join(s['missing']) or '-'} | "
                     f"{', '.join(s['absent_but_probed']) or '-'} | {len(s['call_problems'])} | "
                     f"{plan_cell(r, 'fp32', 'fp32')} | {plan_cell(r, 'fp16', 'fp32')} | {plan_cell(r, 'fp16', 'fp16')} | "
                     f"{plan_cell(r, 'int8', 'int8-qdq')} | {r['calls']['Builder'].split(':')[0]} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", default=",".join(DEFAULT_VERSIONS), help="comma-separated TensorRT versions")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="wheels and stub libraries [%(default)s]")
    ap.add_argument("--out", type=Path, default=None, help="write the full results as JSON")
    ap.add_argument("--dump-enums", type=Path, default=None,
                    help="write {version: {NetworkDefinitionCreationFlag, BuilderFlag, DataType: [members]}}")
    ap.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one version, JSON out
    ap.add_argument("--source", type=Path, action="append", default=None,
                    help=argparse.SUPPRESS)  # with --probe: other file(s) in place of TRT_SOURCES
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.source or TRT_SOURCES)))
        return 0
    results = []
    for version in [v.strip() for v in args.versions.split(",") if v.strip()]:
        try:
            results.append(run_version(version, args.cache))
        except (RuntimeError, subprocess.CalledProcessError) as e:
            results.append({"version": version, "ok": False, "error": str(e)})
        log(f"TensorRT {version}: {'ok' if results[-1]['ok'] else 'FAILED'}")
    print(markdown(results))
    for r in results:
        for problem in (r.get("surface", {}).get("call_problems") or []):
            print(f"{r['version']}: line {problem['line']}: {problem['call']} with {problem['positional']} positional "
                  f"+ {problem['keywords']} fits none of {problem['signatures']}")
        for name in r.get("surface", {}).get("core_not_reached") or []:
            print(f"{r['version']}: {name} was not reached by the type-following (update CORE_ACCESSES/NAME_TYPES)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.dump_enums:
        enums = {r["version"]: r["enums"] for r in results if "enums" in r}
        args.dump_enums.parent.mkdir(parents=True, exist_ok=True)
        args.dump_enums.write_text(json.dumps(enums, indent=1) + "\n")
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
