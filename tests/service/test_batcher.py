"""The micro-batcher with a fake model on the real device worker: batching, grouping, fan-out,
deadlines, cancellation, backpressure, out-of-memory fallback and fairness. Driven by events."""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager

import anyio
import pytest
import torch

from model.images import to_float
from service.batcher import MicroBatcher
from service.errors import DeadlineExceeded, Disconnected, InferenceFailed, OutOfMemory, QueueFull
from service.metrics import Metrics
from service.planner import Plan, Planner
from service.worker import DeviceWorker
from tests.service.conftest import FakeModel, until

pytestmark = pytest.mark.anyio
FAR = 1e9  # a deadline that never comes


def plan(value: float, shape=(8, 8), items: int = 1) -> Plan:
    """`items` items of `shape`, item k filled with value + k (distinct, so results show cross-talk)."""
    x = torch.stack([torch.full((3, *shape), value + k) for k in range(items)])
    return Plan(shape[0], shape[1], shape, x, None)


@asynccontextmanager
async def batcher(model: FakeModel, tasks=("a", "b"), planner: Planner | None = None, **kw):
    worker = DeviceWorker(dict.fromkeys(tasks, model), torch.device("cpu"))
    options = {"max_batch_size": 8, "max_wait_s": 60.0, "batch_pixels": 1e9, "queue_max_requests": 100, "queue_max_pixels": 1e12}
    options.update(kw)
    b = MicroBatcher(tasks, worker.run, Metrics(tasks), replan=planner.smaller if planner else None, **options)
    for task in tasks:
        b.seed_throughput(task, 1e9, 1.0)  # a fast device: admission by expected wait stays out of the way
    consumer = asyncio.create_task(b.run_forever())
    try:
        yield b
    finally:
        model.gate.set()
        consumer.cancel()
        worker.close()


def queue(b: MicroBatcher, ticket, p: Plan):
    """Queue an admitted request (its first item stands for the image, which only the OOM fallback reads)."""
    return b.submit(ticket, p, p.inputs[0])


def submit(b: MicroBatcher, p: Plan, task="a", deadline=FAR):
    with b.admit(task, asyncio.get_running_loop().time() + deadline if deadline != FAR else FAR) as ticket:
        return queue(b, ticket, p)


async def occupy(b: MicroBatcher, model: FakeModel, task="a"):
    """Put one job on the device and hold it there (gate closed) until the test opens the gate."""
    model.gate.clear()
    model.entered.clear()
    job = submit(b, plan(-1.0), task)
    await anyio.to_thread.run_sync(model.entered.wait)
    return job


async def test_lone_request_on_idle_device_runs_at_once():
    model = FakeModel()
    async with batcher(model, max_wait_s=60.0) as b:  # a full window would time the test out
        job = submit(b, plan(3.0))
        with anyio.fail_after(10):
            (out,) = await job.future
    assert torch.equal(out, torch.full((3, 8, 8), 3.0))


async def test_requests_queued_while_busy_form_one_batch_each_with_its_own_result():
    model = FakeModel()
    async with batcher(model) as b:
        first = await occupy(b, model)
        jobs = [submit(b, plan(float(v))) for v in range(5)]
        model.gate.set()
        with anyio.fail_after(10):
            results = [await j.future for j in [first, *jobs]]
    assert [len(batch) for batch in model.batches] == [1, 5]
    for v, (out,) in enumerate(results[1:]):
        assert torch.equal(out, torch.full((3, 8, 8), float(v)))


async def test_open_batch_waits_for_requests_being_decoded_then_closes_without_the_full_window():
    model = FakeModel()
    async with batcher(model, max_wait_s=60.0) as b:
        with b.arriving("a"), b.arriving("a"):
            one = submit(b, plan(1.0))
            await asyncio.sleep(0)  # let the consumer open the batch
            two = submit(b, plan(2.0))
        with anyio.fail_after(10):  # the last arrival closes the batch, not the 60 s window
            await one.future, await two.future
    assert [len(batch) for batch in model.batches] == [2]


