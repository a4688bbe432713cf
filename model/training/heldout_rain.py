"""A second rain renderer, written apart from model/training/degrade.py, for validation only.

It follows the same published spec as ``degrade.rain_layer`` (3-40 streaks per 10,000 px, length
10-40 px, within +/-30 degrees of vertical, width 1-3 px, peak 0.5-1.0, dimmer towards the ends,
softened by a Gaussian of sigma 0.5-1.0 px, screen blend, grey) but draws it differently, so that a
model that scores well on it has learned rain rather than one renderer's habits:

* each streak is a line segment drawn by its exact distance field (anti-aliased box profile across
  the streak) instead of splatted sample points;
* brightness falls off along the streak as a parabola (not a sine), overlapping streaks take the
  maximum (not the sum), and streaks are softened by a separable kernel built here;
* the streak angles scatter normally (sd 3 degrees) around the image's dominant angle, and each
  image draws its widths from its own mix, so some images have only thin streaks.

``thin=True`` draws the corner of the spec that a model trained on one renderer missed most often:
only 1-px streaks, dense (25-40 per 10,000 px), barely softened (sigma 0.5-0.7).

No training code imports this module; ``benchmark_degrade(..., rain="heldout")`` and
``mprnet train``'s second validation score use it.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import convolve1d

DENSITY = (3.0, 40.0)  # streak centres per 10,000 px of the image and its margin
LENGTH = (10.0, 40.0)
MAX_ANGLE = 30.0
PEAK = (0.5, 1.0)
SOFTEN = (0.5, 1.0)


def _soften(layer: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    return convolve1d(convolve1d(layer, kernel, axis=0, mode="nearest"), kernel, axis=1, mode="nearest")


def _draw_segment(layer: np.ndarray, x0: float, y0: float, x1: float, y1: float, width: float, peak: float) -> None:
    h, w = layer.shape
    reach = width / 2.0 + 1.0
    left, right = int(max(0, np.floor(min(x0, x1) - reach))), int(min(w, np.ceil(max(x0, x1) + reach) + 1))
    top, bottom = int(max(0, np.floor(min(y0, y1) - reach))), int(min(h, np.ceil(max(y0, y1) + reach) + 1))
    if left >= right or top >= bottom:
        return
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float64)
    dx, dy = x1 - x0, y1 - y0
    span2 = dx * dx + dy * dy
    u = np.clip(((xx - x0) * dx + (yy - y0) * dy) / span2, 0.0, 1.0)  # position along the segment, 0..1
    dist = np.hypot(xx - (x0 + u * dx), yy - (y0 + u * dy))
    across = np.clip(width / 2.0 + 0.5 - dist, 0.0, 1.0)  # box of `width` px with a 1-px anti-aliased edge
    along = 1.0 - (2.0 * u - 1.0) ** 2 * 0.8  # parabola: full brightness mid-streak, 20 % at the ends
    patch = layer[top:bottom, left:right]
    np.maximum(patch, peak * across * along, out=patch)


def heldout_layer(shape: tuple[int, int], rng: np.random.Generator, thin: bool = False) -> np.ndarray:
    """A (H, W) float32 rain layer in [0, 1]."""
    h, w = shape
    margin = LENGTH[1] / 2.0  # centres also fall just outside the image, so streaks enter across its edges
    density = rng.uniform(25.0, DENSITY[1]) if thin else rng.uniform(*DENSITY)
    count = int(round(density * (h + 2 * margin) * (w + 2 * margin) / 1e4))
    dominant = rng.uniform(-MAX_ANGLE + 6.0, MAX_ANGLE - 6.0)
    mix = np.array([1.0, 0.0, 0.0]) if thin else rng.dirichlet(np.ones(3))  # this image's share of 1, 2 and 3 px
    layer = np.zeros((h, w), np.float64)
    for _ in range(count):
        theta = np.radians(np.clip(dominant + rng.normal(0.0, 3.0), -MAX_ANGLE, MAX_ANGLE))
        half = rng.uniform(*LENGTH) / 2.0
        cx, cy = rng.uniform(-margin, w + margin), rng.uniform(-margin, h + margin)
        ex, ey = np.sin(theta) * half, np.cos(theta) * half
        width = float(rng.choice([1, 2, 3], p=mix))
        _draw_segment(layer, cx - ex, cy - ey, cx + ex, cy + ey, width, rng.uniform(*PEAK))
    sigma = rng.uniform(SOFTEN[0], 0.7) if thin else rng.uniform(*SOFTEN)
    return np.clip(_soften(layer, sigma), 0.0, 1.0).astype(np.float32)


def heldout_rain(img: np.ndarray, rng: np.random.Generator, thin: bool = False) -> np.ndarray:
    """Rain from this renderer screen-blended onto `img` ((H, W, 3) float32 in [0, 1])."""
    rain = heldout_layer(img.shape[:2], rng, thin)[:, :, None]
    return (1.0 - (1.0 - img) * (1.0 - rain)).astype(np.float32)
