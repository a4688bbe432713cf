"""The restore pipeline: what one request goes through whatever protocol it came in by.

`Pipeline.restore` (encoded image out), `restore_pixels` (raw pixels out) and `restore_with` (any answer)
run admission -> decode -> plan -> submit -> wait -> assemble -> finish for one image; `restore_many` runs
a request whose body carries several images (admitted once for its body, then each image on its own, all
batched together). The `Service` builds one and hands its methods to the front-ends. It uses the batcher,
the planner and the codec threads; admission (drain and readiness included) comes in as a callable.

A front-end hands in a `Source`:

- encoded image bytes (PNG, JPEG, ...), decoded in the codec threads;
- raw pixels, a (H, W, 3) uint8 RGB array, which skip decoding;
- a zero-argument callable returning an async context manager of image bytes (e.g. an HTTP upload
  being read), opened only after admission and left (releasing the upload's memory budget) once the
  request is queued, so a full queue answers before the body is read.

A front-end that can tell when its client went away passes `gone`: called once the request is queued,
it returns an awaitable that completes when the client is gone; the request is then dropped before
(further) compute. If that awaitable raises, the connection cannot be watched and the answer is
awaited alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Union

import numpy as np
from torch import Tensor

from . import codec
from .admission import Ticket
from .batcher import Job, MicroBatcher
from .errors import DeadlineExceeded, Disconnected, ServiceError, UnknownTask
from .planner import Plan, Planner
from .settings import Settings

Source = Union[bytes, np.ndarray, Callable[[], AbstractAsyncContextManager[bytes]]]
Gone = Callable[[], Awaitable[Any]]
T = TypeVar("T")
C = TypeVar("C")
Finish = Callable[[Tensor, codec.Decoded], T]
# A request's body, opened once it is admitted: (the bytes, a `release()` that stops counting them as an upload)
Body = Callable[[float], AbstractAsyncContextManager[tuple[bytes, Callable[[], None]]]]


@dataclass
class Timings:
    """Seconds one request spent in each step (decode is ~0 for raw pixels)."""

    decode: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    encode: float = 0.0

    def server_timing(self) -> str:
        """The value of a `Server-Timing` header, durations in ms."""
        steps = (("decode", self.decode), ("queue", self.queue), ("inference", self.inference), ("encode", self.encode))
        return ", ".join(f"{name};dur={seconds * 1e3:.1f}" for name, seconds in steps)


def opened(source: Source) -> AbstractAsyncContextManager[bytes | np.ndarray]:
    """The source's image (bytes or pixels) for an `async with`."""
    if isinstance(source, (bytes, np.ndarray)):
        return contextlib.nullcontext(source)
    return source()


