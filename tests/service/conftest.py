"""Fixtures for the service tests: fake models driven by events, in-process apps, images as bytes."""

from __future__ import annotations

import io
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.app import create_app
from service.loading import TaskModel
from service.settings import Settings
from tests.live_server import TEST_ENV, tiny_weights

torch.set_num_threads(1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeModel:
    """Identity (or `fn`) model that records every batch; `gate` (set by default) holds it on demand."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.fn = fn or (lambda x: x.clone())
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set whenever a batch reaches the model
        self.batches: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def run_batch(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.batches.append(x.clone())
        self.entered.set()
        if not self.gate.wait(30):
            raise RuntimeError("test gate never opened")
        return self.fn(x)

    def saw(self, image: torch.Tensor) -> bool:
        """Did any batch contain an item whose top-left corner equals `image`'s?"""
        _, h, w = image.shape
        return any(torch.equal(item[:, :h, :w], image) for b in self.batches for item in b if item.shape[1] >= h and item.shape[2] >= w)


def fake_models(tasks=("deblur", "derain", "denoise"), model: FakeModel | None = None) -> dict[str, TaskModel]:
    return {t: TaskModel(task=t, runner=model or FakeModel(), device=torch.device("cpu"), precision="fp32") for t in tasks}


def test_settings(**overrides) -> Settings:
    env = {k.removeprefix("MPRNET_").lower(): v for k, v in TEST_ENV.items()}
    env.update(overrides)
    return Settings(**env)


test_settings.__test__ = False  # a helper, not a test


@asynccontextmanager
async def running(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client talking to it in-process."""
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30) as client:
        yield client


async def wait_ready(client: httpx.AsyncClient) -> None:
    import anyio

    with anyio.fail_after(30):
        while (await client.get("/readyz")).status_code != 200:
            await anyio.sleep(0.01)


@asynccontextmanager
async def fake_app(model: FakeModel | None = None, **settings) -> AsyncIterator[tuple[httpx.AsyncClient, FakeModel, object]]:
    model = model or FakeModel()
    app = create_app(test_settings(ui_enabled=False, **settings), models=fake_models(model=model))
    async with running(app) as client:
        await wait_ready(client)
        yield client, model, app


def png(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **save)
    return buf.getvalue()


def rand_image(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("weights"))
