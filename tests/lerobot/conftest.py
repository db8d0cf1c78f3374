"""LeRobot tests need LeRobot 0.4 (pip install 'vla-export[lerobot]'), which pins torch<2.11 and so lives in its own
environment: scripts/lerobot_env.sh builds .venv-lerobot and runs `pytest -m lerobot` there."""

from __future__ import annotations

import importlib.util

import pytest

LEROBOT_MISSING = None if importlib.util.find_spec("lerobot") else (
    "LeRobot is not installed here; run scripts/lerobot_env.sh (its own environment: lerobot pins torch<2.11)")


def pytest_collection_modifyitems(config, items):
    if LEROBOT_MISSING:
        skip = pytest.mark.skip(reason=LEROBOT_MISSING)
        for item in items:
            if item.get_closest_marker("lerobot"):
                item.add_marker(skip)
