"""Fixtures of the model tests: an exact identity network, and the reference state-dict listing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.model.nets import IdentityNet

# The machines these tests run on have 2 cores shared with other jobs; one intra-op thread avoids
# the spin-waiting of oversubscribed thread pools (measured: a 64x64 derain forward took 20 s with
# 2 threads on a loaded machine and 1 s with one).
torch.set_num_threads(1)

# ../shared/reference/ beside the repository (where CI and the project's machines keep it)
STATE_DICTS_JSON = REPO_ROOT.parent / "shared" / "reference" / "mprnet_state_dicts.json"


@pytest.fixture
def identity() -> IdentityNet:
    return IdentityNet()


@pytest.fixture(scope="session")
def reference_state_dicts() -> dict:
    """The released checkpoints' keys and shapes (skips when ../shared/reference is absent)."""
    if not STATE_DICTS_JSON.is_file():
        pytest.skip(f"reference listing not found at {STATE_DICTS_JSON} (it lives beside the repository in CI)")
    return json.loads(Path(STATE_DICTS_JSON).read_text())
