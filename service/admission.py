"""Admission by expected wait, for the micro-batcher's queue.

A request is admitted (`Admission.admit`, before its body is read) by expected wait: the work ahead of it
(queued, and admitted but not yet queued) divided by each task's measured throughput (`expected_wait`,
also the Retry-After of a refusal). A request that cannot be expected to start computing before its
deadline hears 429 at once rather than 504 when the deadline comes; the static limits on queued requests
and pixels stay as the outer bound. When its size is known (`MicroBatcher.submit`) it is checked again.

The estimate reads the queue through `Queue` (the batcher) and learns from the batcher: each batch's
measured throughput (`measured`), the batches handed to the device (`on_device`), each request's planned size
(`planned`). Like the batcher, it runs on the event loop only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from .errors import QueueFull

if TYPE_CHECKING:
    from .batcher import Job

# Device throughput assumed before anything was measured: slower than every device and model measured
# here (the CPU runs the full deblur model at about 1,700 pixels/s), so an unmeasured server admits little.
ASSUMED_PIXELS_PER_S = 1000.0


class Queue(Protocol):
    """What admission reads of the batcher's queue."""

    batch_pixels: float

    def depth(self, task: str | None = None) -> int: ...

    def pixels(self, task: str | None = None) -> int: ...

    def queued(self, task: str) -> Iterable[Job]: ...

    def items_per_batch(self, shape: tuple[int, int]) -> int: ...

    def on_device(self) -> list[tuple[str, int, float]]: ...


