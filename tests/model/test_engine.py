"""The engine (model/engine.py, model/transfer.py): settings, static shapes, warm-up, uint8 path, compile.

Most tests swap `torch.compile` for the identity, so they check the engine's own plumbing (batch
rounding, chunking, warm-up coverage, the memory report) in seconds; one slow test compiles a tiny
MPRNet with inductor for real. GPU-only behaviour (CUDA graphs, reduce-overhead, streams, memory
figures) is in the tests marked `gpu`.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from model.arch import MPRNet
from model.engine import Engine, EngineSettings, MemoryUse, _Runner, configure_compile_cache, static_batch_sizes
from model.images import from_tensor, to_tensor
from model.inference import Restorer
from model.transfer import infer_layout
from model.variants import TINY

RNG = np.random.default_rng(7)


def _tiny() -> MPRNet:
    torch.manual_seed(0)
    return MPRNet(**TINY)


class Invert(nn.Module):
    """1 - x per pixel, recording the batch shapes it sees: exact, and shows what the engine ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: Tensor) -> list[Tensor]:
        self.calls.append(tuple(x.shape))
        return [1 - x]


@pytest.fixture
def fake_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile -> identity: the engine takes its static-shape path without compiling."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def _pixels(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------- settings


def test_defaults_on_the_cpu_are_the_eager_restorer():
    model = _tiny()
    engine = Engine(model, device="cpu")
    assert (engine.compile_mode, engine.cuda_graphs, engine.static) == ("off", False, False)
    x = torch.rand(3, 3, 16, 24)
    assert torch.equal(engine.run_batch(x), Restorer(model, device="cpu").run_batch(x))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"compile": "max-autotune"}, "unknown compile mode"),
        ({"compile": "reduce-overhead"}, "on the CPU"),
        ({"cuda_graphs": True}, "need a CUDA device"),
        ({"max_batch": 0}, "at least 1"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Engine(Invert(), device="cpu", settings=EngineSettings(**settings))


def test_static_batch_sizes():
    assert static_batch_sizes(1) == (1,)
    assert static_batch_sizes(16) == (1, 2, 4, 8, 16)
    assert static_batch_sizes(12) == (1, 2, 4, 8, 12)


def test_compile_cache_setting_points_inductor_and_triton_there(tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "placeholder")  # restored after the test, whatever the engine sets
        monkeypatch.delenv(name)
    path = configure_compile_cache(tmp_path / "compile")
    assert path.is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert os.environ["TRITON_CACHE_DIR"] == str(path / "triton")


# ---------------------------------------------------------------- static shapes


def test_a_batch_runs_as_the_next_static_size_and_large_batches_in_chunks(fake_compile):
    net = Invert()
    engine = Engine(net, device="cpu", precision="fp32", settings=EngineSettings(compile="default", max_batch=8))
    x = torch.rand(3, 3, 16, 8)
    assert torch.equal(engine.run_batch(x), (1 - x).clamp(0, 1))
    assert set(net.calls) == {(4, 3, 16, 8)}  # prepared once, then run: always 4 rows

    net.calls.clear()
    x = torch.rand(20, 3, 8, 8)
    y = engine.run_batch(x)
    assert torch.equal(y, (1 - x).clamp(0, 1))
    assert {c[0] for c in net.calls} == {8, 4}  # 8 + 8 + 4 (the last chunk rounded up from 4)


def test_warm_up_covers_every_static_shape_and_reports_memory(fake_compile):
    net = Invert()
    engine = Engine(net, device="cpu", precision="fp32", settings=EngineSettings(compile="default", max_batch=8))
    report = engine.warmup([(16, 16), (8, 24)])
    expected = {(b, h, w) for b in (1, 2, 4, 8) for h, w in ((16, 16), (8, 24))}
    assert set(report) == expected == set(engine.memory_report()) == set(engine.warm_shapes())
    assert all(m.peak_bytes is None and m.retained_bytes is None for m in report.values())  # CPU: not measured

    calls = len(net.calls)
    engine.run_batch(torch.rand(5, 3, 8, 24))
    assert net.calls[calls:] == [(8, 3, 8, 24)]  # warm: one pass, nothing prepared on the way

    # (B, H, W): only the static sizes a batch of B can need
    assert set(engine.warmup([(3, 32, 8)])) == {(1, 32, 8), (2, 32, 8), (4, 32, 8)}
    described = engine.describe()
    json.dumps(described)  # goes into GET /tasks as is
    assert described["static_batch_sizes"] == [1, 2, 4, 8]
    assert len(described["shapes"]) == len(expected) + 3
    with pytest.raises(ValueError, match="multiples of 8"):
        engine.warmup([(15, 16)])


def test_describe_reads_a_snapshot_while_warm_up_adds_shapes(fake_compile):
    """GET /tasks describes the engine while the device thread adds warm shapes: no 'dictionary changed size'."""
    engine = Engine(Invert(), device="cpu", precision="fp32", settings=EngineSettings(compile="default", max_batch=2))
    engine.warmup([(8, 8)])

    class GrowsOnRead(MemoryUse):
        """Reading a field adds a shape, as the device thread would between two steps of the iteration."""

        def __getattribute__(self, name):
            if name == "peak_bytes":
                engine._memory[(1, 8, 8 * (len(engine._memory) + 1))] = MemoryUse(None, None)
            return super().__getattribute__(name)

    engine._memory[(2, 16, 16)] = GrowsOnRead(None, None)
    shapes = engine.describe()["shapes"]
    assert [(s["batch"], s["height"], s["width"]) for s in shapes] == [(1, 8, 8), (2, 8, 8), (2, 16, 16)]
    assert len(engine.memory_report()) == 4  # the shape added meanwhile shows the next time


def test_an_eager_engine_warms_each_shape_once_at_batch_one():
    net = Invert()
    engine = Engine(net, device="cpu", precision="fp32")
    assert set(engine.warmup([(16, 16), (8, 8)])) == {(1, 16, 16), (1, 8, 8)}
    assert net.calls == [(1, 3, 16, 16), (1, 3, 8, 8)]
    engine.run_batch(torch.rand(3, 3, 8, 8))
    assert net.calls[-1] == (3, 3, 8, 8)  # eager: no batch rounding


def test_static_and_eager_tiny_mprnet_agree(fake_compile):
    model = _tiny()
    eager = Engine(model, device="cpu", precision="fp32")
    static = Engine(model, device="cpu", precision="fp32", settings=EngineSettings(compile="default", max_batch=4))
    x = torch.rand(3, 3, 16, 16)  # runs as 4 rows; the extra row must not leak into the others
    torch.testing.assert_close(static.run_batch(x), eager.run_batch(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- uint8 path


def _float_path(engine: Engine, image: np.ndarray) -> np.ndarray:
    x, meta = to_tensor(image)
    return from_tensor(engine.restore_tensor(x), meta)


@pytest.mark.parametrize("layout", ["BHWC", "BCHW"])
def test_uint8_path_equals_the_float_path(layout):
    engine = Engine(_tiny(), device="cpu", precision="fp32")
    pixels = _pixels(2, 13, 21, 3)  # not multiples of 8: padded and cropped inside
    batch = pixels if layout == "BHWC" else np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    out = engine.run_uint8(batch)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == batch.shape
    got = out if layout == "BHWC" else out.transpose(0, 2, 3, 1)
    for i in range(len(pixels)):
        np.testing.assert_array_equal(got[i], _float_path(engine, pixels[i]))


def test_uint8_path_takes_tensors_and_static_batches(fake_compile):
    engine = Engine(Invert(), device="cpu", precision="fp32", settings=EngineSettings(compile="default", max_batch=4))
    pixels = torch.from_numpy(_pixels(3, 10, 17, 3))
    pending = engine.submit_uint8(pixels)
    assert pending.ready()
    out = pending.result()
    assert isinstance(out, Tensor) and out.dtype == torch.uint8
    assert torch.equal(out, 255 - pixels)
    assert set(engine.warm_shapes()) == {(4, 16, 24)}  # padded to multiples of 8, batch rounded up


@pytest.mark.parametrize(
    "shape, layout, error",
    [
        ((1, 3, 8, 3), None, "pass layout"),
        ((1, 8, 8, 4), None, "3 color channels"),
        ((8, 8, 3), None, "4-D"),
        ((1, 8, 8, 3), "BCHW", "3 channels"),
        ((1, 8, 8, 3), "NHWC", "unknown layout"),
    ],
)
def test_uint8_layouts_that_cannot_be_read_are_refused(shape, layout, error):
    with pytest.raises(ValueError, match=error):
        infer_layout(shape, layout)


def test_uint8_path_refuses_other_dtypes():
    engine = Engine(Invert(), device="cpu", precision="fp32")
    with pytest.raises(TypeError, match="uint8"):
        engine.run_uint8(np.zeros((1, 8, 8, 3), np.uint16))


# ---------------------------------------------------------------- dynamo, with the eager backend


class ConvNet(nn.Module):
    """Two 3x3 convolutions plus a skip: memory format matters to it, and dynamo traces it in a blink.
    (Nets of other widths, like the tasks' models, are other versions of the engine's compiled frame.)"""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.conv(x) + x]


@pytest.fixture
def dynamo_frames():
    """Frames dynamo has compiled so far (a fresh cache: engines of other tests share `_forward`'s code)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield lambda: counters["frames"]["ok"]
    torch._dynamo.reset()


@pytest.mark.parametrize("channels_last", [True, False])
def test_warm_up_leaves_no_recompile_for_real_batches(dynamo_frames, channels_last):
    """Compiled without the engine's graphs (as reduce-overhead or default with graphs off run), the real
    batches must hit the code warm-up traced: same strides, same dispatch keys, whatever the caller passes."""
    settings = EngineSettings(compile="default", backend="eager", max_batch=4)
    engine = Engine(ConvNet(), device="cpu", precision="fp32", channels_last=channels_last, settings=settings)
    engine.warmup([(16, 16), (8, 16)])
    warm = dynamo_frames()
    assert warm == 6  # batch sizes 1, 2, 4 for each of the two shapes
    for n in (1, 2, 3, 4):
        engine.run_batch(torch.rand(n, 3, 16, 16))  # contiguous, made outside inference mode
        engine.run_batch(torch.rand(n, 3, 8, 16).contiguous(memory_format=torch.channels_last))
        engine.run_uint8(_pixels(n, 16, 16, 3))
    assert dynamo_frames() == warm


def test_recompile_limit_grows_with_shapes_times_tasks(dynamo_frames):
    """Every static shape of every engine is a version of the same frame; past dynamo's limit a shape would
    run eagerly (here: raise). The limits must grow with each shape compiled, whatever they were when the
    engines were made: 2 tasks x 3 batch sizes x 2 shapes = 12 compiles, over dynamo's default 8."""
    settings = EngineSettings(compile="default", backend="eager", max_batch=4)
    engines = [Engine(ConvNet(width), device="cpu", precision="fp32", settings=settings) for width in (4, 6)]
    # dynamo's own patch restores the limits after (dynamo's defaults are 8 and 256); monkeypatch would
    # undo through the config module's delattr, which hides the option for every later test
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8, accumulated_recompile_limit=8):
        for engine in engines:
            engine.warmup([(8, 8), (8, 16)])
        assert dynamo_frames() == 12
        assert torch._dynamo.config.recompile_limit >= 12 and torch._dynamo.config.accumulated_recompile_limit >= 12
        for engine in engines:
            engine.run_batch(torch.rand(3, 3, 8, 16))
        assert dynamo_frames() == 12
    assert hasattr(torch._dynamo.config, "recompile_limit")


def test_engines_on_one_gpu_share_a_lock_and_one_graph_pool(monkeypatch):
    from model.engine import _device_share

    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", next(handles)))
    a, b, other = (_device_share(torch.device(d)) for d in ("cuda:0", "cuda:0", "cuda:7"))
    assert a is b and a.lock is b.lock and other.lock is not a.lock
    assert a.graph_pool() == b.graph_pool() == a.graph_pool() != other.graph_pool()
    # the engine takes both from there on CUDA; on the CPU each engine has its own lock
    x, y = (Engine(Invert(), device="cpu", precision="fp32") for _ in range(2))
    assert x._lock is not y._lock and x._graph_pool is None


# ---------------------------------------------------------------- inductor, for real


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_inductor_compiled_engine_matches_eager():
    """One real inductor compile (batch 1, 16x16; minutes on two busy cores): float and uint8 paths."""
    model = _tiny()
    eager = Engine(model, device="cpu", precision="fp32")
    compiled = Engine(model, device="cpu", precision="fp32", settings=EngineSettings(compile="default", max_batch=1))
    assert compiled.static and compiled.compile_mode == "default"
    compiled.warmup([(16, 16)])
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(compiled.run_batch(x), eager.run_batch(x), atol=1e-5, rtol=1e-5)
    pixels = _pixels(1, 14, 16, 3)  # pads to the compiled 16x16
    diff = compiled.run_uint8(pixels).astype(int) - eager.run_uint8(pixels).astype(int)
    assert np.abs(diff).max() <= 1
    assert set(compiled.warm_shapes()) == {(1, 16, 16)}  # no recompile on the way


# ---------------------------------------------------------------- CUDA, faked on the CPU


class FakeCuda:
    """torch.cuda's device, stream and graph calls for the CPU: records the device each capture and replay
    ran on (the current device starts as cuda:0, as in a thread that never set one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.current = torch.device("cuda:0")
        self.captures: list[dict] = []
        self.replays: list[torch.device] = []
        fake = self

        class Stream:
            def __init__(self, device=None) -> None:
                self.device = torch.device(device) if device is not None else fake.current

            def wait_stream(self, other) -> None:
                """Ordering between fake streams: nothing to do."""

        class Graph:
            def replay(self) -> None:
                fake.replays.append(fake.current)

        @contextlib.contextmanager
        def device(d):
            before, fake.current = fake.current, torch.device(d)
            try:
                yield
            finally:
                fake.current = before

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            fake.captures.append({"stream": stream and stream.device, "current": fake.current})
            yield

        for name, value in {"Stream": Stream, "CUDAGraph": Graph, "device": device, "graph": graph,
                            "current_stream": lambda d=None: Stream(d), "stream": lambda s: contextlib.nullcontext()}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_graphs_are_captured_and_replayed_on_the_engines_gpu(monkeypatch):
    fake = FakeCuda(monkeypatch)
    engine = Engine(ConvNet(), device="cpu", precision="fp32")
    engine.device, engine.static, engine.cuda_graphs = torch.device("cuda:1"), True, True  # as on a second GPU
    engine.batch_sizes = (2,)
    runner = _Runner((2, 8, 8), engine._fn, torch.rand(2, 3, 8, 8))
    engine._capture(runner)
    engine._runners[(2, 8, 8)] = runner
    engine._core(torch.rand(1, 3, 8, 8))
    cuda1 = torch.device("cuda:1")
    assert fake.captures == [{"stream": cuda1, "current": cuda1}]
    assert fake.replays == [cuda1]
    assert fake.current == torch.device("cuda:0")  # the caller's device is left as it was


# ---------------------------------------------------------------- CUDA


def _cuda_pair(**settings) -> tuple[Engine, Engine]:
    model = _tiny()
    eager = Engine(model, device="cuda", settings=EngineSettings(compile="off", cuda_graphs=False))
    return eager, Engine(model, device="cuda", settings=EngineSettings(max_batch=4, **settings))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "settings",
    [{"compile": "off", "cuda_graphs": True}, {"compile": "default"}, {"compile": "reduce-overhead", "cuda_graphs": False}],
)
def test_cuda_modes_match_eager_within_bf16_tolerance(settings):
    eager, fast = _cuda_pair(**settings)
    fast.warmup([(32, 32)])
    for n in (1, 3, 4):
        x = torch.rand(n, 3, 32, 32)
        torch.testing.assert_close(fast.run_batch(x), eager.run_batch(x), atol=2e-2, rtol=0)
    for m in fast.memory_report().values():
        assert m.peak_bytes is not None and m.peak_bytes > 0 and m.retained_bytes is not None


@pytest.mark.gpu
def test_cuda_uint8_submissions_overlap_and_match_the_synchronous_result():
    eager, fast = _cuda_pair(compile="off", cuda_graphs=True)
    batches = [_pixels(4, 30, 32, 3) for _ in range(3)]
    pending = [fast.submit_uint8(b) for b in batches]  # queued back to back
    for b, p in zip(batches, pending, strict=True):
        assert np.abs(p.result().astype(int) - fast.run_uint8(b).astype(int)).max() <= 1  # same graph, same input
        assert np.abs(p.result().astype(int) - eager.run_uint8(b).astype(int)).max() <= 2  # bf16, graph vs eager kernels


@pytest.mark.gpu
def test_cuda_batches_staged_on_the_upload_stream_while_another_computes_match_run_items():
    _, fast = _cuda_pair(compile="off", cuda_graphs=True)
    fast.warmup([(32, 32)])
    batches = [[torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(3)] for _ in range(3)]
    want = [fast.run_items(b) for b in batches]
    staged = fast.stage_items(batches[0])
    for k in range(3):  # each next batch uploads on its own stream before the one before runs
        following = fast.stage_items(batches[k + 1]) if k < 2 else None
        got = fast.run_staged(staged)
        assert all(torch.equal(g, w) for g, w in zip(got, want[k], strict=True))
        staged = following
    assert fast.transfer.upload is not None and fast.transfer.upload != torch.cuda.current_stream(fast.device)


@pytest.mark.gpu
def test_cuda_engines_share_one_graph_pool_and_answer_as_eager():
    eager, first = _cuda_pair(compile="off", cuda_graphs=True)
    second = Engine(_tiny(), device="cuda", settings=EngineSettings(compile="off", cuda_graphs=True, max_batch=4))
    assert first.device == second.device and first.device.index is not None  # resolved with its index
    assert first._graph_pool == second._graph_pool and first._lock is second._lock
    first.warmup([(32, 32)])
    second.warmup([(32, 32)])
    x = torch.rand(3, 3, 32, 32)
    for engine in (first, second):  # the second's captures reuse the pool: the first's outputs must survive
        torch.testing.assert_close(engine.run_batch(x), eager.run_batch(x), atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_graphs_on_a_second_gpu_stay_there():
    model = _tiny()
    eager = Engine(model, device="cuda:1", settings=EngineSettings(compile="off", cuda_graphs=False))
    graphs = Engine(model, device="cuda:1", settings=EngineSettings(compile="off", cuda_graphs=True, max_batch=2))
    before = torch.cuda.memory_allocated(0)
    graphs.warmup([(32, 32)])
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(graphs.run_batch(x), eager.run_batch(x), atol=2e-2, rtol=0)
    assert torch.cuda.memory_allocated(0) == before  # nothing captured or allocated on cuda:0
    assert torch.cuda.current_device() == 0  # the caller's device is left as it was


def test_run_items_is_its_two_halves_and_a_staged_batch_keeps_its_items():
    engine = Engine(_tiny(), device="cpu", settings=EngineSettings(compile="off"))
    items = [torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8), torch.rand(3, 16, 24)]
    staged = engine.stage_items(items)
    assert staged.items == items and staged.quantise == [True, False]
    got, want = engine.run_staged(staged), engine.run_items(items)
    assert [g.dtype for g in got] == [torch.uint8, torch.float32]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
