"""A fast PNG writer for the service's answers: numpy filters, then one deflate call.

Pillow's PNG writer filters row by row in C and deflates with the system zlib; for a 256x256 photo on
this project's 2-core CPU that takes about 9 ms (level 1, run-length strategy), most of the HTTP
overhead budget (docs/performance.md). Here the filtering is vectorised over the whole image with
numpy and the result is deflated once, by ISA-L (`isal`, several times faster than zlib at its low
levels) when it is installed, else by zlib at level 1 with the run-length strategy.

Two efforts (`MPRNET_PNG_EFFORT`), measured on 256x256 photos, their blurred and their downscaled
copies (9 images, 2-core x86 CPU, filter + deflate):
- `fast` (default): the "up" filter on every row, ISA-L level 1: 0.8-1.1 ms, files 4-10 % larger than
  Pillow's level 1.
- `small`: per row, the one of the five PNG filters with the smallest sum of absolute signed bytes
  (libpng's and Pillow's heuristic; the encoder's filters read only unfiltered bytes, so all rows are
  computed at once), ISA-L level 2: 2.2-2.5 ms, 1-4 % smaller than `fast`.

Writes grey, grey+alpha, RGB and RGBA at 8 or 16 bits per sample, non-interlaced, with an ICC profile
(iCCP) and EXIF (eXIf) when given; any PNG decoder reads the result (tests/service/test_png.py).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

try:  # ISA-L's deflate: same format, much faster at the low levels
    from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps the writer working without it
    _fast_zlib = None

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


EFFORTS = ("fast", "small")


def deflate(data: bytes | memoryview, level: int = 1) -> bytes:
    """zlib-format stream of `data` (ISA-L levels 0-3; zlib at `level` with the run-length strategy)."""
    if _fast_zlib is not None:
        return _fast_zlib.compress(data, level)
    c = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return c.compress(data) + c.flush()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))


def up_filter(raw: np.ndarray) -> np.ndarray:
    """(H, R) uint8 scanlines -> (H, R + 1): every row "up"-filtered (the first row has none above)."""
    h, r = raw.shape
    out = np.empty((h, r + 1), dtype=np.uint8)
    out[:, 0] = 2
    out[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=out[1:, 1:])  # wraps mod 256, as PNG's arithmetic does
    return out


def filter_rows(raw: np.ndarray, bpp: int) -> np.ndarray:
    """(H, R) uint8 scanlines -> (H, R + 1) filtered scanlines, each led by its filter type byte.

    Each row gets the filter with the smallest sum of absolute signed bytes. `bpp` is bytes per
    complete pixel (the filters' "left" distance). All arithmetic wraps mod 256 as PNG's does.
    """
    h, r = raw.shape
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    upleft = np.zeros_like(raw)
    upleft[1:, bpp:] = raw[:-1, :-bpp]
    a, b, c = left.astype(np.int16), up.astype(np.int16), upleft.astype(np.int16)
    # Paeth predictor: whichever of left, up, up-left is closest to left + up - up-left (ties in that order)
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    pick_a = (pa <= pb) & (pa <= pc)
    pick_b = (pb <= pc) & ~pick_a
    paeth = (c + pick_a * (a - c) + pick_b * (b - c)).astype(np.uint8)  # arithmetic select: np.where is 3x slower
    avg = ((a + b) >> 1).astype(np.uint8)
    candidates = np.empty((5, h, r), dtype=np.uint8)
    candidates[0] = raw
    np.subtract(raw, left, out=candidates[1])
    np.subtract(raw, up, out=candidates[2])
    np.subtract(raw, avg, out=candidates[3])
    np.subtract(raw, paeth, out=candidates[4])
    # cost per row: sum of |byte as signed|; abs of int8 -128 stays -128, i.e. 128 read back unsigned
    magnitude = np.abs(candidates.view(np.int8)).view(np.uint8)  # (5, H, R)
    cost = magnitude.sum(axis=2, dtype=np.uint32)  # (5, H)
    best = cost.argmin(axis=0)  # (H,)
    out = np.empty((h, r + 1), dtype=np.uint8)
    out[:, 0] = best
    out[:, 1:] = candidates[best, np.arange(h)]
    return out


def encode_png(pixels: np.ndarray, icc: bytes | None = None, exif: bytes | None = None, effort: str = "fast") -> bytes:
    """(H, W) or (H, W, C) uint8/uint16 array, C in 1-4 -> PNG bytes (non-interlaced); effort: EFFORTS."""
    if effort not in EFFORTS:
        raise ValueError(f"encode_png effort must be one of {EFFORTS}, not {effort!r}")
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in _COLOR_TYPES or arr.dtype not in (np.uint8, np.uint16) or 0 in arr.shape:
        raise ValueError(f"encode_png takes (H, W[, 1-4]) uint8 or uint16 pixels, not {arr.shape} {arr.dtype}")
    h, w, c = arr.shape
    depth = 8 * arr.dtype.itemsize
    rows = np.ascontiguousarray(arr.astype(">u2", copy=False) if depth == 16 else arr).view(np.uint8).reshape(h, -1)
    out = [_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, _COLOR_TYPES[c], 0, 0, 0))]
    if icc:
        out.append(_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
    if exif:
        out.append(_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    if effort == "fast":
        idat = deflate(up_filter(rows).data, 1)
    else:
        idat = deflate(filter_rows(rows, c * arr.dtype.itemsize).data, 2)
    out.append(_chunk(b"IDAT", idat))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)
