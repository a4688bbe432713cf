"""`Service.restore` / `restore_pixels` / `restore_many` without HTTP: what a protocol front-end relies on."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time

import anyio
import numpy as np
import pytest
import torch
from PIL import Image

from service.errors import ServiceError
from service.pipeline import Images, Timings
from tests.service.conftest import decode, fake_app, png, rand_image, until

pytestmark = pytest.mark.anyio
IMG = rand_image(20, 30, seed=3)


def call(service) -> dict:
    now = time.monotonic()
    return {"arrived": now, "deadline": service.deadline(now, None), "request_id": "pipe-1"}


async def test_encoded_and_raw_pixels_go_in_and_come_out_in_every_combination():
    async with fake_app() as (_, _, app):
        service = app.state.service
        body, timings = await service.restore("deblur", png(IMG), fmt="png", **call(service))
        assert (decode(body) == IMG).all() and isinstance(timings, Timings)
        pixels, _ = await service.restore_pixels("deblur", png(IMG), **call(service))
        assert pixels.dtype == np.uint8 and pixels.shape == (20, 30, 3) and (pixels == IMG).all()
        pixels, timings = await service.restore_pixels("derain", IMG, **call(service))
        assert (pixels == IMG).all() and timings.inference >= 0
        body, _ = await service.restore("denoise", IMG, fmt="png", **call(service))
        assert (decode(body) == IMG).all()
        body, _ = await service.restore("denoise", IMG, fmt="jpeg", quality=95, **call(service))
        reference = io.BytesIO()
        Image.fromarray(IMG).save(reference, "JPEG", quality=95)
        assert (decode(body) == decode(reference.getvalue())).all()  # encoded as an RGB image of those pixels


@pytest.mark.parametrize(
    ("pixels", "status"),
    [(np.zeros((4, 4), np.uint8), 400), (np.zeros((4, 4, 3), np.float32), 400), (np.zeros((4, 4, 4), np.uint8), 400),
     (np.zeros((0, 4, 3), np.uint8), 400), (np.zeros((300, 300, 3), np.uint8), 413)],
)
async def test_bad_raw_pixels_are_a_client_error(pixels, status):
    async with fake_app(max_pixels=256 * 256) as (_, _, app):
        service = app.state.service
        with pytest.raises(ServiceError) as e:
            await service.restore_pixels("deblur", pixels, **call(service))
        assert e.value.status == status


async def test_a_lazy_source_is_opened_only_once_admitted_and_left_once_queued():
    async with fake_app(queue_max_requests=1) as (_, model, app):
        service = app.state.service
        events = []

        @contextlib.asynccontextmanager
        async def upload():
            events.append("open")
            yield png(IMG)
            events.append(("close", service.batcher.depth()))

        model.gate.clear()
        model.entered.clear()  # warm-up set it
        first = asyncio.create_task(service.restore("deblur", upload, fmt="png", **call(service)))
        await anyio.to_thread.run_sync(model.entered.wait)
        second = asyncio.create_task(service.restore("deblur", upload, fmt="png", **call(service)))
        await until(lambda: service.batcher.depth() >= 1)
        assert events == ["open", ("close", 1), "open", ("close", 1)]  # each left with its request queued
        with pytest.raises(ServiceError) as e:  # the queue is full: refused before the source is opened
            await service.restore("deblur", upload, fmt="png", **call(service))
        assert e.value.code == "queue_full" and len(events) == 4
        model.gate.set()
        assert (decode((await first)[0]) == IMG).all() and (decode((await second)[0]) == IMG).all()


async def test_gone_drops_a_queued_request_before_compute():
    async with fake_app() as (client, model, app):
        service = app.state.service
        model.gate.clear()
        model.entered.clear()  # warm-up set it
        busy = asyncio.create_task(service.restore("deblur", rand_image(8, 8, seed=9), fmt="png", **call(service)))
        await anyio.to_thread.run_sync(model.entered.wait)
        went_away = asyncio.Event()
        gone_image = rand_image(16, 16, seed=10)
        restoring = service.restore_pixels("deblur", gone_image, gone=went_away.wait, **call(service))
        dropped = asyncio.create_task(restoring)
        await until(lambda: service.batcher.depth() >= 1)
        went_away.set()
        with pytest.raises(ServiceError) as e:
            await dropped
        assert e.value.code == "disconnected" and service.batcher.depth() == 0
        model.gate.set()
        await busy
        assert not model.saw(torch.from_numpy(gone_image).permute(2, 0, 1).float() / 255)  # the model sees [0, 1]


async def test_a_watch_that_fails_means_waiting_for_the_answer_alone():
    async with fake_app() as (_, _, app):
        service = app.state.service

        async def unwatchable():
            raise OSError("cannot watch this connection")

        pixels, _ = await service.restore_pixels("deblur", IMG, gone=unwatchable, **call(service))
        assert (pixels == IMG).all()


async def test_an_unknown_task_is_404_and_a_passed_deadline_504():
    async with fake_app() as (client, _, app):
        service = app.state.service
        with pytest.raises(ServiceError) as e:
            await service.restore_pixels("dehaze", IMG, **call(service))
        assert (e.value.status, e.value.code) == (404, "unknown_task")
        now = time.monotonic()
        deadline = now + 0.2

        @contextlib.asynccontextmanager
        async def slow_upload():  # the deadline passes while the body arrives
            await anyio.sleep(deadline - time.monotonic() + 0.01)
            yield png(IMG)

        with pytest.raises(ServiceError) as e:
            await service.restore("deblur", slow_upload, fmt="png", arrived=now, deadline=deadline)
        assert (e.value.status, e.value.code) == (504, "deadline")
        assert service.batcher.depth() == 0 and not service.batcher.pixels()


def test_server_timing_lists_the_four_steps_in_ms():
    header = Timings(0.001, 0.002, 0.0305, 0).server_timing()
    assert header == "decode;dur=1.0, queue;dur=2.0, inference;dur=30.5, encode;dur=0.0"


async def test_restore_with_hands_the_restored_image_and_the_input_metadata_to_finish():
    async with fake_app() as (_, _, app):
        service = app.state.service
        grey = rand_image(12, 10, seed=11, channels=1)

        def both(restored, decoded):
            return restored.shape, decoded.meta.channels, decoded.format

        (shape, channels, fmt), _ = await service.restore_with("deblur", png(grey), both, **call(service))
        assert (tuple(shape), channels, fmt) == ((3, 12, 10), 1, "PNG")



def many(service, body: bytes = b"body", **overrides) -> tuple[dict, list]:
    """Arguments for `restore_many`, and the list of what happened: the body opened / released / closed."""
    events: list = []

    @contextlib.asynccontextmanager
    async def opened(deadline):
        events.append("open")
        try:
            yield body, lambda: events.append("release")
        finally:
            events.append("close")

    now = time.monotonic()
    return {"body": opened, "arrived": now, "timeout": None, "request_id": "many-1", **overrides}, events


def finished(restored, decoded):
    return restored.permute(1, 2, 0).numpy(), decoded.format


@pytest.mark.parametrize("inline", [True, False])
async def test_restore_many_parses_the_body_once_admitted_and_restores_each_image(inline):
    async with fake_app() as (_, _, app):
        service = app.state.service
        grey = rand_image(6, 9, seed=12)
        parsed_in = []

        def parse(data):
            parsed_in.append((data, threading.current_thread().name))
            return "the call", Images([png(IMG), grey], finished)

        kwargs, events = many(service)
        call, results = await service.restore_many("derain", parse=parse, parse_inline=lambda data: inline, **kwargs)
        assert call == "the call" and events == ["open", "release", "close"]
        (data, thread), = parsed_in
        assert data == b"body" and (thread == threading.current_thread().name) == inline  # else a codec thread
        ((first, fmt), timings), ((second, raw), _) = results
        assert (first == IMG).all() and fmt == "PNG" and (second == grey).all() and raw == "pixels"
        assert isinstance(timings, Timings) and service.uploads.used == 0


async def test_restore_many_answers_the_first_client_error_and_drops_the_other_images():
    async with fake_app() as (_, model, app):
        service = app.state.service
        kwargs, events = many(service)
        parse = lambda data: (None, Images([rand_image(7, 7, seed=13), b"not an image"], finished))  # noqa: E731
        with pytest.raises(ServiceError) as e:
            await service.restore_many("deblur", parse=parse, parse_inline=lambda data: True, **kwargs)
        assert e.value.status == 400 and events == ["open", "release", "close"]
        assert service.batcher.depth() == 0 and service._in_flight == 0


async def test_restore_many_keeps_to_the_shorter_of_the_header_timeout_and_the_requests_own():
    async with fake_app() as (_, _, app):
        service = app.state.service
        kwargs, events = many(service, timeout=60)
        parse = lambda data: (None, Images([IMG], finished, timeout_s=1e-6))  # noqa: E731
        with pytest.raises(ServiceError) as e:  # refused at the image's admission, or at its deadline
            await service.restore_many("deblur", parse=parse, parse_inline=lambda data: True, **kwargs)
        assert e.value.status in (429, 504) and events[0] == "open" and events[-1] == "close"
        kwargs, _ = many(service, timeout=1e-6)
        with pytest.raises(ServiceError) as e:  # the header's limit alone: refused before the body is opened
            await service.restore_many("deblur", parse=parse, parse_inline=lambda data: True, **kwargs)
        assert e.value.status == 429
