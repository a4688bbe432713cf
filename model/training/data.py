"""Training and validation data: paired folders, or clean photos degraded on the fly.

Images are float32 numpy arrays ``(H, W, 3)`` in [0, 1]; batches are torch tensors
``(B, 3, P, P)``. Sampling is driven by one ``numpy.random.Generator``, so a seed fixes the data.

Paired layouts found by ``find_pairs(root)`` (searched recursively):

* a folder of degraded images next to a folder of targets, files matched by stem:
  ``input/`` + ``target/`` (Rain13K, MPRNet's own layout), ``blur/`` + ``sharp/`` (GoPro),
  ``noisy/`` + ``gt/``, ``degraded/`` + ``clean/``, ``lq/`` + ``hq/``...;
* SIDD style: ``*NOISY*`` and ``*GT*`` files side by side in one folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .degrade import TASK_MARGIN, degrade

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
DEGRADED_DIRS = ("input", "degraded", "blur", "blurred", "rain", "rainy", "noisy", "lq", "low")
TARGET_DIRS = ("target", "groundtruth", "gt", "sharp", "clean", "norain", "hq", "high")

# scikit-image's bundled photographs with a stated free licence (see model/weights/*.md).
# motorcycle_left/right (Middlebury 2014) are left out: their page states no licence.
TRAIN_PHOTOS = ("astronaut.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "brick.png",
                "grass.png", "gravel.png")
HOLDOUT_PHOTOS = ("coffee.png", "chelsea.png", "rocket.jpg")  # never trained on; validation and evaluation
EVAL_MARKER = "EVALUATION_ONLY.txt"  # written by `mprnet photos --eval-set`: a folder training refuses


def eval_set_marker(folder: str | Path) -> Path | None:
    """The evaluation-set marker in `folder`, in a folder above it or anywhere below it (training reads
    images recursively), or None."""
    folder = Path(folder).absolute()
    for d in (folder, *folder.parents):
        if (d / EVAL_MARKER).is_file():
            return d / EVAL_MARKER
    return next(iter(sorted(folder.rglob(EVAL_MARKER))), None) if folder.is_dir() else None


def load_image(path: str | Path) -> np.ndarray:
    """Any image file -> (H, W, 3) float32 RGB in [0, 1] (grey is replicated, alpha dropped)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return arr


def skimage_photo_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def load_photos(names: Sequence[str]) -> list[np.ndarray]:
    """scikit-image's bundled sample photos by file name (available offline)."""
    root = skimage_photo_dir()
    return [load_image(root / n) for n in names]


def list_images(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def find_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """(degraded, target) file pairs under `root` in any layout listed in the module docstring."""
    root = Path(root)
    pairs: list[tuple[Path, Path]] = []
    for d in sorted(p for p in [root, *root.rglob("*")] if p.is_dir()):
        if d.name.lower() in DEGRADED_DIRS:
            targets = [d.parent / t for t in TARGET_DIRS] + [d.parent / t.upper() for t in TARGET_DIRS]
            target_dir = next((t for t in targets if t.is_dir()), None)
            if target_dir is not None:
                by_stem = {p.stem: p for p in target_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
                pairs += [(p, by_stem[p.stem]) for p in sorted(d.iterdir()) if p.stem in by_stem]
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and "NOISY" in p.name:
                gt = p.with_name(p.name.replace("NOISY", "GT"))
                if gt.is_file():
                    pairs.append((p, gt))
    return pairs


def augment(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip / 90-degree rotation (one of the 8 dihedral transforms) for every array."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(0, 1))
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


def _crop(a: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    return a[y:y + size, x:x + size]


def _random_origin(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


class SyntheticPatches:
    """Random crops of clean images, augmented, then degraded with `task`'s spec (model/training/degrade.py).

    Images smaller than the crop (plus the blur margin) are rejected at construction. Larger images
    are picked with probability proportional to their area, so every pixel is equally likely.
    `rain` restricts the derain family (``degrade.parse_rain_family``); None draws all of it.
    """

    def __init__(self, images: Sequence[np.ndarray], task: str, patch: int, rain: dict | None = None) -> None:
        self.task, self.patch, self.margin, self.rain = task, patch, TASK_MARGIN[task], rain
        need = patch + 2 * self.margin
        small = [i for i, im in enumerate(images) if min(im.shape[:2]) < need]
        if small:
            raise ValueError(f"images {small} are smaller than the {need}-px crop (patch {patch} + blur margin)")
        self.images = list(images)
        area = np.array([im.shape[0] * im.shape[1] for im in images], np.float64)
        self.p = area / area.sum()

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        img = self.images[int(rng.choice(len(self.images), p=self.p))]
        size = self.patch + 2 * self.margin
        (big,) = augment([_crop(img, *_random_origin(*img.shape[:2], size, rng), size)], rng)
        low = degrade(self.task, big, rng, valid=True, rain=self.rain)  # deblur consumes the margin
        m = self.margin
        return low, big[m:m + self.patch, m:m + self.patch]


class PairedPatches:
    """Random aligned crops of (degraded, target) image pairs, augmented identically."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], patch: int) -> None:
        if not pairs:
            raise ValueError("no (degraded, target) pairs found")
        self.pairs = [(load_image(a), load_image(b)) for a, b in pairs]
        for (a, b), (pa, _) in zip(self.pairs, pairs, strict=True):
            if a.shape != b.shape:
                raise ValueError(f"{pa}: degraded {a.shape} and target {b.shape} differ in size")
            if min(a.shape[:2]) < patch:
                raise ValueError(f"{pa} is smaller than the {patch}-px crop")
        self.patch = patch

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        low, high = self.pairs[int(rng.integers(len(self.pairs)))]
        y, x = _random_origin(*low.shape[:2], self.patch, rng)
        low, high = augment([_crop(low, y, x, self.patch), _crop(high, y, x, self.patch)], rng)
        return low, high


def batch(source: SyntheticPatches | PairedPatches, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(degraded, target) tensors of shape (size, 3, P, P), float32 in [0, 1]."""
    lows, highs = zip(*(source.sample(rng) for _ in range(size)), strict=True)
    to_t = lambda xs: torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return to_t(lows), to_t(highs)


def multiscale(images: Sequence[np.ndarray], scales: Sequence[float] = (1.0, 0.5), min_side: int = 128) -> list[np.ndarray]:
    """Add downscaled copies (area-averaged): more textures per pixel from a handful of photos."""
    out = []
    for im in images:
        for s in scales:
            if s == 1.0:
                out.append(im)
                continue
            h, w = int(im.shape[0] * s), int(im.shape[1] * s)
            if min(h, w) >= min_side:
                pil = Image.fromarray((im * 255.0 + 0.5).astype(np.uint8)).resize((w, h), Image.Resampling.BOX)
                out.append(np.asarray(pil, dtype=np.float32) / 255.0)
    return out
