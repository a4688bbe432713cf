"""Checks on an image file's structure that bound the work of decoding it.

Before Pillow parses a file, `check` walks the structures Pillow or libjpeg would walk once per item,
reading only their headers (struct and a regular expression over bytes, never pixel data) and stopping
as soon as a count passes its cap (413): PNG chunks, JPEG marker segments and scans (libjpeg re-reads
every coefficient of the image once per scan), GIF extension blocks before the first frame, and the
entries and strip or tile counts of a TIFF's first directory. Frames after the first (chained TIFF
directories, later GIF frames) are never walked, here or by the decoder: only the first is decoded.
It also refuses a JPEG too short to hold the pixels its header declares (400): libjpeg fills the rows
of a JPEG whose scans end early with grey and reports that only as a warning Pillow drops.

`check` catches the rest of those for a JPEG with one sequential scan (baseline: what cameras and
phones write). It returns the bytes to decode: the scan without the marker that ends it, followed by
`JPEG_SCAN_TAIL`, bits that satisfy the Huffman decoder's look-ahead at the scan's true end but are no
code. A complete scan decodes exactly as before (its last block ends within its own bits); a scan cut
short, even one closed with an EOI marker, runs through the tail and out of data, and Pillow reports the
truncation. A cut within the last block or two can pass: the tail stands in for their last codes.

Around the decode, `mark_last_rows` and `unwritten` catch the other way truncated data passes: a PNG
(or GIF, BMP, TIFF) whose compressed stream ends before the pixels do is decoded without an error into
an image whose missing rows stay as allocated. The ends of the rows a decoder writes last (the last
row top-down, the first row bottom-up, the last odd row for interlaced images) are filled with a
pattern first; if the pattern is still there after decoding, the data ran out.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass

from PIL import Image, ImageFile

from .errors import BadInput, ServiceError, TooLarge

PNG_MAX_CHUNKS = 16_384  # libpng writes 8 KB IDAT chunks: a 50 MB PNG has about 6,400
JPEG_MAX_SEGMENTS = 4_096  # marker segments with a length (APPn, DQT, DHT, SOS ...): photos have 10-300
JPEG_MAX_SCANS = 100  # progressive encoders write about 10 (libjpeg, mozjpeg); each costs a pass over the image
GIF_MAX_BLOCKS = 10_000  # extension data blocks before the first frame (255 bytes each at most)
TIFF_MAX_TAGS = 1_000  # entries of the first directory; files in the wild have a few dozen
TIFF_MAX_STRIPS = 131_072  # strips or tiles: a 25 MP image in 16x16 tiles has about 98,000

# A JPEG marker that ends entropy-coded data: 0xFF followed by neither a stuffed 0x00 nor a restart marker (D0-D7)
_JPEG_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd9-\xfe]")
# Frame headers (SOFn); C9-CB and CD-CF are arithmetic-coded, C4, C8 and CC are other markers
_SOF_HUFFMAN = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7}
_SOF = _SOF_HUFFMAN | {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOF_SEQUENTIAL_HUFFMAN = {0xC0, 0xC1}  # baseline and extended sequential, Huffman-coded
_STRIP_TAGS = {273: "strips", 279: "strips", 324: "tiles", 325: "tiles"}  # offsets and byte counts of each
# What follows a single sequential scan when it is decoded: 64 one-bits (0xFF is written FF 00 in scan data).
# libjpeg's Huffman decoder reads ahead to 57 bits (64-bit builds) and may need all of them after a complete
# scan's last code; no Huffman code is all ones, so a decoder that is still short of codes gets none here.
JPEG_SCAN_TAIL = b"\xff\x00" * 8


def too_complex(detail: str) -> ServiceError:
    return TooLarge(detail + " Re-save it with an ordinary encoder.")


def truncated(detail: str) -> ServiceError:
    return BadInput(detail + " The file is truncated or corrupt.")


def check(data: bytes) -> bytes:
    """Raise ServiceError 413 if the file has more of some structure than its cap allows, 400 if it is
    a JPEG too short for its declared size. Formats other than PNG, JPEG, GIF and TIFF pass unchecked.
    Returns the bytes to decode: `data`, or for a JPEG with a single sequential Huffman-coded scan its
    bytes up to the end of that scan's data followed by `JPEG_SCAN_TAIL` (the same pixels when the scan
    is whole, a truncation error when it is not). Progressive and other multi-scan JPEGs keep their end:
    libjpeg reads their scans to EOI before it outputs a row."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        _png(data)
    elif data.startswith(b"\xff\xd8\xff"):
        return _jpeg(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _gif(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _tiff(data)
    return data


def _png(data: bytes) -> None:
    pos, chunks = 8, 0
    while pos + 8 <= len(data):
        chunks += 1
        if chunks > PNG_MAX_CHUNKS:
            raise too_complex(f"The PNG has more than {PNG_MAX_CHUNKS:,} chunks.")
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            return
        pos += 12 + length


@dataclass
class _JpegLayout:
    size: tuple[int, int] | None = None  # (width, height) from the first frame header
    frame: int | None = None  # that header's marker (SOFn)
    scans: int = 0
    first_scan: int | None = None  # offset of the first SOS marker
    scan_end: int | None = None  # offset of the first marker after the first scan's data (or the file's end)
    end: int = 0  # where the walk stopped: the EOI marker, or the end of the data


def _jpeg_layout(data: bytes) -> _JpegLayout:
    """Walk a JPEG's marker segments (not its entropy-coded data, which the search skips) up to EOI;
    413 once there are more segments or scans than their caps allow."""
    pos, segments, layout = 2, 0, _JpegLayout()
    while (m := _JPEG_MARKER.search(data, pos)) is not None:
        pos, marker = m.start(), data[m.start() + 1]
        if layout.scans == 1 and layout.scan_end is None:
            layout.scan_end = pos
        if marker == 0xD9:  # end of image: what follows is not decoded
            break
        segments += 1
        if segments > JPEG_MAX_SEGMENTS:
            raise too_complex(f"The JPEG has more than {JPEG_MAX_SEGMENTS:,} marker segments.")
        if marker == 0xDA:
            layout.scans += 1
            if layout.scans > JPEG_MAX_SCANS:
                raise too_complex(f"The JPEG has more than {JPEG_MAX_SCANS} scans.")
            layout.first_scan = pos if layout.first_scan is None else layout.first_scan
        elif marker in _SOF and layout.size is None and pos + 9 <= len(data):
            height, width = struct.unpack_from(">HH", data, pos + 5)
            layout.size, layout.frame = (width, height), marker
        if pos + 4 > len(data):
            break
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]  # past the segment; the search skips entropy-coded data
    else:
        pos = len(data)
    if layout.scans == 1 and layout.scan_end is None:
        layout.scan_end = len(data)
    layout.end = pos
    return layout


def _jpeg(data: bytes) -> bytes:
    layout = _jpeg_layout(data)
    size, first_scan, pos = layout.size, layout.first_scan, layout.end
    huffman = layout.frame in _SOF_HUFFMAN
    if size is not None and first_scan is not None and huffman:
        # a Huffman code is at least one bit, and every 8x8 block of the largest component gets one (its DC value)
        blocks = -(-size[0] // 8) * -(-size[1] // 8)
        if (pos - first_scan) * 8 < blocks:
            raise truncated(
                f"The JPEG declares {size[0]}x{size[1]} pixels, which need at least {blocks // 8:,} bytes "
                f"of image data; it holds {pos - first_scan:,}."
            )
    if layout.scans == 1 and layout.frame in _SOF_SEQUENTIAL_HUFFMAN and layout.scan_end is not None:
        return data[: layout.scan_end] + JPEG_SCAN_TAIL
    return data


def _gif(data: bytes) -> None:
    if len(data) < 13:
        return
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    blocks = 0
    while pos + 1 < len(data) and data[pos] == 0x21:  # extensions before the first image (0x2C)
        pos += 2  # introducer, label
        while pos < len(data):
            blocks += 1
            if blocks > GIF_MAX_BLOCKS:
                raise too_complex(f"The GIF has more than {GIF_MAX_BLOCKS:,} extension blocks before its first image.")
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


def _tiff(data: bytes) -> None:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    head, count_fmt, entry, value_fmt = (8, "Q", 20, "Q") if big else (4, "H", 12, "I")
    if len(data) < head + 8:
        return
    ifd = struct.unpack_from(order + ("Q" if big else "I"), data, head)[0]
    if ifd + struct.calcsize(count_fmt) > len(data):
        return  # Pillow refuses it
    tags = struct.unpack_from(order + count_fmt, data, ifd)[0]
    if tags > TIFF_MAX_TAGS:
        raise too_complex(f"The TIFF's first directory has {tags:,} entries; the limit is {TIFF_MAX_TAGS:,}.")
    pos = ifd + struct.calcsize(count_fmt)
    for _ in range(tags):
        if pos + entry > len(data):
            return
        tag = struct.unpack_from(order + "H", data, pos)[0]
        count = struct.unpack_from(order + value_fmt, data, pos + 4)[0]
        if tag in _STRIP_TAGS and count > TIFF_MAX_STRIPS:
            raise too_complex(f"The TIFF has {count:,} {_STRIP_TAGS[tag]}; the limit is {TIFF_MAX_STRIPS:,}.")
        pos += entry


Marks = list[tuple[int, int, tuple]]  # (x, y, the pixel values marked there from x on)


def mark_last_rows(img: ImageFile.ImageFile) -> Marks:
    """Before `img.load()`: allocate its pixels with a pattern at the end of the rows decoders write last;
    returns what `unwritten` needs. Marks nothing where that proves nothing: JPEG (libjpeg fills missing
    rows itself, see `check`), WebP (decoded whole or not at all), a GIF whose first frame does not cover
    the canvas (the rest is background), a TIFF rotated while loading, a mode without a raw pattern."""
    w, h = img.size
    if img.format not in ("PNG", "GIF", "BMP", "TIFF") or not img.tile:
        return []
    if getattr(img, "_tile_size", img.size) != img.size:  # a TIFF that Pillow rotates while loading
        return []
    if img.format == "GIF" and tuple(img.tile[0][1]) != (0, 0, w, h):
        return []
    mark = _mark(img.mode, min(w, 128 if img.mode == "1" else 16))
    if mark is None:
        return []
    last_odd = h - 1 if h % 2 == 0 else h - 2  # Adam7 and GIF interlacing write odd rows in their last pass
    rows = sorted({0, h - 1} | ({last_odd} if last_odd > 0 else set()))  # bottom-up BMP writes row 0 last
    x = w - mark[0].size[0]
    img.im = Image.core.new(img.mode, img.size)
    for y in rows:
        img.im.paste(mark[0].im, (x, y, w, y + 1))
    return [(x, y, mark[1]) for y in rows]


@functools.lru_cache(maxsize=64)
def _mark(mode: str, width: int) -> tuple[Image.Image, tuple] | None:
    """A 1-row image of `width` pixels of a fixed pseudo-random pattern in `mode`, and its pixel values;
    None where the pattern holds under 64 bits (a real row could match it by chance) or the mode has no
    raw form."""
    try:
        nbytes = len(Image.new(mode, (width, 1)).tobytes())
        if nbytes < 8:
            return None
        mark = Image.frombytes(mode, (width, 1), bytes((i * 151 + 83) & 255 for i in range(nbytes)))
    except (ValueError, OSError):
        return None
    return mark, tuple(mark.im.getpixel((i, 0)) for i in range(width))


def unwritten(img: Image.Image, marks: Marks) -> bool:
    """After `img.load()`: did the decoder leave any marked row as it was (the data ran out)?"""
    pixel = img.im.getpixel
    return any(all(pixel((x + i, y)) == v for i, v in enumerate(values)) for x, y, values in marks)
