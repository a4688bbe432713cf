"""Padding and overlapping tiles, shared by `restore` and the service's batcher.

A large image is cut into fixed-size tiles that overlap by `overlap` pixels. Each tile's output is
weighted by a window that tapers (raised cosine) across the overlap on every side that has a
neighbour and stays flat on sides at the image border; outputs and weights are summed and divided.
For an identity model the image is reassembled exactly, and for a real network the tapered blend
hides the seams. All tiles of one image have the same shape, so tiles (also from different
images) batch together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .arch import MULTIPLE_OF

_CPU_PADDED_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def ceil_to(n: int, multiple: int = MULTIPLE_OF) -> int:
    return -(-n // multiple) * multiple


def _pad_dim(x: Tensor, dim: int, after: int) -> Tensor:
    """Pad `after` pixels at the end of spatial `dim` (-1 width, -2 height): reflect, then replicate.

    Reflection cannot reach further than size-1 pixels (a 1-pixel side has nothing to reflect), so
    the rest of the padding repeats the edge pixel.
    """
    if after <= 0:
        return x
    size = x.shape[dim]
    reflect = min(after, size - 1)
    pads = [0, 0, 0, 0]  # (left, right, top, bottom)
    pads[1 if dim == -1 else 3] = reflect
    if reflect:
        x = F.pad(x, pads, mode="reflect")
    if after > reflect:
        pads[1 if dim == -1 else 3] = after - reflect
        x = F.pad(x, pads, mode="replicate")
    return x


def pad_to(x: Tensor, height: int, width: int) -> Tensor:
    """Pad a (B, C, H, W) or (C, H, W) tensor at the bottom/right up to (height, width)."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.shape[-2] > height or x.shape[-1] > width:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} down to {(height, width)}")
    # torch's CPU reflect/replicate pads take uint8 (the service's 8-bit images) and signed integers
    # as they are; uint16, bool and integers elsewhere go through float (exact below 2**24).
    native = x.is_floating_point() or (x.device.type == "cpu" and x.dtype in _CPU_PADDED_INTS)
    y = x if native else x.float()
    y = _pad_dim(_pad_dim(y, -2, height - x.shape[-2]), -1, width - x.shape[-1]).to(x.dtype)
    return y.squeeze(0) if squeeze else y


def pad_to_multiple(x: Tensor, multiple: int = MULTIPLE_OF) -> Tensor:
    return pad_to(x, ceil_to(x.shape[-2], multiple), ceil_to(x.shape[-1], multiple))


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride tile-overlap, the last tile flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    starts = [i * stride for i in range(n - 1)] + [length - tile]
    return sorted(set(starts))


@dataclass(frozen=True)
class TilePlan:
    """How one (height, width) image is cut. Tiles are (tile_h, tile_w); the image is first padded to
    (padded_h, padded_w) (only along axes shorter than a tile, up to a multiple of 8)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def padded_h(self) -> int:
        return max(self.height, self.tile_h)

    @property
    def padded_w(self) -> int:
        return max(self.width, self.tile_w)

    @property
    def boxes(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TilePlan:
    """Cut a height x width image into tiles of at most `tile` (a multiple of 8) overlapping by `overlap`."""
    if tile % MULTIPLE_OF or tile <= 0:
        raise ValueError(f"tile size must be a positive multiple of {MULTIPLE_OF}, got {tile}")
    if overlap % MULTIPLE_OF or not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be a multiple of {MULTIPLE_OF} in [0, tile), got {overlap}")
    th = tile if height > tile else ceil_to(height)
    tw = tile if width > tile else ceil_to(width)
    return TilePlan(height, width, th, tw, overlap, tuple(_starts(height, tile, overlap)), tuple(_starts(width, tile, overlap)))


@lru_cache(maxsize=64)
def _ramp(overlap: int) -> Tensor:
    t = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
    return 0.5 - 0.5 * torch.cos(math.pi * t)  # (overlap,) rising from ~0 to ~1, never exactly 0


def _axis_weight(n: int, overlap: int, taper_start: bool, taper_end: bool) -> Tensor:
    w = torch.ones(n)
    if overlap:
        if taper_start:
            w[:overlap] = _ramp(overlap)
        if taper_end:
            w[-overlap:] = torch.minimum(w[-overlap:], _ramp(overlap).flip(0))
    return w


def tile_window(plan: TilePlan, y: int, x: int) -> Tensor:
    """(tile_h, tile_w) blending weight of the tile at (y, x): tapered only towards neighbours."""
    wy = _axis_weight(plan.tile_h, plan.overlap, y > plan.ys[0], y < plan.ys[-1])
    wx = _axis_weight(plan.tile_w, plan.overlap, x > plan.xs[0], x < plan.xs[-1])
    return wy[:, None] * wx[None, :]


def extract_tiles(image: Tensor, plan: TilePlan, start: int = 0, stop: int | None = None) -> Tensor:
    """(C, H, W) -> (N, C, tile_h, tile_w): tiles `start:stop` (default all) in the order of `plan.boxes`.

    Taking one batch at a time keeps only that batch's tiles in memory besides the image (padding
    copies the image only when it is smaller than a tile along some axis).
    """
    padded = pad_to(image, plan.padded_h, plan.padded_w)
    return torch.stack([padded[:, y : y + plan.tile_h, x : x + plan.tile_w] for y, x in plan.boxes[start:stop]])


class TileAssembler:
    """Accumulates tile outputs (in any order, any batches) and blends them into one image."""

    def __init__(self, plan: TilePlan, channels: int, device: torch.device | str = "cpu") -> None:
        self.plan = plan
        self.acc = torch.zeros(channels, plan.padded_h, plan.padded_w, device=device)
        self.weight: Tensor | None = torch.zeros(1, plan.padded_h, plan.padded_w, device=device)
        self.remaining = len(plan)

    def add(self, index: int, tile: Tensor) -> None:
        """Add the output (C, tile_h, tile_w) of tile number `index` of `plan.boxes`."""
        if self.weight is None:
            raise RuntimeError("the image was already assembled; tiles can no longer be added")
        y, x = self.plan.boxes[index]
        w = tile_window(self.plan, y, x).to(self.acc.device)
        th, tw = self.plan.tile_h, self.plan.tile_w
        self.acc[:, y : y + th, x : x + tw] += tile.float() * w
        self.weight[:, y : y + th, x : x + tw] += w
        self.remaining -= 1

    def result(self) -> Tensor:
        """The blended (C, H, W) image; every tile must have been added. Later calls return the same tensor.

        The sum is divided in place and the weights freed: a large image needs no third
        image-sized buffer.
        """
        if self.remaining:
            raise RuntimeError(f"{self.remaining} tiles were never added")
        if self.weight is not None:
            self.acc.div_(self.weight)
            self.weight = None
        return self.acc[:, : self.plan.height, : self.plan.width]
