"""`Policy`: a bundle at run time. Camera frame (RGB uint8) + instruction -> actions, with the LSTM state carried.

The artifact runs through the same runner as `validate` (`vla_export.runtime.open_runner`), fed by the same
`Preprocessor` and the same dtype cast (`validate.validate.cast_feeds`), with the recurrent state fed back as
`validate.validate.rollout` does, so `act` returns the numbers validation measured for that artifact.

Backends (what `backend=` accepts for each kind of bundled artifact):
- ONNX (`onnxruntime` manifests): `onnxruntime` (CUDA execution provider when available, else CPU), `tensorrt`
  (ONNX Runtime's TensorRT execution provider, only where it is available), `auto` (the fastest of those this machine
  runs, by the bundle's profile numbers when it has them for each, else CUDA before CPU).
- TensorRT engine: `tensorrt` / `auto` (needs TensorRT and a CUDA GPU: BackendUnavailable, exit 4, otherwise).
- AOTInductor package (`.pt2`): `aoti` / `torch` / `auto`. `torch` means "run in the PyTorch runtime", which a
  bundle can only do through a compiled package: bundles carry no weights for eager PyTorch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla_export.errors import BackendUnavailable, GateFailed, UserError

log = logging.getLogger("vla_export.deploy")

BACKENDS = ("auto", "onnxruntime", "tensorrt", "aoti", "torch")
ORT_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class SelfTestFailed(GateFailed):
    """The bundle's artifact misses its budgets on this machine (exit 3, like any failed accuracy gate)."""


@dataclass
class Candidate:
    backend: str  # what Policy.backend reports
    provider: str | None = None  # ORT execution provider
    device: str | None = None
    p50_ms: float | None = None  # batch-1 latency from the bundle's profile, when it has one for this row

    def describe(self) -> str:
        where = self.provider or self.device or ""
        return f"{self.backend} ({where})" if where else self.backend


# -- profile numbers -----------------------------------------------------------------------------------------------------
def _find_p50(obj: Any, depth: int = 0) -> float | None:
    """Batch-1 p50 of a profile row: `p50_ms` at the top, else under a batch-1 entry, else the first one found."""
    if not isinstance(obj, dict) or depth > 4:
        return None
    if isinstance(obj.get("p50_ms"), (int, float)):
        return float(obj["p50_ms"])
    keys = sorted(obj, key=lambda k: (not any(tag in str(k) for tag in ("batch_1", "b1", "1")), str(k)))
    for k in keys:
        v = _find_p50(obj[k], depth + 1)
        if v is not None:
            return v
    return None


def _profile_p50(info: dict[str, Any], cand: Candidate) -> float | None:
    prof = info.get("profile")
    if not isinstance(prof, dict):
        return None
    for row in prof.get("rows", []):
        if row.get("status") not in (None, "ok") or row.get("batch") not in (None, 1):
            continue
        if cand.provider and row.get("provider") not in (None, cand.provider):
            continue
        if cand.device and row.get("device") not in (None, cand.device):
            continue
        if isinstance(row.get("batches"), dict):  # vla_export.validate.profile rows: batches["1"]["p50_ms"]
            row = row["batches"].get("1") or {}
        p50 = _find_p50(row)
        if p50 is not None:
            return p50
    return None


