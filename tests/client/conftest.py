"""Fixtures for examples/client.py: the module itself (it is a script, not a package) and a stub API."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.client.stub_api import StubState, create_stub_app, serve

CLIENT_PATH = Path(__file__).resolve().parents[2] / "examples" / "client.py"


@pytest.fixture(scope="session")
def client_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mprnet_example_client", CLIENT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stub() -> Iterator[tuple[str, StubState]]:
    """(base URL, the stub's state to script answers and read what arrived)."""
    state = StubState()
    with serve(create_stub_app(state)) as url:
        yield url, state
