"""Synthetic degradations used to train and evaluate the bundled models (the published spec).

Every function takes a clean image as a float32 numpy array ``(H, W, 3)`` in [0, 1] and a
``numpy.random.Generator``; the same generator state always gives the same degraded image.
Results are float32, clipped to [0, 1] (as an image file would be), not quantised.

denoise
    Additive white Gaussian noise, independent per pixel and channel, with
    ``sigma ~ U[5, 50]`` on the 0-255 scale (``add_noise`` takes a fixed sigma: evaluation uses 25).

deblur
    A blur kernel of at most 25 x 25 (``KERNEL_SIZE``), normalised to sum 1, centred on its centre
    of mass (so blurring never shifts the image), then Gaussian noise with ``sigma ~ U[0, 2]``.
    The kernel is, with equal probability:

    * a *camera-shake trajectory*: a random walk with inertia and occasional jerks (in the
      spirit of Boracchi & Foi, 2012), sampled at equal time steps (slow parts of the path get
      more exposure), scaled to a random extent of 3-21 px;
    * *linear motion*: a segment of random length 3-21 px at any angle in [0, 180) degrees.

    With probability 0.3 it is further convolved with a Gaussian of ``sigma ~ U[0.3, 1.5]``
    (defocus); the result is cropped back to 25 x 25 and renormalised. Paths are rasterised with
    bilinear splatting so sub-pixel motion is represented. Images are reflect-padded before
    convolution, or, in training, cropped with a 12-px margin that the blur consumes.

derain
    Rain streaks, combined with the image by *screen blending*: ``1 - (1 - image) * (1 - rain)``.
    Per image: a density of 3-40 streak centres per 10,000 px (uniform, counted over the image and a
    margin of 44 px around it, where streaks that enter the image may start), a dominant angle within +/-25
    degrees of vertical plus +/-5 degrees of jitter per streak (so every streak is within +/-30);
    per streak: length U[10, 40] px, width 1, 2 or 3 px, peak intensity U[0.5, 1.0] before
    softening, a brightness that tapers towards both ends; the rain layer is then softened with a
    Gaussian of ``sigma ~ U[0.5, 1.0]`` px and clipped to [0, 1]. Rain is grey (equal in R, G, B).
    ``rain_layer`` draws exactly this; the fixed evaluation (``benchmark_degrade``) uses it.

    Training draws from a wider *family* (``family_rain``) so that the model learns rain rather than
    one renderer: 1-3 layers per image, each with its own angle (all within +/-35 degrees of
    vertical), length range (5-70 px), streak width (1-3 px, thin ones most often) and profile
    (``RAIN_PROFILES``: hard 1-px-sharp lines, tapered ends, or blurred by sigma U[0.3, 1.5]); a total
    density of 3-60 streaks per 10,000 px (the spec and 1.5 x above it); peak brightness U[0.3, 1.0];
    the rain is screen-blended (60 %) or added (40 %), and 15 % of images also get a light grey haze.
    ``family_rain(..., profiles=..., blends=..., haze=...)`` restricts the draw (ablations): a subset of
    ``RAIN_PROFILES``, a subset of ``RAIN_BLENDS`` and the probability of haze (0: never);
    ``parse_rain_family`` reads those from text (``mprnet train --rain-profiles/--rain-blends/--rain-haze``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

KERNEL_SIZE = 25  # blur kernels fit in 25 x 25; training crops carry a margin of KERNEL_SIZE // 2
MAX_MOTION = 21  # px, longest linear motion / largest trajectory extent
DENOISE_SIGMA = (5.0, 50.0)  # 0-255 scale
DEBLUR_NOISE_MAX = 2.0  # 0-255 scale
RAIN_LENGTH = (10.0, 40.0)
RAIN_MAX_ANGLE = 30.0  # degrees from vertical
RAIN_DENSITY = (3.0, 40.0)  # streaks per 10,000 px
TASK_MARGIN = {"denoise": 0, "deblur": KERNEL_SIZE // 2, "derain": 0}


# ----------------------------------------------------------------------------- denoise
def add_noise(img: np.ndarray, sigma255: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, sigma255/255) per pixel and channel; clip to [0, 1]."""
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma255 / 255.0)
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


