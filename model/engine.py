"""The torch engine behind the batcher: a `Restorer` that runs a few static shapes fast.

The batcher hands the device batches of a handful of item shapes (its buckets and tiles). The
engine makes each (batch, height, width) a *static shape*:

* a batch is rounded up to the next of a few static batch sizes (1, 2, 4, ... up to `max_batch`),
  the extra rows computed and dropped, so a short list of shapes covers all traffic;
* per shape, the forward pass is optionally compiled by inductor (`compile`: it fuses the many
  pointwise ops of the CABs and SAMs), and on CUDA a graph of the whole pass is captured once and
  replayed (`cuda_graphs`), which removes the per-kernel launch cost that dominates small batches;
* `warmup(shapes)` compiles and captures them all before the service reports ready, and measures
  the device memory each one needs (`memory_report()`).

With `compile="off"` and no graphs it is exactly a `Restorer`. `run_batch` keeps the Restorer's
contract; `run_uint8`/`submit_uint8` (model/transfer.py) move 8-bit pixels instead of float32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .engine_api import MemoryUse, Shape, TileSettings
from .inference import PRECISIONS, Restorer
from .transfer import StagedItems, Uint8Transfer, stage_items

log = logging.getLogger("model.engine")

COMPILE_MODES = ("off", "default", "reduce-overhead")
__all__ = ["COMPILE_MODES", "Engine", "EngineSettings", "MemoryUse", "Shape", "configure_compile_cache", "static_batch_sizes"]


def static_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, and `max_batch` itself: (1, 2, 4, 8, 12) for 12."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch}
    return tuple(sorted(sizes | {max_batch}))


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs. `None`/"auto" fields resolve per device (see `Engine.__init__`)."""

    compile: str = "auto"  # off | default | reduce-overhead; auto: default on CUDA, off on the CPU
    cuda_graphs: bool | None = None  # capture and replay per shape; None: on with CUDA (reduce-overhead graphs by itself)
    cache_dir: str | None = None  # inductor + Triton cache; a persistent folder makes a restart skip most compile time
    max_batch: int = 16  # largest static batch; larger batches run in chunks
    # Compile height and width as symbols: one compile per static batch size serves every (H, W),
    # which cuts warm-up from shapes x batch sizes compiles to about one per batch size (inductor's
    # conv still guards batch ranges 2-3, 4-7, ... so batch sizes stay separate), at some cost in
    # kernel speed. Graphs are still captured per shape.
    dynamic_hw: bool = False
    backend: str = "inductor"  # torch.compile backend
    # Shapes are static, so cuDNN may time its algorithms once per shape and keep the fastest
    # (a process-wide switch: set on CUDA when the engine is static).
    cudnn_benchmark: bool = True

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES + ("auto",):
            raise ValueError(f"unknown compile mode {self.compile!r}: use auto, off, default or reduce-overhead")
        static_batch_sizes(self.max_batch)  # validates


def configure_compile_cache(cache_dir: str | os.PathLike[str]) -> Path:
    """Point inductor's (and with it Triton's) on-disk cache at `cache_dir`, before anything compiles.

    Inductor reads TORCHINDUCTOR_CACHE_DIR on each use and keeps the FX-graph and autotuning caches
    there; Triton's kernel cache goes below it unless TRITON_CACHE_DIR is set.
    """
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    return path


@dataclass
class _Runner:
    """One static shape: a persistent input buffer, the forward function, and on CUDA maybe its graph."""

    shape: Shape
    fn: Callable[[Tensor], Tensor]
    input: Tensor  # (B, 3, H, W) float32, in the model's memory format
    graph: torch.cuda.CUDAGraph | None = None
    output: Tensor | None = None  # the graph's output buffer
    before_call: Callable[[], None] = field(default=lambda: None)

    def __call__(self, x: Tensor) -> Tensor:
        """(n <= B, 3, H, W) float on the device -> (n, 3, H, W) float32; valid until the next call."""
        n = x.shape[0]
        # Always the persistent buffer, never x itself: a graph reads that address, and compiled code
        # guards on the strides it was traced with (the buffer is in the model's memory format; the
        # worker's batches come contiguous and would recompile). Rows n.. keep what they held: each
        # image is computed on its own.
        if x is not self.input:
            self.input[:n].copy_(x)
        if self.graph is not None:
            self.graph.replay()
            assert self.output is not None
            return self.output[:n]
        self.before_call()
        return self.fn(self.input)[:n]


