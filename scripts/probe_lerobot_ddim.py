"""Probe: does LeRobot's Diffusion Policy with a fixed-step DDIM sampler (noise as an input) export to ONNX and match
LeRobot's own sampler? Run in the LeRobot environment:
PYTHONPATH=. .venv-lerobot/bin/python scripts/probe_lerobot_ddim.py
(`lerobot-diffusion`, vla_export/lerobot/diffusion.py, grew out of this probe and its sampler is used here.)

The sampler loop iterates Python ints (the scheduler's timesteps read once, outside the traced forward), so
diffusers' `DDIMScheduler.step` indexes `alphas_cumprod` with constants and traces; `int(t)` of a timestep tensor
inside the traced forward is a data-dependent guard torch.export refuses. Prints: parameters, max |ours - LeRobot
generate_actions| in eager, max |ORT - eager|, export wall time. Measured (2-core Xeon, loaded, torch 2.10 CPU):
11.24 M parameters, eager 0, ORT 6.9e-7 at 5 DDIM steps, export 232 s and 490 s (two runs, load 8-15); through
`DiffusionSampler` (05 Dec 2026, load 6): eager 0, ORT 1.5e-6, export 62 s.
"""

from __future__ import annotations

import time

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

from vla_export.lerobot.diffusion import DiffusionSampler  # the architecture's own sampler, not a copy

STEPS = 5


def main() -> None:
    cfg = DiffusionConfig(
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (5,)),
                        "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 64, 64))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))},
        n_obs_steps=2, horizon=8, n_action_steps=4, crop_shape=(56, 56), down_dims=(16, 32), kernel_size=3,
        n_groups=4, diffusion_step_embed_dim=16, spatial_softmax_num_keypoints=8, pretrained_backbone_weights=None,
        noise_scheduler_type="DDIM", num_inference_steps=STEPS, device="cpu", push_to_hub=False)
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg).eval()
    sampler = DiffusionSampler(policy).eval()
    feeds = {"observation_state": torch.randn(2, 2, 5), "observation_images": torch.rand(2, 2, 1, 3, 64, 64),
             "noise": torch.randn(2, 8, 4)}
    with torch.no_grad():
        ours = sampler(**feeds)
        theirs = policy.diffusion.generate_actions(
            {"observation.state": feeds["observation_state"], "observation.images": feeds["observation_images"]},
            noise=feeds["noise"])
    print(f"parameters {sum(p.numel() for p in policy.parameters())}; eager vs LeRobot max abs "
          f"{(ours - theirs).abs().max().item():.3g}")
    batch = torch.export.Dim("batch", min=1, max=8)
    start = time.perf_counter()
    program = torch.onnx.export(sampler, (), kwargs=feeds, dynamo=True, optimize=True, verbose=False,
                                dynamic_shapes={k: {0: batch} for k in feeds})
    program.save("/tmp/ddim_probe.onnx")
    export_s = time.perf_counter() - start
    import onnxruntime as ort

    out = ort.InferenceSession("/tmp/ddim_probe.onnx").run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    print(f"ORT vs eager max abs {abs(out - ours.numpy()).max():.3g}; export {export_s:.0f} s")


if __name__ == "__main__":
    main()
