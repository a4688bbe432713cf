"""The device worker's hold on its GPU, on the CPU with errors injected and torch.cuda's calls faked:
every thread that touches the device sets it first; sticky device errors, confirmed device errors and
dead or hung probes mark the device failed (/livez 503), recoverable ones do not."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
import torch

from service.app import create_app
from service.worker import DeviceWorker, device_error_kind, is_out_of_memory
from tests.service.conftest import FakeModel, fake_models, running, test_settings

pytestmark = pytest.mark.anyio


def test_every_thread_that_touches_the_device_sets_it_first(monkeypatch: pytest.MonkeyPatch):
    set_on: dict[str, torch.device] = {}

    def set_device(d) -> None:
        torch.cuda._utils._get_device_index(d)  # refuses what torch.cuda.set_device refuses ("cuda" without index)
        set_on[threading.current_thread().name] = d

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    worker = DeviceWorker({}, torch.device("cuda:1"), threads=2)
    try:
        pools = (worker._pool, worker._probe_pool, worker._upload_pool)
        names = [pool.submit(lambda: threading.current_thread().name).result() for pool in pools]
    finally:
        worker.close()
    assert set_on == dict.fromkeys(names, torch.device("cuda:1"))
    assert names[0].startswith("device_") and names[1].startswith("device-probe") and names[2].startswith("device-upload")

    set_on.clear()
    worker = DeviceWorker({}, torch.device("cuda"))  # no index: the thread keeps its current device, and starts
    try:
        assert [pool.submit(lambda: 1).result() for pool in (worker._pool, worker._probe_pool)] == [1, 1]
    finally:
        worker.close()
    assert set_on == {}


# ---------------------------------------------------------------- which errors lose the device


@pytest.mark.parametrize(
    "message, kind",
    [
        ("CUDA error: an illegal memory access was encountered", "sticky"),
        ("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`", "sticky"),
        ("CUDA error: unspecified launch failure", "sticky"),
        ("CUDA error: uncorrectable ECC error encountered", "sticky"),
        ("CUDA error: misaligned address", "sticky"),
        ("CUDA error: an illegal instruction was encountered", "sticky"),
        ("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
         "device"),
        ("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmStridedBatchedEx(handle, opa, ...)`", "device"),
        ("CUDA error: invalid configuration argument", "device"),
        ("CUDA error: out of memory", None),  # an allocation failure: split and retry, as OutOfMemoryError
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", None),
        # OpenVINO's CPU plugin and its allocator (std::bad_alloc, "bad allocation" on Windows)
        ("Exception from src/inference/src/cpp/infer_request.cpp:223:\nCheck 'ptr' failed at "
         "src/plugins/intel_cpu/src/cpu_memory.cpp:257:\nFailed to allocate 7663872811008 bytes of memory", None),
        ("Exception from src/core/src/runtime/allocator.cpp:79:\nstd::bad_alloc", None),
        ("Exception from src\\core\\src\\runtime\\allocator.cpp:79:\nbad allocation", None),
        ("Expected all tensors to be on the same device, but found at least two devices", None),
        ("Given groups=1, weight of size [8, 3, 3, 3], expected input to have 3 channels", None),
    ],
)
def test_only_sticky_errors_lose_the_device_outright(message, kind):
    assert device_error_kind(RuntimeError(message)) == kind
    allocation = ("out of memory", "ALLOC_FAILED", "Failed to allocate", "bad_alloc", "bad allocation")
    assert is_out_of_memory(RuntimeError(message)) == any(s in message for s in allocation)


class Failing(FakeModel):
    """Raises `error` from every batch and warm-up."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def run_batch(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error

    def warmup(self, shapes):
        raise self.error


def _worker(model: FakeModel, probe_answers: bool = True) -> DeviceWorker:
    worker = DeviceWorker({"deblur": model}, torch.device("cpu"))
    if not probe_answers:
        worker._probe = lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: unknown error"))
    return worker


@pytest.mark.parametrize(
    "message, probe_answers, failed",
    [
        ("CUDA error: an illegal memory access was encountered", True, True),  # sticky: no need to ask
        ("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED", True, False),  # the device still answers: a recoverable error
        ("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED", False, True),  # ... unless a fresh probe fails too
        ("CUDA error: out of memory", False, False),  # split down to one item, answered as out of memory
        ("a bug in the model", False, False),  # not the device's: nothing probed, nothing marked
    ],
)
def test_a_failed_batch_marks_the_device_failed_only_when_it_is(message, probe_answers, failed):
    worker = _worker(Failing(RuntimeError(message)), probe_answers)
    try:
        try:
            worker.run_sync("deblur", [torch.rand(3, 8, 8), torch.rand(3, 8, 8)])
        except RuntimeError as e:
            assert str(e) == message  # the batch's own error goes on to the batcher
        assert (worker.failure is not None) == failed
        if failed:
            assert worker.failure.startswith("RuntimeError: " + message.splitlines()[0])
    finally:
        worker.close()


async def test_device_errors_during_warm_up_fail_liveness():
    model = Failing(RuntimeError("CUDA error: unspecified launch failure"))
    app = create_app(test_settings(ui_enabled=False), models=fake_models(("deblur",), model))
    async with running(app) as client:
        service = app.state.service
        await next(t for t in service._tasks if t.get_name() == "warm-up")
        assert "unspecified launch failure" in service.warm_errors["deblur"]
        r = await client.get("/livez")
        assert r.status_code == 503 and "unspecified launch failure" in r.json()["detail"]


