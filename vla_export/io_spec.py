"""The IO spec: what a model takes and returns, declared once and read by every stage.

Export reads names, dtypes and dynamic axes; TensorRT reads min/opt/max shapes; AOTInductor reads `torch.export`
dims; validation and profiling read the example-input factory. An artifact's manifest stores the spec as JSON
(`IOSpec.to_json`), so a runner can check its feeds without importing the model code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Dtype names used throughout: numpy-style strings, mapped per backend where needed.
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


@dataclass(frozen=True)
class Dim:
    """A named dimension. `dynamic=False` dims are fixed at `opt`; `reason` says why a dim is not dynamic."""

    name: str
    min: int
    opt: int
    max: int
    dynamic: bool = True
    reason: str = ""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of NUMPY_DTYPES
    shape: tuple[int | str, ...]  # ints are fixed sizes, strings name a `Dim` of the spec
    description: str = ""

    def dim_names(self) -> list[tuple[int, str]]:
        return [(axis, d) for axis, d in enumerate(self.shape) if isinstance(d, str)]


@dataclass
class IOSpec:
    """Inputs, outputs and dims of one architecture instance (one config)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, Dim]
    # recurrent state: output name -> input name it feeds on the next step (LSTM h/c). Empty for stateless heads.
    state: dict[str, str] = field(default_factory=dict)
    # Makes a dict of numpy inputs: factory(batch, seed, **dims) -> {name: array}. Not serialised: the model
    # module provides it; `from_json` specs fall back to generic inputs.
    example_factory: Callable[..., dict[str, np.ndarray]] | None = field(default=None, repr=False, compare=False)

    # -- names -------------------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in [*self.inputs, *self.outputs]:
            if t.name == name:
                return t
        raise KeyError(f"no tensor {name!r} in the IO spec (inputs {self.input_names}, outputs {self.output_names})")

    # -- shapes ------------------------------------------------------------------------------------------------
    def concrete_shape(self, name: str, **dim_values: int) -> tuple[int, ...]:
        """Shape of `name` with each named dim at `dim_values[dim]`, else its `opt`."""
        out = []
        for d in self.tensor(name).shape:
            out.append(d if isinstance(d, int) else int(dim_values.get(d, self.dims[d].opt)))
        return tuple(out)

    def profile_shapes(self, **overrides: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape per input, for TensorRT optimization profiles. `overrides[dim] = (min, opt, max)`."""
        ranges = {}
        for name, d in self.dims.items():
            lo, opt, hi = overrides.get(name, (d.min, d.opt, d.max)) if d.dynamic else (d.opt, d.opt, d.opt)
            if not lo <= opt <= hi:
                raise ValueError(f"dim {name!r}: need min <= opt <= max, got {lo}/{opt}/{hi}")
            ranges[name] = (lo, opt, hi)
        shapes = {}
        for t in self.inputs:
            shapes[t.name] = tuple(
                tuple(d if isinstance(d, int) else ranges[d][k] for d in t.shape) for k in range(3)
            )
        return shapes

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """`{tensor: {axis: dim_name}}` over inputs and outputs, dynamic dims only (torch.onnx / ORT style)."""
        axes = {}
        for t in [*self.inputs, *self.outputs]:
            dyn = {axis: d for axis, d in t.dim_names() if self.dims[d].dynamic}
            if dyn:
                axes[t.name] = dyn
        return axes

    def torch_dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        """`dynamic_shapes` for `torch.export.export` / `torch.onnx.export(dynamo=True)`, keyed by input name.

        One `torch.export.Dim` object per named dim, shared across inputs, so the exporter knows that all the
        batch axes are the same symbol. Lower bound 1 (not 0/1 specialised by torch.export's default of 2..)."""
        import torch

        made = {
            name: torch.export.Dim(name, min=max(d.min, 1), max=d.max)
            for name, d in self.dims.items()
            if d.dynamic
        }
        return {
            t.name: {axis: made[d] for axis, d in t.dim_names() if d in made} or None for t in self.inputs
        }

    # -- inputs ------------------------------------------------------------------------------------------------
    def example_inputs(self, batch: int = 1, seed: int = 0, **dims: int) -> dict[str, np.ndarray]:
        """Deterministic example inputs (numpy), same seed -> same arrays."""
        if self.example_factory is not None:
            return self.example_factory(batch=batch, seed=seed, **dims)
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            shape = self.concrete_shape(t.name, batch=batch, **dims)
            if t.dtype.startswith("float"):
                feeds[t.name] = rng.standard_normal(shape).astype(NUMPY_DTYPES[t.dtype])
            elif t.dtype == "bool":
                feeds[t.name] = np.ones(shape, dtype=np.bool_)
            else:
                feeds[t.name] = np.ones(shape, dtype=NUMPY_DTYPES[t.dtype])
        return feeds

    def check_feeds(self, feeds: dict[str, Any]) -> None:
        """Raise ValueError naming every feed whose name, dtype or rank does not match the spec."""
        problems = []
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing:
            problems.append(f"missing inputs {missing}")
        if extra:
            problems.append(f"unexpected inputs {extra}")
        for t in self.inputs:
            if t.name not in feeds:
                continue
            arr = feeds[t.name]
            dtype = str(arr.dtype).replace("torch.", "")
            if dtype != t.dtype:
                problems.append(f"{t.name}: dtype {dtype}, spec says {t.dtype}")
            if len(arr.shape) != len(t.shape):
                problems.append(f"{t.name}: shape {tuple(arr.shape)}, spec says {t.shape}")
                continue
            for got, want in zip(arr.shape, t.shape, strict=True):
                if isinstance(want, int) and got != want:
                    problems.append(f"{t.name}: shape {tuple(arr.shape)}, spec says {t.shape}")
                    break
        if problems:
            raise ValueError("; ".join(problems))

    def initial_state(self, batch: int) -> dict[str, np.ndarray]:
        """Zero recurrent state for a fresh rollout (empty for stateless models)."""
        return {
            inp: np.zeros(self.concrete_shape(inp, batch=batch), dtype=NUMPY_DTYPES[self.tensor(inp).dtype])
            for inp in self.state.values()
        }

    # -- serialisation -----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [dataclasses.asdict(t) | {"shape": list(t.shape)} for t in self.inputs],
            "outputs": [dataclasses.asdict(t) | {"shape": list(t.shape)} for t in self.outputs],
            "dims": {k: dataclasses.asdict(v) for k, v in self.dims.items()},
            "state": dict(self.state),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "IOSpec":
        def tensors(items):
            return [TensorSpec(i["name"], i["dtype"], tuple(i["shape"]), i.get("description", "")) for i in items]

        return cls(
            inputs=tensors(data["inputs"]),
            outputs=tensors(data["outputs"]),
            dims={k: Dim(**v) for k, v in data["dims"].items()},
            state=dict(data.get("state", {})),
        )
