"""Small crafted image files that used to hold a decode thread or pass as a large job, built byte by byte."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encoded(arr: np.ndarray | Image.Image, fmt: str, **save) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def small(seed: int = 0, h: int = 20, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunks(n: int) -> bytes:
    """A valid PNG with `n` empty ancillary chunks after its header."""
    data = encoded(small(), "PNG")
    return data[:33] + png_chunk(b"abCd", b"") * n + data[33:]


def png_short_stream(w: int, h: int, interlace: int = 0) -> bytes:
    """An RGB PNG declaring w x h whose complete zlib stream holds three rows (of the first pass, if interlaced)."""
    row = -(-w // 8) if interlace else w
    raw = zlib.compress((b"\x00" + b"\x80" * (3 * row)) * 3)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", raw) + png_chunk(b"IEND", b"")


def jpeg_with_segments(n: int) -> bytes:
    """A valid JPEG with `n` empty APP5 segments after SOI."""
    data = encoded(small(), "JPEG")
    return data[:2] + b"\xff\xe5\x00\x02" * n + data[2:]


def jpeg_with_scans(repeats: int) -> bytes:
    """A progressive JPEG whose last scan is repeated `repeats` more times (libjpeg runs each over the image)."""
    data = encoded(small(), "JPEG", progressive=True)
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * repeats + b"\xff\xd9"


def jpeg_declaring(w: int, h: int) -> bytes:
    """A baseline JPEG whose frame header says w x h, cut 40 bytes into its scan and closed with EOI."""
    data = bytearray(encoded(small(), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data[: data.find(b"\xff\xda") + 40]) + b"\xff\xd9"


def gif_frames(n: int) -> bytes:
    """An animated GIF of `n` + 2 frames, 4x4 each."""
    frames = [Image.fromarray(np.full((4, 4), c, np.uint8)) for c in (0, 90, 180)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    last = data.rfind(b"\x21\xf9")  # the last frame: graphic control extension, descriptor, data
    return data[:-1] + data[last:-1] * n + b"\x3b"


def gif_with_extension_blocks(n: int) -> bytes:
    """A GIF whose first image follows a comment extension of `n` one-byte data blocks."""
    data = encoded(np.full((4, 4), 7, np.uint8), "GIF")
    flags = data[10]
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[:start] + b"\x21\xfe" + b"\x01x" * n + b"\x00" + data[start:]


def tiff_chain(n: int) -> bytes:
    """A little-endian TIFF of 1 + `n` directories, all describing the same 4x4 strip."""
    one = encoded(small()[:4, :4], "TIFF")
    ifd = struct.unpack_from("<I", one, 4)[0]
    tags = struct.unpack_from("<H", one, ifd)[0]
    size = 2 + 12 * tags + 4
    out = bytearray(one)
    struct.pack_into("<I", out, ifd + 2 + 12 * tags, len(one))
    for i in range(n):
        nxt = len(one) + (i + 1) * size if i + 1 < n else 0
        out += one[ifd : ifd + size - 4] + struct.pack("<I", nxt)
    return bytes(out)


def tiff_first_directory(tags: int = 0, strips: int = 0) -> bytes:
    """A 4x4 TIFF whose first directory has `tags` extra private entries, or claims `strips` strip offsets."""
    one = bytearray(encoded(small()[:4, :4], "TIFF"))
    ifd = struct.unpack_from("<I", one, 4)[0]
    count = struct.unpack_from("<H", one, ifd)[0]
    entries = [bytes(one[ifd + 2 + 12 * i : ifd + 14 + 12 * i]) for i in range(count)]
    if strips:
        entries = [e[:4] + struct.pack("<I", strips) + e[8:] if e[:2] == struct.pack("<H", 273) else e for e in entries]
    entries += [struct.pack("<HHII", 65000 + i % 500, 1, 1, 0) for i in range(tags)]
    entries.sort(key=lambda e: struct.unpack_from("<H", e)[0])
    directory = struct.pack("<H", len(entries)) + b"".join(entries) + b"\x00\x00\x00\x00"
    return bytes(one[:4]) + struct.pack("<I", len(one)) + bytes(one[8:]) + directory
