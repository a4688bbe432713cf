"""JPEG scans that end early: libjpeg fills the missing blocks with grey and only warns (Pillow drops the
warning), even when the cut file still ends with an EOI marker. A single-scan JPEG is decoded with its
scan followed by bits that are no Huffman code (structure.check), so a short scan runs out of data:
400. Valid JPEGs, whatever their bottom rows hold, decode to exactly Pillow's pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import codec, structure
from service.errors import ServiceError
from tests.service import crafted
from tests.service.conftest import fake_app

pytestmark = pytest.mark.anyio
CAP = 25_000_000
EOI = b"\xff\xd9"


def photo(h: int, w: int, seed: int = 0, grey: bool = False) -> np.ndarray:
    """Smooth gradients plus noise: compresses like a photo (random pixels would make every block large)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.sin(x / 7.0)[..., None] * 60 + np.cos(y / 11.0)[..., None] * 50 + 128 + rng.normal(0, 12, (h, w, 3))
    arr = np.clip(base, 0, 255).astype(np.uint8)
    return arr[:, :, 0] if grey else arr


def grey_bottom() -> np.ndarray:
    arr = photo(96, 80)
    arr[40:] = 128  # exactly what libjpeg writes for missing blocks
    return arr


def jpeg(arr: np.ndarray | Image.Image, **save) -> bytes:
    return crafted.encoded(arr, "JPEG", **save)


def cmyk() -> bytes:
    return jpeg(Image.fromarray(photo(40, 48)).convert("CMYK"), quality=90)


def scan_end(data: bytes) -> int:
    """Where the entropy-coded data of a single-scan JPEG ends (its EOI)."""
    assert data.count(b"\xff\xda") == 1 and data.endswith(EOI)
    return len(data) - 2


def cut(data: bytes, keep: int) -> bytes:
    """The file cut `keep` bytes into its scan data, closed with EOI again."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    assert start + keep < scan_end(data)
    return data[: start + keep] + EOI


VALID = {
    "baseline-420": jpeg(photo(101, 203), quality=75),
    "baseline-444-q95": jpeg(photo(64, 48), quality=95, subsampling=0),
    "baseline-422-optimized": jpeg(photo(57, 90), quality=85, subsampling=1, optimize=True),
    "restart-every-block": jpeg(photo(120, 88), quality=85, restart_marker_blocks=1),
    "restart-every-7-blocks": jpeg(photo(120, 88), quality=85, restart_marker_blocks=7),
    "restart-every-row": jpeg(photo(120, 88), quality=85, restart_marker_rows=1),
    "progressive": jpeg(photo(101, 203), quality=90, progressive=True),
    "grey-L": jpeg(photo(50, 70, grey=True), quality=80),
    "cmyk": cmyk(),
    "grey-bottom-rows": jpeg(grey_bottom(), quality=90),
    "all-grey": jpeg(np.full((64, 64, 3), 128, np.uint8)),
    "one-pixel": jpeg(photo(1, 1)),
    "odd-size": jpeg(photo(9, 17), quality=100),
}


@pytest.mark.parametrize("data", VALID.values(), ids=VALID.keys())
def test_valid_jpegs_decode_to_pillows_pixels(data):
    decoded = codec.decode(data, CAP)
    with Image.open(io.BytesIO(data)) as img:
        expected = np.asarray(img.convert("L" if img.mode == "L" else "RGB"))
    got = decoded.image.permute(1, 2, 0).numpy()
    assert np.array_equal(got if expected.ndim == 3 else got[:, :, 0], expected)


def test_only_single_scan_sequential_jpegs_are_fed_without_their_end():
    assert structure.check(VALID["baseline-420"]) == VALID["baseline-420"][:-2] + structure.JPEG_SCAN_TAIL
    for other in (VALID["progressive"], crafted.encoded(photo(8, 8), "PNG")):
        assert structure.check(other) is other


def test_a_complete_scan_without_eoi_decodes():
    """Some writers leave EOI out; the scan is whole, so the pixels are (Pillow refused these before)."""
    data = VALID["baseline-420"]
    assert np.array_equal(codec.decode(data[:-2], CAP).image, codec.decode(data, CAP).image)


SHORT = ["baseline-420", "baseline-444-q95", "baseline-422-optimized", "restart-every-7-blocks", "grey-L", "cmyk"]


@pytest.mark.parametrize("name", SHORT)
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_a_scan_cut_short_and_closed_with_eoi_is_400(name, fraction):
    data = VALID[name]
    sos = data.find(b"\xff\xda")
    bad = cut(data, int((scan_end(data) - sos - 20) * fraction))
    Image.open(io.BytesIO(bad)).load()  # what made this a gap: Pillow decodes it without a word, grey rows and all
    for candidate in (bad, bad[:-2]):  # closed with EOI, or simply cut
        with pytest.raises(ServiceError) as info:
            codec.decode(candidate, CAP)
        assert info.value.status == 400 and "image data ends early" in info.value.detail, info.value.detail
        assert "203x101" in info.value.detail or name != "baseline-420"


@pytest.mark.parametrize("name", ["baseline-444-q95", "restart-every-block", "grey-L", "grey-bottom-rows"])
def test_every_cut_is_refused_or_loses_only_the_last_blocks(name):
    """Cut anywhere in the scan and closed with EOI: 400, except a cut in the last block or two, whose missing
    codes the tail's 64 bits can stand in for. Those lose detail in those blocks (and the pixel next to them,
    through chroma upsampling), never rows: the intact file's pixels everywhere else."""
    data = VALID[name]
    intact = codec.decode(data, CAP).image
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    height, width = intact.shape[1:]
    accepted = []
    for keep in range(0, scan_end(data) - start):
        try:
            decoded = codec.decode(cut(data, keep), CAP).image
        except ServiceError as e:
            assert e.status == 400 and ("ends early" in e.detail or "declares" in e.detail), (keep, e.detail)
            continue
        accepted.append(scan_end(data) - start - keep)
        changed = np.argwhere((decoded != intact).any(dim=0).numpy())
        assert (changed >= [height - 17, width - 33]).all(), (keep, changed.min(axis=0))
    assert len(accepted) < 40 and all(before <= 40 for before in accepted), accepted


async def test_the_api_answers_400_for_a_short_scan_and_200_for_grey_rows():
    data = VALID["baseline-420"]
    headers = {"content-type": "image/jpeg"}
    async with fake_app() as (client, _, _):
        bad = await client.post("/restore/denoise", content=cut(data, 1500), headers=headers)
        good = await client.post("/restore/denoise", content=VALID["grey-bottom-rows"], headers=headers)
    assert bad.status_code == 400 and bad.json()["code"] == "bad_input", bad.text
    assert "image data ends early" in bad.json()["detail"]
    assert good.status_code == 200, good.text
