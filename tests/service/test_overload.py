"""Overload is answered early: 429 with Retry-After before the upload is read when the queue cannot be
expected to serve the request before its deadline. Driven by a fake model held on the device."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from tests.live_server import metric_value
from tests.service.conftest import FakeModel, SlowUpload, fake_app, png, rand_image, scope_for, until

pytestmark = pytest.mark.anyio
RAW = {"content-type": "image/png"}


async def occupy(client, model: FakeModel, task: str = "deblur") -> asyncio.Task:
    model.gate.clear()
    model.entered.clear()
    held = asyncio.create_task(client.post(f"/restore/{task}", content=png(rand_image(8, 8, seed=99)), headers=RAW))
    await anyio.to_thread.run_sync(model.entered.wait)
    return held


async def test_a_request_the_queue_cannot_serve_in_time_hears_429_before_its_body_is_read():
    async with fake_app() as (client, model, app):
        batcher = app.state.service.batcher
        held = await occupy(client, model)
        batcher.seed_throughput("deblur", 1.0, 1.0)  # nothing measured yet: 1 pixel/s, so the held batch takes long
        assert batcher.expected_wait("deblur") > 60
        text = (await client.get("/metrics")).text
        assert metric_value(text, "mprnet_queue_expected_wait_seconds", task="deblur") > 60
        late = SlowUpload(b"\x89PNG" * 25_000, first=0)  # its body never arrives
        with anyio.fail_after(10):
            await app(scope_for([(b"content-length", b"100000")], "/restore/deblur"), late.receive, late.send)
        assert late.answer()[0] == 429 and not late.first_sent.is_set()
        assert int(late.headers()[b"retry-after"]) > 60
        model.gate.set()
        assert (await held).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric_value(text, "mprnet_rejected_total", task="deblur", reason="queue_full") == 1
        # measured now: the fake model is fast, so the same request is admitted and served
        assert batcher.expected_wait("deblur") < 1
        r = await client.post("/restore/deblur", content=png(rand_image(8, 8, seed=1)), headers=RAW)
        assert r.status_code == 200


async def test_a_shorter_client_deadline_is_refused_where_the_default_is_admitted():
    async with fake_app() as (client, model, app):
        batcher = app.state.service.batcher
        held = await occupy(client, model)
        batcher.seed_throughput("deblur", 32 * 32 / 5, 1.0)  # the held request (a 32x32 bucket): about 5 s left
        short = await client.post("/restore/deblur", content=png(rand_image(8, 8, seed=2)),
                                  headers={**RAW, "X-Request-Timeout": "2"})
        assert short.status_code == 429 and short.json()["code"] == "queue_full"
        patient = asyncio.create_task(client.post("/restore/deblur", content=png(rand_image(8, 8, seed=3)),
                                                  headers=RAW))
        await until(lambda: batcher.depth("deblur") >= 1)
        model.gate.set()
        assert (await held).status_code == 200 and (await patient).status_code == 200
