"""Fixtures for the service tests: fake models driven by events, in-process apps, images as bytes."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model.engine_api import InferenceEngine
from service.app import create_app
from service.loading import TaskModel
from service.settings import Settings
from tests.live_server import TEST_ENV, tiny_weights

torch.set_num_threads(1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeModel(InferenceEngine):
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
        return any(
            torch.equal(item[:, :h, :w], image)
            for b in self.batches
            for item in b
            if item.shape[1] >= h and item.shape[2] >= w
        )


def fake_models(tasks=("deblur", "derain", "denoise"), model: FakeModel | None = None) -> dict[str, TaskModel]:
    return {t: TaskModel(task=t, engine=model or FakeModel(), device=torch.device("cpu"), precision="fp32") for t in tasks}


def test_settings(**overrides) -> Settings:
    env = {k.removeprefix("MPRNET_").lower(): v for k, v in TEST_ENV.items()}
    env.update(overrides)
    return Settings(**env)


test_settings.__test__ = False  # a helper, not a test


@asynccontextmanager
async def running(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client talking to it in-process."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30) as client,
    ):
        yield client


async def until(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    """Wait until `condition()` holds (state that another task changes, e.g. the queue depth); a bounded wait."""
    with anyio.fail_after(timeout_s):
        while not condition():
            await anyio.sleep(0.005)


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


def asgi_call(app, path: str, body: bytes, headers: dict[str, str], body_ready=None, disconnect=None):
    """POST `body` to the app at the ASGI level, as a server would: the body arrives once `body_ready` (an
    anyio.Event, or None: at once) is set, and the client goes away when `disconnect` is set. Returns the
    call's task and the list of messages the app sent."""
    import anyio

    sent: list[dict] = []
    given = False
    disconnect = disconnect or anyio.Event()

    async def receive():
        nonlocal given
        if not given:
            if body_ready is not None:
                await body_ready.wait()
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    raw = [(k.encode(), v.encode()) for k, v in {**headers, "content-length": str(len(body))}.items()]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
        "server": ("test", 80), "headers": raw,
    }
    return asyncio.create_task(app(scope, receive, send)), sent


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


def scope_for(headers: list[tuple[bytes, bytes]], path: str = "/restore/denoise") -> dict:
    """The ASGI scope of a POST of a PNG to `path` with extra `headers`, for driving the app directly."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
            "server": ("test", 80), "headers": [(b"content-type", b"image/png"), *headers]}


class SlowUpload:
    """An ASGI request whose body arrives in two parts, the second only when released. `first`: bytes of
    the first part (default half; 0: nothing arrives until the release)."""

    def __init__(self, body: bytes, first: int | None = None) -> None:
        n = len(body) // 2 if first is None else first
        self.parts = [body[:n], body[n:]] if n else [body]
        self.release = asyncio.Event()
        self.first_sent = asyncio.Event()  # the app asked for the body (and got the first part, if any)
        self.messages: list[dict] = []

    async def receive(self) -> dict:
        self.first_sent.set()
        if len(self.parts) == 2:
            return {"type": "http.request", "body": self.parts.pop(0), "more_body": True}
        if self.parts:
            await self.release.wait()
            return {"type": "http.request", "body": self.parts.pop(0), "more_body": False}
        await asyncio.Event().wait()  # then the client just waits for its answer
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.messages.append(message)

    def answer(self) -> tuple[int, bytes]:
        status = next(m["status"] for m in self.messages if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    def headers(self) -> dict[bytes, bytes]:
        return dict(next(m["headers"] for m in self.messages if m["type"] == "http.response.start"))