async def test_mixed_shapes_are_grouped_and_tiles_of_different_requests_share_a_batch():
    model = FakeModel()
    async with batcher(model, max_batch_size=8) as b:
        first = await occupy(b, model)
        a = submit(b, plan(10.0, (8, 8), items=3))
        c = submit(b, plan(20.0, (16, 8)))
        d = submit(b, plan(30.0, (8, 8), items=4))
        model.gate.set()
        with anyio.fail_after(10):
            outs = [await j.future for j in (first, a, c, d)]
    shapes = [(len(batch), tuple(batch.shape[2:])) for batch in model.batches]
    assert shapes == [(1, (8, 8)), (7, (8, 8)), (1, (16, 8))]
    assert [float(o[0, 0, 0]) for o in outs[1]] == [10.0, 11.0, 12.0]
    assert [float(o[0, 0, 0]) for o in outs[3]] == [30.0, 31.0, 32.0, 33.0]


async def test_a_huge_image_shares_the_device_with_requests_queued_behind_it():
    model = FakeModel()
    async with batcher(model, max_batch_size=2) as b:
        first = await occupy(b, model)
        huge = submit(b, plan(50.0, (16, 16), items=6))
        small = submit(b, plan(60.0, (8, 8)))
        model.gate.set()
        with anyio.fail_after(10):
            await first.future, await huge.future, await small.future
    order = [(len(batch), tuple(batch.shape[2:])) for batch in model.batches[1:]]
    assert order == [(2, (16, 16)), (1, (8, 8)), (2, (16, 16)), (2, (16, 16))]  # not after all six tiles


async def test_megapixel_budget_bounds_a_batch():
    model = FakeModel()
    async with batcher(model, max_batch_size=100, batch_pixels=3 * 64) as b:  # three 8x8 items
        first = await occupy(b, model)
        job = submit(b, plan(0.0, items=7))
        model.gate.set()
        with anyio.fail_after(10):
            await first.future, await job.future
    assert [len(batch) for batch in model.batches] == [1, 3, 3, 1]


