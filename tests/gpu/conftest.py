"""GPU tests run only with `pytest -m gpu` on a machine with a CUDA GPU; elsewhere they skip."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import pytest

# tests/ (helpers shared with the CPU suite, e.g. expert_checks.py) is importable from the GPU tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _gpu_arch() -> int | None:
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    if dev.platform != "gpu":
        return None
    return int(str(getattr(dev, "compute_capability", "0")).split(".")[0])


GPU_ARCH = _gpu_arch()


def pytest_collection_modifyitems(config, items):
    if GPU_ARCH is not None:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cpu_device():
    return jax.devices("cpu")[0]
