"""Admission by expected wait (service/admission.py), through the batcher whose queue it reads: refusals
with the wait, admitted-not-queued requests, tiled requests and round-robin in the estimate, the measured
throughput replacing the seed, the check again at submit. A fake model on the real device worker."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from service.batcher import MicroBatcher
from service.errors import QueueFull
from tests.service.conftest import FakeModel
from tests.service.test_batcher import batcher, occupy, plan, queue, submit

pytestmark = pytest.mark.anyio


# ---- admission by expected wait: 64-pixel items at a seeded 64 pixels/s, one second of work each ----------


def slow(b: MicroBatcher, *tasks: str, pixels_per_s: float = 64.0) -> MicroBatcher:
    for task in tasks or b.tasks:
        b.seed_throughput(task, pixels_per_s, 1.0)
    return b


def admit_in(b: MicroBatcher, task: str, seconds: float):
    return b.admit(task, asyncio.get_running_loop().time() + seconds)


async def test_a_request_that_cannot_start_before_its_deadline_is_refused_at_once_with_the_wait():
    model = FakeModel()
    async with batcher(model) as b:
        slow(b)
        first = await occupy(b, model)  # 1 s of work on the device
        queued = [submit(b, plan(float(v))) for v in range(3)]  # 3 s more ahead of a newcomer
        assert 3.0 < b.expected_wait("a") <= 4.0
        with pytest.raises(QueueFull) as refused:
            admit_in(b, "a", 2.5)
        assert refused.value.status == 429 and "work ahead takes about" in refused.value.detail
        assert int(refused.value.headers["Retry-After"]) == 4  # the same figure, rounded up
        with admit_in(b, "a", 30) as ticket:  # a later deadline is admitted
            late = queue(b, ticket, plan(5.0))
        model.gate.set()
        with anyio.fail_after(10):
            for job in [first, *queued, late]:
                await job.future


async def test_admitted_requests_not_yet_queued_count_so_a_burst_is_admitted_only_as_far_as_it_can_be_served():
    model = FakeModel()
    async with batcher(model) as b:
        slow(b)
        b.seed_request_pixels(64)  # an undecoded request is assumed to be one 8x8 item
        tickets = [admit_in(b, "a", 3.5) for _ in range(4)]  # waits 0, 1, 2 and 3 s: all start in time
        with pytest.raises(QueueFull):
            admit_in(b, "a", 3.5)  # the fifth would wait 4 s
        tickets[0].close()  # one went away before it was queued: its place is free again
        tickets[0] = admit_in(b, "a", 3.5)
        jobs = [queue(b, t, plan(float(v))) for v, t in enumerate(tickets)]
        with anyio.fail_after(10):
            for job in jobs:
                await job.future


async def test_a_newcomer_waits_for_one_batch_of_a_tiled_request_and_one_batch_per_round_of_other_tasks():
    model = FakeModel()
    async with batcher(model, max_batch_size=2, batch_pixels=128) as b:
        slow(b)
        first = await occupy(b, model)
        big = submit(b, plan(1.0, items=20))  # 20 s of tiles of task a, but a newcomer waits for one batch of 2
        others = [submit(b, plan(float(v)), "b") for v in range(10)]  # 10 s of task b: one batch of 2 per round
        # the device's 1 s, one batch of the tiled request (2 s), and one batch of b (2 s) before each batch of a
        assert 1.0 + 2.0 + 2.0 * 2 - 0.5 < b.expected_wait("a") <= 1.0 + 2.0 + 2.0 * 2
        with admit_in(b, "a", 8.0) as ticket:
            newcomer = queue(b, ticket, plan(7.0))
        with pytest.raises(QueueFull):
            admit_in(b, "b", 8.0)  # behind ten queued requests of its own task
        model.gate.set()
        with anyio.fail_after(30):
            for job in [first, big, *others, newcomer]:
                await job.future


async def test_the_first_measured_batch_replaces_the_seeded_throughput():
    model = FakeModel()
    async with batcher(model) as b:
        slow(b, pixels_per_s=1.0)  # 64 s per item until something is measured
        job = submit(b, plan(1.0))
        with anyio.fail_after(10):
            await job.future  # the fake model answers at once: a high measured throughput
        first = await occupy(b, model)
        queued = submit(b, plan(2.0))
        assert b.expected_wait("a") < 5.0  # was 128 s with the seed
        with admit_in(b, "a", 10.0) as ticket:
            newcomer = queue(b, ticket, plan(3.0))
        model.gate.set()
        with anyio.fail_after(10):
            for j in (first, queued, newcomer):
                await j.future


async def test_a_request_larger_than_its_estimate_is_checked_again_with_its_size_when_submitted():
    model = FakeModel()
    async with batcher(model, queue_max_pixels=1000) as b:
        first = await occupy(b, model)
        with admit_in(b, "a", 60) as ticket:  # admitted before its size was known
            with pytest.raises(QueueFull):
                queue(b, ticket, plan(1.0, shape=(32, 32)))  # 1024 pixels > the queue's 1000
        assert b.depth() == 0 and b.admission._pending["a"] == 0
        model.gate.set()
        with anyio.fail_after(10):
            await first.future
