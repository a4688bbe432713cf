"""The one interface every inference engine implements, whatever runs the network (torch, OpenVINO, ...).

An engine holds one warm model on one device. The service, the CLI, `mprnet evaluate` and the
benchmarks talk to it only through `InferenceEngine`:

* `run_batch(x)`: the network on a batch of same-shaped float images, H and W multiples of 8;
* `run_items(items)`: same-shaped (3, H, W) items from the host, each uint8 (8-bit pixels) or float32
  in [0, 1]; the one place where pixels cross to the engine's device and back (model/transfer.py);
  `stage_items` and `run_staged` are its two halves, so that a batch can upload while another computes;
* `warmup(shapes)`: prepare the shapes it will be given before serving (compile, capture, allocate);
* `describe()` and `memory_report()`: what it is and what each prepared shape cost;
* `restore_tensor(x)` / `restore(image)`: whole images of any size, tiled by `tiles`.

An implementation supplies `run_batch` (and may do more in the others); everything else is shared.
"""

from __future__ import annotations

import importlib.util
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .images import from_tensor, to_tensor
from .tiling import TileAssembler, extract_tiles, pad_to_multiple, plan_tiles
from .transfer import StagedItems, items_from_device, stage_items

Shape = tuple[int, int, int]  # (batch, height, width) of the network's input


@dataclass(frozen=True)
class TileSettings:
    size: int = 512  # tile edge in pixels (multiple of 8); images up to this size run whole
    overlap: int = 32  # pixels shared by neighbouring tiles (multiple of 8)
    batch: int = 4  # tiles per forward pass: with `size`, this bounds peak memory

    def __post_init__(self) -> None:
        plan_tiles(self.size, self.size, self.size, self.overlap)  # validates size and overlap
        if self.batch < 1:
            raise ValueError(f"tile batch must be at least 1, got {self.batch}")


@dataclass
class MemoryUse:
    """Device memory of one prepared shape, measured when it was first run (bytes; None where not measured)."""

    peak_bytes: int | None  # most memory the pass needed above what was allocated before it
    # growth of the memory the allocator holds (graph pool, static buffers, cache) over the warm-up: a
    # graph's private pool stays taken; shapes share one pool, so later shapes add only their excess
    retained_bytes: int | None
    warmup_s: float = 0.0  # compile + capture + first runs


class BatchMismatch(RuntimeError):
    """The network returned a different number or shape of outputs than it was given."""


