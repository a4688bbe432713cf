"""The sum of uploads held in memory is capped (MPRNET_MAX_INFLIGHT_UPLOAD_BYTES): 429, nothing lost."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.errors import ServiceError
from service.http_io import UploadBudget
from tests.service.conftest import decode, fake_app, png, rand_image

pytestmark = pytest.mark.anyio


def scope_for(headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/restore/denoise",
            "raw_path": b"/restore/denoise", "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("test", 80),
            "headers": [(b"content-type", b"image/png"), *headers]}


class SlowUpload:
    """An ASGI request whose body arrives in two parts, the second only when released."""

    def __init__(self, body: bytes) -> None:
        self.parts = [body[: len(body) // 2], body[len(body) // 2 :]]
        self.release = asyncio.Event()
        self.first_sent = asyncio.Event()
        self.messages: list[dict] = []

    async def receive(self) -> dict:
        if len(self.parts) == 2:
            self.first_sent.set()
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


def test_budget_arithmetic():
    budget = UploadBudget(100)
    budget.take(60)
    with pytest.raises(ServiceError) as e:
        budget.take(41)
    assert e.value.status == 429 and e.value.code == "uploads_busy" and "Retry-After" in e.value.headers
    budget.take(40)
    budget.give(100)
    assert budget.used == 0


@pytest.mark.parametrize("declared", [True, False])
async def test_a_held_upload_blocks_others_until_it_is_decoded(declared):
    image = rand_image(32, 32, seed=1)
    body = png(image)
    assert 2 * len(body) > 4096 > len(body)
    async with fake_app(max_upload_bytes=4096, max_inflight_upload_bytes=4096) as (client, _, app):
        slow = SlowUpload(body)
        headers = [(b"content-length", str(len(body)).encode())] if declared else [(b"transfer-encoding", b"chunked")]
        first = asyncio.create_task(app(scope_for(headers), slow.receive, slow.send))
        await slow.first_sent.wait()
        await asyncio.sleep(0.05)
        service = app.state.service
        assert service.uploads.used == (len(body) if declared else len(body) // 2)
        # a second upload does not fit next to the first: refused at once, with Retry-After
        other = png(rand_image(32, 32, seed=2))
        assert service.uploads.used + len(other) > 4096
        busy = await client.post("/restore/denoise", content=other, headers={"content-type": "image/png"})
        assert busy.status_code == 429 and busy.json()["code"] == "uploads_busy" and int(busy.headers["Retry-After"]) >= 1
        slow.release.set()
        await asyncio.wait_for(first, 30)
        status, content = slow.answer()
        assert status == 200 and np.array_equal(decode(content), image)  # the held upload lost nothing
        assert service.uploads.used == 0
        again = await client.post("/restore/denoise", content=other, headers={"content-type": "image/png"})
        assert again.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert "mprnet_upload_bytes_in_flight 0.0" in metrics
        assert 'mprnet_rejected_total{reason="uploads_busy",task="denoise"} 1.0' in metrics


async def test_refused_and_failed_uploads_give_their_bytes_back():
    async with fake_app(max_upload_bytes=4096, max_inflight_upload_bytes=8192) as (client, _, app):
        for data in (b"not an image at all", png(rand_image(8, 8, seed=3))[:60], b"\x89PNG" + b"\0" * 5000):
            r = await client.post("/restore/denoise", content=data, headers={"content-type": "image/png"})
            assert 400 <= r.status_code < 500
        assert app.state.service.uploads.used == 0


def test_budget_smaller_than_one_upload_is_refused_at_start_up():
    from tests.service.conftest import test_settings

    with pytest.raises(ValueError, match="MPRNET_MAX_INFLIGHT_UPLOAD_BYTES"):
        test_settings(max_upload_bytes=1 << 20, max_inflight_upload_bytes=1 << 19)