async def test_a_failing_batch_fails_every_member_and_the_batcher_keeps_serving():
    calls = []

    def fn(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return x.clone()

    model = FakeModel(fn)
    async with batcher(model) as b:
        first = await occupy(b, model)
        jobs = [submit(b, plan(float(v))) for v in range(3)]
        model.gate.set()
        with anyio.fail_after(10):
            await first.future
            for j in jobs:
                with pytest.raises(InferenceFailed):
                    await j.future
            (out,) = await submit(b, plan(7.0)).future
    assert calls == [1, 3, 1] and float(out[0, 0, 0]) == 7.0


async def test_wrong_output_count_is_an_error_for_all_not_a_hang():
    model = FakeModel(lambda x: x[:1].clone())
    async with batcher(model) as b:
        first = await occupy(b, model)
        jobs = [submit(b, plan(float(v))) for v in range(3)]
        model.gate.set()
        with anyio.fail_after(10):
            await first.future  # a batch of one gets one output: fine
            for j in jobs:
                with pytest.raises(InferenceFailed):
                    await j.future


async def test_deadline_passed_in_queue_is_answered_and_never_computed():
    model = FakeModel()
    async with batcher(model) as b:
        first = await occupy(b, model)
        late = submit(b, plan(5.0), deadline=0.05)
        with anyio.fail_after(10), pytest.raises(DeadlineExceeded):
            await late.future
        assert b.depth() == 0
        model.gate.set()
        await first.future
    assert not model.saw(torch.full((3, 8, 8), 5.0))


async def test_cancelled_request_is_dropped_before_compute():
    model = FakeModel()
    async with batcher(model) as b:
        first = await occupy(b, model)
        gone = submit(b, plan(6.0))
        kept = submit(b, plan(7.0))
        b.cancel(gone, Disconnected())
        model.gate.set()
        with anyio.fail_after(10):
            await first.future, await kept.future
        with pytest.raises(Disconnected):
            gone.future.result()
    assert not model.saw(torch.full((3, 8, 8), 6.0)) and model.saw(torch.full((3, 8, 8), 7.0))


async def test_full_queue_refuses_with_a_retry_after():
    model = FakeModel()
    async with batcher(model, queue_max_requests=2) as b:
        first = await occupy(b, model)  # on the device: no longer queued
        queued = [submit(b, plan(float(v))) for v in range(2)]
        with pytest.raises(QueueFull) as refused:
            submit(b, plan(9.0))
        assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1
        model.gate.set()
        with anyio.fail_after(10):
            await first.future, *[await j.future for j in queued]


async def test_tasks_are_served_round_robin():
    model = FakeModel()
    async with batcher(model, max_batch_size=1) as b:
        first = await occupy(b, model, task="a")
        jobs = [submit(b, plan(float(10 + v)), "a") for v in range(3)] + [submit(b, plan(float(20 + v)), "b") for v in range(3)]
        model.gate.set()
        with anyio.fail_after(10):
            await first.future, *[await j.future for j in jobs]
    served = [int(batch[0, 0, 0, 0]) // 10 for batch in model.batches[1:]]
    assert served == [2, 1, 2, 1, 2, 1]  # after task a's batch: b, a, b, a, ...


def oom_over(pixels: int):
    def fn(x):
        if x.shape[0] * x.shape[2] * x.shape[3] > pixels:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return x.clone()

    return fn


async def test_out_of_memory_splits_the_batch_and_every_request_still_succeeds():
    model = FakeModel(oom_over(2 * 64))  # at most two 8x8 items fit
    async with batcher(model) as b:
        first = await occupy(b, model)
        jobs = [submit(b, plan(float(v))) for v in range(4)]
        model.gate.set()
        with anyio.fail_after(10):
            await first.future
            outs = [await j.future for j in jobs]
    assert [float(o[0][0, 0, 0]) for o in outs] == [0.0, 1.0, 2.0, 3.0]
    assert [len(batch) for batch in model.batches] == [1, 4, 2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])  # 16- and 8-bit images
async def test_out_of_memory_on_one_image_falls_back_to_smaller_tiles(dtype):
    planner = Planner(((64, 64),), tile_size=64, overlap=16)
    model = FakeModel(oom_over(40 * 40))  # a 64x64 item never fits, 32x32 tiles do
    image = torch.rand(3, 50, 60) if dtype == torch.float32 else torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8)
    async with batcher(model, planner=planner) as b:
        p = planner.plan(image)
        job = b.submit(b.admit("a", FAR), p, image)
        with anyio.fail_after(10):
            outs = await job.future
    assert job.plan.shape == (32, 32) and len(outs) == len(job.plan) > 1
    assert job.plan.inputs.dtype == dtype and all(o.dtype == dtype for o in outs)  # re-planned and answered in kind
    assert all(batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1 for batch in model.batches)
    assert torch.allclose(to_float(job.plan.assemble(outs)), to_float(image), atol=1e-6)  # identity model: the image comes back


async def test_out_of_memory_even_in_the_smallest_tiles_answers_that_request_only():
    planner = Planner(((64, 64),), tile_size=64, overlap=16)
    model = FakeModel(oom_over(0))
    async with batcher(model, planner=planner) as b:
        image = torch.rand(3, 40, 40)
        job = b.submit(b.admit("a", FAR), planner.plan(image), image)
        with anyio.fail_after(10), pytest.raises(OutOfMemory) as err:
            await job.future
        assert err.value.status == 503
        model.fn = lambda x: x.clone()  # memory is back: the batcher still serves
        with anyio.fail_after(10):
            await submit(b, plan(1.0)).future


# ---- handing batches to the device ahead of time ---------------------------------------------------------


