"""Every bad input gets a clear 4xx JSON answer; every image kind that must work comes back in kind.

The fake model is the identity, so what comes back must be exactly the (decoded, upright, RGB
where converted) input: any loss in the service's own decode / pad / tile / encode path shows.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from tests.service.conftest import decode, fake_app, png, rand_image

pytestmark = pytest.mark.anyio
RAW = {"content-type": "image/png"}


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height (the pixel data is a stub): a decompression bomb."""
    data = png(rand_image(8, 8, seed=0))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


@pytest.fixture
async def client():
    async with fake_app(max_upload_bytes=200 * 1024, max_pixels=300_000) as (c, _, _):
        yield c


async def restore(client, data: bytes, content_type="image/png", task="denoise", **params):
    return await client.post(f"/restore/{task}", content=data, headers={"content-type": content_type}, params=params)


def error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["detail"]


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"", "image/png", 400, "bad_input"),
        (b"this is not an image at all", "image/png", 400, "bad_input"),
        (png(rand_image(40, 40, seed=1))[:300], "image/png", 400, "bad_input"),  # truncated
        (png(rand_image(40, 40, seed=1))[:40] + b"\x00" * 200, "image/png", 400, "bad_input"),  # corrupt data
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", 415, "unsupported"),
        (b"%PDF-1.4\n%...", "application/octet-stream", 415, "unsupported"),
        (png(rand_image(8, 8, seed=1)), "text/plain", 415, "unsupported"),
        (png(rand_image(8, 8, seed=1)), "application/json", 415, "unsupported"),
        (bomb_png(100_000, 100_000), "image/png", 413, "too_large"),  # over Pillow's own bomb limit
        (bomb_png(1000, 1000), "image/png", 413, "too_large"),  # over MPRNET_MAX_PIXELS, refused from the header
        (np.random.default_rng(0).bytes(300 * 1024), "image/png", 413, "too_large"),  # over MPRNET_MAX_UPLOAD_BYTES
    ],
    ids=["empty", "not-image", "truncated", "corrupt", "svg", "pdf", "text-plain", "json", "bomb",
         "over-pixel-cap", "over-byte-cap"],
)
async def test_bad_input_is_a_clear_4xx(client, data, content_type, status, code):
    error(await restore(client, data, content_type), status, code)


async def test_unknown_task_is_404(client):
    error(await restore(client, png(rand_image(8, 8, seed=1)), task="sharpen"), 404, "unknown_task")


async def test_multipart_without_an_image_file_is_400(client):
    error(await client.post("/restore/denoise", files={"picture": ("x.png", b"123", "image/png")}), 400, "bad_input")
    error(await client.post("/restore/denoise", data={"image": "not a file"}, files={"other": ("x", b"1")}), 400, "bad_input")


async def test_oversized_upload_is_refused_before_the_body_is_read(client):
    """A declared Content-Length over the cap is answered without reading a single body byte."""
    app = client._transport.app
    sent = []

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/restore/denoise", "raw_path": b"/restore/denoise", "root_path": "", "query_string": b"",
             "client": ("127.0.0.1", 1), "server": ("test", 80),
             "headers": [(b"content-type", b"image/png"), (b"content-length", b"10000000000")]}
    await asyncio.wait_for(app(scope, receive, send), 10)
    assert sent[0]["status"] == 413


async def test_grayscale_palette_rgba_and_16_bit_come_back_in_kind(client):
    gray = rand_image(21, 17, seed=2, channels=1)
    rgba = rand_image(19, 23, seed=3, channels=4)
    deep = np.random.default_rng(4).integers(0, 65536, (18, 22), dtype=np.uint16)
    palette = Image.fromarray(np.array([[0, 1, 2, 3] * 5] * 12, dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 250])
    for arr in (gray, rgba, deep):
        r = await restore(client, png(arr))
        assert r.status_code == 200, r.text
        out = Image.open(io.BytesIO(r.content))
        assert out.mode == Image.fromarray(arr).mode and (np.asarray(out) == arr).all()
    r = await restore(client, encoded(palette, "PNG"))
    out = Image.open(io.BytesIO(r.content))
    assert r.status_code == 200 and out.mode == "P"
    assert (np.asarray(out.convert("RGB")) == np.asarray(palette.convert("RGB"))).all()


