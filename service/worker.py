"""The device worker: one thread that owns the device and runs batches, never on the event loop.

Out of memory is an answer about one batch, not a crash: the cache is emptied and the batch is split
in halves and retried; an item that cannot run even alone comes back as `ItemOutOfMemory` in its
slot, so the batcher can re-plan that one request with smaller tiles. Any other error fails the whole
batch (the batcher fans it out to every member); a CUDA error marks the device failed for /readyz.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from torch import Tensor

log = logging.getLogger("service.worker")


class BatchModel(Protocol):
    def run_batch(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, 3, H, W) float in [0, 1]."""


class ItemOutOfMemory(Exception):
    """One item did not fit in device memory even in a batch of one."""


class BatchMismatch(RuntimeError):
    """The model returned a different number or shape of outputs than it was given."""


def is_out_of_memory(e: BaseException) -> bool:
    # torch.OutOfMemoryError on CUDA; the CPU allocator raises a plain RuntimeError
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _is_device_failure(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert", "illegal memory access"))


class DeviceWorker:
    def __init__(self, models: Mapping[str, BatchModel], device: torch.device, threads: int | None = None) -> None:
        self.models = dict(models)
        self.device = device
        self.failure: str | None = None  # set after an unrecoverable device error
        # torch's CPU thread count is per calling thread: the model's thread gets `threads`, the
        # probe one (the codec threads set their own; see runtime.py).
        threads = threads or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="device", initializer=torch.set_num_threads, initargs=(threads,))
        self._probe_pool = ThreadPoolExecutor(1, thread_name_prefix="device-probe", initializer=torch.set_num_threads, initargs=(1,))
        self._probe_stream = None
        self._lock = threading.Lock()

    async def run(self, task: str, inputs: Sequence[Tensor]) -> list[Tensor | BaseException]:
        """Run same-shaped (3, h, w) items as one batch (split on OOM); one result or ItemOutOfMemory per item."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, task, list(inputs))

    async def warm_up(self, task: str, shape: tuple[int, int], max_items: int = 1) -> None:
        """Prepare one (h, w) item shape: an engine compiles/captures each static batch up to `max_items`
        (model/engine.py); any other model runs one item."""
        model = self.models[task]
        loop = asyncio.get_running_loop()
        if hasattr(model, "warmup"):
            await loop.run_in_executor(self._pool, model.warmup, [(max_items, *shape)])
            return
        x = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(0))
        await loop.run_in_executor(self._pool, self._run_checked, model, x)

    def _run(self, task: str, inputs: list[Tensor]) -> list[Tensor | BaseException]:
        x = torch.stack(inputs)  # (B, 3, h, w)
        return self._split_run(self.models[task], x)

    def _split_run(self, model: BatchModel, x: Tensor) -> list[Tensor | BaseException]:
        try:
            return list(self._run_checked(model, x).unbind(0))
        except Exception as e:
            if not is_out_of_memory(e):
                if _is_device_failure(e):
                    self.failure = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                    log.error("device failure: %s", self.failure)
                raise
            log.warning("out of memory on a batch of %d x %s; splitting", len(x), tuple(x.shape[2:]))
        # Retry outside the `except` block: the exception's traceback holds the failed batch's tensors.
        self.free_cache()
        if len(x) == 1:
            return [ItemOutOfMemory(f"a {x.shape[2]}x{x.shape[3]} item does not fit in {self.device} memory")]
        half = len(x) // 2
        return self._split_run(model, x[:half]) + self._split_run(model, x[half:])

    @staticmethod
    def _run_checked(model: BatchModel, x: Tensor) -> Tensor:
        y = model.run_batch(x)
        if not isinstance(y, Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise BatchMismatch(f"model returned {got} for an input of {tuple(x.shape)}")
        return y

    def free_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    async def probe(self, timeout_s: float = 2.0) -> str | None:
        """None when the device answers a tiny operation within `timeout_s`, else why not.

        Runs on its own thread (and CUDA stream), so a long batch on the device thread does not make
        a busy server look dead.
        """
        if self.failure:
            return self.failure
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._probe_pool, self._probe), timeout_s)
        except TimeoutError:
            return f"{self.device} did not answer a tiny operation within {timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - any failure here means "not ready", reported in the body
            return f"{self.device} failed a tiny operation: {type(e).__name__}: {e}"
        return None

    def _probe(self) -> None:
        if self.device.type == "cuda":
            with self._lock:
                if self._probe_stream is None:
                    self._probe_stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._probe_stream):
                v = (torch.ones(1, device=self.device) + 1).item()
        else:
            v = (torch.ones(1) + 1).item()
        if v != 2:
            raise RuntimeError(f"1 + 1 = {v}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