async def outputs(job: Job, batcher: MicroBatcher, gone: Gone | None) -> list[Tensor]:
    """The job's outputs; if the client goes away first, the job is dropped before (further) compute."""
    if gone is None:
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            batcher.cancel(job, Disconnected())
            raise
    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({job.future, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        batcher.cancel(job, Disconnected())
        raise
    finally:
        watch.cancel()
    if not job.future.done() and watch.done() and not watch.cancelled() and watch.exception() is not None:
        return await job.future  # the connection cannot be watched: wait for the answer alone
    if not job.future.done():
        batcher.cancel(job, Disconnected())
    return job.future.result()


@dataclass
class Images(Generic[T]):
    """What a front-end parsed from the body of a request of several images, for `Pipeline.restore_many`."""

    items: Sequence[bytes | np.ndarray]  # each a `Source` of one image
    finish: Finish[T]  # as for `Pipeline.restore_with`, for each image
    timeout_s: float | None = None  # the request's own limit, besides the one its headers gave


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        tasks: Sequence[str],
        planner: Planner,
        batcher: MicroBatcher,
        codec_pool: ThreadPoolExecutor,
        admitted: Callable[[str, float], AbstractContextManager[Ticket]],
        failure: Callable[[], ServiceError | None],
    ) -> None:
        """`admitted(task, deadline)`: the admission around each request (raises 503/429, else a ticket for
        `batcher.submit`); `failure()`: the error every request answers once the batcher's consumer died."""
        self.settings, self.tasks, self.planner, self.batcher = settings, tuple(tasks), planner, batcher
        self.codec_pool, self.admitted, self.failure = codec_pool, admitted, failure

    def deadline(self, arrived: float, timeout: float | None) -> float:
        """When compute must have started: `timeout` s after `arrived` (monotonic), at most the server's limit."""
        limit = self.settings.request_timeout_s
        return arrived + min(timeout or limit, limit)

    async def restore(
        self, task: str, source: Source, *, fmt: str, quality: int | None = None, arrived: float,
        deadline: float, request_id: str = "-", gone: Gone | None = None,
    ) -> tuple[bytes, Timings]:
        """Restore one image (see `Source`) and encode it as `fmt` (png, jpeg or webp) in the input's mode.

        Raises ServiceError for every answer but success (404 unknown task, 503/429 not admitted, 4xx bad
        image, 504 deadline, 499 client gone, 500/503 model failure); a front-end counts the refusals among them
        with `metrics.reject(task, error)`.
        """
        png_effort = self.settings.png_effort

        def encode(restored: Tensor, decoded: codec.Decoded) -> bytes:
            return codec.encode(restored, decoded, fmt, quality, png_effort)

        return await self.restore_with(
            task, source, encode, arrived=arrived, deadline=deadline, request_id=request_id, gone=gone
        )

    async def restore_pixels(
        self, task: str, source: Source, *, arrived: float, deadline: float, request_id: str = "-",
        gone: Gone | None = None,
    ) -> tuple[np.ndarray, Timings]:
        """Restore one image (see `Source`) to a (H, W, 3) uint8 RGB array (alpha and 16 bits are not kept).
        Raises as `restore`."""

        def pixels(restored: Tensor, decoded: codec.Decoded) -> np.ndarray:
            return codec.to_pixels(restored)

        return await self.restore_with(
            task, source, pixels, arrived=arrived, deadline=deadline, request_id=request_id, gone=gone
        )

    async def restore_with(
        self, task: str, source: Source, finish: Finish[T], *, arrived: float, deadline: float,
        request_id: str = "-", gone: Gone | None = None,
    ) -> tuple[T, Timings]:
        """The pipeline behind `restore` and `restore_pixels`, for answers of other shapes (e.g. both pixels and a
        file): `finish(restored, decoded)` runs in a codec thread with the (3, H, W) restored image (uint8, or float
        in [0, 1] for 16-bit inputs) and the decoded input's metadata (for `codec.encode`); its result is returned.
        Raises as `restore`."""
        self._check_task(task)
        timings = Timings()
        with self.admitted(task, deadline) as ticket:  # before the upload is read; a drain waits for all inside
            # an upload's bytes count against MPRNET_MAX_INFLIGHT_UPLOAD_BYTES until it is decoded and queued
            async with opened(source) as image:
                t0 = time.monotonic()
                with self.batcher.arriving(task):
                    decoded, plan = await self._decode_by(deadline, arrived, image)
                    t1 = time.monotonic()
                    timings.decode = t1 - t0
                    if t1 >= deadline:
                        raise DeadlineExceeded(t1 - arrived)
                    # submitted inside `arriving`, no await between: an open batch never misses this request
                    job = self.batcher.submit(ticket, plan, decoded.image, request_id)
                    failure = self.failure()
                    if failure is not None:  # admitted before the consumer died: nobody would run it
                        self.batcher.cancel(job, failure)
            results = await outputs(job, self.batcher, gone)
            t2 = time.monotonic()
            result = await self.in_codec_pool(_assemble_and, finish, job.plan, results, decoded)
            timings.encode = time.monotonic() - t2
        if job.computing is not None and job.finished is not None:
            timings.queue, timings.inference = job.computing - job.enqueued, job.finished - job.computing
        return result, timings

    async def restore_many(
        self, task: str, body: Body, parse: Callable[[bytes], tuple[C, Images[T]]], *,
        parse_inline: Callable[[bytes], bool], arrived: float, timeout: float | None, request_id: str = "-",
        gone: Gone | None = None,
    ) -> tuple[C, list[tuple[T, Timings]]]:
        """Restore every image a request's body carries, all at once (so they batch together).

        The request is admitted (503/429) before `body(deadline)` is opened; `parse(body)` (in a codec thread
        unless `parse_inline(body)`) gives the front-end's own view of the request and its `Images`. Each image
        is then admitted and queued on its own; the body stops counting as an upload once all are queued. The
        deadline is `timeout` or the request's own, whichever is shorter. The client is watched from then on
        with one `gone()` for all. The first error cancels the other images (dropped before compute) and is
        raised (a ServiceError before any other). Returns the parsed request and each image's (result, timings).
        """
        self._check_task(task)
        admission_deadline = self.deadline(arrived, timeout)
        with self.admitted(task, admission_deadline) as ticket:  # a drain waits for the whole request
            async with body(admission_deadline) as (data, release):
                if parse_inline(data):
                    call, images = parse(data)
                else:
                    call, images = await self.in_codec_pool(parse, data)
                ticket.close()  # from here each image is admitted (and counted in the queue's limits) on its own
                timeouts = [t for t in (timeout, images.timeout_s) if t is not None]
                deadline = self.deadline(arrived, min(timeouts) if timeouts else None)
                # one watch for all the request's images (an HTTP connection has one receive channel)
                watch = asyncio.ensure_future(gone()) if gone is not None else None
                try:
                    results = await self._restore_each(task, images, release, arrived, deadline, request_id, watch)
                finally:
                    if watch is not None:
                        watch.cancel()
        return call, results

    async def _restore_each(
        self, task: str, images: Images[T], release: Callable[[], None], arrived: float, deadline: float,
        request_id: str, watch: asyncio.Future | None,
    ) -> list[tuple[T, Timings]]:
        left = [len(images.items)]

        def source(item: np.ndarray | bytes) -> Callable[[], AbstractAsyncContextManager[np.ndarray | bytes]]:
            @contextlib.asynccontextmanager
            async def one() -> AsyncIterator[np.ndarray | bytes]:
                try:
                    yield item
                finally:  # this image is queued (its pixels copied) or refused
                    left[0] -= 1
                    if not left[0]:
                        release()  # the body no longer counts as an upload in MPRNET_MAX_INFLIGHT_UPLOAD_BYTES

            return one

        def gone() -> Awaitable[None]:
            return asyncio.shield(watch)

        try:
            async with asyncio.TaskGroup() as group:
                runs = [
                    group.create_task(
                        self.restore_with(
                            task, source(item), images.finish, arrived=arrived, deadline=deadline,
                            request_id=request_id, gone=gone if watch is not None else None,
                        )
                    )
                    for item in images.items
                ]
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None
        return [r.result() for r in runs]

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise UnknownTask(f"Unknown task {task!r}; this server restores: {', '.join(self.tasks)}.")

    async def _decode_by(
        self, deadline: float, arrived: float, image: bytes | np.ndarray
    ) -> tuple[codec.Decoded, Plan]:
        """Decode and plan in a codec thread. A request still waiting for a free thread at its deadline is
        answered 504 then, and its decode never starts; a decode that has started runs on (within its budget)."""
        work = self.codec_pool.submit(self._decode_and_plan, image)
        waiting = asyncio.wrap_future(work)
        try:
            done, _ = await asyncio.wait({waiting}, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            waiting.cancel()  # and with it the decode, if it has not started
            raise
        if not done and work.cancel():
            raise DeadlineExceeded(time.monotonic() - arrived)
        return await waiting

    def _decode_and_plan(self, image: bytes | np.ndarray) -> tuple[codec.Decoded, Plan]:
        if isinstance(image, np.ndarray):
            decoded = codec.from_pixels(image, self.settings.max_pixels)
        else:
            decoded = codec.decode(image, self.settings.max_pixels, self.settings.decode_budget_s)
        return decoded, self.planner.plan(decoded.image)

    async def in_codec_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a codec thread: CPU work (decoding, encoding, a large body's parsing or serialising)
        kept off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.codec_pool, fn, *args)


def _assemble_and(finish: Finish[T], plan: Plan, results: list[Tensor], decoded: codec.Decoded) -> T:
    return finish(plan.assemble(results), decoded)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to answer with: the first ServiceError (a client's mistake or a refusal), else the first error."""
    errors = list(_leaves(group))
    return next((e for e in errors if isinstance(e, ServiceError)), errors[0])


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e
