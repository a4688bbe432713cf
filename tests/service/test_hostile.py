"""Crafted and mutated files: the decode's work is bounded before and during decoding, truncated data is
refused, and no input gets a 5xx.

Work is counted with a clock that advances one unit per reading (`Ticks`): the decoder reads the upload
through a file that looks at the clock on every read, so a decode's reads are counted independently of
the machine's speed.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from service import codec, structure
from service.errors import ServiceError
from tests.service import crafted
from tests.service.conftest import fake_app, png

pytestmark = pytest.mark.anyio
BIG = 25_000_000  # the default pixel cap: a declared 2000x2000 passes it
OCTETS = {"content-type": "application/octet-stream"}
PNG = {"content-type": "image/png"}


class Ticks:
    """A clock that advances one unit each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def refused(data: bytes, status: int, words: str) -> None:
    with pytest.raises(ServiceError) as info:
        codec.decode(data, BIG)
    assert info.value.status == status, info.value.detail
    assert words in info.value.detail, info.value.detail


@pytest.mark.parametrize("make", [crafted.tiff_chain, crafted.gif_frames], ids=["tiff-directories", "gif-frames"])
def test_later_frames_are_never_read(make):
    """Pillow's frame count walks every TIFF directory (in time quadratic in their number) and every GIF
    frame: 3,000 of them take thousands of reads. Only the first frame is read now."""
    ticks = Ticks()
    decoded = codec.decode(make(3000), BIG, 200, ticks)
    assert tuple(decoded.image.shape) == (3, 4, 4)
    assert ticks.now < 200


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (crafted.png_with_chunks(structure.PNG_MAX_CHUNKS), "chunks"),
        (crafted.jpeg_with_segments(structure.JPEG_MAX_SEGMENTS), "marker segments"),
        (crafted.jpeg_with_scans(structure.JPEG_MAX_SCANS), "scans"),
        (crafted.gif_with_extension_blocks(structure.GIF_MAX_BLOCKS), "extension blocks"),
        (crafted.tiff_first_directory(tags=structure.TIFF_MAX_TAGS), "entries"),
        (crafted.tiff_first_directory(strips=structure.TIFF_MAX_STRIPS + 1), "strips"),
    ],
    ids=["png-chunks", "jpeg-segments", "jpeg-scans", "gif-blocks", "tiff-entries", "tiff-strips"],
)
def test_structures_over_their_cap_are_413_before_decoding(data, words):
    refused(data, 413, words)


@pytest.mark.parametrize(
    "data",
    [
        crafted.png_with_chunks(100),
        crafted.jpeg_with_segments(200),
        crafted.jpeg_with_scans(20),
        crafted.gif_with_extension_blocks(500),
        crafted.tiff_first_directory(tags=40),
    ],
    ids=["png-chunks", "jpeg-segments", "jpeg-scans", "gif-blocks", "tiff-entries"],
)
def test_the_same_structures_under_their_cap_decode(data):
    assert codec.decode(data, BIG).image.shape[0] == 3


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (crafted.png_short_stream(2000, 2000), "ends before its 2000x2000 pixels"),
        (crafted.png_short_stream(2000, 2000, interlace=1), "ends before its 2000x2000 pixels"),
        (crafted.png_short_stream(1999, 1999, interlace=1), "ends before its 1999x1999 pixels"),
        (crafted.jpeg_declaring(2000, 2000), "declares 2000x2000 pixels"),
    ],
    ids=["png", "png-interlaced", "png-interlaced-odd", "jpeg"],
)
def test_data_that_ends_before_the_declared_pixels_is_400(data, words):
    """A few hundred bytes declaring 4 MP used to be accepted as a 4 MP job, its missing rows zero or grey."""
    refused(data, 400, words)


def test_a_decode_past_its_budget_stops_with_413():
    readings = iter([0.0, 0.5, 100.0])  # start, one read in time, then the budget is spent
    with pytest.raises(ServiceError) as info:
        codec.decode(crafted.encoded(crafted.small(), "PNG"), BIG, 10, lambda: next(readings, 100.0))
    assert info.value.status == 413 and "more than 10 s to decode" in info.value.detail


async def test_the_service_decodes_under_its_budget_setting(monkeypatch):
    budgets = []
    real = codec.decode

    def spy(data, max_pixels, budget_s=10.0, *rest):
        budgets.append(budget_s)
        return real(data, max_pixels, budget_s, *rest)

    monkeypatch.setattr(codec, "decode", spy)
    async with fake_app(decode_budget_s=3.5) as (client, _, _):
        r = await client.post("/restore/denoise", content=png(crafted.small()), headers=PNG)
    assert r.status_code == 200 and budgets == [3.5]