def random_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The denoise training degradation: AWGN with sigma ~ U[5, 50] (0-255 scale)."""
    return add_noise(img, rng.uniform(*DENOISE_SIGMA), rng)


# ----------------------------------------------------------------------------- deblur
def _splat(points: np.ndarray, size: int = KERNEL_SIZE) -> np.ndarray:
    """Bilinear-splat (N, 2) (x, y) points, centred on their mean, into a size x size kernel summing to 1."""
    pts = points - points.mean(axis=0) + (size - 1) / 2.0
    x0, y0 = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
    fx, fy = pts[:, 0] - x0, pts[:, 1] - y0
    k = np.zeros((size, size), np.float64)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (np.clip(y0 + dy, 0, size - 1), np.clip(x0 + dx, 0, size - 1)), w)
    return (k / k.sum()).astype(np.float32)


def _fit(points: np.ndarray, extent: float, size: int = KERNEL_SIZE) -> np.ndarray:
    """Scale a path so its bounding box is at most `extent` px and, centred on its mean, fits the kernel."""
    centred = points - points.mean(axis=0)
    span = max(np.ptp(points, axis=0).max(), 1e-6)
    reach = max(np.abs(centred).max(), 1e-6)
    half = (size - 1) / 2.0 - 1.0  # one pixel kept free for the bilinear footprint
    return centred * min(extent / span, half / reach)


def linear_motion_kernel(length: float, angle_deg: float, size: int = KERNEL_SIZE) -> np.ndarray:
    """Uniform motion along a segment of `length` px at `angle_deg` (0 = horizontal)."""
    t = np.linspace(-0.5, 0.5, max(int(length * 4), 2))[:, None]
    direction = np.array([[math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))]])
    return _splat(_fit(t * direction * max(length, 1e-3), min(length, MAX_MOTION), size), size)


def shake_kernel(rng: np.random.Generator, extent: float, size: int = KERNEL_SIZE, steps: int = 200) -> np.ndarray:
    """Camera shake: a random walk with inertia and rare jerks, equal exposure per time step."""
    velocity = np.zeros((steps, 2))
    v = rng.standard_normal(2)
    inertia = rng.uniform(0.7, 0.95)
    for i in range(steps):
        kick = rng.standard_normal(2)
        if rng.random() < 0.02:  # an abrupt jerk of the hand
            kick *= 6.0
        v = inertia * v + (1.0 - inertia) * kick
        velocity[i] = v
    path = np.cumsum(velocity, axis=0)
    return _splat(_fit(path, extent, size), size)


def gaussian_kernel(sigma: float, size: int = KERNEL_SIZE) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def random_blur_kernel(rng: np.random.Generator) -> np.ndarray:
    """A deblur training kernel (see the module docstring): (25, 25) float32, sums to 1."""
    if rng.random() < 0.5:
        k = shake_kernel(rng, rng.uniform(3.0, MAX_MOTION))
    else:
        k = linear_motion_kernel(rng.uniform(3.0, MAX_MOTION), rng.uniform(0.0, 180.0))
    if rng.random() < 0.3:
        k = fftconvolve(k, gaussian_kernel(rng.uniform(0.3, 1.5), 11), mode="same")
        k = np.clip(k, 0.0, None)
        k = (k / k.sum()).astype(np.float32)
    return k


def blur(img: np.ndarray, kernel: np.ndarray, valid: bool = False) -> np.ndarray:
    """Convolve each channel with `kernel`.

    valid=False: reflect-pad so the result has the input's size. valid=True: no padding; the
    result is smaller by kernel_size - 1 (training crops carry that margin, so no border is invented).
    """
    r = kernel.shape[0] // 2
    if not valid:
        img = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")
    out = fftconvolve(img, kernel[:, :, None], mode="valid", axes=(0, 1))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def random_blur(img: np.ndarray, rng: np.random.Generator, valid: bool = False) -> np.ndarray:
    """The deblur training degradation: random kernel, then Gaussian noise sigma ~ U[0, 2]."""
    out = blur(img, random_blur_kernel(rng), valid=valid)
    return add_noise(out, rng.uniform(0.0, DEBLUR_NOISE_MAX), rng)


# ----------------------------------------------------------------------------- derain
def rain_layer(shape: tuple[int, int], rng: np.random.Generator, *, return_angles: bool = False):
    """A (H, W) float32 rain layer in [0, 1] (see the module docstring); optionally the streak angles."""
    h, w = shape
    pad = int(RAIN_LENGTH[1]) + 4  # streaks may start outside the image and enter it
    # Density counts streak centres per area of the padded canvas, so that small training crops
    # and whole images see the same rain.
    n = int(round(rng.uniform(*RAIN_DENSITY) * (h + 2 * pad) * (w + 2 * pad) / 1e4))
    main = rng.uniform(-RAIN_MAX_ANGLE + 5.0, RAIN_MAX_ANGLE - 5.0)
    angles = np.clip(main + rng.uniform(-5.0, 5.0, n), -RAIN_MAX_ANGLE, RAIN_MAX_ANGLE)
    lengths = rng.uniform(*RAIN_LENGTH, n)
    widths = rng.integers(1, 4, n)
    peaks = rng.uniform(0.5, 1.0, n)
    canvas = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)
    if n:
        cx, cy = rng.uniform(0, w + 2 * pad, n), rng.uniform(0, h + 2 * pad, n)
        samples = int(RAIN_LENGTH[1] * 2)  # half-pixel steps along the longest streak
        t = np.linspace(-0.5, 0.5, samples)[None, :]  # (1, S)
        rad = np.radians(angles)[:, None]
        # Angle from vertical: dx = sin, dy = cos. Offsets across the streak give its width.
        along_x, along_y = np.sin(rad) * lengths[:, None] * t, np.cos(rad) * lengths[:, None] * t
        taper = np.sin(np.pi * (t + 0.5)) ** 0.5  # dimmer at both ends
        weight = peaks[:, None] * taper * (lengths[:, None] / samples)  # ~peak per pixel along the streak
        for off in (-1, 0, 1):
            use = widths >= (1 if off == 0 else (2 if off == 1 else 3))
            if not use.any():
                continue
            xs = cx[use, None] + along_x[use] + off * np.cos(rad[use])
            ys = cy[use, None] + along_y[use] - off * np.sin(rad[use])
            _splat_into(canvas, xs.ravel(), ys.ravel(), np.broadcast_to(weight[use], xs.shape).ravel())
    layer = canvas[pad:pad + h, pad:pad + w]
    layer = np.clip(gaussian_filter(np.clip(layer, 0.0, 1.0), rng.uniform(0.5, 1.0)), 0.0, 1.0)
    return (layer, angles) if return_angles else layer


def _splat_into(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, ws: np.ndarray) -> None:
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    h, w = canvas.shape
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        np.add.at(canvas, (yi[ok], xi[ok]), (ws * wt)[ok])


def screen(img: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Screen blend: brightens where the layer is bright, never darkens, stays in [0, 1]."""
    return (1.0 - (1.0 - img) * (1.0 - layer[:, :, None])).astype(np.float32)