def png_16bit_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


async def test_16_bit_colour_png_is_answered_in_8_bits(client):
    """Pillow decodes 16-bit colour PNGs to 8 bits (16-bit grayscale keeps its depth, above)."""
    data = png_16bit_rgb(np.random.default_rng(7).integers(0, 65536, (9, 11, 3), dtype=np.uint16))
    r = await restore(client, data)
    out = Image.open(io.BytesIO(r.content))
    assert r.status_code == 200 and out.mode == "RGB"
    assert (np.asarray(out) == np.asarray(Image.open(io.BytesIO(data)))).all()


async def test_cmyk_jpeg_is_converted_to_rgb(client):
    cmyk = Image.fromarray(rand_image(16, 24, seed=5, channels=4), "CMYK")
    data = encoded(cmyk, "JPEG", quality=95)
    r = await restore(client, data, "image/jpeg")
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(r.content))
    assert out.mode == "RGB" and (np.asarray(out) == np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).all()


async def test_exif_orientation_is_applied_and_icc_profile_kept(client):
    img = Image.fromarray(rand_image(20, 40, seed=6))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encoded(img, "JPEG", quality=95, exif=exif.tobytes())
    r = await restore(client, data, "image/jpeg")
    out = Image.open(io.BytesIO(r.content))
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert r.status_code == 200 and out.size == (20, 40) and (np.asarray(out) == np.asarray(upright)).all()
    assert out.getexif().get(0x0112) in (None, 1)

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    r = await restore(client, encoded(img, "PNG", icc_profile=icc))
    assert Image.open(io.BytesIO(r.content)).info.get("icc_profile") == icc


async def test_animated_gif_answers_its_first_frame(client):
    frames = [Image.fromarray(np.full((12, 14, 3), c, dtype=np.uint8)) for c in (30, 140, 250)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    r = await restore(client, data, "image/gif")
    assert r.status_code == 200, r.text
    first = Image.open(io.BytesIO(data)).convert("RGB")
    assert (np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")) == np.asarray(first)).all()


@pytest.mark.parametrize(("h", "w"), [(1, 1), (8, 4000), (4000, 8), (3, 700), (65, 65)])
async def test_tiny_and_extreme_aspect_ratios_round_trip(client, h, w):
    arr = rand_image(h, w, seed=h * w)
    r = await restore(client, png(arr))
    assert r.status_code == 200, r.text
    assert (decode(r.content) == arr).all()


@pytest.mark.parametrize("fmt", ["webp", "bmp", "tiff"])
async def test_other_input_formats(client, fmt):
    arr = rand_image(10, 12, seed=9)
    data = encoded(Image.fromarray(arr), fmt.upper(), **({"lossless": True} if fmt == "webp" else {}))
    r = await restore(client, data, f"image/{fmt}")
    assert r.status_code == 200 and (decode(r.content) == arr).all()


async def test_png_effort_setting_changes_the_file_not_the_pixels():
    yy, xx = np.mgrid[0:96, 0:80]
    smooth = np.stack([(xx * 3 + yy) % 256, (yy * 2) % 256, (xx + yy * 5) % 256], axis=2).astype(np.uint8)
    bodies = {}
    for effort in ("fast", "small"):
        async with fake_app(png_effort=effort) as (client, _, _):
            r = await restore(client, png(smooth))
            assert r.status_code == 200, r.text
            assert np.array_equal(decode(r.content), smooth)
            bodies[effort] = r.content
    assert bodies["small"] != bodies["fast"]
    assert len(bodies["small"]) <= len(bodies["fast"])
