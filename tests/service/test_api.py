"""The HTTP API in-process with a fake model: readiness, auth, headers, formats, metrics, overload,
deadlines, disconnects, model errors, out of memory and drain."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
import torch

from service import codec
from service.app import create_app
from tests.live_server import metric_value
from tests.service.conftest import (
    FakeModel,
    asgi_call,
    decode,
    fake_app,
    fake_models,
    png,
    rand_image,
    running,
    test_settings,
    until,
)

pytestmark = pytest.mark.anyio
IMG = rand_image(20, 30, seed=1)
RAW = {"content-type": "image/png"}


def as_tensor(arr) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


async def occupy(client, model: FakeModel):
    """Start a request whose batch is held on the device until `model.gate` opens; returns its task."""
    model.gate.clear()
    model.entered.clear()
    task = asyncio.create_task(client.post("/restore/deblur", content=png(rand_image(8, 8, seed=99)), headers=RAW))
    await anyio.to_thread.run_sync(model.entered.wait)
    return task


async def test_readiness_waits_for_warm_up():
    model = FakeModel()
    model.gate.clear()  # warm-up blocks in the model
    app = create_app(test_settings(ui_enabled=False), models=fake_models(model=model))
    async with running(app) as client:
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_ready" and r.headers["Retry-After"]
        assert r.json()["tasks"]["deblur"] == {"ready": False, "detail": "warming up"}
        assert (await client.get("/livez")).status_code == 200
        r = await client.post("/restore/deblur", content=png(IMG), headers=RAW)
        assert r.status_code == 503 and r.json()["code"] == "not_ready"
        assert metric_value((await client.get("/metrics")).text, "mprnet_model_ready", task="deblur") == 0
        model.gate.set()
        with anyio.fail_after(20):
            while (r := await client.get("/readyz")).status_code != 200:
                await anyio.sleep(0.01)
        assert r.json()["status"] == "ready" and r.json()["device"]["ok"]
        assert metric_value((await client.get("/metrics")).text, "mprnet_model_ready", task="deblur") == 1


async def test_restore_answers_the_image_with_request_id_and_server_timing():
    async with fake_app() as (client, _, _):
        r = await client.post("/restore/denoise", content=png(IMG), headers={**RAW, "X-Request-ID": "abc-123"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-request-id"] == "abc-123"
        steps = [p.split(";")[0].strip() for p in r.headers["server-timing"].split(",")]
        assert steps == ["decode", "queue", "inference", "encode"]
        assert (decode(r.content) == IMG).all()  # identity model: the image comes back unchanged
        form = {"image": ("x.png", png(IMG), "image/png")}
        r = await client.post("/restore/denoise", files=form, headers={"X-Request-ID": "bad id\x7f"})
        assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32  # an unusable id is replaced
        assert (await client.get("/livez")).headers["x-request-id"]


async def test_output_format_from_query_and_accept():
    async with fake_app() as (client, _, _):
        r = await client.post("/restore/derain?format=jpeg&quality=80", content=png(IMG), headers=RAW)
        assert r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
        r = await client.post("/restore/derain", content=png(IMG), headers={**RAW, "Accept": "image/webp"})
        assert r.headers["content-type"] == "image/webp" and r.content[8:12] == b"WEBP"
        accept = "image/avif,image/webp;q=0.5,*/*;q=0.1"
        r = await client.post("/restore/derain", content=png(IMG), headers={**RAW, "Accept": accept})
        assert r.headers["content-type"] == "image/webp"
        r = await client.post("/restore/derain", content=png(IMG), headers={**RAW, "Accept": "text/html"})
        assert r.status_code == 406 and r.json()["code"] == "not_acceptable"
        r = await client.post("/restore/derain?format=gif", content=png(IMG), headers=RAW)
        assert r.status_code == 422 and r.json()["code"] == "invalid_request"
        r = await client.post("/restore/derain?quality=0", content=png(IMG), headers=RAW)
        assert r.status_code == 422


async def test_bearer_token_guards_restore_and_tasks_only():
    async with fake_app(api_token="s3cret") as (client, _, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            r = await client.post("/restore/deblur", content=png(IMG), headers={**RAW, **headers})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and r.json()["code"] == "unauthorized"
            assert (await client.get("/tasks", headers=headers)).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/restore/deblur", content=png(IMG), headers={**RAW, **ok})).status_code == 200
        assert (await client.get("/tasks", headers=ok)).status_code == 200
        for path in ("/livez", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200


async def test_tasks_describes_models_and_batching():
    async with fake_app() as (client, _, app):
        body = (await client.get("/tasks")).json()
    assert set(body["tasks"]) == {"deblur", "derain", "denoise"}
    assert body["tasks"]["derain"]["paper_task"] == "Deraining" and body["tasks"]["derain"]["ready"] is True
    assert body["batching"]["static_shapes"] == ["32x32", "64x32", "32x64", "64x64"]
    assert app.state.service.planner.static_shapes() == [(32, 32), (32, 64), (64, 32), (64, 64)]  # (h, w) for warm-up


async def test_metrics_expose_the_contract_names():
    async with fake_app() as (client, _, _):
        assert (await client.post("/restore/deblur", content=png(rand_image(70, 90, seed=3)), headers=RAW)).status_code == 200
        text = (await client.get("/metrics")).text
    for name in (
        "mprnet_requests_total", "mprnet_request_duration_seconds_bucket", "mprnet_queue_wait_seconds_bucket",
        "mprnet_inference_duration_seconds_bucket", "mprnet_batch_size_requests_bucket", "mprnet_batch_size_tiles_bucket",
        "mprnet_queue_depth_requests", "mprnet_queue_depth_megapixels", "mprnet_queue_oldest_wait_seconds",
        "mprnet_queue_expected_wait_seconds",
        "mprnet_megapixels_processed_total", "mprnet_padding_waste_ratio_bucket", "mprnet_rejected_total", "mprnet_model_ready",
        "mprnet_gpu_memory_allocated_bytes", "mprnet_gpu_memory_reserved_bytes",
    ):
        assert f"\n{name}{{" in text, name
    assert metric_value(text, "mprnet_requests_total", task="deblur", status="200") == 1
    assert metric_value(text, "mprnet_batch_size_tiles_sum", task="deblur") == 4  # 70x90 -> 2x2 tiles of 64
    assert metric_value(text, "mprnet_megapixels_processed_total", task="deblur") == pytest.approx(70 * 90 / 1e6)


async def test_full_queue_answers_429_with_retry_after():
    async with fake_app(queue_max_requests=1) as (client, model, app):
        first = await occupy(client, model)
        queued = asyncio.create_task(client.post("/restore/deblur", content=png(IMG), headers=RAW))
        await until(lambda: app.state.service.batcher.depth() == 1)
        r = await client.post("/restore/denoise", content=png(IMG), headers=RAW)
        assert r.status_code == 429 and r.json()["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        model.gate.set()
        assert (await first).status_code == 200 and (await queued).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric_value(text, "mprnet_rejected_total", task="denoise", reason="queue_full") == 1


async def test_deadline_passed_in_queue_is_504_and_never_computed():
    async with fake_app() as (client, model, _):
        first = await occupy(client, model)
        late = rand_image(24, 24, seed=5)
        r = await client.post("/restore/deblur", content=png(late), headers={**RAW, "X-Request-Timeout": "0.2"})
        assert r.status_code == 504 and r.json()["code"] == "deadline"
        model.gate.set()
        assert (await first).status_code == 200
        assert not model.saw(as_tensor(late))
        assert metric_value((await client.get("/metrics")).text, "mprnet_rejected_total", task="deblur", reason="deadline") == 1


async def test_deadline_passed_while_waiting_for_a_decode_thread_is_504_then(monkeypatch):
    """With every codec thread busy (here held by the test), a request whose deadline passes is answered
    504 at its deadline, not once a thread frees; its decode never runs."""
    decodes = []
    real = codec.decode
    monkeypatch.setattr(codec, "decode", lambda *args: decodes.append(1) or real(*args))
    async with fake_app(codec_threads=1) as (client, _, app):
        held, release = threading.Event(), threading.Event()
        pool = app.state.service.codec_pool
        busy = pool.submit(lambda: held.set() or release.wait(30))
        await anyio.to_thread.run_sync(held.wait)
        try:
            with anyio.fail_after(10):  # without the fix: answered only after `release`, which comes after
                r = await client.post("/restore/deblur", content=png(IMG), headers={**RAW, "X-Request-Timeout": "0.2"})
        finally:
            release.set()
        assert r.status_code == 504 and r.json()["code"] == "deadline", r.text
        await anyio.to_thread.run_sync(busy.result)
        await anyio.to_thread.run_sync(pool.submit(lambda: None).result)  # the single thread ran what was queued
        assert decodes == []
        assert (await client.post("/restore/deblur", content=png(IMG), headers=RAW)).status_code == 200


async def dropped_when_gone(path: str, body: bytes, headers: dict[str, str], images: list) -> str:
    """Queue a request behind a held batch, let its client go away: it is dropped before compute, its
    `images` never reach the model. Returns the /metrics text after."""
    async with fake_app() as (client, model, app):
        first = await occupy(client, model)
        disconnect = anyio.Event()
        call, _ = asgi_call(app, path, body, headers, None, disconnect)
        await until(lambda: app.state.service.batcher.depth() == len(images))
        disconnect.set()
        with anyio.fail_after(10):
            await call
        assert app.state.service.batcher.depth() == 0
        model.gate.set()
        assert (await first).status_code == 200
        assert not any(model.saw(as_tensor(image)) for image in images)
        return (await client.get("/metrics")).text


async def test_client_that_disconnects_while_queued_is_dropped_before_compute():
    gone_image = rand_image(16, 16, seed=6)
    text = await dropped_when_gone("/restore/deblur", png(gone_image), RAW, [gone_image])
    assert metric_value(text, "mprnet_rejected_total", task="deblur", reason="disconnected") == 1
    assert metric_value(text, "mprnet_requests_total", task="deblur", status="499") == 1


async def test_model_error_is_a_json_500_and_the_service_keeps_serving():
    model = FakeModel()
    async with fake_app(model) as (client, _, _):
        model.fn = lambda x: (_ for _ in ()).throw(RuntimeError("kaboom"))
        r = await client.post("/restore/deblur", content=png(IMG), headers={**RAW, "X-Request-ID": "req-42"})
        assert r.status_code == 500 and r.json()["code"] == "inference_failed" and "kaboom" not in r.text
        model.fn = lambda x: x.clone()
        assert (await client.post("/restore/deblur", content=png(IMG), headers=RAW)).status_code == 200


def oom_over(pixels: int):
    """A fake model that runs out of memory on any item of more than `pixels` pixels."""

    def fn(x):
        if x.shape[-1] * x.shape[-2] > pixels:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return x.clone()

    return fn


async def test_out_of_memory_falls_back_to_smaller_tiles_then_503_for_that_request_only():
    model = FakeModel()
    async with fake_app(model) as (client, _, _):
        model.fn = oom_over(40 * 40)  # the 64x64 bucket does not fit, 32x32 tiles do
        small = rand_image(40, 40, seed=8)
        r = await client.post("/restore/deblur", content=png(small), headers=RAW)
        assert r.status_code == 200 and (decode(r.content) == small).all()
        model.fn = oom_over(0)  # nothing fits
        r = await client.post("/restore/deblur", content=png(rand_image(60, 60, seed=7)), headers=RAW)
        assert r.status_code == 503 and r.json()["code"] == "out_of_memory" and r.headers["Retry-After"]
        model.fn = lambda x: x.clone()
        assert (await client.post("/restore/denoise", content=png(small), headers=RAW)).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert metric_value((await client.get("/metrics")).text, "mprnet_rejected_total", task="deblur", reason="oom") == 1


async def test_draining_turns_readiness_and_new_work_away():
    async with fake_app() as (client, _, app):
        app.state.service.start_drain()
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        assert (await client.get("/livez")).status_code == 200
        r = await client.post("/restore/deblur", content=png(IMG), headers=RAW)
        assert r.status_code == 503 and r.json()["code"] == "draining" and r.headers["Retry-After"]


async def test_a_task_this_server_does_not_load_is_404():
    app = create_app(test_settings(ui_enabled=False, tasks="denoise"), models=fake_models(("denoise",)))
    async with running(app) as client:
        r = await client.post("/restore/deblur", content=png(IMG), headers=RAW)
        assert r.status_code == 404 and r.json()["code"] == "unknown_task" and "denoise" in r.json()["detail"]


async def test_a_device_failure_turns_readiness_and_liveness_red():
    model = FakeModel()
    async with fake_app(model) as (client, _, _):
        model.fn = lambda x: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access was encountered"))
        r = await client.post("/restore/deblur", content=png(IMG), headers=RAW)
        assert r.status_code == 500 and r.json()["code"] == "inference_failed"
        ready = await client.get("/readyz")
        device = ready.json()["device"]
        assert ready.status_code == 503 and not device["ok"] and "illegal memory access" in device["detail"]
        assert (await client.get("/livez")).status_code == 503  # a sticky CUDA error needs a new process


async def test_an_unexpected_error_is_a_logged_json_500_with_the_request_id():
    async with fake_app() as (client, _, app):
        def broken(image):
            raise ZeroDivisionError("a bug")

        app.state.service.planner.plan = broken
        r = await client.post("/restore/deblur", content=png(IMG), headers={**RAW, "X-Request-ID": "req-7"})
        assert r.status_code == 500
        assert r.json() == {"detail": "Internal error; quote request id req-7.", "code": "internal_error"}
        assert r.headers["x-request-id"] == "req-7" and "a bug" not in r.text
        assert metric_value((await client.get("/metrics")).text, "mprnet_requests_total", task="deblur", status="500") == 1
        assert (await client.get("/livez")).status_code == 200


async def test_a_batcher_that_dies_is_logged_at_once_fails_its_requests_and_turns_readiness_off(caplog):
    async with fake_app() as (client, _, app):
        service = app.state.service

        def broken(task):
            raise RuntimeError("a bug in the batcher")

        service.batcher._take = broken  # the consumer's next batch kills it
        with caplog.at_level("CRITICAL", logger="service"):
            # without the done-callback this waited for its deadline (504), and readiness stayed green
            r = await client.post("/restore/deblur", content=png(IMG), headers={**RAW, "X-Request-Timeout": "20"})
        assert r.status_code == 500 and r.json()["code"] == "inference_failed"
        assert any("batcher's consumer stopped" in rec.getMessage() and rec.exc_info for rec in caplog.records)
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "batcher stopped" in ready.json()["tasks"]["deblur"]["detail"]
        live = await client.get("/livez")
        assert live.status_code == 503 and live.json()["status"] == "batcher_failed"
        assert (await client.get("/v2/health/live")).status_code == 503
        r = await client.post("/restore/denoise", content=png(IMG), headers=RAW)
        assert r.status_code == 503 and r.json()["code"] == "not_ready"
        assert metric_value((await client.get("/metrics")).text, "mprnet_model_ready", task="deblur") == 0


async def test_stop_logs_a_background_task_that_had_failed(caplog):
    app = create_app(test_settings(ui_enabled=False), models=fake_models())
    service = app.state.service

    def broken(pixels):
        raise RuntimeError("warm-up bug")

    service.batcher.seed_request_pixels = broken  # outside warm-up's per-task handling: the task dies
    with caplog.at_level("ERROR", logger="service"):
        async with running(app):
            await until(lambda: service._tasks[1].done())
        # stop() used to swallow it
    logged = [rec for rec in caplog.records if "warm-up had failed" in rec.getMessage()]
    assert logged and "warm-up bug" in str(logged[0].exc_info[1])
