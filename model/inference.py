"""Device and precision, and the plain torch engine (`Restorer`); whole images and tiling are in engine_api.

The release's convention: RGB float in [0, 1]; pad H and W up to a multiple of 8 (reflect); run;
take element 0 of the output; clamp to [0, 1]; crop the padding away.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

from .engine_api import InferenceEngine, TileSettings

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'; a CUDA device always with its index.

    The index is fixed here ('cuda' is the current device, cuda:0 in a fresh process): other threads
    make it their current device (`torch.cuda.set_device` refuses a device without an index), and
    "cuda" would mean whatever each thread's current device happens to be.
    """
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda[:N]") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda[:N]")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is fp32 on the CPU, bf16 on GPUs that compute it natively (compute capability 8.0 on:
    Ampere, Ada, Hopper, ...) and fp16 on older ones (V100, T4: bf16 there is emulated, or refused); fp16
    needs CUDA."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use fp32 (or bf16) on the CPU")
    return precision


class Restorer(InferenceEngine):
    """The torch engine in its plainest form: a model on a device, with a precision, run eagerly.

    (`engine.Engine` adds static shapes, torch.compile and CUDA graphs.)
    """

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "auto",
        precision: str = "auto",
        tiles: TileSettings | None = None,
        channels_last: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.tiles = tiles or TileSettings()
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=memory_format)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    @torch.inference_mode()
    def run_batch(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float in [0, 1], H and W multiples of 8 -> (B, 3, H, W) float32 in [0, 1] on x's device."""
        source_device = x.device
        x = x.to(self.device, dtype=torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            y = self.model(x)[0]
        return y.float().clamp_(0, 1).contiguous().to(source_device)


def load_restorer(
    weights: str | Path,
    device: str = "auto",
    precision: str = "auto",
    tiles: TileSettings | None = None,
    *,
    engine: str = "torch",
    threads: int = 0,
    cache_dir: str | None = None,
) -> InferenceEngine:
    """A weights file as a warm engine (`engine_api.build_engine`): torch unless another is named; torch
    runs eagerly (no compile or graph capture: a one-off run would spend longer preparing than running)."""
    from .checkpoint import load_mprnet
    from .engine import EngineSettings
    from .engine_api import build_engine

    tiles = tiles or TileSettings()
    if threads:
        torch.set_num_threads(threads)  # this thread's torch ops (OpenVINO takes `threads` itself)
    return build_engine(load_mprnet(weights), engine, device=device, precision=precision, tiles=tiles, threads=threads,
                        cache_dir=cache_dir, max_batch=tiles.batch,
                        torch_settings=EngineSettings(compile="off", cuda_graphs=False, max_batch=tiles.batch))