class StagingModel(FakeModel):
    """FakeModel that says when a batch was staged (its upload, on the worker's upload thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.staged = threading.Event()

    def stage_items(self, items):
        staged = super().stage_items(items)
        self.staged.set()
        return staged


async def spin(steps: int = 50) -> None:
    """Let the consumer run as far as it will (to show that something does not happen)."""
    for _ in range(steps):
        await asyncio.sleep(0)


async def test_a_full_batch_is_handed_over_and_uploaded_while_the_device_runs_the_one_before():
    model = StagingModel()
    async with batcher(model, max_batch_size=4) as b:
        first = await occupy(b, model)
        model.staged.clear()
        jobs = [submit(b, plan(float(v))) for v in range(3)]
        await spin()
        assert len(b.on_device()) == 1 and b.depth() == 3  # not full: it waits and gathers what arrives
        jobs.append(submit(b, plan(3.0)))  # now it is full
        await until(lambda: len(b.on_device()) == 2)
        assert b.depth() == 0
        assert await anyio.to_thread.run_sync(model.staged.wait, 10)  # uploaded while the device is still busy
        assert len(model.batches) == 1  # the first batch is still on the device
        assert all(j.started is not None and j.computing is None for j in jobs)  # handed over, not computing yet
        jobs.append(submit(b, plan(9.0)))
        jobs += [submit(b, plan(10.0 + v)) for v in range(3)]
        await spin()
        assert len(b.on_device()) == 2  # a full batch, but one is already waiting behind the running one
        model.gate.set()
        with anyio.fail_after(10):
            outs = [await job.future for job in [first, *jobs]]
    assert [len(batch) for batch in model.batches] == [1, 4, 4]
    assert first.computing < jobs[0].computing <= first.finished  # its queue time ran until the device began it
    assert [float(o[0][0, 0, 0]) for o in outs] == [-1.0, 0.0, 1.0, 2.0, 3.0, 9.0, 10.0, 11.0, 12.0]


async def test_with_no_batches_ahead_a_batch_is_formed_only_when_the_device_is_idle():
    model = StagingModel()
    async with batcher(model, max_batch_size=4, batches_ahead=0) as b:
        first = await occupy(b, model)
        model.staged.clear()
        jobs = [submit(b, plan(float(v))) for v in range(6)]
        await spin()
        assert len(b.on_device()) == 1 and b.depth() == 6 and not model.staged.is_set()
        model.gate.set()
        with anyio.fail_after(10):
            for job in [first, *jobs]:
                await job.future
    assert [len(batch) for batch in model.batches] == [1, 4, 2]


async def test_batches_handed_ahead_are_answered_when_the_batcher_stops():
    model = FakeModel()
    async with batcher(model, max_batch_size=2) as b:
        first = await occupy(b, model)
        ahead = [submit(b, plan(float(v))) for v in range(2)]
        queued = submit(b, plan(5.0))
        await until(lambda: len(b.on_device()) == 2)
        b.fail_all(Disconnected())  # what stopping does (service/runtime.py), with its own error
        for job in [first, *ahead, queued]:
            with pytest.raises(Disconnected):
                await job.future


async def test_the_wait_counts_every_batch_handed_to_the_device():
    model = FakeModel()
    async with batcher(model, max_batch_size=2) as b:
        for task in b.tasks:
            b.seed_throughput(task, 64.0, 1.0)  # one 8x8 item: one second
        first = await occupy(b, model)  # 1 s
        for v in range(2):
            submit(b, plan(float(v)))  # a full batch of 2 s, handed over behind it
        await until(lambda: len(b.on_device()) == 2)
        assert 2.0 < b.expected_wait("a") <= 3.0  # what is left of the running 1 s, and the 2 s behind it
        b._on_device[0].start -= 5.0  # the running batch has overrun its 1 s by 4 s: the 2 s behind it still wait
        assert 1.9 < b.expected_wait("a") <= 2.0
        model.gate.set()
        with anyio.fail_after(10):
            await first.future


async def test_a_bug_in_a_batch_s_bookkeeping_stops_the_consumer_and_still_answers_that_batch():
    worker = DeviceWorker({"a": FakeModel()}, torch.device("cpu"))
    b = MicroBatcher(("a",), worker.run, Metrics(("a",)), max_batch_size=4, max_wait_s=1.0, batch_pixels=1e9,
                     queue_max_requests=10, queue_max_pixels=1e9)
    b.seed_throughput("a", 1e9, 1.0)

    def broken(*_):
        raise ValueError("bookkeeping bug")

    b.admission.measured = broken
    consumer = asyncio.create_task(b.run_forever())
    try:
        job = submit(b, plan(1.0))
        with anyio.fail_after(10):
            with pytest.raises(ValueError, match="bookkeeping bug"):
                await consumer  # the consumer dies of it: the service turns red and restarts (service/runtime.py)
            with pytest.raises(InferenceFailed):
                await job.future  # and the batch's requests are answered, not left waiting
    finally:
        consumer.cancel()
        worker.close()


class FailingUpload(FakeModel):
    """Staging a batch of two fails (a non-memory error on the upload thread); other batches run."""

    def stage_items(self, items):
        if len(items) == 2:
            raise ValueError("bad upload")
        return super().stage_items(items)


async def test_a_batch_that_fails_while_waiting_leaves_the_running_batch_s_clock_alone():
    model = FailingUpload()
    async with batcher(model, max_batch_size=2) as b:
        first = await occupy(b, model)
        ((_, _, since),) = b.on_device()
        ahead = [submit(b, plan(float(v))) for v in range(2)]  # full: handed over, and its staging fails at once
        with anyio.fail_after(10), pytest.raises(InferenceFailed):
            await ahead[0].future
        assert b.on_device() == [("a", 64, since)]  # the running batch's start (and so its measured time) kept
        model.gate.set()
        with anyio.fail_after(10):
            await first.future


class GatedPlanner(Planner):
    """A planner whose re-plans wait for `go` and are counted."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.go, self.entered, self.calls = threading.Event(), threading.Event(), 0

    def smaller(self, image, p):
        self.calls += 1
        self.entered.set()
        self.go.wait(10)
        return super().smaller(image, p)