# -- backend choice --------------------------------------------------------------------------------------------------------
def backend_candidates(info: dict[str, Any], requested: str = "auto") -> list[Candidate]:
    """What this machine may run the bundle's artifact with, best first; raises UserError/BackendUnavailable."""
    if requested not in BACKENDS:
        raise UserError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    kind = info.get("backend")
    name = info.get("artifact")
    if kind == "onnxruntime":
        from vla_export.runtime import ORT_PROVIDER_DEVICE, available_ort_providers

        providers = available_ort_providers()
        if requested in ("aoti", "torch"):
            raise UserError(f"backend {requested!r} needs a bundle made from an AOTInductor .pt2 (bundles carry no "
                            f"PyTorch weights); {name} is ONNX: use onnxruntime, tensorrt or auto")
        if requested == "tensorrt":
            if "TensorrtExecutionProvider" not in providers:
                raise BackendUnavailable(f"backend tensorrt for ONNX bundle {name} needs ONNX Runtime's "
                                         f"TensorrtExecutionProvider (available: {', '.join(providers)}); "
                                         "use --backend onnxruntime or bundle a TensorRT engine")
            return [Candidate("tensorrt", "TensorrtExecutionProvider", "cuda")]
        # ORT's TensorRT provider builds an engine at load (minutes); `auto` uses it only when profiled fastest.
        usable = [p for p in ORT_PREFERENCE if p in providers and (p != "TensorrtExecutionProvider" or requested
                                                                     == "auto")]
        cands = [Candidate("tensorrt" if p == "TensorrtExecutionProvider" else "onnxruntime", p,
                           ORT_PROVIDER_DEVICE[p]) for p in usable]
        for c in cands:
            c.p50_ms = _profile_p50(info, c)
        if requested == "auto":
            cands = [c for c in cands if c.provider != "TensorrtExecutionProvider" or c.p50_ms is not None]
            if cands and all(c.p50_ms is not None for c in cands):
                cands.sort(key=lambda c: c.p50_ms)
        if not cands:
            raise BackendUnavailable(f"ONNX Runtime offers no usable execution provider here ({providers})")
        return cands
    if kind == "tensorrt":
        if requested not in ("auto", "tensorrt"):
            raise UserError(f"bundle artifact {name} is a TensorRT engine; it runs only with backend tensorrt "
                            "(or auto)")
        from vla_export.engines.tensorrt import import_tensorrt

        import_tensorrt()  # BackendUnavailable naming what is missing (TensorRT, a CUDA GPU)
        return [Candidate("tensorrt", None, "cuda", _profile_p50(info, Candidate("tensorrt", None, "cuda")))]
    if kind == "aoti":
        if requested not in ("auto", "aoti", "torch"):
            raise UserError(f"bundle artifact {name} is an AOTInductor package; run it with backend aoti (or torch, "
                            "auto)")
        device = info.get("device") or "cpu"
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BackendUnavailable(f"bundle artifact {name} was compiled for {device} but no CUDA GPU is visible")
        return [Candidate("aoti" if requested == "auto" else requested, None, device)]
    raise UserError(f"bundle artifact {name} has unknown backend {kind!r}; rebuild the bundle")


# -- images ------------------------------------------------------------------------------------------------------------------
def check_image(image: Any) -> np.ndarray:
    """One RGB uint8 HxWx3 frame, else UserError saying what is wrong with it."""
    from vla_export.data.preprocess import check_image_batch

    if not isinstance(image, np.ndarray):
        raise UserError(f"image must be a numpy uint8 array HxWx3 (RGB), got {type(image).__name__}")
    if image.ndim != 3:
        raise UserError(f"image must be HxWx3 RGB uint8, got shape {tuple(image.shape)}; convert grayscale/other "
                        "layouts to 3-channel RGB first")
    return check_image_batch(image[None])[0]