class Engine(Restorer):
    """A Restorer with static shapes, optional torch.compile and CUDA graphs, uint8 transfers and a memory report."""

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "auto",
        precision: str = "auto",
        *,
        tiles: TileSettings | None = None,
        channels_last: bool | None = None,
        settings: EngineSettings | None = None,
    ) -> None:
        super().__init__(model, device=device, precision=precision, tiles=tiles or TileSettings(), channels_last=channels_last)
        settings = settings or EngineSettings()
        cuda = self.device.type == "cuda"
        mode = settings.compile if settings.compile != "auto" else ("default" if cuda else "off")
        if mode == "reduce-overhead" and not cuda:
            raise ValueError("compile mode reduce-overhead captures CUDA graphs; on the CPU use default or off")
        graphs = settings.cuda_graphs if settings.cuda_graphs is not None else (cuda and mode != "reduce-overhead")
        if graphs and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        if graphs and mode == "reduce-overhead":
            raise ValueError(
                "compile mode reduce-overhead already replays CUDA graphs; turn cuda_graphs off or compile with default"
            )
        self.settings = settings
        self.compile_mode = mode
        self.cuda_graphs = graphs
        self.batch_sizes = static_batch_sizes(settings.max_batch)
        self.static = mode != "off" or graphs  # else: plain eager, any batch size as it comes
        self.prepares_shapes = self.static
        if cuda and self.static and settings.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if settings.cache_dir and mode != "off":
            configure_compile_cache(settings.cache_dir)
        self._fn: Callable[[Tensor], Tensor] = self._forward
        if mode != "off":
            self._fn = torch.compile(
                self._forward, mode=None if mode == "default" else mode, dynamic=False, backend=settings.backend
            )
        self._runners: dict[Shape, _Runner] = {}
        self._memory: dict[Shape, MemoryUse] = {}
        # One pass at a time (runners share static buffers); on CUDA, one at a time for every engine
        # on the GPU, and so one graph memory pool for all of them (see `_DeviceShare`).
        share = _device_share(self.device) if cuda else _DeviceShare()
        self._lock = share.lock
        self._graph_pool = share.graph_pool() if graphs else None
        self.transfer = Uint8Transfer(self.device, self._core, self._lock)

    # ---- the pass --------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # cache_enabled=False: the autocast weight cache must not live across a graph capture
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], cache_enabled=False)

    def _forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float32 in [0, 1] on the device -> (B, 3, H, W) float32 in [0, 1]."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            y = self.model(x)[0]
        return y.float().clamp(0, 1)

    def _on_device(self) -> contextlib.AbstractContextManager:
        """The engine's GPU as the current device: a graph replays on the current device's stream."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def static_batch(self, n: int) -> int:
        """The static batch size a batch of n runs as (n itself when the engine is not static)."""
        if not self.static:
            return n
        return next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])

    @torch.inference_mode()
    def _core(self, x: Tensor) -> Tensor:
        """(n, 3, H, W) float32 on the device -> (n, 3, H, W) float32 in [0, 1]: valid until the next call."""
        with self._lock, self._on_device():
            if not self.static:
                return self._fn(x)
            top = self.batch_sizes[-1]
            if x.shape[0] <= top:
                return self._runner((self.static_batch(x.shape[0]), x.shape[2], x.shape[3]))(x)
            # larger than the largest static batch: chunks, each copied out before the next overwrites
            return torch.cat([self._core(chunk).clone() for chunk in x.split(top)])

    @torch.inference_mode()
    def run_batch(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float in [0, 1], H and W multiples of 8 -> (B, 3, H, W) float32 in [0, 1] on x's device."""
        source_device = x.device
        y = self._core(x.to(self.device, dtype=torch.float32, non_blocking=True))
        return y.contiguous().to(source_device, copy=True)

    def stage_items(self, items: Sequence[Tensor]) -> StagedItems:
        """On CUDA the items upload and convert on the transfer's upload stream, apart from the compute stream."""
        return stage_items(items, self.device, self.transfer.upload)

    def run_uint8(self, pixels, layout: str | None = None):
        """uint8 pixels (B, H, W, 3) or (B, 3, H, W), any H and W -> restored uint8, same layout, shape and kind.

        See `transfer.Uint8Transfer.submit`; numpy in gives numpy out, a tensor gives a tensor.
        """
        return self.transfer.submit(pixels, layout).result()

    def submit_uint8(self, pixels, layout: str | None = None):
        """Start a uint8 batch and return at once; `.result()` waits. Submit the next batch before
        waiting on this one and its upload overlaps this one's compute."""
        return self.transfer.submit(pixels, layout)

    # ---- static shapes ---------------------------------------------------------------------------

    def _runner(self, shape: Shape) -> _Runner:
        runner = self._runners.get(shape)
        if runner is None:
            runner = self._prepare(shape)
        return runner

    @contextlib.contextmanager
    def _measured(self, shape: Shape) -> Iterator[None]:
        """Record the memory and time the block takes as `shape`'s warm-up (memory on CUDA only)."""
        cuda = self.device.type == "cuda"
        start = time.monotonic()
        if cuda:
            torch.cuda.synchronize(self.device)
            allocated, reserved = torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - allocated
            self._memory[shape] = MemoryUse(peak, torch.cuda.memory_reserved(self.device) - reserved, time.monotonic() - start)
        else:
            self._memory[shape] = MemoryUse(None, None, time.monotonic() - start)

    def _prepare(self, shape: Shape) -> _Runner:
        with self._measured(shape), self._on_device():
            runner = self._build(shape)
        self._runners[shape] = runner
        log.info("static shape batch=%d %dx%d ready in %.1f s", *shape, self._memory[shape].warmup_s)
        return runner

    def _build(self, shape: Shape) -> _Runner:
        b, h, w = shape
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # a fixed, non-constant input: compile and capture on real-looking data, not zeros
        gen = torch.Generator(device="cpu").manual_seed(b * 7919 + h * 31 + w)
        static_in = torch.rand((b, 3, h, w), generator=gen).to(self.device).contiguous(memory_format=memory_format)
        before_call = torch.compiler.cudagraph_mark_step_begin if self.compile_mode == "reduce-overhead" else (lambda: None)
        if self.compile_mode != "off" and self.settings.dynamic_hw:
            torch._dynamo.maybe_mark_dynamic(static_in, [2, 3])
        if self.compile_mode != "off":
            _reserve_recompile()
        runner = _Runner(shape, self._fn, static_in, before_call=before_call)
        if self.cuda_graphs:
            self._capture(runner)
        else:
            for _ in range(2 if self.device.type == "cuda" else 1):  # compiles; a 2nd run lets reduce-overhead record
                runner(static_in)
        return runner

    def _capture(self, runner: _Runner) -> None:
        """Warm up on a side stream (compiles, picks cuDNN algorithms), then capture one pass on it.

        Everything on the engine's device: without `stream=`, torch.cuda.graph captures on a stream of
        the *current* device (cuda:0 in a thread that never set one), not on cuda:N's.
        """
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    runner.fn(runner.input)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # One memory pool for all shapes of all engines on the GPU: passes never overlap (`_lock`),
            # so a pass's intermediates may reuse another's; every graph's output buffer stays referenced.
            # thread_local: the service's readiness probe touches the device from another thread meanwhile
            with torch.cuda.graph(graph, pool=self._graph_pool, stream=side, capture_error_mode="thread_local"):
                runner.output = runner.fn(runner.input)
        runner.graph = graph

    @torch.inference_mode()
    def prepare(self, batch: int, height: int, width: int) -> MemoryUse:
        """Prepare the one static shape a batch of `batch` runs as (compile, capture); its memory use."""
        with self._lock:
            if not self.static:
                self._warm_eager((batch, height, width))
                return self._memory[(batch, height, width)]
            shape = (self.static_batch(min(batch, self.batch_sizes[-1])), height, width)
            self._runner(shape)
            return self._memory[shape]

    @torch.inference_mode()
    def warmup(self, shapes: Iterable[tuple[int, int] | tuple[int, int, int]]) -> dict[Shape, MemoryUse]:
        """Prepare every static shape the given item shapes can produce, before serving.

        (H, W) means every static batch size; (B, H, W) the static sizes up to the one that holds B.
        Eager engines run each (H, W) once at batch 1 (a cheap check that the model runs there).
        Returns the memory report of the shapes prepared.
        """
        done: dict[Shape, MemoryUse] = {}
        for s in shapes:
            if len(s) == 2:
                h, w = s
                top = self.batch_sizes[-1]
            else:
                top, h, w = s
                top = self.static_batch(min(top, self.batch_sizes[-1]))
            if h % 8 or w % 8:
                raise ValueError(f"warm-up shape {h}x{w}: height and width must be multiples of 8")
            with self._lock:
                if not self.static:
                    self._warm_eager((1, h, w))
                    done[(1, h, w)] = self._memory[(1, h, w)]
                    continue
                for b in (b for b in self.batch_sizes if b <= top):
                    self._runner((b, h, w))
                    done[(b, h, w)] = self._memory[(b, h, w)]
        return done

    def _warm_eager(self, shape: Shape) -> None:
        if shape not in self._memory:
            with self._measured(shape):
                self._fn(torch.rand(shape[0], 3, shape[1], shape[2], device=self.device))

    def warm_shapes(self) -> list[Shape]:
        """The static shapes prepared so far, in the order they were prepared."""
        return list(self.memory_report())

    def memory_report(self) -> dict[Shape, MemoryUse]:
        """(batch, height, width) -> memory measured at its warm-up (None on the CPU).

        A copy: the device thread adds shapes during warm-up while GET /tasks reads them from another
        thread. `dict(d)` of a plain dict copies in one step under the GIL (no Python code runs in it).
        """
        return dict(self._memory)

    def describe(self) -> dict:
        """What the engine does, for GET /tasks: modes and the memory of each warm shape."""
        return {
            **super().describe(),
            "compile": self.compile_mode,
            "cuda_graphs": self.cuda_graphs,
            "channels_last": self.channels_last,
            "static_batch_sizes": list(self.batch_sizes) if self.static else None,
            "shapes": [
                {
                    "batch": b,
                    "height": h,
                    "width": w,
                    "peak_bytes": m.peak_bytes,
                    "retained_bytes": m.retained_bytes,
                    "warmup_s": round(m.warmup_s, 3),
                }
                for (b, h, w), m in self.memory_report().items()
            ],
        }


