"""Every image mode Pillow opens gets a right answer in PNG, JPEG and WebP, or a 415 before any compute.

TIFF carries the most modes (32-bit integer and float grey, signed 16-bit, YCbCr, LAB, CMYK, ...); each
is built here, sent through the identity model and compared with what its pixels mean: exactly for
PNG answers, within JPEG/WebP's loss at quality 100 for the 8-bit answers.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from tests.service.conftest import fake_app

pytestmark = pytest.mark.anyio
TIFF = {"content-type": "image/tiff"}
H, W = 24, 32
YY, XX = np.mgrid[0:H, 0:W]
LEVELS = (XX * 1500 + YY * 700).astype(np.int64)  # a smooth ramp over 0..62,600: 16-bit levels
SMOOTH_RGB = np.stack([XX * 7, YY * 9, (XX + YY) * 4], axis=2).astype(np.uint8)


def tiff(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "TIFF", **save)
    return buf.getvalue()


def signed16(levels: np.ndarray) -> bytes:
    """A signed 16-bit TIFF (SampleFormat 2), which Pillow opens as mode I."""
    return tiff(Image.frombytes("I;16", (W, H), levels.astype("<i2").tobytes()), tiffinfo={339: 2})


def _lab() -> tuple[bytes, np.ndarray]:
    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    data = tiff(ImageCms.applyTransform(Image.fromarray(SMOOTH_RGB), ImageCms.buildTransform(srgb, lab, "RGB", "LAB")))
    opened = Image.open(io.BytesIO(data))
    return data, np.asarray(ImageCms.applyTransform(opened, ImageCms.buildTransform(lab, srgb, "LAB", "RGB")))


LAB_TIFF, LAB_AS_RGB = _lab()
YCBCR_TIFF = tiff(Image.fromarray(SMOOTH_RGB).convert("YCbCr"))
FLOAT = (LEVELS / 65535.0).astype(np.float32)
GREY8 = (LEVELS // 257).astype(np.uint8)
PALETTE = Image.fromarray(SMOOTH_RGB).quantize(16)
CMYK = Image.fromarray(SMOOTH_RGB).convert("CMYK")
BILEVEL = Image.fromarray(GREY8).convert("1", dither=Image.Dither.NONE)

# (id, file, the PNG answer's mode and pixels)
ANSWERED = [
    ("I-int32", tiff(Image.fromarray(LEVELS.astype(np.int32))), "I;16", LEVELS.astype(np.uint16)),
    ("I-int16-signed", signed16(LEVELS // 2), "I;16", (LEVELS // 2).astype(np.uint16)),
    ("I-uint32", tiff(Image.fromarray(LEVELS.astype(np.int32)), tiffinfo={339: 1}), "I;16", LEVELS.astype(np.uint16)),
    ("I;16", tiff(Image.fromarray(LEVELS.astype(np.uint16))), "I;16", LEVELS.astype(np.uint16)),
    ("I;16B", tiff(Image.frombytes("I;16B", (W, H), LEVELS.astype(">u2").tobytes())), "I;16", LEVELS.astype(np.uint16)),
    ("F", tiff(Image.fromarray(FLOAT)), "I;16", np.rint(FLOAT.astype(np.float64) * 65535).astype(np.uint16)),
    ("YCbCr", YCBCR_TIFF, "RGB", np.asarray(Image.open(io.BytesIO(YCBCR_TIFF)).convert("RGB"))),
    ("LAB", LAB_TIFF, "RGB", LAB_AS_RGB),
    ("CMYK", tiff(CMYK), "RGB", np.asarray(CMYK.convert("RGB"))),
    ("1", tiff(BILEVEL), "1", np.asarray(BILEVEL)),
    ("L", tiff(Image.fromarray(GREY8)), "L", GREY8),
    ("LA", tiff(Image.fromarray(np.dstack([GREY8, 255 - GREY8]))), "LA", np.dstack([GREY8, 255 - GREY8])),
    ("RGB", tiff(Image.fromarray(SMOOTH_RGB)), "RGB", SMOOTH_RGB),
    ("RGBA", tiff(Image.fromarray(np.dstack([SMOOTH_RGB, GREY8]))), "RGBA", np.dstack([SMOOTH_RGB, GREY8])),
    ("P", tiff(PALETTE), "P", np.asarray(PALETTE.convert("RGB"))),
]

REFUSED = [
    ("I-negative", signed16(LEVELS // 2 - 1000), "-1000..30300"),
    ("I-over-16-bit", tiff(Image.fromarray((LEVELS * 2).astype(np.int32))), "0..125200"),
    ("F-over-1", tiff(Image.fromarray(FLOAT * 2)), "0..1.9"),
    ("F-nan", tiff(Image.fromarray(np.where(XX > 3, FLOAT, np.nan).astype(np.float32))), "NaN"),
]


def _as_8bit_rgb(arr: np.ndarray) -> np.ndarray:
    """What an 8-bit RGB viewer shows of the PNG answer's pixels (alpha dropped)."""
    if arr.dtype == np.uint16:
        arr = np.rint(arr / 257.0).astype(np.uint8)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.broadcast_to(arr[:, :, :1], (*arr.shape[:2], 3)) if arr.shape[2] <= 2 else arr[:, :, :3]


@pytest.fixture
async def app():
    async with fake_app(max_pixels=1_000_000) as (client, model, _):
        yield client, model


@pytest.mark.parametrize(("data", "mode", "pixels"), [c[1:] for c in ANSWERED], ids=[c[0] for c in ANSWERED])
async def test_every_mode_is_answered_right_in_every_format(app, data, mode, pixels):
    client, _ = app
    r = await client.post("/restore/denoise", content=data, headers=TIFF)
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(r.content))
    if mode == "P":  # a new adaptive palette: compare colours
        assert out.mode == "P" and np.array_equal(np.asarray(out.convert("RGB")), pixels)
    else:
        assert out.mode == mode and np.array_equal(np.asarray(out), pixels)
    shown = _as_8bit_rgb(pixels if mode != "P" else pixels.astype(np.uint8)).astype(int)
    for fmt in ("jpeg", "webp"):
        r = await client.post("/restore/denoise", content=data, headers=TIFF, params={"format": fmt, "quality": 100})
        assert r.status_code == 200, (fmt, r.text)
        lossy = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
        assert np.abs(lossy - shown).mean() < 8, fmt  # JPEG subsamples colour even at 100; a wrong scale is off by ~100


@pytest.mark.parametrize(("data", "words"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
async def test_values_a_mode_cannot_mean_are_415_before_compute(app, data, words):
    client, model = app
    before = len(model.batches)
    r = await client.post("/restore/denoise", content=data, headers=TIFF)
    assert r.status_code == 415 and r.json()["code"] == "unsupported", r.text
    assert words in r.json()["detail"]
    assert len(model.batches) == before
