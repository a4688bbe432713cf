"""The dynamic micro-batcher: per-task queues of planned requests, one consumer, one device.

A request (`Job`) is a `Plan`: N items of one static shape (a bucket-padded image, or tiles). The
consumer picks a task round-robin (no task starves another), takes the shape of that task's oldest
waiting item, and gathers items of that shape in arrival order, from any request, up to
`max_batch_size` items and `batch_pixels` pixels. Tiles of different requests share batches.

When to close a batch: at once if it is full, or if nothing else is on its way. Only while other
requests of the task are still being decoded (`arriving`) does it wait for them, and never past
`max_wait_s` after the oldest item was queued. So a lone request on an idle device never waits, a
burst is batched, and while the device is busy the queue fills by itself.

When to hand a batch to the device: when the device is idle; or, while it runs a batch, as soon as the
next one is full (up to `batches_ahead` of them wait behind the running one). That batch uploads while
the one before computes, and the device starts it without a round trip through the event loop. A batch
that is not full waits for the device to finish instead, and so gathers what arrives meanwhile. A job
counts as started (its deadline met) when its first batch is handed over.

Admission (`admit`, before a request's body is read) is by expected wait (service/admission.py); the
batcher tells it what it measures and checks each request again when its size is known (`submit`).

Every state change happens on the event loop (producer and consumer share one loop), so there are
no locks; only the model runs elsewhere, on the device worker's thread. Every job's future is
resolved exactly once (`_resolve` checks), errors fan out to every member of a failed batch, and a
result count that does not match the batch is an error for all of them, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from .admission import Admission, Ticket
from .errors import DeadlineExceeded, InferenceFailed, OutOfMemory, ServiceError
from .metrics import Metrics
from .planner import Plan
from .worker import ItemOutOfMemory

log = logging.getLogger("service.batcher")

RunBatch = Callable[[str, Sequence[Tensor]], Awaitable[Sequence[Tensor | BaseException]]]
Replan = Callable[[Tensor, Plan], Plan | None]


@dataclass(eq=False)
class Job:
    """One admitted request. `future` resolves to its N outputs (3, h, w), in item order (uint8 for an 8-bit
    image, float32 otherwise: see service/worker.py), or an error."""

    task: str
    plan: Plan
    image: Tensor  # (3, H, W) as decoded (uint8 or float32), kept for the out-of-memory re-plan
    deadline: float  # time.monotonic() by which compute must have started
    request_id: str = "-"
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    outputs: list[Tensor | None] = field(init=False)
    next_item: int = 0  # items before this one were dispatched
    done_items: int = 0
    generation: int = 0  # bumped by a re-plan; results of older items are ignored
    started: float | None = None  # when its first item was handed to the device (its deadline is met)
    computing: float | None = None  # when the device began its first batch (later, if that waited behind another)
    finished: float | None = None  # when its future was resolved
    queued: bool = False
    turn: float = 0.0  # when this job's next items are due: its arrival, then the time of its last batch
    timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.plan)

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class _Batch:
    """A batch handed to the device: running, or waiting behind the one that runs."""

    task: str
    jobs: list[Job]
    pixels: int
    start: float  # when it was handed over; when the batch before it finished, if that was later


class MicroBatcher:
    def __init__(
        self,
        tasks: Sequence[str],
        run: RunBatch,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_wait_s: float,
        batch_pixels: float,
        queue_max_requests: int,
        queue_max_pixels: float,
        replan: Replan | None = None,
        batches_ahead: int = 1,
    ) -> None:
        self.tasks = tuple(tasks)
        self.run, self.metrics, self.replan = run, metrics, replan
        self.max_batch_size, self.max_wait_s, self.batch_pixels = max_batch_size, max_wait_s, batch_pixels
        if batches_ahead < 0:
            raise ValueError(f"batches_ahead must be 0 or more, got {batches_ahead}")
        self.batches_ahead = batches_ahead
        self._queues: dict[str, deque[Job]] = {t: deque() for t in self.tasks}
        self._depth = dict.fromkeys(self.tasks, 0)
        self._pixels = dict.fromkeys(self.tasks, 0)
        self._arriving = dict.fromkeys(self.tasks, 0)
        self._changed = asyncio.Event()
        self._last = -1  # index of the task served last (round-robin)
        self._on_device: list[_Batch] = []  # handed to the device, oldest (running) first
        self._runners: set[asyncio.Task] = set()  # each batch's task, until it ends (a re-plan runs in it)
        self._replanning: set[Job] = set()  # out of memory: being re-planned, neither queued nor on the device
        self._crash: BaseException | None = None  # a bug in a batch's bookkeeping: the consumer dies of it
        self.batches = 0
        self.admission = Admission(
            self.tasks, self, queue_max_requests=queue_max_requests, queue_max_pixels=queue_max_pixels
        )
        # what producers and warm-up call: admit, then submit; the seeds of the estimate
        a = self.admission
        self.admit, self.expected_wait = a.admit, a.expected_wait
        self.seed_throughput, self.seed_request_pixels = a.seed_throughput, a.seed_request_pixels
        metrics.watch_queue(self.depth, self.pixels, self.oldest_wait, self.expected_wait)

    # ---- producer side (request handlers) ----------------------------------------------------

    def depth(self, task: str | None = None) -> int:
        return sum(self._depth.values()) if task is None else self._depth[task]

    def pixels(self, task: str | None = None) -> int:
        return sum(self._pixels.values()) if task is None else self._pixels[task]

    def on_device(self) -> list[tuple[str, int, float]]:
        """(task, pixels, start) of each batch handed to the device, the running one first."""
        return [(b.task, b.pixels, b.start) for b in self._on_device]

    def oldest_wait(self, task: str) -> float:
        return next((time.monotonic() - j.enqueued for j in self._queues[task] if j.queued), 0.0)

    def items_per_batch(self, shape: tuple[int, int]) -> int:
        """The most items of (h, w) `shape` one batch holds."""
        return max(1, min(self.max_batch_size, int(self.batch_pixels // (shape[0] * shape[1]))))

    def queued(self, task: str) -> Iterator[Job]:
        """The queued jobs of `task`, oldest first."""
        return (job for job in self._live(task) if job.queued)

    @contextlib.contextmanager
    def arriving(self, task: str) -> Iterator[None]:
        """Mark a request of `task` as on its way (being decoded): an open batch may wait for it."""
        self._arriving[task] += 1
        try:
            yield
        finally:
            self._arriving[task] -= 1
            self._changed.set()

    def submit(self, ticket: Ticket, plan: Plan, image: Tensor, request_id: str = "-") -> Job:
        """Queue an admitted request; await `job.future` for its outputs.

        Its size is known now: the limits and the expected wait are checked again for it (QueueFull),
        counting only the queue, which it joins at the back.
        """
        task, deadline = ticket.task, ticket.deadline
        ticket.close()
        self.admission.check(task, deadline, plan.computed_pixels, pending=False)
        self.admission.planned(task, plan.computed_pixels)
        job = Job(task, plan, image, deadline, request_id)
        job.timer = asyncio.get_running_loop().call_at(deadline, self._expire, job)
        self._enqueue(job)
        return job

    def cancel(self, job: Job, error: ServiceError) -> None:
        """Drop a request (its client went away): items not yet computed never will be."""
        self._resolve(job, error=error)

    # ---- queue bookkeeping ---------------------------------------------------------------------

    def _enqueue(self, job: Job, front: bool = False) -> None:
        job.queued = True
        job.turn = job.enqueued if not front else 0.0
        self._depth[job.task] += 1
        self._pixels[job.task] += job.plan.computed_pixels
        (self._queues[job.task].appendleft if front else self._queues[job.task].append)(job)
        self._changed.set()

    def _dequeue(self, job: Job) -> None:
        # The job stays in its deque until the consumer passes it: removal there is lazy.
        if job.queued:
            job.queued = False
            self._depth[job.task] -= 1
            self._pixels[job.task] -= job.plan.computed_pixels

    def _resolve(self, job: Job, result: list[Tensor] | None = None, error: ServiceError | None = None) -> None:
        self._dequeue(job)
        if job.timer:
            job.timer.cancel()
        if job.done:
            return  # exactly once: the first answer wins
        job.finished = time.monotonic()
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    def _expire(self, job: Job) -> None:
        if job.started is None and not job.done:
            self._resolve(job, error=DeadlineExceeded(time.monotonic() - job.enqueued))

    def _live(self, task: str) -> deque[Job]:
        q = self._queues[task]
        while q and not q[0].queued:
            q.popleft()
        return q

    # ---- consumer side ---------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """The consumer loop; run it as one task and cancel it to stop (the batches on the device are dropped:
        answer their jobs with `fail_all`)."""
        try:
            while True:
                await self._device_ready()
                task = await self._next_task()
                await self._window(task)
                batch = self._take(task)
                if batch:
                    self._hand_over(task, batch)
        finally:
            for runner in self._runners:
                runner.cancel()

    async def _changes(self, timeout: float | None = None) -> None:
        """Wait for the next change of the queues or the device (at most `timeout` s); raise what killed a
        batch's bookkeeping."""
        if self._crash is None:
            self._changed.clear()  # before the wait starts: wait_for runs its awaitable a step later
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        if self._crash is not None:
            raise self._crash

    def _peek_task(self) -> str | None:
        """The task whose turn is next in the round-robin (None: nothing is queued)."""
        n = len(self.tasks)
        turns = (self.tasks[(self._last + step) % n] for step in range(1, n + 1))
        return next((task for task in turns if self._live(task)), None)

    async def _device_ready(self) -> None:
        """Until the device is idle, or it has room ahead of the running batch and the next batch is full."""
        while self._on_device:
            if len(self._on_device) <= self.batches_ahead and (task := self._peek_task()) and self._full(task):
                return
            await self._changes()

    async def _next_task(self) -> str:
        while True:
            task = self._peek_task()
            if task is not None:
                self._last = self.tasks.index(task)
                return task
            await self._changes()

    def _in_turn(self, task: str) -> list[Job]:
        """Queued jobs, the one whose turn came first first.

        A job's turn is its arrival; once it has had a batch and still has tiles left, its turn moves
        to that moment. So a huge image shares the device with the requests queued behind it (one
        batch each in turn) instead of blocking them for all of its tiles.
        """
        return sorted((j for j in self._live(task) if j.queued), key=lambda j: j.turn)

    def _shape_load(self, task: str) -> tuple[tuple[int, int] | None, int]:
        """The shape whose turn it is, and how many items of that shape are queued."""
        jobs = self._in_turn(task)
        if not jobs:
            return None, 0
        shape = jobs[0].plan.shape
        return shape, sum(len(j.plan) - j.next_item for j in jobs if j.plan.shape == shape)

    def _full(self, task: str) -> bool:
        """Nothing of `task` is queued, or a whole batch of its oldest shape is (`items_per_batch`)."""
        shape, items = self._shape_load(task)
        return shape is None or items >= self.items_per_batch(shape)

    async def _window(self, task: str) -> None:
        """Hold the batch open while more requests of `task` are being decoded, up to max_wait_s."""
        while self._arriving[task] and not self._full(task):
            remaining = self._live(task)[0].enqueued + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            await self._changes(remaining)

    def _take(self, task: str) -> list[tuple[Job, int, int]]:
        """Dispatch up to a full batch of the oldest shape: [(job, generation, item index)]."""
        shape, _ = self._shape_load(task)
        if shape is None:
            return []
        limit = self.items_per_batch(shape)
        now, batch = time.monotonic(), []
        for job in self._in_turn(task):
            if len(batch) >= limit:
                break
            if job.plan.shape != shape:
                continue
            if job.started is None and now >= job.deadline:
                self._expire(job)  # the timer may run late on a busy loop: check again before compute
                continue
            if job.started is None:
                job.started = now
            while job.next_item < len(job.plan) and len(batch) < limit:
                batch.append((job, job.generation, job.next_item))
                job.next_item += 1
            if job.next_item == len(job.plan):
                self._dequeue(job)
            else:
                job.turn = now  # more tiles left: they queue behind whoever is waiting now
        return batch

    def _hand_over(self, task: str, batch: list[tuple[Job, int, int]]) -> None:
        """Give a batch to the device: its members are on the device from now on (`fail_all` answers them)."""
        jobs = list(dict.fromkeys(job for job, _, _ in batch))
        self.metrics.batch_requests.labels(task).observe(len(jobs))
        self.metrics.batch_tiles.labels(task).observe(len(batch))
        pixels = len(batch) * batch[0][0].plan.shape[0] * batch[0][0].plan.shape[1]
        handed = _Batch(task, jobs, pixels, time.monotonic())
        self._on_device.append(handed)
        if len(self._on_device) == 1:
            self._computing(handed)
        runner = asyncio.create_task(self._execute(handed, batch), name=f"batch-{task}")
        self._runners.add(runner)
        runner.add_done_callback(lambda runner: self._batch_ended(runner, handed))

    def _finished(self, handed: _Batch) -> float:
        """Take a batch off the device; its time there. Batches compute in the order they were handed over (one
        upload thread, one device thread): when the running one ends, the next one's compute starts and is
        counted from then. (One waiting behind can end first only by failing before it ran: its staging.)"""
        now = time.monotonic()
        running = self._on_device[0] is handed
        self._on_device.remove(handed)
        if running and self._on_device:
            self._on_device[0].start = max(self._on_device[0].start, now)
            self._computing(self._on_device[0])
        elapsed = now - handed.start
        self.batches += 1
        self.metrics.inference.labels(handed.task).observe(elapsed)
        self._changed.set()
        return elapsed

    def _computing(self, handed: _Batch) -> None:
        """The device begins `handed`: for its jobs that had no batch computed before, the queue wait ends."""
        for job in handed.jobs:
            if job.computing is None:
                job.computing = handed.start
                self.metrics.queue_wait.labels(handed.task).observe(handed.start - job.enqueued)

    def _batch_ended(self, runner: asyncio.Task, handed: _Batch) -> None:
        """A batch's task ended. If it died of a bug, its requests are answered, and the consumer dies of the bug
        too: a batcher whose bookkeeping failed cannot be trusted with more (the service turns red)."""
        self._runners.discard(runner)
        if not runner.cancelled() and (error := runner.exception()) is not None:
            log.error("the bookkeeping of a batch for %s failed", handed.task, exc_info=error)
            for job in handed.jobs:
                self._resolve(job, error=InferenceFailed())
            if handed in self._on_device:
                self._on_device.remove(handed)
            self._crash = self._crash or error
        self._changed.set()

    async def _execute(self, handed: _Batch, batch: list[tuple[Job, int, int]]) -> None:
        task, jobs = handed.task, handed.jobs
        try:
            results = await self.run(task, [job.plan.inputs[i] for job, _, i in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(batch)}")
        except Exception as e:
            self._finished(handed)
            ids = ", ".join(j.request_id for j in jobs)
            log.error("batch of %d items for %s failed (requests %s)", len(batch), task, ids, exc_info=e)
            for job in jobs:
                self._resolve(job, error=InferenceFailed())
            return
        # (cancelled: the service is stopping; the batch stays listed, so `fail_all` answers its jobs)
        self.admission.measured(task, handed.pixels, self._finished(handed))

        too_big: list[Job] = []
        for (job, generation, index), result in zip(batch, results, strict=True):
            if job.done or generation != job.generation:
                continue  # cancelled, failed, or re-planned meanwhile
            if isinstance(result, ItemOutOfMemory):
                too_big.append(job)
                self._replan_begins(job)  # before any await: its other items stop here
            elif isinstance(result, BaseException):
                self._resolve(job, error=InferenceFailed())
            elif job.outputs[index] is None:
                job.outputs[index] = result
                job.done_items += 1
                if job.done_items == len(job.plan):
                    self.metrics.padding_waste.labels(task).observe(job.plan.padding_waste)
                    self.metrics.megapixels.labels(task).inc(job.plan.height * job.plan.width / 1e6)
                    self._resolve(job, result=job.outputs)
        for job in dict.fromkeys(too_big):
            await self._fall_back(job)

    def _replan_begins(self, job: Job) -> None:
        """An item of `job` did not fit alone. From now on its items still queued are not handed over, and the
        results of those on the device are ignored (their generation is past); `fail_all` answers it."""
        self._dequeue(job)
        with contextlib.suppress(ValueError):
            self._queues[job.task].remove(job)  # it re-enters at the front when re-planned
        job.generation += 1
        self._replanning.add(job)

    async def _fall_back(self, job: Job) -> None:
        """Re-plan a job whose item did not fit alone (`_replan_begins`) with smaller tiles, or answer 503."""
        # cancelled here (stopping), the job stays in `_replanning`, and `fail_all` answers it
        plan = await asyncio.to_thread(self.replan, job.image, job.plan) if self.replan else None
        self._replanning.discard(job)
        if job.done:
            return
        if plan is None:
            why = (f"A {job.plan.width}x{job.plan.height} image does not fit in device memory even in the smallest "
                   "tiles; try a smaller image or retry later.")
            self._resolve(job, error=OutOfMemory(why))
            return
        log.warning("request %s: out of memory with %s items; re-planned as %d items of %s",
                    job.request_id, job.plan.shape, len(plan), plan.shape)
        job.plan, job.next_item, job.done_items = plan, 0, 0
        job.outputs = [None] * len(plan)
        self._enqueue(job, front=True)

    def fail_all(self, error: ServiceError) -> None:
        """Answer everything queued or on the device (used when stopping)."""
        for handed in self._on_device:
            for job in handed.jobs:
                self._resolve(job, error=error)
        for job in list(self._replanning):
            self._resolve(job, error=error)
        self._replanning.clear()
        for q in self._queues.values():
            for job in list(q):
                self._resolve(job, error=error)
            q.clear()