class _DeviceShare:
    """What the engines on one GPU share: the lock that lets one pass run at a time, and the CUDA graph
    memory pool. Passes never overlap, so every engine's graphs can draw their intermediates from one
    pool: the GPU holds the largest pass's working memory once, not once per task."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._pool = None

    def graph_pool(self):
        with self.lock:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            return self._pool


_shares: dict[torch.device, _DeviceShare] = {}
_shares_lock = threading.Lock()


def _device_share(device: torch.device) -> _DeviceShare:
    with _shares_lock:
        return _shares.setdefault(device, _DeviceShare())


# Static shapes compiled so far in this process, all engines together. Each is a recompile of the same
# code (`Engine._forward`, and the model's frames after a graph break): dynamo keeps at most
# `recompile_limit` versions of a frame and runs anything past it eagerly, with only a warning.
_compiled_shapes = 0
_compiled_lock = threading.Lock()
_SPARE_RECOMPILES = 8  # dynamo's default limit, kept free above the shapes for other guard failures


def _reserve_recompile() -> None:
    """Count one more static shape to compile and size dynamo's limits for all of them (shapes x tasks)."""
    global _compiled_shapes
    with _compiled_lock:
        _compiled_shapes += 1
        _raise_recompile_limit(_compiled_shapes + _SPARE_RECOMPILES)


def _raise_recompile_limit(limit: int) -> None:
    """At least `limit` versions of one frame (per object it guards on by id, and in all)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < limit:
        setattr(cfg, name, limit)
    acc = "accumulated_recompile_limit" if hasattr(cfg, "accumulated_recompile_limit") else "accumulated_cache_size_limit"
    if hasattr(cfg, acc) and getattr(cfg, acc) < limit:
        setattr(cfg, acc, limit)
