"""A user architecture plugged in with `--arch tests.plugin_arch:build`: a module plus its IO spec."""

from __future__ import annotations

from torch import nn

from vla_export.io_spec import Dim, IOSpec, TensorSpec


class TinyMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def build(cfg):
    width = int(cfg.get("width", 4))
    spec = IOSpec(
        inputs=[TensorSpec("x", "float32", ("batch", width))],
        outputs=[TensorSpec("actions", "float32", ("batch", 2))],
        dims={"batch": Dim("batch", 1, 1, 8)},
    )
    return TinyMLP(width).eval(), spec
