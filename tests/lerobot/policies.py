"""What the LeRobot policy tests share: saving a policy with its processors the way LeRobot does, and observations
as a robot gives them to `Policy.act`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_with_processors(policy, cfg, stats: dict, cams: tuple[str, ...], generator, out: Path) -> Path:
    """`policy` + LeRobot's pre/post-processors (with `stats` plus random per-camera MEAN_STD stats) saved by LeRobot's
    own save_pretrained into `out`: config.json, model.safetensors, processor JSON and safetensors."""
    import torch
    from lerobot.policies.factory import make_pre_post_processors

    for k in cams:
        stats[k] = {"mean": torch.rand(3, 1, 1, generator=generator) * 0.5 + 0.25,
                    "std": torch.rand(3, 1, 1, generator=generator) * 0.2 + 0.1}
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    return out


def random_observations(n: int, cams: tuple[str, ...], image_chw: tuple[int, int, int], state_dim: int,
                        seed: int = 3) -> list[dict[str, np.ndarray]]:
    """`n` observations: a uint8 HxWx3 frame per camera and a float32 state vector."""
    rng = np.random.default_rng(seed)
    return [{**{k: rng.integers(0, 256, (image_chw[1], image_chw[2], 3), dtype=np.uint8) for k in cams},
             "observation.state": rng.standard_normal(state_dim).astype(np.float32)} for _ in range(n)]


def load_with_processors(policy_cls, pretrained: Path):
    """LeRobot's `policy_cls` and its pre/post-processors, loaded from a pretrained_model folder by LeRobot itself."""
    from lerobot.policies.factory import make_pre_post_processors

    policy = policy_cls.from_pretrained(pretrained).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(pretrained))
    return policy, pre, post


def assert_same_weights(pretrained: Path, checkpoint: Path) -> None:
    """The native checkpoint holds LeRobot's weights, tensor for tensor (same names, exactly equal)."""
    import torch
    from safetensors.torch import load_file

    from vla_export.checkpoint import load_checkpoint

    theirs = load_file(str(pretrained / "model.safetensors"))
    ours = load_checkpoint(checkpoint).model.state_dict()
    assert set(theirs) == set(ours)
    for k, v in theirs.items():
        assert torch.equal(v, ours[k]), k


def import_export_bundle(pretrained: Path, root: Path) -> dict[str, Path]:
    """A LeRobot pretrained_model folder through `vla-export checkpoint --from-lerobot` (the CLI, as a user runs it),
    the ONNX export with its parity gate, and a bundle: the paths the policy tests read."""
    from click.testing import CliRunner

    from vla_export.cli import main
    from vla_export.deploy.bundle import make_bundle
    from vla_export.export.onnx_export import ExportOptions, export_checkpoint

    result = CliRunner().invoke(main, ["checkpoint", "--from-lerobot", str(pretrained), "-o", str(root / "ckpt")])
    assert result.exit_code == 0, result.output
    artifact = Path(export_checkpoint(root / "ckpt", root / "artifacts",
                                      ExportOptions(n_inputs=2, batch_sizes=(1, 2), quiet=True)).artifact)
    make_bundle(artifact, root / "bundle")
    return {"root": root, "pretrained": pretrained, "checkpoint": root / "ckpt", "artifact": artifact,
            "bundle": root / "bundle"}
