"""`mprnet restore`: files and folders in, same-named files of the same format out; clean errors."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from model.cli import main
from tests.conftest import REPO_ROOT


def _write(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in a fresh interpreter (what a user sees, tracebacks included)."""
    return subprocess.run(
        [sys.executable, "-m", "model", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False
    )


def test_restore_one_file(tmp_path, tiny_checkpoint, photo):
    src = _write(tmp_path / "in" / "photo.png", photo[:20, :30])
    dst = tmp_path / "restored.png"
    proc = _run("restore", "--task", "denoise", "--weights", str(tiny_checkpoint), "--device", "cpu", str(src), "-o", str(dst))
    assert proc.returncode == 0, proc.stderr
    with Image.open(dst) as out:
        assert out.format == "PNG" and out.size == (30, 20) and out.mode == "RGB"
    assert "wrote" in proc.stderr


def test_restore_folder_keeps_names_and_formats(tmp_path, tiny_checkpoint, photo):
    src = tmp_path / "in"
    _write(src / "a.png", photo[:16, :16])
    _write(src / "b.jpg", photo[:24, :17], quality=95)
    _write(src / "sub" / "c.webp", photo[:9, :31])
    _write(src / "d.tiff", np.dstack([photo[:8, :8], np.full((8, 8), 77, np.uint8)]))  # RGBA
    _write(src / "gray16.png", (photo[:10, :12, 0].astype(np.uint16) * 257))  # 16-bit gray
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = main(["restore", "--task", "deblur", "--weights", str(tiny_checkpoint), "--device", "cpu",
               "--tile", "16", "--tile-overlap", "8", str(src), "-o", str(out)])
    assert rc == 0
    produced = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert produced == ["a.png", "b.jpg", "d.tiff", "gray16.png", "sub/c.webp"]
    for name, fmt, size, mode in [("a.png", "PNG", (16, 16), "RGB"), ("b.jpg", "JPEG", (17, 24), "RGB"),
                                  ("sub/c.webp", "WEBP", (31, 9), "RGB"), ("d.tiff", "TIFF", (8, 8), "RGBA"),
                                  ("gray16.png", "PNG", (12, 10), "I;16")]:
        with Image.open(out / name) as im:
            assert (im.format, im.size, im.mode) == (fmt, size, mode), name
    with Image.open(out / "d.tiff") as im:
        assert (np.asarray(im)[..., 3] == 77).all()  # alpha untouched


def test_several_inputs_and_an_unreadable_image(tmp_path, tiny_checkpoint, photo, capsys):
    a = _write(tmp_path / "a.png", photo[:8, :8])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    rc = main(["restore", "--task", "derain", "--weights", str(tiny_checkpoint), "--device", "cpu",
               str(a), str(broken), "-o", str(out)])
    assert rc == 1  # the good image is written, the broken one reported
    assert (out / "a.png").is_file() and not (out / "broken.png").exists()
    assert "skipped" in capsys.readouterr().err


def test_bad_weights_exit_cleanly(tmp_path, photo):
    src = _write(tmp_path / "a.png", photo[:8, :8])
    proc = _run("restore", "--task", "deblur", "--weights", str(tmp_path / "missing.pth"), str(src), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mprnet:") and "not found" in proc.stderr


@pytest.mark.parametrize(
    "content, needle", [(b"\x00" * 100, "not a checkpoint"), (b"PK\x03\x04" + b"\x00" * 60, "truncated or corrupt")]
)
def test_unusable_weights_are_a_message(tmp_path, photo, content, needle):
    src = _write(tmp_path / "a.png", photo[:8, :8])
    (tmp_path / "w.pth").write_bytes(content)
    with pytest.raises(SystemExit) as info:  # SystemExit with a message: printed to stderr, exit status 1
        main(["restore", "--task", "deblur", "--weights", str(tmp_path / "w.pth"), str(src), "-o", str(tmp_path / "out")])
    assert str(info.value.code).startswith("mprnet:") and needle in str(info.value.code)


def test_bad_arguments_exit_cleanly(tmp_path, tiny_checkpoint):
    with pytest.raises(SystemExit, match="no such file"):
        main(["restore", "--task", "deblur", "--weights", str(tiny_checkpoint), str(tmp_path / "nope.png"), "-o", str(tmp_path)])
    with pytest.raises(SystemExit, match="no images"):
        main(["restore", "--task", "deblur", "--weights", str(tiny_checkpoint), str(tmp_path), "-o", str(tmp_path / "o")])
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(SystemExit, match="tile"):
        main(["restore", "--task", "deblur", "--weights", str(tiny_checkpoint), "--tile", "12",
              str(tmp_path / "a.png"), "-o", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as info:
        main(["restore", "--task", "sharpen", str(tmp_path), "-o", str(tmp_path)])
    assert info.value.code == 2  # argparse: invalid choice


def test_default_weights_are_the_bundled_ones(tmp_path, photo, capsys):
    from model.bundled import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "denoise.safetensors").is_file():
        pytest.skip("no bundled denoise weights in this checkout")
    src = _write(tmp_path / "a.png", photo[:24, :24])
    assert main(["restore", "--task", "denoise", "--device", "cpu", str(src), "-o", str(tmp_path / "b.png")]) == 0
    assert "denoise.safetensors" in capsys.readouterr().err
    with Image.open(tmp_path / "b.png") as out:
        assert out.size == (24, 24)


def _restore(*args: str, weights) -> int:
    return main(["restore", "--task", "denoise", "--weights", str(weights), "--device", "cpu", *map(str, args)])


def _png_declaring(width: int, height: int) -> bytes:
    """A 1.8 KB-class PNG whose header says width x height (a decompression bomb to Pillow)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return data[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def test_undecodable_and_oversized_images_are_one_line_each_and_the_run_goes_on(tmp_path, tiny_checkpoint, photo,
                                                                                  capsys):
    src = tmp_path / "in"
    _write(src / "a.png", photo[:8, :8])
    (src / "bomb.png").write_bytes(_png_declaring(60000, 60000))
    (src / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")  # a JPEG cut inside its first segment
    _write(src / "z.png", photo[8:16, :8])
    rc = _restore(src, "-o", tmp_path / "out", weights=tiny_checkpoint)
    err = capsys.readouterr().err
    assert rc == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "z.png"]
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and all(line.startswith("mprnet: skipped ") for line in skipped), err
    assert any("bomb.png" in line for line in skipped) and any("cut.jpg" in line for line in skipped)


def test_output_paths_that_cannot_work_are_refused_before_any_work(tmp_path, photo):
    """One line each, before the weights are even looked for (they do not exist here)."""
    a = _write(tmp_path / "in" / "a.png", photo[:8, :8])
    _write(tmp_path / "in" / "b.png", photo[:8, :8])
    (tmp_path / "taken.txt").write_text("a file")
    (tmp_path / "looks.png").mkdir()
    cases = [
        ((tmp_path / "in", "-o", tmp_path / "taken.txt"), "is an existing file"),
        ((a, "-o", tmp_path / "looks.png"), "is a folder"),
        ((tmp_path / "in", "-o", tmp_path / "new.png"), "names a file, but 2 images"),
        ((a, "-o", tmp_path / "taken.txt" / "x.png"), "is a file, not a folder"),
        ((tmp_path / "in", "-o", tmp_path / "in"), "would overwrite the input"),
        ((a, "-o", a), "would overwrite the input"),
        ((a, _write(tmp_path / "other" / "a.png", photo[:8, :8]), "-o", tmp_path / "out"), "would both be written"),
    ]
    for args, words in cases:
        with pytest.raises(SystemExit) as info:
            _restore(*args, weights=tmp_path / "missing.pth")
        assert str(info.value.code).startswith("mprnet: ") and words in str(info.value.code), (args, info.value.code)
        assert "\n" not in str(info.value.code)
    assert not (tmp_path / "out").exists() and not (tmp_path / "new.png").exists()


def test_overwrite_lets_outputs_replace_inputs(tmp_path, tiny_checkpoint, photo):
    a = _write(tmp_path / "a.png", photo[:16, :16])
    before = a.read_bytes()
    assert _restore(a, "-o", a, "--overwrite", weights=tiny_checkpoint) == 0
    assert a.read_bytes() != before and not list(tmp_path.glob(".*partial"))
    with Image.open(a) as out:
        assert out.size == (16, 16)


def test_a_write_that_fails_is_one_line_and_the_run_goes_on(tmp_path, tiny_checkpoint, photo, capsys):
    src = tmp_path / "in"
    _write(src / "sub" / "a.png", photo[:8, :8])
    _write(src / "b.png", photo[:8, :8])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file where a folder is needed")
    assert _restore(src, "-o", tmp_path / "out", weights=tiny_checkpoint) == 1
    assert (tmp_path / "out" / "b.png").is_file()
    failures = [line for line in capsys.readouterr().err.splitlines() if "could not write" in line]
    assert len(failures) == 1 and failures[0].startswith("mprnet: could not write")


def test_deep_grey_tiff_to_png(tmp_path, tiny_checkpoint):
    """A 32-bit integer TIFF written as a PNG: 16-bit grey (Pillow cannot write mode I as PNG)."""
    src = tmp_path / "deep.tif"
    Image.fromarray((np.arange(16 * 16).reshape(16, 16) * 200).astype(np.int32)).save(src)
    assert _restore(src, "-o", tmp_path / "deep.png", weights=tiny_checkpoint) == 0
    with Image.open(tmp_path / "deep.png") as out:
        assert out.mode == "I;16" and out.size == (16, 16)


def test_restore_on_the_openvino_engine_matches_torch(tmp_path, tiny_checkpoint, photo, capsys):
    pytest.importorskip("openvino")
    src = _write(tmp_path / "in.png", photo[:61, :45])
    common = ["restore", "--task", "denoise", "--weights", str(tiny_checkpoint), "--device", "cpu", "--tile", "32",
              "--tile-overlap", "8", "--cache-dir", str(tmp_path / "cache"), str(src)]
    assert main([*common, "--engine", "openvino", "-o", str(tmp_path / "ov.png")]) == 0
    assert "(openvino, fp32)" in capsys.readouterr().err
    assert main([*common, "--engine", "torch", "-o", str(tmp_path / "torch.png")]) == 0
    ov, ref = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("ov.png", "torch.png"))
    assert ov.shape == (61, 45, 3) and np.abs(ov - ref).max() <= 1  # tiled: 32-pixel tiles


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_writes_a_dynamic_model_and_its_card(tmp_path, tiny_checkpoint, fmt):
    ov = pytest.importorskip("openvino")
    import json

    import torch

    from model.checkpoint import load_mprnet

    out = tmp_path / "export"
    assert main(["export", "--task", "derain", "--weights", str(tiny_checkpoint), "--format", fmt, "-o", str(out)]) == 0
    card = json.loads((out / "mprnet-derain.model-card.json").read_text())
    assert card["format"] == fmt and card["onnx_opset"] == 17 and card["input"]["range"] == [0.0, 1.0]
    assert "multiples of 8" in card["padding"] and card["config"]["n_feat"] == 8
    assert "licence" in card["weights_licence"]
    model_file = out / card["files"][0]
    assert model_file.suffix == (".onnx" if fmt == "onnx" else ".xml")
    assert all((out / f).is_file() for f in card["files"])
    compiled = ov.Core().compile_model(str(model_file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    net = load_mprnet(tiny_checkpoint).eval()
    for shape in [(1, 3, 32, 48), (2, 3, 56, 40)]:  # any batch, height and width (multiples of 8)
        x = torch.rand(shape)
        with torch.inference_mode():
            want = net(x)[0].clamp(0, 1).numpy()
        assert np.abs(compiled(x.numpy())[0] - want).max() <= 1e-4


def test_export_of_the_bundled_weights_names_their_licence(tmp_path):
    pytest.importorskip("openvino")
    import json

    assert main(["export", "--task", "derain", "--format", "onnx", "-o", str(tmp_path)]) == 0
    card = json.loads((tmp_path / "mprnet-derain.model-card.json").read_text())
    assert card["weights_licence"].startswith("Apache-2.0") and card["weights"].endswith("derain.safetensors")
