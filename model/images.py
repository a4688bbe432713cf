"""Images in and out of the network's format: (3, H, W) float32 RGB in [0, 1].

`to_tensor(image, keep_uint8=True)` leaves 8-bit pixels as a (3, H, W) uint8 tensor instead (the
service moves them to the device like that, a quarter of float32's bytes, and scales them there), and
`from_tensor` takes such a uint8 result as well as a float one.

Accepted: numpy arrays H x W, H x W x 1, H x W x 3 or H x W x 4 of uint8 or uint16, and PIL images
of every mode Pillow opens. The result comes back as the same kind of object with the same size,
channels and bit depth (and the same PIL mode; palette images get a new adaptive palette): grayscale
is replicated to RGB for the network and averaged back; alpha is passed through untouched. Modes
that are not plain levels are read as follows (ValueError, with the reason, where they cannot be):

- I (32-bit integers; Pillow opens signed 16-bit and 32-bit TIFFs so) holds 16-bit levels: values
  must lie in 0..65535, and come back in mode I;
- F (32-bit float) holds levels in 0..1 (1 is white), restored at 16-bit precision; values outside
  0..1, NaN or infinity are refused;
- YCbCr and LAB come back as RGB (other encodings of colour; LAB is converted to sRGB); La
  (premultiplied alpha) as LA; CMYK and HSV go to RGB and back.

`for_format(image, "PNG" | "JPEG" | ...)` then gives an image the file format can store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


@dataclass(frozen=True)
class ImageMeta:
    """What is needed to turn the network's RGB output back into the caller's image."""

    dtype: np.dtype
    channels: int  # 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) in the caller's array
    squeeze: bool  # the caller's array was H x W (no channel axis)
    alpha: np.ndarray | None  # H x W, passed through unchanged
    pil_mode: str | None  # the caller gave a PIL image of this mode


def _pil_to_array(img: Image.Image) -> tuple[np.ndarray, str]:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16), mode
    if mode == "I":  # 32-bit integers holding 16-bit levels
        levels = np.asarray(img)
        low, high = (int(levels.min()), int(levels.max())) if levels.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(f"mode I pixels are read as 16-bit levels 0..65535; this image holds {low}..{high}")
        return levels.astype(np.uint16), mode
    if mode == "F":  # 32-bit float levels, 1 is white
        levels = np.asarray(img)
        if not np.isfinite(levels).all():
            raise ValueError("float (mode F) pixels must be levels in 0..1; this image holds NaN or infinity")
        low, high = (float(levels.min()), float(levels.max())) if levels.size else (0.0, 0.0)
        if low < 0 or high > 1:
            raise ValueError(f"float (mode F) pixels must be levels in 0..1 (1 is white); it holds {low:g}..{high:g}")
        return np.rint(levels * 65535.0).astype(np.uint16), mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(img), mode
    if mode == "La":  # premultiplied alpha
        return np.asarray(img.convert("LA")), "LA"
    if mode in ("YCbCr", "LAB"):  # other encodings of colour (Pillow converts LAB colorimetrically, to sRGB)
        return np.asarray(img.convert("RGB")), "RGB"
    if mode == "P" or mode == "PA":
        target = "RGBA" if ("transparency" in img.info or mode == "PA") else "RGB"
        return np.asarray(img.convert(target)), mode
    if mode == "1":
        return np.asarray(img.convert("L")), mode
    # CMYK, HSV: the network works in RGB; the answer is converted back
    return np.asarray(img.convert("RGB")), mode


def to_uint8(x: Tensor) -> Tensor:
    """Float in [0, 1], any shape and device -> uint8 on that device: clamped, scaled by 255 and rounded
    half to even (as np.rint); uint8 stays as it is. Every 8-bit answer of this package is rounded this
    way, so the device paths give the same pixels as converting the float result on the CPU."""
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"expected float in [0, 1] or uint8 pixel values, got {x.dtype}")
    return x.clamp(0, 1).mul_(255).round_().to(torch.uint8)


def to_float(x: Tensor) -> Tensor:
    """uint8 pixel values -> float32 in [0, 1] on x's device (a new tensor); float stays as it is, as float32."""
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 pixel values or float in [0, 1], got {x.dtype}")
    return x.float()


def to_tensor(image: np.ndarray | Image.Image, keep_uint8: bool = False) -> tuple[Tensor, ImageMeta]:
    """Image -> ((3, H, W) float32 tensor in [0, 1], meta to undo the conversion).

    With `keep_uint8`, an 8-bit image comes back as a (3, H, W) uint8 tensor of its pixel values (no
    scaling); 16-bit images are float32 either way, as uint8 cannot hold them.
    """
    pil_mode = None
    if isinstance(image, Image.Image):
        image, pil_mode = _pil_to_array(image)
    arr = np.asarray(image)
    if arr.dtype not in _MAX:
        raise TypeError(f"images must be uint8 or uint16, got {arr.dtype}")
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected an H x W x {{1,2,3,4}} image, got shape {np.asarray(image).shape}")
    channels = arr.shape[2]
    alpha = arr[:, :, -1].copy() if channels in (2, 4) else None
    color = arr[:, :, :3] if channels >= 3 else arr[:, :, :1]
    meta = ImageMeta(arr.dtype, channels, squeeze, alpha, pil_mode)
    as_uint8 = keep_uint8 and arr.dtype == np.uint8
    # One buffer, filled (and for float scaled in place): large images need no float temporaries.
    x = torch.empty((3, arr.shape[0], arr.shape[1]), dtype=torch.uint8 if as_uint8 else torch.float32)
    np.copyto(x.numpy(), color.transpose(2, 0, 1))  # (C, H, W) view; gray broadcasts to 3 channels
    if not as_uint8:
        x.div_(_MAX[arr.dtype])
    return x, meta


