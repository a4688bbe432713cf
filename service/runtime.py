"""The running service: models, batcher, device worker, codec threads, warm-up, readiness and drain state.

One `Service` per app (in `app.state.service`); the routes use it, the lifespan starts and stops it. The
restore pipeline that every protocol front-end calls (`restore`, `restore_pixels`, `restore_with`,
`restore_many`) is service/pipeline.py's, built here with the Service's admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .admission import Ticket
from .batcher import MicroBatcher
from .errors import Draining, InferenceFailed, NotReady, ServiceError
from .http_io import UploadBudget
from .loading import TaskModel
from .metrics import Metrics
from .pipeline import Pipeline
from .planner import Planner
from .settings import MEGA, Settings
from .worker import DeviceWorker

log = logging.getLogger("service")
_inside_admitted: contextvars.ContextVar[bool] = contextvars.ContextVar("inside_admitted", default=False)


class Service:
    def __init__(self, settings: Settings, models: dict[str, TaskModel]) -> None:
        self.settings = settings
        self.models = models
        self.tasks = tuple(models)
        self.metrics = Metrics(self.tasks)
        self.planner = Planner(settings.buckets, settings.tile_size, settings.tile_overlap)
        device = next(iter(models.values())).device
        self.worker = DeviceWorker({t: m.engine for t, m in models.items()}, device, settings.model_threads())
        self.metrics.watch_device(device)
        self.uploads = UploadBudget(settings.max_inflight_upload_bytes, settings.upload_idle_timeout_s)
        self.metrics.uploads.set_function(lambda: self.uploads.used)
        self.batcher = MicroBatcher(
            self.tasks,
            self.worker.run,
            self.metrics,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            batch_pixels=settings.batch_pixels(device.type),
            queue_max_requests=settings.queue_max_requests,
            queue_max_pixels=settings.queue_max_megapixels * MEGA,
            replan=self.planner.smaller,
            batches_ahead=settings.batches_ahead,
        )
        # Codec threads convert, pad and blend small tensors: one torch thread each. With torch's
        # default (all cores) every such op wakes an OpenMP team that fights the model's for the
        # cores, and a conversion costs many times its single-threaded time (docs/performance.md).
        self.codec_pool = ThreadPoolExecutor(
            settings.codec_threads, thread_name_prefix="codec", initializer=torch.set_num_threads, initargs=(1,)
        )
        self.warm: dict[str, bool] = dict.fromkeys(self.tasks, False)
        self.warm_errors: dict[str, str] = {}
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task] = []
        self.consumer_failure: ServiceError | None = None  # the batcher's consumer died: every request answers this
        self.pipeline = Pipeline(
            settings, self.tasks, self.planner, self.batcher, self.codec_pool,
            admitted=self.admitted, failure=lambda: self.consumer_failure,
        )
        # what the front-ends call (see service/pipeline.py)
        self.deadline, self.in_codec_pool = self.pipeline.deadline, self.pipeline.in_codec_pool
        self.restore, self.restore_pixels = self.pipeline.restore, self.pipeline.restore_pixels
        self.restore_with, self.restore_many = self.pipeline.restore_with, self.pipeline.restore_many

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        consumer = asyncio.create_task(self.batcher.run_forever(), name="batcher")
        consumer.add_done_callback(self._consumer_ended)
        self._tasks = [consumer, asyncio.create_task(self.warm_up(), name="warm-up")]

    def _consumer_ended(self, consumer: asyncio.Task) -> None:
        """The batcher's consumer ends only when `stop` cancels it; anything else is a bug that leaves no request
        of this process computable. Say so at once, answer every queued request 500 and turn readiness off."""
        if consumer.cancelled():
            return
        error = consumer.exception()
        why = f"{type(error).__name__}: {error}" if error is not None else "it returned"
        log.critical("the batcher's consumer stopped (%s): failing its requests; restart the process", why,
                     exc_info=error)
        self.consumer_failure = InferenceFailed(
            "The server's batcher stopped; the error was logged. Retry on another instance."
        )
        for task in self.tasks:
            self.warm[task] = False
            self.warm_errors[task] = "cannot run: the batcher stopped (see the log)"
            self.metrics.model_ready.labels(task).set(0)
        self.batcher.fail_all(self.consumer_failure)

    def warmup_shapes(self) -> list[tuple[int, int]]:
        """The shapes warm-up runs: every static shape the batcher can produce, or only the smallest."""
        shapes = self.planner.static_shapes()
        mode = self.settings.warmup
        if mode == "auto":  # every shape where an unprepared one would cost a request its compile time
            prepares = any(m.engine.prepares_shapes for m in self.models.values())
            mode = "full" if self.worker.device.type == "cuda" or prepares else "minimal"
        return shapes if mode == "full" else shapes[:1]

    def max_items(self, shape: tuple[int, int]) -> int:
        """The largest batch of (h, w) items the batcher can form."""
        s = self.settings
        return max(1, min(s.max_batch_size, int(self.batcher.batch_pixels // (shape[0] * shape[1]))))

    async def warm_up(self) -> None:
        self.batcher.seed_request_pixels(self.planner.static_shapes()[0][0] * self.planner.static_shapes()[0][1])
        for task in self.tasks:
            try:
                for i, shape in enumerate(self.warmup_shapes()):
                    start = time.monotonic()
                    await self.worker.warm_up(task, shape, self.max_items(shape))
                    if i == 0:
                        await self._seed_throughput(task, shape, time.monotonic() - start)
            except Exception as e:
                self.warm_errors[task] = f"warm-up failed: {type(e).__name__}: {e}"
                log.error("warm-up of %s failed", task, exc_info=e)
                continue
            self.warm[task] = True
            self.metrics.engine_memory_from(task, self.models[task].engine.memory_report())
            self.metrics.model_ready.labels(task).set(1)
            log.info("%s is warm", task)

    async def _seed_throughput(self, task: str, shape: tuple[int, int], warm_up_s: float) -> None:
        """Admission's throughput of `task` until its first batch is measured. A warm-up under a second is
        mostly one-time costs (a small model's first call), and one on CUDA mostly compilation or capture,
        so then one more item of `shape` is timed through the device worker, as requests run (cheap in
        both cases); a longer warm-up on the CPU is mostly compute, and timing it costs nothing more."""
        seconds = warm_up_s
        if warm_up_s < 1.0 or self.worker.device.type == "cuda":
            start = time.monotonic()
            await self.worker.run(task, [torch.zeros((3, *shape), dtype=torch.uint8)])
            seconds = time.monotonic() - start
        self.batcher.seed_throughput(task, shape[0] * shape[1], seconds)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        try:
            outcomes = await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self.batcher.fail_all(Draining())
            for task in self.tasks:
                self.metrics.model_ready.labels(task).set(0)
            self.worker.close()
            self.codec_pool.shutdown(wait=False, cancel_futures=True)
        for t, outcome in zip(self._tasks, outcomes, strict=True):
            # cancelled is how they should end; the consumer's own failure was reported when it happened
            if isinstance(outcome, Exception) and not (t.get_name() == "batcher" and self.consumer_failure):
                log.error("background task %s had failed", t.get_name(), exc_info=outcome)

    # ---- readiness and drain ------------------------------------------------------------------

    async def liveness(self) -> str | None:
        """None while the device is usable, else why it is lost (a new process is needed). Probes it: a dead
        or hung GPU fails enough probes in a row to count as lost (`DeviceWorker.probe`). A batcher that
        stopped (a bug) leaves nothing computable either."""
        if self.consumer_failure is not None:
            return "the batcher stopped; see the log"
        await self.worker.probe()
        return self.worker.failure

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        device_problem = await self.worker.probe()
        tasks = {}
        for task in self.tasks:
            if self.warm[task]:
                tasks[task] = {"ready": True, "detail": "warm"}
            else:
                tasks[task] = {"ready": False, "detail": self.warm_errors.get(task, "warming up")}
        ok = not self.draining and device_problem is None and all(t["ready"] for t in tasks.values())
        status = "draining" if self.draining else "ready" if ok else "not_ready"
        device = {"name": str(self.worker.device), "ok": device_problem is None, "detail": device_problem or "answers"}
        return ok, {"status": status, "tasks": tasks, "device": device}

    def start_drain(self) -> None:
        if not self.draining:
            log.info("draining: refusing new work, finishing %d admitted requests", self._in_flight)
        self.draining = True
        self.uploads.drain()  # bodies still arriving are cut once they stall

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no admitted request is left (within `timeout_s`)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    @contextlib.contextmanager
    def admitted(self, task: str, deadline: float) -> Iterator[Ticket]:
        """Admit a request of `task` or refuse it: 503 while draining or not warm, 429 when the queue is full or
        cannot be expected to start it by `deadline`. Inside, it counts as admitted work that a drain waits for;
        the ticket is for `batcher.submit`. Admissions nested inside one (the images of a multi-image request)
        are part of admitted work: a drain that began meanwhile does not refuse them."""
        if self.draining and not _inside_admitted.get():
            raise Draining()
        self.check_ready(task)
        ticket = self.batcher.admit(task, deadline)
        self._in_flight += 1
        self._idle.clear()
        inside = _inside_admitted.set(True)  # copied into tasks created inside, as contextvars are
        try:
            with ticket:
                yield ticket
        finally:
            _inside_admitted.reset(inside)
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    def check_ready(self, task: str) -> None:
        if not self.warm[task]:
            detail = self.warm_errors.get(task, "is still warming up")
            raise NotReady(f"The {task} model {detail}; retry shortly.")

    def describe(self) -> dict[str, Any]:
        s = self.settings
        batching = {
            "max_batch_size": s.max_batch_size,
            "max_wait_ms": s.max_wait_ms,
            "batch_megapixels": self.batcher.batch_pixels / MEGA,
            "buckets": [f"{w}x{h}" for w, h in s.buckets],
            "tile_size": s.tile_size,
            "tile_overlap": s.tile_overlap,
            "static_shapes": [f"{w}x{h}" for h, w in self.planner.static_shapes()],
            "queue_max_requests": s.queue_max_requests,
            "queue_max_megapixels": s.queue_max_megapixels,
        }
        return {
            "tasks": {t: {"ready": self.warm[t], **m.describe()} for t, m in self.models.items()},
            "batching": batching,
            "limits": {
                "max_upload_bytes": s.max_upload_bytes,
                "max_pixels": s.max_pixels,
                "request_timeout_s": s.request_timeout_s,
            },
        }