async def test_warm_up_errors_that_are_not_the_devices_leave_it_alive():
    app = create_app(test_settings(ui_enabled=False), models=fake_models(("deblur",), Failing(ValueError("bad shape"))))
    async with running(app) as client:
        await next(t for t in app.state.service._tasks if t.get_name() == "warm-up")
        assert (await client.get("/livez")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503  # not ready: the task is not warm


# ---------------------------------------------------------------- probes


async def test_consecutive_failed_or_hung_probes_fail_liveness():
    worker = _worker(FakeModel())
    worker.probe_failures = 3
    release = threading.Event()
    answers = iter(["fail", "fail", "ok", "fail", "hang", "hang"])

    def probe() -> None:
        answer = next(answers)
        if answer == "fail":
            raise RuntimeError("CUDA error: unknown error")
        if answer == "hang":
            release.wait(30)

    worker._probe = probe
    try:
        results = [await worker.probe(timeout_s=0.2) for _ in range(5)]
        assert [r is None for r in results] == [False, False, True, False, False]
        assert worker.failure is None  # a success in between starts the count again
        problem = await worker.probe(timeout_s=0.2)  # queued behind the hung one: times out as well
        assert "did not answer" in problem
        assert worker.failure is not None and worker.failure.startswith("3 device probes in a row failed")
        assert await worker.probe() == worker.failure  # failed for good
    finally:
        release.set()
        worker.close()


async def test_a_probe_that_hits_a_sticky_error_fails_at_once():
    worker = _worker(FakeModel())
    worker._probe = lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access was encountered"))
    try:
        await worker.probe()
        assert "illegal memory access" in worker.failure
    finally:
        worker.close()


async def test_livez_probes_the_device_itself():
    model = FakeModel()
    app = create_app(test_settings(ui_enabled=False), models=fake_models(("deblur",), model))
    async with running(app) as client:
        worker = app.state.service.worker
        worker._probe = lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: unknown error"))
        codes = [(await client.get("/livez")).status_code for _ in range(worker.probe_failures)]
        assert codes == [200] * (worker.probe_failures - 1) + [503]


async def test_both_liveness_routes_probe_the_device():
    app = create_app(test_settings(ui_enabled=False), models=fake_models(("deblur",), FakeModel()))
    async with running(app) as client:
        worker = app.state.service.worker
        worker._probe = lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: unknown error"))
        assert (await client.get("/livez")).status_code == 200
        assert (await client.get("/v2/health/live")).status_code == 200
        r = await client.get("/v2/health/live")  # the third failed probe in a row
        assert r.status_code == 503 and r.json() == {"live": False}
        assert (await client.get("/livez")).json()["status"] == "device_failed"


# ---------------------------------------------------------------- staging: uploads apart from compute


class Staging(FakeModel):
    """Records the thread of every staging and pass; `stage_error` is raised by the next staging."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[tuple[str, str]] = []
        self.staged = threading.Event()
        self.stage_error: BaseException | None = None
        self.freed = 0

    def stage_items(self, items):
        self.threads.append(("stage", threading.current_thread().name))
        if self.stage_error is not None:
            error, self.stage_error = self.stage_error, None
            raise error
        staged = super().stage_items(items)
        self.staged.set()
        return staged

    def run_batch(self, x):
        self.threads.append(("run", threading.current_thread().name))
        return super().run_batch(x)

    def free_cache(self) -> None:
        self.freed += 1


async def test_a_batch_stages_on_the_upload_thread_while_the_device_runs_the_one_before():
    model = Staging()
    worker = DeviceWorker({"deblur": model}, torch.device("cpu"))
    try:
        model.gate.clear()
        first = asyncio.ensure_future(worker.run("deblur", [torch.full((3, 8, 8), 1, dtype=torch.uint8)]))
        await anyio.to_thread.run_sync(model.entered.wait, 10)  # the first batch holds the device thread
        model.staged.clear()
        second = asyncio.ensure_future(worker.run("deblur", [torch.full((3, 8, 8), 2, dtype=torch.uint8)] * 2))
        assert await anyio.to_thread.run_sync(model.staged.wait, 10)  # uploaded meanwhile
        assert not first.done() and len(model.batches) == 1
        model.gate.set()
        with anyio.fail_after(10):
            (one,), two = await first, await second
    finally:
        model.gate.set()
        worker.close()
    assert one.dtype == torch.uint8 and int(one[0, 0, 0]) == 1 and [int(t[0, 0, 0]) for t in two] == [2, 2]
    stages = {name for kind, name in model.threads if kind == "stage"}
    runs = {name for kind, name in model.threads if kind == "run"}
    assert all(n.startswith("device-upload") for n in stages) and all(n.startswith("device_") for n in runs)


@pytest.mark.parametrize(
    "error, answered, failed",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True, False),  # run from the host
        (RuntimeError("a bug in staging"), False, False),  # the batch fails; the device is not blamed
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False, True),  # the device is lost
    ],
)
async def test_a_staging_error_is_handled_as_a_pass_error(error, answered, failed):
    model = Staging()
    model.stage_error = error
    worker = DeviceWorker({"deblur": model}, torch.device("cpu"))
    try:
        items = [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]
        with anyio.fail_after(10):
            if answered:
                out = await worker.run("deblur", items)
                assert all(torch.equal(o, i) for o, i in zip(out, items, strict=True)) and model.freed == 1
            else:
                with pytest.raises(RuntimeError, match=str(error)):
                    await worker.run("deblur", items)
        assert (worker.failure is not None) == failed
    finally:
        worker.close()


def test_a_staged_batch_runs_once():
    staged = FakeModel().stage_items([torch.rand(3, 8, 8)])
    assert staged.take().shape == (1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="runs once"):
        staged.take()