def _sources() -> dict[str, bytes]:
    img = crafted.small(seed=3, h=24, w=20)
    gray = img[:, :, 0]
    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x8769] = 6, "camera", {0x9003: "2026:12:01 12:00:00"}  # orientation, make, date
    frames = [Image.fromarray(np.roll(img, k, axis=1)) for k in range(3)]
    return {
        "png": crafted.encoded(img, "PNG"),
        "png-gray": crafted.encoded(gray, "PNG"),
        "jpeg": crafted.encoded(img, "JPEG", quality=90),
        "jpeg-exif": crafted.encoded(img, "JPEG", quality=90, exif=exif.tobytes()),
        "jpeg-progressive": crafted.encoded(img, "JPEG", quality=90, progressive=True),
        "tiff": crafted.encoded(img, "TIFF"),
        "tiff-lzw": crafted.encoded(img, "TIFF", compression="tiff_lzw"),
        "gif-animated": crafted.encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20),
        "webp": crafted.encoded(img, "WEBP", quality=80),
        "webp-lossless": crafted.encoded(img, "WEBP", lossless=True),
        "bmp": crafted.encoded(img, "BMP"),
    }


def _mutations(data: bytes, rng: np.random.Generator, n: int):
    """Byte flips anywhere or in the headers, truncation, a repeated slice, a large number over a size field."""
    for _ in range(n):
        b = bytearray(data)
        kind = int(rng.integers(5))
        if kind == 0:
            for pos in rng.integers(0, len(b), int(rng.integers(1, 9))):
                b[pos] = int(rng.integers(256))
        elif kind == 1:
            for pos in rng.integers(0, min(64, len(b)), int(rng.integers(1, 5))):
                b[pos] = int(rng.integers(256))
        elif kind == 2:
            b = b[: int(rng.integers(1, len(b)))]
        elif kind == 3:
            i = int(rng.integers(0, len(b)))
            j = min(len(b), i + int(rng.integers(1, 200)))
            b[j:j] = b[i:j] * int(rng.integers(1, 50))
        else:
            pos = int(rng.integers(0, min(128, len(b) - 4)))
            number = int(rng.integers(1, 2**32)) | 0x00FF0000  # at least 16.7 million
            b[pos : pos + 4] = number.to_bytes(4, "big" if rng.integers(2) else "little")
        yield bytes(b)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the broken TIFF tags and EXIF blocks it skips
async def test_mutated_files_never_get_a_5xx_nor_decode_past_the_budget():
    """A fixed-seed fuzz of valid PNG, JPEG, TIFF, GIF, WebP and BMP files (440 cases): every answer is
    200 or a 4xx, each decode returns or stops within its budget (plus one read's slack), and the server
    still restores a valid image afterwards."""
    budget, max_pixels = 2.0, 4_000_000
    rng = np.random.default_rng(20261201)
    seen: Counter[int] = Counter()
    async with fake_app(max_pixels=max_pixels, decode_budget_s=budget) as (client, _, _):
        for name, data in _sources().items():
            for i, case in enumerate(_mutations(data, rng, 40)):
                t0 = time.monotonic()
                try:
                    codec.decode(case, max_pixels, budget)
                except ServiceError:
                    pass
                assert time.monotonic() - t0 < budget + 1.0, (name, i)
                r = await client.post("/restore/denoise", content=case, headers=OCTETS)
                assert r.status_code < 500, (name, i, r.text)
                seen[r.status_code] += 1
        r = await client.post("/restore/denoise", content=png(crafted.small()), headers=PNG)
        assert r.status_code == 200
    assert seen[200] and seen[400]  # the mutations reach both outcomes
    assert set(seen) <= {200, 400, 413, 415}, seen


async def test_metadata_an_output_format_cannot_hold_is_dropped_not_a_500():
    """A PNG's 70 KB EXIF block does not fit a JPEG (64 KB segments): the answer comes without it."""
    data = png(crafted.small(), exif=b"Exif\x00\x00" + bytes(70_000))
    async with fake_app() as (client, _, _):
        r = await client.post("/restore/denoise", content=data, headers=PNG, params={"format": "jpeg"})
    assert r.status_code == 200, r.text
    assert "exif" not in Image.open(io.BytesIO(r.content)).info
