"""Image bytes in and out (run in a thread pool: Pillow releases the GIL while it codes).

Decoding checks the header before touching pixels: the pixel cap is enforced from the header, so a
decompression bomb is refused without being decompressed. Only the formats in `FORMATS` are opened
(never, say, EPS, which would run Ghostscript). EXIF orientation is applied, the ICC profile kept,
CMYK converted to sRGB through its profile, palettes expanded (re-quantized on the way out),
animations reduced to their first frame; the other modes as model/images.py reads them (32-bit
integer and float grey as 16-bit levels, or 415 before any compute when their values are out of
range; YCbCr and LAB as RGB). Encoding keeps size, mode and depth where the format allows: PNG keeps alpha and 16 bits
(grey, grey+alpha, RGB and RGBA go through service/png.py, a numpy-filtered writer with ISA-L deflate,
about 1 ms instead of Pillow's 9 for 256x256 RGB; other modes through Pillow at level 1 with the
run-length strategy); JPEG has neither; WebP keeps alpha, not 16 bits. Raw pixels (a (H, W, 3) uint8 RGB array)
come in as a decoded RGB image would (`from_pixels`) and go out the same way (`to_pixels`).
"""

from __future__ import annotations

import contextlib
import io
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError
from torch import Tensor

from model.images import ImageMeta, for_format, from_tensor, to_tensor, to_uint8