async def test_a_job_being_re_planned_when_the_batcher_stops_is_answered():
    planner = GatedPlanner(((64, 64),), tile_size=64, overlap=16)
    model = FakeModel(oom_over(40 * 40))
    worker = DeviceWorker({"a": model}, torch.device("cpu"))
    b = MicroBatcher(("a",), worker.run, Metrics(("a",)), max_batch_size=4, max_wait_s=0.0, batch_pixels=1e9,
                     queue_max_requests=10, queue_max_pixels=1e12, replan=planner.smaller)
    b.seed_throughput("a", 1e9, 1.0)
    consumer = asyncio.create_task(b.run_forever())
    try:
        image = torch.rand(3, 50, 60)
        job = b.submit(b.admit("a", FAR), planner.plan(image), image)
        assert await anyio.to_thread.run_sync(planner.entered.wait, 10)  # out of memory; re-planning in a thread
        consumer.cancel()  # what stopping does: cancel the consumer, then answer everything
        await asyncio.gather(consumer, return_exceptions=True)
        b.fail_all(Disconnected())
        with anyio.fail_after(10), pytest.raises(Disconnected):
            await job.future
    finally:
        planner.go.set()
        worker.close()


async def test_out_of_memory_stops_a_job_s_old_items_and_re_plans_it_once():
    planner = GatedPlanner(((64, 64),), tile_size=64, overlap=16)
    model = FakeModel(oom_over(40 * 40))  # no 64x64 item fits; 32x32 tiles do
    async with batcher(model, planner=planner, max_batch_size=2) as b:
        first = await occupy(b, model)
        image = torch.rand(3, 64, 256)
        job = b.submit(b.admit("a", FAR), planner.plan(image), image)
        assert len(job.plan) > 4  # more 64x64 items than two batches hold
        await until(lambda: len(b.on_device()) == 2)  # the first two are handed over behind the running batch
        model.gate.set()
        assert await anyio.to_thread.run_sync(planner.entered.wait, 10)
        handed = b.batches + len(b.on_device())  # every batch handed over before the out of memory was seen
        await until(lambda: not b.on_device())  # a batch already handed over runs out
        await spin()
        assert b.depth() == 0 and b.batches == handed  # the rest of the old plan is not handed over
        planner.go.set()
        with anyio.fail_after(10):
            outs = await job.future
            await first.future
    assert planner.calls == 1 and job.plan.shape == (32, 32) and len(outs) == len(job.plan)
    assert torch.allclose(job.plan.assemble(outs), image, atol=1e-6)
    # only the batches of two handed over before the out of memory ran 64x64 items (each once whole, then each
    # item alone): the first, and the one behind it if the consumer handed it over before the first failed
    assert sum(1 for x in model.batches if x.shape[-1] == 64) in (3, 6)