class Policy:
    """A loaded bundle. `act(image, instruction)` -> actions; `reset()` at the start of each episode."""

    def __init__(self, bundle_dir: Path, info: dict[str, Any], runner, preprocessor, candidate: Candidate,
                 reason: str, preprocess_threads: int | None = 1, processor=None):
        self.bundle_dir = bundle_dir
        self.info = info
        self.runner = runner
        self.preprocessor = preprocessor
        self.backend = candidate.backend
        self.provider = candidate.provider
        self.device = candidate.device
        self.backend_reason = reason
        self.spec = runner.spec  # the artifact's own IO spec, from its manifest
        self.preprocess_threads = preprocess_threads
        self._state: dict[str, np.ndarray] | None = None
        self.selftest: dict[str, Any] | None = None
        # The bundle's own processor (vla_export.processors), when it has one: observations -> feeds, outputs ->
        # actions (normalisation, action chunks). Without one, `preprocessor` is the hybrid's Preprocessor.
        self.processor = processor

    # -- loading ----------------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle_dir: str | os.PathLike, backend: str = "auto", *, verify: bool = True,
             threads: int | None = None, preprocess_threads: int | None = 1, artifact: str | None = None,
             step_modules: Sequence[str] = ()) -> "Policy":
        """Verify the bundle (sha256 of every file), build its preprocessing, open its artifact on `backend`, and
        run the quick part of the bundle's self-test on this machine (`verify=False` skips both).

        The self-test runs the artifact on a few stored inputs and one raw frame and compares them with the fp32
        reference that travelled with the bundle, against the bundle's budgets: an artifact that was fine where it was
        validated can be wrong here (another CPU's INT8 kernels, an engine built on this GPU). A failure raises
        `SelfTestFailed` (exit 3) with one line; `self.selftest` holds the result.

        `artifact`: which of the bundle's artifacts to run (default: the one it was made with; `vla-export trt
        --bundle` adds engines built on the target).

        `threads`: ONNX Runtime intra-op threads (None: ORT's default, one per core). On a CPU shared with other
        work fewer can be faster: a parallel op waits for its slowest thread (measured on a loaded 2-core machine,
        tiny model: p50 11.3 ms with ORT's default 2 threads, 3.0 ms with 1).

        `preprocess_threads`: torch threads while resizing a frame (None: leave torch's setting). One frame's
        resize takes ~1 ms on one thread; spread over threads it only adds synchronisation, which on a busy CPU
        (a robot's, or a shared machine) costs far more: measured p50 0.8 ms with 1 thread vs 116 ms with 2 on a
        loaded 2-core machine.

        `step_modules`: modules to import first, which register processor steps written in Python
        (`vla_export.processors.register_step`) that the bundle's processor.json names."""
        import importlib

        from vla_export.data.preprocess import Preprocessor
        from vla_export.deploy.bundle import read_bundle, verify_bundle
        from vla_export.runtime import open_runner

        bundle_dir = Path(bundle_dir)
        info = verify_bundle(bundle_dir) if verify else read_bundle(bundle_dir)
        if artifact is not None:
            from vla_export.deploy.bundle import bundle_artifacts

            held = bundle_artifacts(info)
            if artifact not in held:
                raise UserError(f"bundle {bundle_dir} holds no artifact {artifact!r}; it holds {', '.join(held)}")
            info = {**info, "artifact": artifact, **{k: held[artifact].get(k) for k in ("backend", "precision",
                                                                                        "variant", "device")}}
        from vla_export.processors import Processor, has_processor

        for module in step_modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise UserError(f"cannot import processor step module {module!r} ({e}); check it is installed") from e
        processor = Processor.load(bundle_dir) if has_processor(bundle_dir) else None
        preprocessor = None if processor is not None else Preprocessor.from_checkpoint(bundle_dir)
        candidates = backend_candidates(info, backend)
        artifact = bundle_dir / info["artifact"]
        failures = []
        for cand in candidates:
            runner = open_runner(artifact, device=cand.device, provider=cand.provider)
            if threads and hasattr(runner, "threads"):  # OrtRunner reads it when activated
                runner.threads = int(threads)
            try:
                runner.activate()
            except (BackendUnavailable, UserError) as e:
                failures.append(f"{cand.describe()}: {e}")
                log.warning("policy: cannot use %s (%s); trying the next backend", cand.describe(), e)
                continue
            if backend != "auto":
                reason = "requested"
            elif cand.p50_ms is not None:
                reason = f"fastest available by the bundle's profile (p50 {cand.p50_ms:.3g} ms)"
            else:
                reason = "first available in preference order (no profile numbers for every candidate)"
            if failures:
                reason += f"; skipped {'; '.join(failures)}"
            log.info("policy: %s on %s: backend %s, %s", info["artifact"], bundle_dir, cand.describe(), reason)
            policy = cls(bundle_dir, info, runner, preprocessor, cand, reason, preprocess_threads, processor)
            if verify:
                policy.run_selftest(quick=True)
            return policy
        raise BackendUnavailable(f"no backend could open {artifact.name}: {'; '.join(failures)}")

    def run_selftest(self, quick: bool = True) -> dict[str, Any]:
        """The bundle's self-test on this machine (deploy/selftest.py); SelfTestFailed when a budget fails here."""
        from vla_export.deploy.selftest import SELFTEST_ARRAYS, SelfTest, budget_for, run_end_to_end, run_parity

        if SELFTEST_ARRAYS not in (self.info.get("files") or {}):
            # A bundle made before self-tests existed: nothing to judge with here. It still runs (it passed its
            # hash check); `vla-export verify` refuses it and says to rebuild.
            log.warning("policy: %s has no self-test set (made by an older vla-export); not judged on this machine, "
                        "rebuild it with `vla-export bundle` to get one", self.bundle_dir)
            self.selftest = {"quick": quick, "passed": None, "skipped": "the bundle has no self-test set"}
            return self.selftest
        test = SelfTest(self.bundle_dir)
        budget = budget_for(test.budgets, self.info.get("precision") or "fp32", self.info.get("variant"))
        parity = run_parity(self.runner, test, budget, quick=quick)
        e2e = run_end_to_end(self, test, budget, quick=quick)
        self.selftest = {"quick": quick, "parity": parity, "end_to_end": e2e,
                         "passed": parity["passed"] and e2e["passed"]}
        if not self.selftest["passed"]:
            failed = parity["failures"] + e2e["failures"]
            self.close()
            raise SelfTestFailed(f"{self.info['artifact']} fails the bundle's self-test on this machine "
                                 f"({self.describe()['backend']}): {'; '.join(failed)}; run `vla-export verify "
                                 f"{self.bundle_dir}` for the full report, or rebuild the artifact for this machine")
        return self.selftest

    # -- properties ---------------------------------------------------------------------------------------------------------
    @property
    def action_names(self) -> list[str]:
        return list(self.info["actions"]["names"])

    @property
    def action_units(self) -> list[str]:
        return list(self.info["actions"]["units"])

    @property
    def twist_fields(self) -> dict[str, str]:
        return dict(self.info["actions"].get("twist", {}))

    @property
    def state(self) -> dict[str, np.ndarray] | None:
        return None if self._state is None else {k: v.copy() for k, v in self._state.items()}

    def describe(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle_dir), "artifact": self.info["artifact"], "backend": self.backend,
                "provider": self.provider, "device": self.device, "reason": self.backend_reason,
                "validation": self.info.get("validation")}

    # -- inference ------------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new episode: the recurrent state goes back to zeros (`spec.initial_state`), queued actions and
        ensembles of the processor are dropped."""
        self._state = None
        if self.processor is not None:
            self.processor.reset()

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray], instruction: str | Sequence[str]
                   ) -> dict[str, np.ndarray]:
        """Model feeds for one HxWx3 frame or a batch ([B,H,W,3] or a list), without recurrent state."""
        if isinstance(images, np.ndarray) and images.ndim != 4:
            images = check_image(images)
        elif isinstance(images, (list, tuple)):
            if not images:
                raise UserError("images: got an empty list; pass at least one HxWx3 RGB uint8 frame")
            images = [check_image(im) for im in images]
        elif not isinstance(images, np.ndarray):
            raise UserError(f"image must be a numpy uint8 array HxWx3 (RGB), got {type(images).__name__}")
        if not isinstance(instruction, str) and not (isinstance(instruction, (list, tuple))
                                                     and all(isinstance(t, str) for t in instruction)):
            raise UserError(f"instruction must be a string (or one per image), got {type(instruction).__name__}")
        if self.processor is not None:
            return self._with_threads(self.processor.preprocess, self.observation(images, instruction))
        return self._with_threads(self.preprocessor, images, instruction)

    def _with_threads(self, fn, *args):
        if not self.preprocess_threads:
            return fn(*args)
        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(self.preprocess_threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(saved)

    def observation(self, images, instruction) -> dict[str, Any]:
        """(camera frame(s), instruction) as an observation dict for a processor with one camera (+ text)."""
        cams, text = self.processor.image_keys, self.processor.text_key
        extra = [k for k in self.processor.observation if k not in cams and k != text]
        if len(cams) != 1 or extra:
            raise UserError(f"this policy observes {sorted(self.processor.observation)}: pass an observation dict "
                            "to act(), not an image and an instruction")
        if isinstance(images, (list, tuple)):
            images = np.stack(images)
        obs: dict[str, Any] = {cams[0]: images}
        if text is not None:
            obs[text] = instruction
        return obs

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Actions [B, action_dim] for preprocessed feeds; feeds the recurrent state in and carries it out."""
        return np.asarray(self.run(feeds)["actions"], dtype=np.float32)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All model outputs for preprocessed feeds; feeds the recurrent state in and carries it out."""
        from vla_export.validate.validate import cast_feeds

        b = int(next(iter(feeds.values())).shape[0])
        if self.spec.state:
            if self._state is None:
                self._state = self.spec.initial_state(b)
            held = next(iter(self._state.values())).shape[0]
            if held != b:
                raise UserError(f"the policy holds recurrent state for batch {held}, got batch {b}; call reset() "
                                "before changing the batch size")
            feeds = {**feeds, **self._state}
        return self.keep_state(self.runner.infer(cast_feeds(feeds, self.spec)))

    def keep_state(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Keep the recurrent state of `out` for the next call; returns `out`."""
        from vla_export.io_spec import NUMPY_DTYPES

        if self.spec.state:
            self._state = {inp: out[o].astype(NUMPY_DTYPES[self.spec.tensor(inp).dtype])
                           for o, inp in self.spec.state.items()}
        return out

    def postprocess(self, out: dict[str, np.ndarray]) -> np.ndarray:
        """Model outputs -> actions [B, action_dim]: the recurrent state kept, then the processor's steps
        (de-normalisation, action chunks) when the bundle has one. What `verify` times as postprocessing."""
        self.keep_state(out)
        if self.processor is not None:
            return self.processor.postprocess(out)
        return np.asarray(out["actions"], dtype=np.float32)

    def act(self, image: np.ndarray | Sequence[np.ndarray] | dict[str, Any],
            instruction: str | Sequence[str] | None = None) -> np.ndarray:
        """Actions for one RGB uint8 HxWx3 frame ([action_dim]) or a batch ([B, action_dim]).

        A policy with a processor also takes an observation dict (`observation.images.<cam>`, `observation.state`,
        `task`, as its processor.json declares), one frame or a batch; action chunks are executed one action per
        call (queued, or temporally ensembled) until `reset()`."""
        if self.processor is not None:
            if isinstance(image, dict):
                obs = image
            else:
                if isinstance(image, np.ndarray) and image.ndim == 3:
                    image = check_image(image)
                obs = self.observation(image, instruction)
            _, single = self.processor.batch_observation(obs)  # refuses bad input even when an action is queued
            if self.processor.pending():
                self._with_threads(self.processor.observe, obs)  # an observation history still records it
                actions = self.processor.postprocess(None)
            else:
                actions = self.processor.postprocess(self.run(self._with_threads(self.processor.preprocess, obs)))
            return actions[0] if single else actions
        if isinstance(image, dict) or instruction is None:
            raise UserError("this policy takes act(image, instruction): an RGB uint8 HxWx3 frame and a string")
        single = isinstance(image, np.ndarray) and image.ndim == 3
        actions = self.infer(self.preprocess(image, instruction))
        return actions[0] if single else actions

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> "Policy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