class Ticket:
    """An admitted request that is not queued yet (its body is arriving or being decoded).

    Until `MicroBatcher.submit` queues it, or the block exits, it holds a place in the queue's limits
    and an estimate of its work in the expected wait of later requests: a burst of requests that all
    arrive before any is decoded is admitted only as far as the queue can serve in time.
    """

    def __init__(self, admission: Admission, task: str, deadline: float, pixels: float) -> None:
        self.admission, self.task, self.deadline, self.pixels = admission, task, deadline, pixels
        self.open = True

    def close(self) -> None:
        if self.open:
            self.open = False
            self.admission._pending[self.task] -= 1
            self.admission._pending_pixels[self.task] -= self.pixels

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Admission:
    def __init__(self, tasks: Sequence[str], queue: Queue, *, queue_max_requests: int, queue_max_pixels: float) -> None:
        self.tasks, self.queue = tuple(tasks), queue
        self.queue_max_requests, self.queue_max_pixels = queue_max_requests, queue_max_pixels
        # Throughput per task (pixels/s): a moving average of measured batches; until the first, a seed
        # (`seed_throughput`, the warm-up's measurement) or ASSUMED_PIXELS_PER_S.
        self._rate = dict.fromkeys(self.tasks, ASSUMED_PIXELS_PER_S)
        self._measured: set[str] = set()
        self._pending = dict.fromkeys(self.tasks, 0)  # admitted, not queued yet (see Ticket)
        self._pending_pixels = dict.fromkeys(self.tasks, 0.0)
        self._typical_pixels = dict.fromkeys(self.tasks, 0.0)  # moving average of a request's computed pixels

    # ---- what it learns ---------------------------------------------------------------------------

    def seed_throughput(self, task: str, pixels: float, seconds: float) -> None:
        """A first estimate of `task`'s throughput (e.g. from warm-up, slower than steady state: the
        conservative side); the first measured batch replaces it."""
        if task not in self._measured and pixels > 0 and seconds > 0:
            self._rate[task] = pixels / seconds

    def seed_request_pixels(self, pixels: float) -> None:
        """The computed pixels assumed for a request whose image has not been decoded yet, until the
        first request of its task was planned (then a moving average of the requests seen)."""
        for task in self.tasks:
            self._typical_pixels[task] = self._typical_pixels[task] or pixels

    def measured(self, task: str, pixels: float, seconds: float) -> None:
        """A batch of `task` computed `pixels` in `seconds`."""
        rate = pixels / max(seconds, 1e-6)
        self._rate[task] = 0.8 * self._rate[task] + 0.2 * rate if task in self._measured else rate
        self._measured.add(task)

    def planned(self, task: str, pixels: float) -> None:
        """A request of `task` was planned at `pixels` computed pixels."""
        typical = self._typical_pixels[task]
        self._typical_pixels[task] = pixels if not typical else 0.8 * typical + 0.2 * pixels

    # ---- the estimate -----------------------------------------------------------------------------

    def _ahead(self, task: str, pending: bool) -> tuple[float, float, int]:
        """Work of `task` in the queue as seen by a newcomer of `task`: (pixels computed before the
        newcomer's first batch, all pixels, batches before the newcomer's first one).

        A newcomer queues behind every waiting request, but a request with tiles left gets one batch
        and then queues behind the newcomer (its turn moves), so each waiting request counts at most
        one batch. With `pending`, admitted requests not queued yet count with the typical size.
        """
        items: dict[tuple[int, int], int] = {}
        first = 0.0
        for job in self.queue.queued(task):
            per_batch = self.queue.items_per_batch(job.plan.shape)
            n = min(len(job.plan) - job.next_item, per_batch)
            items[job.plan.shape] = items.get(job.plan.shape, 0) + n
            first += n * job.plan.shape[0] * job.plan.shape[1]
        batches = sum(math.ceil(n / self.queue.items_per_batch(shape)) for shape, n in items.items())
        total = float(self.queue.pixels(task))
        if pending and self._pending[task]:
            first += self._pending_pixels[task]
            total += self._pending_pixels[task]
            batches += math.ceil(self._pending_pixels[task] / self.queue.batch_pixels) or 1
        return first, total, batches

    def expected_wait(self, task: str, pending: bool = True) -> float:
        """Seconds until a request of `task` queued now can be expected to start computing.

        The batch on the device finishes, then the work of `task` ahead of it runs (`_ahead`), and the
        consumer's round-robin runs up to one batch of each other task before each of those batches
        and before the newcomer's own. Times come from each task's measured throughput.
        """
        wait = 0.0
        for k, (busy, pixels, since) in enumerate(self.queue.on_device()):  # the running batch, then those behind it
            work = pixels / self._rate[busy]
            wait += max(0.0, work - (time.monotonic() - since)) if k == 0 else work  # an overrun delays the rest
        first, _, batches = self._ahead(task, pending)
        wait += first / self._rate[task]
        for other in self.tasks:
            if other != task:
                _, total, _ = self._ahead(other, pending)
                wait += min(total, (batches + 1) * self.queue.batch_pixels) / self._rate[other]
        return wait

    def check(self, task: str, deadline: float, pixels: int, pending: bool) -> None:
        """Raise QueueFull (429) when the queue's static limits or the expected wait refuse a request."""
        depth = self.queue.depth() + (sum(self._pending.values()) if pending else 0)
        wait = self.expected_wait(task, pending)
        queued_pixels = self.queue.pixels()
        if depth >= self.queue_max_requests:
            why = f"The queue holds {depth} requests, its limit"
        elif queued_pixels + pixels > self.queue_max_pixels:
            why = f"The queue holds {queued_pixels / 1e6:.1f} of its {self.queue_max_pixels / 1e6:.1f} megapixels"
        elif time.monotonic() + wait >= deadline:
            left = max(0.0, deadline - time.monotonic())
            why = f"The work ahead takes about {wait:.1f} s, more than the {left:.1f} s left to this request's deadline"
        else:
            return
        raise QueueFull(f"{why}; retry later.", wait)

    def admit(self, task: str, deadline: float) -> Ticket:
        """Admit a request of `task` whose compute must start by `deadline` (time.monotonic()), before its
        body is read: QueueFull (429, Retry-After) at once when the queue is at its limits, or when the
        work ahead (queued, and admitted but not yet queued) cannot be expected to run by then.
        Use the ticket as a context manager around reading, decoding and `MicroBatcher.submit`."""
        self.check(task, deadline, 0, pending=True)
        ticket = Ticket(self, task, deadline, self._typical_pixels[task])
        self._pending[task] += 1
        self._pending_pixels[task] += ticket.pixels
        return ticket