def random_rain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The spec's rain (``rain_layer``) screen-blended onto the image: the fixed evaluation's rain."""
    return screen(img, rain_layer(img.shape[:2], rng))


RAIN_PROFILES = ("hard", "tapered", "blurred")
RAIN_BLENDS = ("screen", "add")
RAIN_HAZE = 0.15  # probability that an image also gets a light grey haze
RAIN_FAMILY_DENSITY = (3.0, 60.0)  # streaks per 10,000 px: the spec's range and half as much again
RAIN_FAMILY_MAX_ANGLE = 35.0
RAIN_FAMILY_LENGTH = (5.0, 70.0)


def _family_streaks(canvas: np.ndarray, n: int, profile: str, rng: np.random.Generator) -> None:
    """Draw one layer of `n` streaks (one angle, length range, width and `profile`) into `canvas`."""
    h, w = canvas.shape
    angle = rng.uniform(-RAIN_FAMILY_MAX_ANGLE + 5.0, RAIN_FAMILY_MAX_ANGLE - 5.0)
    angles = np.radians(np.clip(angle + rng.uniform(-3.0, 3.0, n), -RAIN_FAMILY_MAX_ANGLE, RAIN_FAMILY_MAX_ANGLE))
    lo = rng.uniform(RAIN_FAMILY_LENGTH[0], 30.0)
    lengths = rng.uniform(lo, min(lo + rng.uniform(5.0, 40.0), RAIN_FAMILY_LENGTH[1]), n)
    width = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    peaks = rng.uniform(0.3, 1.0, n) if rng.random() < 0.5 else np.full(n, rng.uniform(0.3, 1.0))
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    samples = int(RAIN_FAMILY_LENGTH[1] * 2)
    t = np.linspace(-0.5, 0.5, samples)[None, :]
    sin, cos = np.sin(angles)[:, None], np.cos(angles)[:, None]
    along = lengths[:, None] * t
    taper = np.sin(np.pi * (t + 0.5)) ** rng.uniform(0.3, 1.5) if profile == "tapered" else np.ones_like(t)
    vals = peaks[:, None] * taper  # (n, S)
    for off in np.arange(width) - (width - 1) / 2.0:
        xs, ys = cx[:, None] + sin * along + off * cos, cy[:, None] + cos * along - off * sin
        if profile == "hard":  # nearest pixel, no anti-aliasing: sharp-edged lines
            xi, yi = np.rint(xs).astype(int), np.rint(ys).astype(int)
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            np.maximum.at(canvas, (yi[ok], xi[ok]), vals[ok])
        else:  # bilinear splat; length / samples of weight per sample gives ~peak per pixel along the streak
            _splat_into(canvas, xs.ravel(), ys.ravel(), (vals * (lengths[:, None] / samples)).ravel())


def family_rain_layer(shape: tuple[int, int], rng: np.random.Generator, profiles=RAIN_PROFILES) -> np.ndarray:
    """A (H, W) float32 rain layer in [0, 1] from the training family (module docstring)."""
    h, w = shape
    pad = int(RAIN_FAMILY_LENGTH[1]) // 2 + 4
    total = rng.uniform(*RAIN_FAMILY_DENSITY) * (h + 2 * pad) * (w + 2 * pad) / 1e4
    layers = int(rng.integers(1, 4))
    share = rng.dirichlet(np.ones(layers))
    out = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)
    for k in range(layers):
        profile = profiles[int(rng.integers(len(profiles)))]
        canvas = np.zeros_like(out)
        _family_streaks(canvas, int(round(total * share[k])), profile, rng)
        canvas = np.clip(canvas, 0.0, 1.0)
        if profile == "blurred":
            canvas = gaussian_filter(canvas, rng.uniform(0.3, 1.5))
        elif profile == "tapered":
            canvas = gaussian_filter(canvas, rng.uniform(0.0, 0.6))
        out = np.maximum(out, canvas)
    return np.clip(out[pad:pad + h, pad:pad + w], 0.0, 1.0)


def family_rain(img: np.ndarray, rng: np.random.Generator, profiles=RAIN_PROFILES, blends=RAIN_BLENDS,
                haze: float = RAIN_HAZE) -> np.ndarray:
    """The derain training degradation: a family rain layer, screen-blended or added, hazy with probability `haze`."""
    layer = family_rain_layer(img.shape[:2], rng, profiles)
    blend = blends[0] if len(blends) == 1 else ("screen" if rng.random() < 0.6 else "add")
    out = screen(img, layer) if blend == "screen" else np.clip(img + layer[:, :, None], 0.0, 1.0)
    if rng.random() < haze:
        t, airlight = rng.uniform(0.03, 0.2), rng.uniform(0.7, 1.0)
        out = out * (1.0 - t) + t * airlight
    return out.astype(np.float32)


def _subset(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",")) if text.strip() else ()
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"{what}: {', '.join(map(repr, unknown)) or 'none given'}; choose one or more of "
                         f"{', '.join(allowed)}, comma-separated")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: {text!r} names one twice")
    return tuple(n for n in allowed if n in names)  # the family's order, so a spec draws the same whatever its order


def parse_rain_family(profiles: str | None = None, blends: str | None = None, haze: float | None = None) -> dict:
    """``family_rain`` keyword arguments from text: comma-separated profiles and blends, a haze probability;
    None keeps the full family's value. Raises ValueError with a readable message."""
    family = {"profiles": RAIN_PROFILES, "blends": RAIN_BLENDS, "haze": RAIN_HAZE}
    if profiles is not None:
        family["profiles"] = _subset(profiles, RAIN_PROFILES, "rain profiles")
    if blends is not None:
        family["blends"] = _subset(blends, RAIN_BLENDS, "rain blends")
    if haze is not None:
        if not 0.0 <= haze <= 1.0:
            raise ValueError(f"rain haze is a probability in [0, 1], not {haze}")
        family["haze"] = float(haze)
    return family