class InferenceEngine(ABC):
    """One warm model on one device. Subclasses implement `run_batch`; see the module docstring."""

    name: ClassVar[str] = "custom"  # torch, openvino, ... (shown by GET /tasks)
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    tiles: TileSettings = TileSettings()
    # True when `warmup` compiles each shape: a shape first seen by a request would pay that time
    prepares_shapes: bool = False

    @abstractmethod
    def run_batch(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float32 in [0, 1], H and W multiples of 8 -> (B, 3, H, W) float32 in [0, 1] on x's device."""

    def run_items(self, items: Sequence[Tensor]) -> list[Tensor]:
        """Same-shaped (3, H, W) host items, each uint8 or float32 in [0, 1], H and W multiples of 8 -> each
        restored, on the host: uint8 for a uint8 item (rounded on the device), float32 for a float one."""
        return self.run_staged(self.stage_items(items))

    def stage_items(self, items: Sequence[Tensor]) -> StagedItems:
        """The first half of `run_items`: the items on the engine's device as one float batch. The service
        calls it on a thread of its own while the device runs the batch before; an engine whose device copies
        asynchronously uploads on a stream of its own there, so the copy overlaps that compute."""
        return stage_items(items, self.device)

    def run_staged(self, staged: StagedItems) -> list[Tensor]:
        """The second half of `run_items`: the network on a staged batch, the results back on the host."""
        x = staged.take()
        shape = tuple(x.shape)
        y = self.run_batch(x)
        del x  # the input is not needed while the outputs are converted
        if not isinstance(y, Tensor) or tuple(y.shape) != shape:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise BatchMismatch(f"the {self.name} engine returned {got} for an input of {shape}")
        return items_from_device(y, staged.quantise)

    def warmup(self, shapes: Iterable[tuple[int, int] | Shape]) -> dict[Shape, MemoryUse]:
        """Prepare the given item shapes, (H, W) or (largest batch, H, W), before serving; their memory report.

        This default runs each (H, W) once at batch 1: a cheap check that the network runs there.
        """
        done: dict[Shape, MemoryUse] = {}
        for s in shapes:
            h, w = s[-2], s[-1]
            if h % 8 or w % 8:
                raise ValueError(f"warm-up shape {h}x{w}: height and width must be multiples of 8")
            start = time.monotonic()
            x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * 31 + w)).to(self.device)
            self.run_batch(x)
            done[(1, h, w)] = MemoryUse(None, None, time.monotonic() - start)
        self._warm_record().update(done)
        return done

    def memory_report(self) -> dict[Shape, MemoryUse]:
        """(batch, height, width) -> what preparing it measured, for every shape prepared so far."""
        return dict(self._warm_record())

    def describe(self) -> dict[str, Any]:
        """What the engine is, for GET /tasks; implementations add their modes."""
        return {"name": self.name}

    def free_cache(self) -> None:
        """Give cached device memory back (after running out of it)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _warm_record(self) -> dict[Shape, MemoryUse]:
        return self.__dict__.setdefault("_warmed", {})

    # ---- whole images ----------------------------------------------------------------------------

    @torch.inference_mode()
    def restore_tensor(self, x: Tensor) -> Tensor:
        """(3, H, W) float in [0, 1], any size from 1x1 -> (3, H, W) restored; tiles when larger than a tile."""
        _, h, w = x.shape
        t = self.tiles
        if h <= t.size and w <= t.size:
            return self.run_batch(pad_to_multiple(x).unsqueeze(0))[0, :, :h, :w]
        plan = plan_tiles(h, w, t.size, t.overlap)
        out = TileAssembler(plan, channels=x.shape[0], device=x.device)
        for start in range(0, len(plan), t.batch):
            tiles = extract_tiles(x, plan, start, start + t.batch)  # (<= batch, 3, tile_h, tile_w)
            for i, tile in enumerate(self.run_batch(tiles), start=start):
                out.add(i, tile)
        return out.result()

    def restore(self, image: np.ndarray | Image.Image) -> np.ndarray | Image.Image:
        """Restore a uint8/uint16 gray, RGB or RGBA image (array or PIL); same size, mode and depth out."""
        x, meta = to_tensor(image)
        y = self.restore_tensor(x)
        del x  # one image-sized buffer fewer while converting back (large images)
        return from_tensor(y, meta)


# ---- choosing an engine ---------------------------------------------------------------------------

ENGINES = ("auto", "torch", "openvino")
_CPU_ONLY = {"openvino": "openvino"}  # engine -> the package it needs


def resolve_engine(engine: str, device: torch.device) -> str:
    """'auto' is OpenVINO on the CPU when it is installed, else torch; a CPU engine refuses CUDA."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use {', '.join(ENGINES)}")
    installed = {name: importlib.util.find_spec(package) is not None for name, package in _CPU_ONLY.items()}
    if engine == "auto":
        return "openvino" if device.type == "cpu" and installed["openvino"] else "torch"
    if engine in _CPU_ONLY:
        if device.type != "cpu":
            raise ValueError(f"the {engine} engine runs on the CPU, not {device}: use device cpu, or the torch engine")
        if not installed[engine]:
            raise ValueError(f"the {engine} engine needs the {_CPU_ONLY[engine]} package: "
                             "pip install 'mprnet-serve[openvino]' (scripts/setup.sh installs it)")
    return engine


def build_engine(
    model: torch.nn.Module,
    engine: str = "auto",
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    tiles: TileSettings | None = None,
    threads: int = 0,
    cache_dir: str | None = None,
    max_batch: int = 16,
    torch_settings: Any = None,
) -> InferenceEngine:
    """The engine named (see `resolve_engine`) for `model`. `cache_dir` applies to every runtime; `threads`
    (0: the runtime's choice) to OpenVINO, whose threads are its own (torch's are set per calling thread,
    by the caller); `torch_settings` (an engine.EngineSettings) to torch alone."""
    from .engine import Engine, EngineSettings
    from .inference import resolve_device

    dev = resolve_device(device)
    name = resolve_engine(engine, dev)
    tiles = tiles or TileSettings()
    if name == "openvino":
        from .engine_openvino import OpenVINOEngine

        return OpenVINOEngine(model, precision, tiles=tiles, threads=threads, cache_dir=cache_dir, max_batch=max_batch)
    settings = torch_settings or EngineSettings(cache_dir=cache_dir, max_batch=max_batch)
    return Engine(model, device=dev, precision=precision, tiles=tiles, settings=settings)
