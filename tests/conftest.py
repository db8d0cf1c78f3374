"""Shared test setup: GPU/TensorRT/ROS tests are skipped with their reason where the machine lacks them."""

from __future__ import annotations

import importlib.util

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _tensorrt_status() -> str | None:
    """None when TensorRT can build here, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'vla-export[trt]' on a machine with a CUDA GPU)"
    if not _cuda_available():
        return "TensorRT is installed but no CUDA GPU is available"
    return None


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    trt_reason = _tensorrt_status()
    no_trt = pytest.mark.skip(reason=trt_reason or "")
    for item in items:
        if "gpu" in item.keywords and not _cuda_available():
            item.add_marker(no_gpu)
        if "tensorrt" in item.keywords and trt_reason:
            item.add_marker(no_trt)
