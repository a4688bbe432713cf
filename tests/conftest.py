"""Shared test set-up: the `gpu` marker, and small fixtures any test package may use.

Packages add their own conftest.py for what only they need; keep this one generic and cheap
(nothing here runs unless a test asks for it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests run on torch unless they name an engine (the CLI and the service read this too): OpenVINO
# exports and compiles each model before its first image, and has tests of its own.
os.environ.setdefault("MPRNET_ENGINE", "torch")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` (declared in pyproject.toml) skip cleanly where CUDA is absent."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (none available here)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """Hyperparameters of a tiny MPRNet (a few thousand parameters, fast on the CPU)."""
    from model.variants import TINY

    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MPRNet with seeded random weights, saved as safetensors (load with `model.load_mprnet`)."""
    import torch

    from model.arch import MPRNet
    from model.checkpoint import save_safetensors
    from model.variants import TINY

    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_safetensors(MPRNet(**TINY), path)
    return path


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo crop, 64 x 96 x 3 uint8 (skimage's astronaut: face, suit and flag; plenty of edges)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100:164, 150:246])
