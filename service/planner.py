"""Cutting any image into batchable items of a few static shapes, and putting the outputs back.

An image that fits a configured bucket becomes one item padded (reflect) to that bucket. A larger
image becomes overlapping tiles of `tile_size`; along an axis shorter than a tile the tile is the
smallest bucket edge (or the tile size) that holds it, so a 4000x8 strip costs 8x256-ish tiles, not
512x512 ones. Every item shape is therefore one of `static_shapes()`, a short list the engine can
warm up (or capture) before the service reports ready. Items of the same shape batch together,
whichever request they come from; `Plan.assemble` blends a request's outputs back with the model
package's `TileAssembler`.

Images keep their dtype through padding and tiling: 8-bit images are uint8 pixel values (the worker
scales them to float on the device and rounds the outputs back to uint8 there), 16-bit ones float32
in [0, 1]. Tiled uint8 outputs are blended in float, so they were rounded to 8 bits before blending:
a weighted mean of values each within half a level of the network's output is within half a level of
blending the float outputs, and once rounded at most one level (1 LSB) from that answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from model.images import to_float
from model.tiling import TileAssembler, TilePlan, ceil_to, extract_tiles, pad_to, plan_tiles

MIN_TILE = 32  # out-of-memory fallback stops halving tiles here


@dataclass(frozen=True)
class Plan:
    """How one (3, height, width) image runs: `inputs` (N, 3, *shape), all of one static shape and the image's dtype."""

    height: int
    width: int
    shape: tuple[int, int]  # (h, w) of every item
    inputs: Tensor  # (N, 3, h, w): uint8 pixel values, or float32 in [0, 1]
    tiles: TilePlan | None  # None: one item, the image padded to a bucket

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def computed_pixels(self) -> int:
        return len(self) * self.shape[0] * self.shape[1]

    @property
    def padding_waste(self) -> float:
        """Fraction of computed pixels that were padding or repeated tile overlap."""
        return 1.0 - self.height * self.width / self.computed_pixels

    def assemble(self, outputs: Sequence[Tensor]) -> Tensor:
        """N outputs (3, h, w) in item order -> the (3, height, width) image (CPU work: run it off the event loop).

        One item is cropped and keeps its dtype (uint8 stays uint8). Tiles are blended in float: uint8
        tiles are scaled to [0, 1] first and the result is float32 (see the module docstring for the
        at most 1 LSB this costs).
        """
        item = tuple(self.inputs.shape[1:])
        if len(outputs) != len(self) or any(tuple(o.shape) != item for o in outputs):
            raise ValueError(f"expected {len(self)} outputs of shape {item}, got {[tuple(o.shape) for o in outputs]}")
        if self.tiles is None:
            return outputs[0][:, : self.height, : self.width]
        out = TileAssembler(self.tiles, channels=item[0], device=outputs[0].device)
        for i in range(len(self)):
            out.add(i, to_float(outputs[i]))
        return out.result()[:, : self.height, : self.width]


class Planner:
    """Buckets are (width, height) as configured; everything inside is (h, w) like tensors."""

    def __init__(self, buckets: tuple[tuple[int, int], ...], tile_size: int, overlap: int) -> None:
        self.buckets = sorted(((h, w) for w, h in buckets), key=lambda s: (s[0] * s[1], s))
        self.tile_size = tile_size
        self.overlap = overlap
        plan_tiles(tile_size, tile_size, tile_size, overlap)  # validates tile size and overlap
        # Edges a tile may take along an axis shorter than a tile: bucket edges up to the tile size.
        self.edges = sorted({e for s in self.buckets for e in s if e <= tile_size} | {tile_size})

    def static_shapes(self) -> list[tuple[int, int]]:
        """Every (h, w) item shape `plan` can produce (the out-of-memory fallback aside)."""
        shapes = set(self.buckets)
        shapes |= {(a, b) for a in self.edges for b in self.edges if self.tile_size in (a, b)}
        return sorted(shapes, key=lambda s: (s[0] * s[1], s))

    def _edge(self, n: int) -> int:
        return self.tile_size if n > self.tile_size else next(e for e in self.edges if e >= n)

    def plan(self, image: Tensor) -> Plan:
        """(3, H, W) uint8 or float image -> its items, of its dtype: one bucket-padded image, or tiles."""
        _, h, w = image.shape
        for bh, bw in self.buckets:
            if h <= bh and w <= bw:
                return Plan(h, w, (bh, bw), pad_to(image, bh, bw).unsqueeze(0), None)
        return _tiled(image, self.tile_size, self.overlap, self._edge(h), self._edge(w))

    def smaller(self, image: Tensor, plan: Plan) -> Plan | None:
        """A plan with tiles half the size of `plan`'s items (out-of-memory fallback); None below MIN_TILE."""
        tile = max(plan.shape) // 2 // 8 * 8
        if tile < MIN_TILE:
            return None
        overlap = min(self.overlap, tile // 4 // 8 * 8)
        _, h, w = image.shape
        return _tiled(image, tile, overlap, tile if h > tile else ceil_to(h), tile if w > tile else ceil_to(w))


def _tiled(image: Tensor, tile: int, overlap: int, edge_h: int, edge_w: int) -> Plan:
    _, h, w = image.shape
    # Pad short axes up to their tile edge first, so every tile of this image is (edge_h, edge_w).
    padded = pad_to(image, max(h, edge_h), max(w, edge_w))
    tiles = plan_tiles(padded.shape[1], padded.shape[2], tile, overlap)
    return Plan(h, w, (tiles.tile_h, tiles.tile_w), extract_tiles(padded, tiles), tiles)
