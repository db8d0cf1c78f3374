"""A tiny end-to-end bundle (checkpoint -> ONNX -> bundle) for the deploy tests and `scripts/bench_ros2.py`.

Real parts throughout: a tiny-preset model with random weights, word-level tokenizers over the synthetic
instructions, an ONNX export through the export stage when it is installed (else `torch.onnx.export(dynamo=True)`
with the same manifest fields), and `make_bundle`. Seconds on a CPU.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ARCH = "kosmos2-clip-hybrid"


def build_tiny_checkpoint(out_dir: str | os.PathLike, head: str = "lstm", seed: int = 0,
                          action_names: list[str] | None = None, preset: str = "tiny") -> Path:
    """A native checkpoint with tokenizers (random weights, fixed by `seed`); tiny unless `preset` says otherwise."""
    import torch

    from vla_export.checkpoint import make_config, save_checkpoint
    from vla_export.data.episodes import synth_instructions
    from vla_export.data.preprocess import build_tokenizers
    from vla_export.models import build_model

    overrides = {"head": head}
    if action_names:
        overrides["action_dim"] = len(action_names)
    config = make_config(ARCH, preset, overrides, action_names=action_names)
    torch.manual_seed(seed)
    model, _ = build_model(ARCH, config["model_config"])
    mc = config["model_config"]
    # presets that keep transformers' defaults (full) do not spell the vocabulary sizes out
    vocab = {"kosmos": int(mc["kosmos"].get("text_config", {}).get("vocab_size", 65037)),
             "clip": int(mc["clip"].get("text_config", {}).get("vocab_size", 49408))}
    with tempfile.TemporaryDirectory() as tmp:
        names = build_tokenizers(tmp, synth_instructions(), vocab)
        return save_checkpoint(model, out_dir, config, extra_files={n: Path(tmp) / n for n in names.values()})


def export_tiny_onnx(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """`model.onnx` + manifest for a checkpoint: the export stage when installed, else a direct dynamo export."""
    try:
        from vla_export.export.onnx_export import ExportOptions, export_checkpoint
    except ImportError:
        return _direct_export(checkpoint, out_dir)
    # a small parity check keeps this quick; the export stage's own tests cover its gate
    opts = ExportOptions(n_inputs=2, batch_sizes=(1,), rollout_steps=2, quiet=True)
    return Path(export_checkpoint(checkpoint, out_dir, opts).artifact)


def _direct_export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    import torch

    from vla_export import manifest as mf
    from vla_export.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    spec = ckpt.spec
    out_dir = mf.check_writable_dir(out_dir)
    feeds = {k: torch.from_numpy(v) for k, v in spec.example_inputs(batch=2, seed=0).items()}
    with mf.staging_dir(out_dir) as tmp, mf.measured() as m:
        staged = tmp / "model.onnx"
        program = torch.onnx.export(ckpt.model, (), kwargs=feeds, dynamo=True,
                                    dynamic_shapes=spec.torch_dynamic_shapes(), input_names=spec.input_names,
                                    output_names=spec.output_names, optimize=True, verbose=False)
        program.save(str(staged))
        final = mf.publish(mf.artifact_files(staged), out_dir)[0]
    manifest = mf.new_manifest(
        "export", final, backend="onnxruntime", precision="fp32", variant="onnx-fp32", io_spec=spec.to_json(),
        source={"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": ckpt.sha256, "artifact": None,
                "artifact_sha256": None},
        settings={"exporter": "torch.onnx.export(dynamo=True)", "opset": None}, timing=dict(m), status="passed")
    mf.write_manifest(final, manifest)
    return final


def build_tiny_bundle(work_dir: str | os.PathLike, head: str = "lstm", seed: int = 0, preset: str = "tiny",
                      budgets: dict | None = None) -> Path:
    """checkpoint -> ONNX -> bundle under `work_dir`; returns the bundle directory (`work_dir/bundle`)."""
    from vla_export.deploy.bundle import make_bundle

    work_dir = Path(work_dir)
    ckpt = build_tiny_checkpoint(work_dir / "checkpoint", head=head, seed=seed, preset=preset)
    onnx_path = export_tiny_onnx(ckpt, work_dir / "artifacts")
    make_bundle(onnx_path, work_dir / "bundle", budgets=budgets)
    return work_dir / "bundle"
