"""service/png.py: the fast PNG writer must produce files every decoder reads back bit for bit."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from service import png


def read_back(data: bytes) -> tuple[np.ndarray, Image.Image]:
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(img), img


def photo_like(h: int, w: int, c: int, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: every filter type wins somewhere."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 3 + xx * 5) % (top + 1)
    arr = base[:, :, None] + rng.integers(0, max(2, top // 20), size=(h, w, c))
    return np.clip(arr, 0, top).astype(dtype)


@pytest.mark.parametrize("effort", png.EFFORTS)
@pytest.mark.parametrize("channels,mode", [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
@pytest.mark.parametrize("shape", [(1, 1), (8, 4000), (4000, 8), (37, 53), (256, 256)])
def test_8_bit_round_trips_exactly(channels, mode, shape, effort):
    arr = photo_like(*shape, channels, seed=channels)
    pixels, img = read_back(png.encode_png(arr, effort=effort))
    assert img.mode == mode
    assert np.array_equal(pixels.reshape(arr.shape), arr)


@pytest.mark.parametrize("effort", png.EFFORTS)
def test_2d_grey_and_16_bit_grey_round_trip(effort):
    grey = photo_like(40, 30, 1)[:, :, 0]
    pixels, img = read_back(png.encode_png(grey, effort=effort))
    assert img.mode == "L" and np.array_equal(pixels, grey)
    deep = photo_like(40, 30, 1, dtype=np.uint16)[:, :, 0]
    pixels, img = read_back(png.encode_png(deep, effort=effort))
    assert img.mode.startswith("I") and np.array_equal(pixels.astype(np.uint16), deep)


def unfilter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """A plain reference PNG unfilter (per byte, as the spec reads), for what Pillow cannot open."""
    h, n = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((h, n), dtype=np.int64)
    for y in range(h):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        for x in range(n):
            a = out[y, x - bpp] if x >= bpp else 0
            b = out[y - 1, x] if y else 0
            c = out[y - 1, x - bpp] if y and x >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            paeth = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            pred = [0, a, b, (a + b) // 2, paeth][kind]
            out[y, x] = (line[x] + pred) % 256
    return out.astype(np.uint8)


@pytest.mark.parametrize("effort", png.EFFORTS)
def test_16_bit_colour_is_written_at_16_bits(effort):
    deep = photo_like(12, 10, 3, dtype=np.uint16)
    data = png.encode_png(deep, effort=effort)
    assert data[24] == 16 and data[25] == 2  # IHDR bit depth 16, colour type RGB
    # Pillow reads 16-bit RGB as 8 bits; decode the scanlines with the reference unfilter
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(12, 1 + 10 * 6)
    assert set(rows[:, 0]) <= {0, 1, 2, 3, 4}
    back = unfilter(rows, 6).view(">u2").reshape(12, 10, 3)
    assert np.array_equal(back, deep)


def test_filters_are_chosen_per_row():
    vertical = np.tile(np.arange(64, dtype=np.uint8) * 4, (16, 1))  # every row equal: "up" is all zeros
    assert list(png.filter_rows(vertical, 1)[1:, 0]) == [2] * 15
    horizontal = np.tile(np.arange(64, dtype=np.uint8)[:, None], (1, 32)).T.copy()  # ramps: "sub" is constant
    filtered = png.filter_rows(horizontal, 1)
    assert filtered[0, 0] == 1 and np.all(filtered[0, 2:] == 1)
    noisy = photo_like(64, 64, 3)
    assert len(set(png.filter_rows(noisy.reshape(64, -1), 3)[:, 0])) >= 2


def test_icc_profile_and_exif_are_written():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "mprnet test"  # Make
    blob = exif.tobytes()
    _, img = read_back(png.encode_png(photo_like(16, 16, 3), icc=icc, exif=blob))
    assert img.info["icc_profile"] == icc
    assert img.getexif()[0x010F] == "mprnet test"


@pytest.mark.parametrize("effort", png.EFFORTS)
def test_zlib_fallback_without_isal(monkeypatch, effort):
    arr = photo_like(33, 47, 4)
    monkeypatch.setattr(png, "_fast_zlib", None)
    pixels, _ = read_back(png.encode_png(arr, effort=effort))
    assert np.array_equal(pixels, arr)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4, 5), np.uint8), np.zeros((4, 4), np.float32), np.zeros((0, 4), np.uint8), np.zeros(4, np.uint8)],
)
def test_refuses_what_it_cannot_write(bad):
    with pytest.raises(ValueError, match="encode_png"):
        png.encode_png(bad)
    with pytest.raises(ValueError, match="effort"):
        png.encode_png(np.zeros((2, 2), np.uint8), effort="best")


def test_sizes_next_to_pillow_on_a_photo():
    skimage_data = pytest.importorskip("skimage.data")
    photo = np.asarray(Image.fromarray(skimage_data.coffee()).resize((256, 256)))
    fast, small = (len(png.encode_png(photo, effort=e)) for e in png.EFFORTS)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG", compress_level=1, compress_type=zlib.Z_RLE)
    assert small <= fast < 1.15 * len(buf.getvalue())


def test_unfilter_reference_agrees_with_pillow_on_adaptive_rows():
    arr = photo_like(9, 7, 3)
    rows = png.filter_rows(arr.reshape(9, -1), 3)
    assert len(set(rows[:, 0])) >= 2
    assert np.array_equal(unfilter(rows, 3).reshape(arr.shape), arr)