def from_tensor(x: Tensor, meta: ImageMeta) -> np.ndarray | Image.Image:
    """(3, H, W) tensor in [0, 1], or uint8 pixel values -> the caller's kind of image (same dtype, channels
    and mode). A uint8 tensor gives the same image as its float equivalent x / 255 would."""
    if x.dtype == torch.uint8 and meta.dtype == np.uint8:
        out = _uint8_to_array(x.detach().to("cpu"), meta.channels)
    else:
        out = _float_to_array(to_float(x), meta)  # 8-bit pixels for a 16-bit answer go through float too
    if meta.alpha is not None:
        out = np.concatenate([out, meta.alpha[:, :, None]], axis=2)
    if meta.squeeze:
        out = out[:, :, 0]
    if meta.pil_mode is None:
        return out
    return _array_to_pil(out, meta.pil_mode)


def _uint8_to_array(y: Tensor, channels: int) -> np.ndarray:
    """(3, H, W) uint8 on the CPU -> a new (H, W, 3) array, or (H, W, 1) grey for a 1- or 2-channel caller."""
    if channels in (1, 2):
        # the float path's round(255 * mean): a sum of three levels over 3 is never a tie, so (sum + 1) // 3
        total = y.sum(dim=0, keepdim=True, dtype=torch.int16)
        y = total.add_(1).div_(3, rounding_mode="floor").to(torch.uint8)
    return y.permute(1, 2, 0).clone(memory_format=torch.contiguous_format).numpy()  # a copy even when already (H, W, C)


def _float_to_array(x: Tensor, meta: ImageMeta) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> a new (H, W, C) array of the caller's dtype, C 1 for grey callers."""
    y = x.detach().to("cpu", torch.float32).clamp(0, 1)  # a new (3, H, W) buffer, never the caller's
    if meta.channels in (1, 2):
        y = y.mean(dim=0, keepdim=True)  # (1, H, W)
    # scaled and rounded in place (round half to even, as np.rint), then one cast to the caller's dtype
    y.mul_(_MAX[meta.dtype]).round_()
    if meta.dtype == np.uint8:  # torch's cast and channel-last copy are about twice numpy's strided astype
        return y.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # (H, W, C)
    return y.permute(1, 2, 0).numpy().astype(meta.dtype, order="C")


def _array_to_pil(out: np.ndarray, mode: str) -> Image.Image:
    if mode == "I":
        return Image.fromarray(out.astype(np.int32))
    if mode == "F":
        return Image.fromarray((out / 65535.0).astype(np.float32))
    img = Image.fromarray(out)  # Pillow infers L / LA / RGB / RGBA / I;16 from the shape and dtype
    if mode == "1":
        return img.convert("1", dither=Image.Dither.NONE)  # threshold: a bilevel image has no grey to dither
    if mode in ("P", "PA"):
        # the restoration has colours the old palette lacks: a new adaptive palette (alpha kept in it)
        return img.quantize(256)
    if mode in ("CMYK", "HSV"):
        return img.convert(mode)  # back from the RGB the network saw
    return img  # L, LA, RGB, RGBA, I;16 (any byte order)


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey -> 8-bit grey (L), rounded; bilevel -> L; others unchanged."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return Image.fromarray(np.clip(np.rint(np.asarray(img).astype(np.float64) / 257.0), 0, 255).astype(np.uint8))
    if img.mode == "F":
        return Image.fromarray(np.rint(np.clip(np.asarray(img), 0, 1) * 255.0).astype(np.uint8))
    if img.mode == "1":
        return img.convert("L")
    return img


# The modes each format stores as they are (TIFF stores every mode)
_STORES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I;16N"),
    "JPEG": ("L", "RGB", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
    "BMP": ("1", "L", "P", "RGB", "RGBA"),
}


def for_format(img: Image.Image, fmt: str) -> Image.Image:
    """`img` in a mode the file format `fmt` (Pillow's name: PNG, JPEG, WEBP, BMP, TIFF) can store: 32-bit
    integer and float grey become 16-bit grey in PNG and 8-bit grey elsewhere, as other deep modes do;
    modes a format lacks become RGB, or RGBA where there is alpha and the format has it (JPEG has none)."""
    keep = _STORES.get(fmt.upper())
    if keep is None or img.mode in keep:
        return img
    if "I;16" in keep and img.mode in ("I", "F"):
        levels = np.asarray(img).astype(np.float64) * (65535.0 if img.mode == "F" else 1.0)
        return Image.fromarray(np.clip(np.rint(levels), 0, 65535).astype(np.uint16))
    img = to_8bit(img)
    if img.mode in keep:
        return img
    if "RGBA" not in keep:
        return img.convert("L" if img.mode in ("LA", "La") else "RGB")
    return img.convert("RGBA" if img.has_transparency_data else "RGB")
