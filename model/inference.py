"""Inference: device and precision, padding, tiling, and `restore` for whole images.

The release's convention: RGB float in [0, 1]; pad H and W up to a multiple of 8 (reflect); run;
take element 0 of the output; clamp to [0, 1]; crop the padding away.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .images import from_tensor, to_tensor
from .tiling import TileAssembler, extract_tiles, pad_to_multiple, plan_tiles

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda[:N]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda[:N]")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on CUDA and fp32 on the CPU; fp16 needs CUDA."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use fp32 (or bf16) on the CPU")
    return precision


@dataclass(frozen=True)
class TileSettings:
    size: int = 512  # tile edge in pixels (multiple of 8); images up to this size run whole
    overlap: int = 32  # pixels shared by neighbouring tiles (multiple of 8)
    batch: int = 4  # tiles per forward pass: with `size`, this bounds peak memory


class Restorer:
    """A warm model on a device, with a precision, that restores batches and whole images.

    `run_batch` is the small interface the service builds on: a batch of same-shaped images in,
    the same shape out, no padding or tiling decisions.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "auto",
        precision: str = "auto",
        tiles: TileSettings = TileSettings(),
        channels_last: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.tiles = tiles
        plan_tiles(tiles.size, tiles.size, tiles.size, tiles.overlap)  # validates the settings early
        if tiles.batch < 1:
            raise ValueError(f"tile batch must be at least 1, got {tiles.batch}")
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


def load_restorer(weights: str | Path, device: str = "auto", precision: str = "auto", tiles: TileSettings = TileSettings()) -> Restorer:
    from .checkpoint import load_mprnet

    return Restorer(load_mprnet(weights), device=device, precision=precision, tiles=tiles)
