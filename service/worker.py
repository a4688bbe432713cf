"""The device worker: one thread that owns the device and runs batches, never on the event loop.

Out of memory is an answer about one batch, not a crash: the cache is emptied and the batch is split
in halves and retried; an item that cannot run even alone comes back as `ItemOutOfMemory` in its
slot, so the batcher can re-plan that one request with smaller tiles. Any other error fails the whole
batch (the batcher fans it out to every member). A sticky CUDA error, a device error that a fresh probe
confirms, or several failed probes in a row mark the device failed: /livez asks for a new process.

Items arrive as uint8 pixel values (8-bit images) or float32 in [0, 1] (16-bit ones), possibly both
in one batch; the engine moves them to its device and back (`InferenceEngine.run_items`). A batch is
staged (copied to the device and converted, `stage_items`) on an upload thread of its own, then run on
the device thread (`run_staged`): a batch handed over while the one before still computes uploads
meanwhile (on CUDA on the engine's upload stream), and the device thread finds it ready.
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
from model.transfer import StagedItems

log = logging.getLogger("service.worker")
__all__ = ["BatchMismatch", "DeviceWorker", "ItemOutOfMemory", "device_error_kind", "is_out_of_memory"]


class ItemOutOfMemory(Exception):
    """One item did not fit in device memory even in a batch of one."""


# Allocation failures outside torch's caching allocator (a library's workspace, a raw cudaMalloc, OpenVINO's
# CPU plugin and allocator): recoverable like torch.OutOfMemoryError, and answered the same way (free the
# cache, split the batch).
_ALLOCATION_FAILURES = (
    "can't allocate memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "Failed to allocate",  # OpenVINO: "Failed to allocate N bytes of memory"
    "std::bad_alloc",
    "bad allocation",  # std::bad_alloc's message on Windows builds
)
# Sticky errors: the CUDA context is corrupt and every later call fails the same way; only a new
# process recovers (the CUDA runtime's descriptions of those error codes, as torch puts them in messages).
_STICKY = (
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "device-side assert",
    "uncorrectable ECC error",
    "hardware stack error",
    "invalid program counter",
    "launch timed out",
    "operation not supported on global/shared address space",
)
# Errors raised by the device or its libraries that need not leave it broken (an unsupported cuDNN
# algorithm, a bad launch configuration, a cuBLAS status): confirmed with a fresh probe before failing.
_DEVICE_ERRORS = ("CUDA error", "CUDA driver error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error")


def is_out_of_memory(e: BaseException) -> bool:
    # torch.OutOfMemoryError on CUDA; the CPU allocator and the CUDA libraries raise plain RuntimeErrors
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _ALLOCATION_FAILURES)


def device_error_kind(e: BaseException) -> str | None:
    """'sticky' (the device is lost for this process), 'device' (a device error that may be recoverable:
    ask the device) or None (not the device's: a bug or bad input, nothing to say about the device)."""
    if is_out_of_memory(e):
        return None
    text = str(e)
    if any(s in text for s in _STICKY):
        return "sticky"
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch's type for CUDA runtime errors
    if isinstance(e, accelerator_error) or any(s in text for s in _DEVICE_ERRORS):
        return "device"
    return None


def _thread_setup(device: torch.device, threads: int) -> None:
    """Start of a thread that touches the device: its torch CPU threads, and on CUDA its current device.

    Both are per thread. Without set_device a thread's current device is cuda:0, whatever the worker's
    is: streams, graph replays and allocations that use the current device would land on the wrong GPU.
    """
    torch.set_num_threads(threads)
    if device.type == "cuda" and device.index is not None:  # resolve_device gives the index; "cuda" alone: keep
        torch.cuda.set_device(device)


class DeviceWorker:
    def __init__(
        self,
        models: Mapping[str, InferenceEngine],
        device: torch.device,
        threads: int | None = None,
        *,
        probe_failures: int = 3,
    ) -> None:
        self.models = dict(models)
        self.device = device
        self.failure: str | None = None  # set after an unrecoverable device error: /livez turns 503
        # this many probes in a row that fail or time out mean a dead or hung device (one may be a hiccup)
        self.probe_failures = probe_failures
        self._failed_probes = 0
        # torch's CPU thread count is per calling thread: the model's thread gets `threads`, the
        # probe one (the codec threads set their own; see runtime.py).
        threads = threads or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(1, "device", initializer=_thread_setup, initargs=(device, threads))
        self._upload_pool = ThreadPoolExecutor(1, "device-upload", initializer=_thread_setup, initargs=(device, 1))
        self._probe_pool = ThreadPoolExecutor(1, "device-probe", initializer=_thread_setup, initargs=(device, 1))
        self._probe_stream = None
        self._lock = threading.Lock()

    async def run(self, task: str, inputs: Sequence[Tensor]) -> list[Tensor | BaseException]:
        """Run same-shaped (3, h, w) items as one batch (split on OOM); one result (on the CPU, uint8 for a
        uint8 item, else float32) or ItemOutOfMemory per item.

        Staged on the upload thread first, so a batch handed over while another runs uploads meanwhile.
        """
        loop, model, items = asyncio.get_running_loop(), self.models[task], list(inputs)
        staged = await loop.run_in_executor(self._upload_pool, self._stage, model, items)
        if staged is None:  # the upload ran out of memory: on the device thread, free the cache and run from the host
            return await loop.run_in_executor(self._pool, self._run_from_host, model, items)
        return await loop.run_in_executor(self._pool, self._split_run, model, items, staged)

    async def warm_up(self, task: str, shape: tuple[int, int], max_items: int = 1) -> None:
        """Prepare one (h, w) item shape for batches of up to `max_items` (`InferenceEngine.warmup`)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._warm_up_sync, task, [(max_items, *shape)])

    def _warm_up_sync(self, task: str, shapes: list[tuple[int, int, int]]) -> None:
        try:
            self.models[task].warmup(shapes)
        except Exception as e:
            self._judge(e)  # a device that fails while warming up fails /livez as one that fails a batch
            raise

    def run_sync(self, task: str, inputs: Sequence[Tensor]) -> list[Tensor | BaseException]:
        """`run` on the calling thread, for benchmarks that time the device's share of a request (upload,
        conversions, model, download) without the event loop; the service always goes through `run`."""
        return self._split_run(self.models[task], list(inputs))

    def _stage(self, model: InferenceEngine, items: list[Tensor]) -> StagedItems | None:
        """The batch on the device, from the upload thread; None when that ran out of memory (`_run_from_host`)."""
        try:
            return model.stage_items(items)
        except Exception as e:
            if not is_out_of_memory(e):
                self._judge(e)
                raise
            log.warning("out of memory uploading a batch of %d x %s", len(items), tuple(items[0].shape[1:]))
            return None

    def _run_from_host(self, model: InferenceEngine, items: list[Tensor]) -> list[Tensor | BaseException]:
        """After an upload ran out of memory: the cache emptied (here, on the device thread, never while it
        captures a graph), then the batch from the host, split in halves if it runs out again."""
        model.free_cache()
        return self._split_run(model, items)

    def _split_run(
        self, model: InferenceEngine, items: list[Tensor], staged: StagedItems | None = None
    ) -> list[Tensor | BaseException]:
        """`items` through the model (`staged`: already on the device), halved and retried on out of memory."""
        try:
            if staged is not None:
                return model.run_staged(staged)
            return model.run_items(items)  # uploads and conversions included: they can run out of memory too
        except Exception as e:
            if not is_out_of_memory(e):
                self._judge(e)
                raise
            log.warning("out of memory on a batch of %d x %s; splitting", len(items), tuple(items[0].shape[1:]))
        # Retry outside the `except` block: the exception's traceback holds the failed batch's tensors (a staged
        # batch's handle let go of its device tensor when the pass took it).
        model.free_cache()
        if len(items) == 1:
            _, h, w = items[0].shape
            return [ItemOutOfMemory(f"a {h}x{w} item does not fit in {self.device} memory")]
        half = len(items) // 2
        return self._split_run(model, items[:half]) + self._split_run(model, items[half:])

    def _fail(self, reason: str) -> None:
        if not self.failure:
            self.failure = reason
            log.error("device failure, restart the process: %s", reason)

    def _judge(self, e: BaseException) -> None:
        """After a failed batch or warm-up: mark the device failed if the error says it is lost, or if it
        was a device error and a fresh probe fails too (an unsupported algorithm leaves the device fine)."""
        kind = device_error_kind(e)
        what = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if kind == "sticky":
            self._fail(what)
        elif kind == "device":
            problem = self._probe_now()
            if problem is None:
                log.warning("device error, but the device still answers (not marked failed): %s", what)
            else:
                self._fail(f"{what}; then {problem}")

    def _probe_now(self, timeout_s: float = 2.0) -> str | None:
        """`probe` from the device thread (no event loop there)."""
        try:
            self._probe_pool.submit(self._probe).result(timeout_s)
        except TimeoutError:
            return f"{self.device} did not answer a tiny operation within {timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - the probe's failure is the answer
            return f"{self.device} failed a tiny operation: {type(e).__name__}: {e}"
        return None

    async def probe(self, timeout_s: float = 2.0) -> str | None:
        """None when the device answers a tiny operation within `timeout_s`, else why not.

        Runs on its own thread (and CUDA stream), so a long batch on the device thread does not make
        a busy server look dead. `probe_failures` failed or timed-out probes in a row, or one that fails
        with a sticky error, mark the device failed (a hung probe keeps the probe thread: the ones
        after it time out too).
        """
        if self.failure:
            return self.failure
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._probe_pool, self._probe), timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure here means "not ready", reported in the body
            problem = (
                f"{self.device} did not answer a tiny operation within {timeout_s:g} s"
                if isinstance(e, TimeoutError)
                else f"{self.device} failed a tiny operation: {type(e).__name__}: {e}"
            )
            self._failed_probes += 1
            if device_error_kind(e) == "sticky":
                self._fail(problem)
            elif self._failed_probes >= self.probe_failures:
                self._fail(f"{self._failed_probes} device probes in a row failed; the last: {problem}")
            return problem
        self._failed_probes = 0
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
        self._upload_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