# ----------------------------------------------------------------------------- dispatch
def degrade(task: str, img: np.ndarray, rng: np.random.Generator, valid: bool = False,
            rain: dict | None = None) -> np.ndarray:
    """Apply `task`'s training degradation. For deblur with valid=True the result is 24 px smaller.
    `rain`: ``family_rain`` keyword arguments (``parse_rain_family``) for derain; None draws the whole family."""
    if task == "denoise":
        return random_noise(img, rng)
    if task == "deblur":
        return random_blur(img, rng, valid=valid)
    if task == "derain":
        return family_rain(img, rng, **(rain or {}))
    raise ValueError(f"unknown task {task!r}")


EVAL_RAIN = ("spec", "heldout", "heldout-thin", "family", *(f"family-{p}" for p in RAIN_PROFILES))


def benchmark_degrade(task: str, img: np.ndarray, seed: int, rain: str = "spec") -> np.ndarray:
    """The fixed evaluation degradation: denoise at sigma 25 (the papers' setting and our target),
    deblur drawn from its training distribution with a per-image `seed`, derain by the spec's renderer
    (`rain="spec"`, ``rain_layer``) or by the separately written one (`rain="heldout"`, or "heldout-thin" for
    its dense 1-px corner of the spec; model/training/heldout_rain.py), which no training draws from.
    `rain="family"` draws the training family itself and "family-<profile>" only its `profile` streaks
    (both blends, haze as in training): how a model does on each part of what it was trained on."""
    rng = np.random.default_rng(seed)
    if task == "denoise":
        return add_noise(img, 25.0, rng)
    if task == "derain":
        if rain in ("heldout", "heldout-thin"):
            from .heldout_rain import heldout_rain

            return heldout_rain(img, rng, thin=rain == "heldout-thin")
        if rain not in EVAL_RAIN:
            raise ValueError(f"unknown rain renderer {rain!r} ({', '.join(EVAL_RAIN)})")
        if rain.startswith("family"):
            return family_rain(img, rng, profiles=RAIN_PROFILES if rain == "family" else (rain.split("-", 1)[1],))
        return random_rain(img, rng)
    return degrade(task, img, rng)