from . import structure
from .errors import BadInput, TooLarge, Unsupported
from .png import encode_png

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # what Pillow may open
OUTPUTS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Modes whose pixels service/png.py writes directly (the rest, e.g. palettes, go through Pillow)
# (I and F: 32-bit integer and float grey, held as 16-bit levels, are answered as 16-bit grey PNGs.)
FAST_PNG_MODES = (None, "L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Pillow's PNG: zlib level 1 with the run-length strategy, faster and no larger than the default level 6
# on photos, blurred photos and flat images (docs/performance.md, "Choices made from measurements").
PNG_COMPRESS_LEVEL = 1
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# What Pillow raises for a malformed EXIF block while reading it (a fuzz of EXIF bytes saw SyntaxError,
# struct.error and TypeError) or for metadata a format cannot hold when writing (JPEG: EXIF over 64 KB)
_BAD_METADATA = (OSError, ValueError, TypeError, KeyError, IndexError, SyntaxError, EOFError, struct.error)
# Formats people send that we do not decode: answered 415 rather than "not an image"
_OTHER_MAGIC = {b"%PDF": "PDF", b"<svg": "SVG", b"<?xm": "SVG/XML", b"8BPS": "PSD", b"\x00\x00\x01\x00": "ICO"}


@dataclass
class Decoded:
    image: Tensor  # (3, H, W) RGB: uint8 pixel values for 8-bit images, float32 in [0, 1] for 16-bit ones
    meta: ImageMeta  # how to turn the RGB result back into the input's mode, depth, alpha and palette
    icc: bytes | None
    exif: bytes | None
    format: str  # what the input was, e.g. "PNG"


class _OverBudget(Exception):
    """Raised inside Pillow's reads once the decode's time budget is spent; becomes a 413."""


class _BudgetedFile(io.BytesIO):
    """The upload as a file that checks the decode's time budget on every read. Pillow's parsers read
    structure by structure and its decode loop reads at most 64 KB at a time, so a decode that runs past
    its budget stops at its next read; one read's worth of work (a libjpeg block, a WebP frame, a libtiff
    image) runs to its end, bounded by the pixel cap and by `structure.check`."""

    def __init__(self, data: bytes, deadline: float, clock: Callable[[], float]) -> None:
        super().__init__(data)
        self._deadline, self._clock = deadline, clock

    def read(self, size: int | None = -1) -> bytes:
        if self._clock() > self._deadline:
            raise _OverBudget
        return super().read(size)


def _open(data: bytes, file: io.BytesIO) -> Image.Image:
    try:
        return Image.open(file, formats=FORMATS)
    except UnidentifiedImageError:
        pass
    except Image.DecompressionBombError:
        raise TooLarge("The image is over the decoder's safety limit on pixels.") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadInput(f"The image header could not be read ({e}); the file is corrupt or truncated.") from None
    head = data[:16].lstrip()
    kind = next((name for magic, name in _OTHER_MAGIC.items() if head.startswith(magic)), None)
    if kind is None and data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftypheim"):
        kind = "HEIF/AVIF"
    if kind is None:
        try:  # a format Pillow knows but we do not serve; only the header is read, never the pixels
            with Image.open(io.BytesIO(data)) as other:
                kind = other.format
        except Exception:  # noqa: BLE001 - anything unreadable is simply not an image
            kind = None
    if kind:
        raise Unsupported(f"{kind} images are not supported; send PNG, JPEG, WebP, GIF, BMP or TIFF.")
    raise BadInput("The body is not an image (PNG, JPEG, WebP, GIF, BMP or TIFF).")


def decode(
    data: bytes, max_pixels: int, budget_s: float = 10.0, clock: Callable[[], float] = time.monotonic
) -> Decoded:
    """Bytes -> RGB tensor + what is needed to answer in kind. Raises ServiceError 400/413/415.

    8-bit images (also palette, bilevel and converted CMYK ones) stay uint8: they travel to the device
    as a quarter of float32's bytes and are scaled there (service/worker.py). Decoding stops with 413
    once it has run `budget_s` by `clock` (see `_BudgetedFile`); only the first frame of an animation
    is read.
    """
    if not data:
        raise BadInput("The request body is empty; send an image.")
    fed = structure.check(data)  # a single-scan JPEG's scan without its end: it must hold all of its pixels
    over_budget = TooLarge(f"The image took more than {budget_s:g} s to decode; the file is crafted or corrupt.")
    deadline = clock() + budget_s
    try:
        file = _BudgetedFile(fed, deadline, clock)
        img = _open(data, file)
        width, height = img.size
        if width * height > max_pixels:
            pixels = f"{width}x{height} = {width * height:,} pixels"
            raise TooLarge(f"The image is {pixels}; the limit is {max_pixels:,}.")
        if width < 1 or height < 1:
            raise BadInput(f"The image has no pixels ({width}x{height}).")
        fmt = img.format or "?"
        img = _load(img, file if fed is not data else None)
    except _OverBudget:
        raise over_budget from None
    with contextlib.suppress(*_BAD_METADATA):  # an unreadable EXIF block costs the orientation, not the request
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # (exif_transpose copies even upright images)
            img = ImageOps.exif_transpose(img)  # upright pixels; the orientation tag is dropped
    if clock() > deadline:
        raise over_budget
    icc = img.info.get("icc_profile") or None
    exif = img.info.get("exif") or None
    if img.mode == "CMYK":
        img = _cmyk_to_rgb(img, icc)
        icc = None  # the pixels are sRGB now; a CMYK profile would misdescribe them
    try:
        tensor, meta = to_tensor(img, keep_uint8=True)
    except (TypeError, ValueError) as e:
        raise Unsupported(f"This mode {img.mode} image cannot be restored: {e}.") from None
    return Decoded(tensor, meta, icc, exif, fmt)


def _load(img: Image.Image, scan_fed: io.BytesIO | None = None) -> Image.Image:
    """Decode the first frame's pixels; refuse data that ends before the pixels do. `scan_fed`: the
    file of a JPEG fed as `structure.check` returns it, where running out of data means its scan is short."""
    width, height = img.size
    try:
        marks = structure.mark_last_rows(img)
        img.load()
    except Image.DecompressionBombError:
        detail = f"The image is {width}x{height} pixels, over the decoder's safety limit."
        raise TooLarge(detail) from None
    except _OverBudget:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad data; all are the client's file
        if scan_fed is not None and isinstance(e, OSError) and scan_fed.tell() == len(scan_fed.getbuffer()):
            raise structure.truncated(
                f"The JPEG's image data ends early: its scan stops before all of its {width}x{height} pixels "
                "are coded (a decoder would fill the rest with grey)."
            ) from None
        detail = f"The image could not be decoded ({type(e).__name__}: {e}); the file is corrupt or truncated."
        raise BadInput(detail) from None
    if structure.unwritten(img, marks):
        raise structure.truncated(f"The {img.format} image's data ends before its {width}x{height} pixels do.")
    return img


def _cmyk_to_rgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    if icc:
        try:
            return ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken embedded profile: fall back to the naive conversion
    return img.convert("RGB")


def encode(restored: Tensor, decoded: Decoded, fmt: str, quality: int | None, png_effort: str = "fast") -> bytes:
    """(3, H, W) restored tensor (uint8 pixel values or float in [0, 1]) -> bytes in `fmt` (png, jpeg or
    webp), in the input's mode where possible."""
    if fmt == "png" and decoded.meta.pil_mode in FAST_PNG_MODES:
        pixels = from_tensor(restored, replace(decoded.meta, pil_mode=None))  # (H, W[, C]) uint8 or uint16
        assert isinstance(pixels, np.ndarray)
        return encode_png(pixels, decoded.icc, decoded.exif, png_effort)
    img = from_tensor(restored, decoded.meta)
    assert isinstance(img, Image.Image)
    extra = {k: v for k, v in (("icc_profile", decoded.icc), ("exif", decoded.exif)) if v}
    try:
        return _save(img, fmt, quality, extra)
    except _BAD_METADATA:
        if not extra:
            raise
        return _save(img, fmt, quality, {})  # the pixels without the metadata the format refused


def _save(img: Image.Image, fmt: str, quality: int | None, extra: dict) -> bytes:
    buf = io.BytesIO()
    img = for_format(img, fmt)  # 8 bits for JPEG and WebP, no alpha in JPEG; 16-bit grey for I and F in PNG
    if fmt == "png":
        img.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=zlib.Z_RLE, **extra)
    elif fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality or 90, **extra)
    else:
        img.save(buf, "WEBP", quality=quality or 90, method=0, **extra)
    return buf.getvalue()


def from_pixels(pixels: np.ndarray, max_pixels: int) -> Decoded:
    """A (H, W, 3) uint8 RGB array -> what `codec.decode` would give for a PNG of it."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        shape = getattr(pixels, "shape", None)
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        detail = f"Raw pixels must be a height x width x 3 array of uint8 RGB values, got {dtype} of shape {shape}."
        raise BadInput(detail)
    height, width, _ = pixels.shape
    if height < 1 or width < 1:
        raise BadInput(f"The image has no pixels ({width}x{height}).")
    if height * width > max_pixels:
        detail = f"The image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}."
        raise TooLarge(detail)
    image, meta = to_tensor(pixels, keep_uint8=True)  # (3, H, W) uint8, a copy: the caller's array is not kept
    # as if it came as an RGB PNG, so every output format (JPEG, WebP too) can encode it
    meta = replace(meta, pil_mode="RGB")
    return Decoded(image, meta, icc=None, exif=None, format="pixels")


def to_pixels(restored: Tensor) -> np.ndarray:
    """(3, H, W) restored image (uint8, or float in [0, 1] for a 16-bit input) -> a new (H, W, 3) uint8 RGB array."""
    return to_uint8(restored.detach().cpu()).permute(1, 2, 0).contiguous().numpy()
