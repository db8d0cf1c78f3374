"""User architectures (`--arch tests.export_plugins:<factory>`) that exercise the export stage's failure paths.

`build`: a forward using an operator no ONNX exporter lowers, `torch.linalg.qr` (neither torch.onnx's dynamo
translation table nor the TorchScript symbolics have it). `build_gated`: a forward torch.export cannot trace but
the TorchScript exporter can (the auto fallback)."""

from __future__ import annotations

import torch
from torch import nn

from vla_export.io_spec import Dim, IOSpec, TensorSpec


class QROrthonormalizer(nn.Module):
    def forward(self, x):
        return torch.linalg.qr(x)[0]


class QRPolicy(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.basis = QROrthonormalizer()
        self.head = nn.Linear(width * width, 2)

    def forward(self, x):
        return self.head(self.basis(self.proj(x)).flatten(1))


def build(cfg):
    width = int(cfg.get("width", 4))
    spec = IOSpec(
        inputs=[TensorSpec("x", "float32", ("batch", width, width))],
        outputs=[TensorSpec("actions", "float32", ("batch", 2))],
        dims={"batch": Dim("batch", 1, 1, 8)},
    )
    return QRPolicy(width).eval(), spec


class GatedPolicy(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it; the TorchScript tracer records the
    branch the example takes (always the same one here: a sum of absolute values is never negative)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Linear(width, 2)

    def forward(self, x):
        if bool(x.abs().sum() >= 0):
            return self.net(x)
        return -self.net(x)


def build_gated(cfg):
    width = int(cfg.get("width", 4))
    spec = IOSpec(
        inputs=[TensorSpec("x", "float32", ("batch", width))],
        outputs=[TensorSpec("actions", "float32", ("batch", 2))],
        dims={"batch": Dim("batch", 1, 1, 8)},
    )
    return GatedPolicy(width).eval(), spec
