"""The device worker: one thread that owns the device and runs batches, never on the event loop.

Out of memory is an answer about one batch, not a crash: the cache is emptied and the batch is split
in halves and retried; an item that cannot run even alone comes back as `ItemOutOfMemory` in its
slot, so the batcher can re-plan that one request with smaller tiles. Any other error fails the whole
batch (the batcher fans it out to every member); a CUDA error marks the device failed for /readyz.

Items arrive as uint8 pixel values (8-bit images) or float32 in [0, 1] (16-bit ones), possibly both
in one batch; the engine moves them to its device and back (`InferenceEngine.run_items`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from model.engine_api import BatchMismatch, InferenceEngine

log = logging.getLogger("service.worker")
__all__ = ["BatchMismatch", "DeviceWorker", "ItemOutOfMemory", "is_out_of_memory"]


class ItemOutOfMemory(Exception):
    """One item did not fit in device memory even in a batch of one."""


def is_out_of_memory(e: BaseException) -> bool:
    # torch.OutOfMemoryError on CUDA; the CPU allocator raises a plain RuntimeError
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _is_device_failure(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert", "illegal memory access"))


def _thread_setup(device: torch.device, threads: int) -> None:
    """Start of a thread that touches the device: its torch CPU threads, and on CUDA its current device.

    Both are per thread. Without set_device a thread's current device is cuda:0, whatever the worker's
    is: streams, graph replays and allocations that use the current device would land on the wrong GPU.
    """
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)


class DeviceWorker:
    def __init__(self, models: Mapping[str, InferenceEngine], device: torch.device, threads: int | None = None) -> None:
        self.models = dict(models)
        self.device = device
        self.failure: str | None = None  # set after an unrecoverable device error
        # torch's CPU thread count is per calling thread: the model's thread gets `threads`, the
        # probe one (the codec threads set their own; see runtime.py).
        threads = threads or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(1, "device", initializer=_thread_setup, initargs=(device, threads))
        self._probe_pool = ThreadPoolExecutor(1, "device-probe", initializer=_thread_setup, initargs=(device, 1))
        self._probe_stream = None
        self._lock = threading.Lock()

    async def run(self, task: str, inputs: Sequence[Tensor]) -> list[Tensor | BaseException]:
        """Run same-shaped (3, h, w) items as one batch (split on OOM); one result (on the CPU, uint8 for a
        uint8 item, else float32) or ItemOutOfMemory per item."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.run_sync, task, list(inputs))

    async def warm_up(self, task: str, shape: tuple[int, int], max_items: int = 1) -> None:
        """Prepare one (h, w) item shape for batches of up to `max_items` (`InferenceEngine.warmup`)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.models[task].warmup, [(max_items, *shape)])

    def run_sync(self, task: str, inputs: Sequence[Tensor]) -> list[Tensor | BaseException]:
        """`run` on the calling thread, for benchmarks that time the device's share of a request (upload,
        conversions, model, download) without the event loop; the service always goes through `run`."""
        return self._split_run(self.models[task], list(inputs))

    def _split_run(self, model: InferenceEngine, items: list[Tensor]) -> list[Tensor | BaseException]:
        try:
            return model.run_items(items)  # uploads and conversions included: they can run out of memory too
        except Exception as e:
            if not is_out_of_memory(e):
                if _is_device_failure(e):
                    self.failure = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                    log.error("device failure: %s", self.failure)
                raise
            log.warning("out of memory on a batch of %d x %s; splitting", len(items), tuple(items[0].shape[1:]))
        # Retry outside the `except` block: the exception's traceback holds the failed batch's tensors.
        model.free_cache()
        if len(items) == 1:
            _, h, w = items[0].shape
            return [ItemOutOfMemory(f"a {h}x{w} item does not fit in {self.device} memory")]
        half = len(items) // 2
        return self._split_run(model, items[:half]) + self._split_run(model, items[half:])

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
