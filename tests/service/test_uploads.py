"""The sum of uploads held in memory is capped (MPRNET_MAX_INFLIGHT_UPLOAD_BYTES): 429, nothing lost."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.errors import ServiceError
from service.http_io import UploadBudget
from tests.live_server import metric_value
from tests.service.conftest import SlowUpload, decode, fake_app, png, rand_image, scope_for

pytestmark = pytest.mark.anyio


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
        assert service.uploads.used == len(body) // 2, slow.messages  # counted as it arrives, declared or not
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


async def test_uploads_that_declare_a_size_and_send_nothing_hold_nothing_and_time_out_with_408():
    body = png(rand_image(32, 32, seed=4))
    limits = {"max_upload_bytes": 4096, "max_inflight_upload_bytes": 4096, "upload_idle_timeout_s": 0.5}
    async with fake_app(**limits) as (client, _, app):
        silent = [SlowUpload(b"\0" * 4096, first=0) for _ in range(6)]
        calls = [asyncio.create_task(app(scope_for([(b"content-length", b"4096")]), s.receive, s.send)) for s in silent]
        for s in silent:
            await s.first_sent.wait()
        assert app.state.service.uploads.used == 0  # declared, not received: nothing reserved
        r = await client.post("/restore/denoise", content=body, headers={"content-type": "image/png"})
        assert r.status_code == 200
        await asyncio.wait_for(asyncio.gather(*calls), 30)
        for s in silent:
            status, content = s.answer()
            assert status == 408 and b'"code":"upload_timeout"' in content and b"0.5 s" in content
            assert s.headers()[b"connection"] == b"close"
        text = (await client.get("/metrics")).text
        assert metric_value(text, "mprnet_rejected_total", task="denoise", reason="upload_timeout") == 6


async def test_a_body_still_arriving_at_the_request_deadline_is_408():
    body = png(rand_image(32, 32, seed=5))
    async with fake_app() as (_, model, app):
        slow = SlowUpload(body)  # half of it, then nothing
        warm_up = len(model.batches)
        await asyncio.wait_for(app(scope_for([(b"x-request-timeout", b"0.3")]), slow.receive, slow.send), 30)
        status, content = slow.answer()
        assert status == 408 and b"deadline" in content
        assert app.state.service.uploads.used == 0 and len(model.batches) == warm_up


async def test_a_drain_cuts_stalled_uploads_with_503_and_lets_arriving_ones_finish():
    stalled_body, arriving_body = png(rand_image(32, 32, seed=6)), png(rand_image(32, 32, seed=7))
    async with fake_app() as (_, _, app):
        stalled, arriving = SlowUpload(stalled_body), SlowUpload(arriving_body)
        calls = [asyncio.create_task(app(scope_for([]), u.receive, u.send)) for u in (stalled, arriving)]
        await stalled.first_sent.wait()
        await arriving.first_sent.wait()
        app.state.service.start_drain()
        arriving.release.set()  # its next bytes come at once
        await asyncio.wait_for(asyncio.gather(*calls), 30)
        status, content = stalled.answer()
        assert status == 503 and b'"code":"draining"' in content and stalled.headers()[b"connection"] == b"close"
        status, content = arriving.answer()
        assert status == 200 and np.array_equal(decode(content), decode(arriving_body))
        assert app.state.service.uploads.used == 0


async def test_the_end_of_a_drain_cuts_every_upload_still_arriving():
    async with fake_app() as (_, _, app):
        slow = SlowUpload(png(rand_image(32, 32, seed=8)))
        call = asyncio.create_task(app(scope_for([]), slow.receive, slow.send))
        await slow.first_sent.wait()
        app.state.service.uploads.drain(0)
        await asyncio.wait_for(call, 10)
        assert slow.answer()[0] == 503


def multipart(field: str, data: bytes, boundary: str = "b0undary") -> tuple[bytes, bytes]:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
    head += "Content-Type: image/png\r\n\r\n"
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}".encode()


async def test_a_multipart_upload_holds_about_the_image_s_bytes_not_twice_them():
    """The body is parsed as it arrives (spooled to disk past 1 MB), so the memory held at the peak is
    the image read out once, plus a chunk; it was the whole body plus a copy of the image."""
    import tracemalloc

    from starlette.requests import Request

    from service.http_io import image_bytes

    image = np.random.default_rng(0).bytes(4 << 20)
    body, ctype = multipart("image", image)
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]

    async def receive() -> dict:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    request = Request({**scope_for([(b"content-type", ctype)]), "headers": [(b"content-type", ctype)]}, receive)
    tracemalloc.start()
    try:
        got = await image_bytes(request, len(body))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == image
    assert peak < 1.3 * len(image), f"peak {peak / len(image):.2f}x the image"
