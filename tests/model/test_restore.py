"""`Restorer.restore`: any size, bit depth and mode in; the same out; padding and clamping as the release."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from model.images import for_format, from_tensor, to_8bit, to_float, to_tensor, to_uint8
from model.inference import Restorer, TileSettings, resolve_device, resolve_precision
from model.tiling import pad_to, pad_to_multiple

RNG = np.random.default_rng(0)


def _random(shape, dtype=np.uint8) -> np.ndarray:
    return RNG.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def _restorer(model: nn.Module, tile: int = 512) -> Restorer:
    return Restorer(model, device="cpu", precision="fp32", tiles=TileSettings(tile, 16, 4))


class Invert(nn.Module):
    """Changes every colour value (so alpha passing through untouched means something)."""

    def forward(self, x: Tensor) -> list[Tensor]:
        return [1 - x]


class Wild(nn.Module):
    """Returns values far outside [0, 1]."""

    def forward(self, x: Tensor) -> list[Tensor]:
        return [x * 4 - 2]


# ---------------------------------------------------------------- arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize(
    "shape", [(13, 21), (13, 21, 1), (13, 21, 2), (13, 21, 3), (13, 21, 4)], ids=["HxW", "gray", "LA", "RGB", "RGBA"]
)
def test_arrays_round_trip_exactly(identity, dtype, shape):
    image = _random(shape, dtype)
    out = _restorer(identity).restore(image)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == shape
    assert np.array_equal(out, image)
    assert identity.calls == [(1, 3, 16, 24)]  # RGB, padded to multiples of 8


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [2, 4])
def test_alpha_passes_through_bit_exactly(dtype, channels):
    image = _random((11, 9, channels), dtype)
    out = _restorer(Invert()).restore(image)
    assert np.array_equal(out[..., -1], image[..., -1])
    top = np.iinfo(dtype).max
    assert np.array_equal(out[..., :-1], top - image[..., :-1])  # the colour went through the model


def test_gray_is_replicated_to_rgb_and_averaged_back():
    seen: list[Tensor] = []

    class SwapAndRecord(nn.Module):
        def forward(self, x: Tensor) -> list[Tensor]:
            seen.append(x.clone())
            # R gets 1, G keeps, B gets 0: the mean of (1, v, 0) is (1 + v) / 3
            return [torch.cat([torch.ones_like(x[:, :1]), x[:, 1:2], torch.zeros_like(x[:, :1])], dim=1)]

    gray = _random((8, 8))
    out = _restorer(SwapAndRecord()).restore(gray)
    x = seen[0]
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray replicated
    assert np.array_equal(out, np.rint((255 + gray.astype(np.float64)) / 3).astype(np.uint8))


def test_output_is_clamped():
    image = _random((8, 16, 3))
    out = _restorer(Wild()).restore(image)
    assert set(np.unique(out)) <= set(range(256))
    expected = np.clip(np.rint((image / 255.0 * 4 - 2) * 255), 0, 255)
    assert np.array_equal(out, expected.astype(np.uint8))


@pytest.mark.parametrize("bad, error", [
    (np.zeros((4, 4, 3), np.float32), TypeError),
    (np.zeros((4, 4, 3), np.int16), TypeError),
    (np.zeros((4, 4, 5), np.uint8), ValueError),
    (np.zeros((0, 4, 3), np.uint8), ValueError),
    (np.zeros((2, 4, 4, 3), np.uint8), ValueError),
])
def test_unsupported_arrays_are_refused(identity, bad, error):
    with pytest.raises(error):
        _restorer(identity).restore(bad)


# ---------------------------------------------------------------- PIL images


def _pil(mode: str, photo: np.ndarray) -> Image.Image:
    rgb = Image.fromarray(photo[:21, :34])
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 256 + 3)
    if mode == "P":
        return rgb.quantize(64)
    if mode == "P-transparent":
        img = rgb.quantize(64)
        img.info["transparency"] = 5
        return img
    if mode == "RGBA" or mode == "LA":
        base = np.asarray(rgb.convert(mode)).copy()
        base[..., -1] = _random(base.shape[:2])
        return Image.fromarray(base)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16", "I", "P", "P-transparent", "CMYK", "1"])
def test_pil_modes_come_back_in_the_same_mode_and_size(identity, photo, mode):
    image = _pil(mode, photo)
    out = _restorer(identity).restore(image)
    assert isinstance(out, Image.Image)
    assert out.size == image.size and out.mode == image.mode
    if mode == "P-transparent":  # a new palette with alpha in it: alpha exact, colours within the quantizer's error
        a, b = np.asarray(out.convert("RGBA")).astype(int), np.asarray(image.convert("RGBA")).astype(int)
        assert (b[..., 3] == 0).any() and np.array_equal(a[..., 3], b[..., 3])
        assert np.abs(a[..., :3] - b[..., :3]).mean() < 4
    elif image.mode in ("P", "CMYK"):  # compared in the colours they stand for (<= 256 colours: exact)
        assert np.array_equal(np.asarray(out.convert("RGBA")), np.asarray(image.convert("RGBA")))
    else:
        assert np.array_equal(np.asarray(out), np.asarray(image))


def test_wide_and_other_colour_modes(identity, photo):
    """Mode I and F hold 16-bit levels (F: 0..1), restored in their mode; YCbCr and LAB come back as RGB,
    premultiplied La as LA; values those modes cannot mean are a ValueError that says what was found."""
    levels = photo[..., 0].astype(np.int32) * 257
    out = _restorer(identity).restore(Image.fromarray(levels))
    assert out.mode == "I" and np.array_equal(np.asarray(out), levels)
    floats = (levels / 65535.0).astype(np.float32)
    out = _restorer(identity).restore(Image.fromarray(floats))
    assert out.mode == "F" and np.abs(np.asarray(out) - floats).max() <= 0.5 / 65535 + 1e-7
    rgb = Image.fromarray(photo)
    for mode in ("YCbCr", "LAB"):
        image = rgb.convert(mode)
        out = _restorer(identity).restore(image)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(image.convert("RGB")))
    la = Image.fromarray(np.dstack([photo[..., 0], np.full(photo.shape[:2], 255, np.uint8)])).convert("La")
    out = _restorer(identity).restore(la)
    assert out.mode == "LA" and np.array_equal(np.asarray(out), np.asarray(la.convert("LA")))
    with pytest.raises(ValueError, match=r"-1\.\."):
        _restorer(identity).restore(Image.fromarray(levels - 1))
    with pytest.raises(ValueError, match="0..1"):
        _restorer(identity).restore(Image.fromarray(floats * 2))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_for_format_gives_every_mode_a_mode_the_format_stores(fmt, tmp_path, photo):
    grey = photo[..., 0]
    modes = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB")
    images = [Image.fromarray(photo).convert(m) for m in modes]
    images += [Image.fromarray(grey.astype(np.uint16) * 257), Image.fromarray(grey.astype(np.int32) * 257),
               Image.fromarray((grey / 255.0).astype(np.float32))]
    for image in images:
        saved = for_format(image, fmt)
        saved.save(tmp_path / f"x.{fmt.lower()}", fmt)
        with Image.open(tmp_path / f"x.{fmt.lower()}") as back:
            shown = np.asarray(to_8bit(back).convert("RGBA").convert("L")).astype(int)
        meant = grey if image.mode in ("I;16", "I", "F") else np.asarray(image.convert("RGBA").convert("L"))
        assert np.abs(shown - meant).mean() < 10, (fmt, image.mode)  # JPEG's loss on a palette image: about 7


def test_pil_alpha_is_untouched_by_the_model(photo):
    image = _pil("RGBA", photo)
    out = _restorer(Invert()).restore(image)
    assert np.array_equal(np.asarray(out)[..., 3], np.asarray(image)[..., 3])
    assert np.array_equal(np.asarray(out)[..., :3], 255 - np.asarray(image)[..., :3])


def test_to_tensor_contract():
    x, meta = to_tensor(_random((5, 7, 3), np.uint16))
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32 and x.is_contiguous()
    assert 0 <= x.min() and x.max() <= 1
    assert isinstance(from_tensor(x, meta), np.ndarray)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16"])
def test_uint8_tensors_stand_for_their_float_equivalent(mode):
    """keep_uint8 keeps 8-bit pixels as they are; from_tensor answers a uint8 result as it would x / 255."""
    if mode == "I;16":
        image = Image.fromarray(_random((9, 14), np.uint16))
    else:
        image = Image.fromarray(_random((9, 14, 4)), "RGBA").convert(mode)
    x8, meta8 = to_tensor(image, keep_uint8=True)
    xf, metaf = to_tensor(image)
    eight_bit = mode != "I;16"
    assert x8.shape == (3, 9, 14) and x8.is_contiguous() and x8.dtype == (torch.uint8 if eight_bit else torch.float32)
    assert xf.dtype == torch.float32 and torch.equal(to_float(x8), xf) and meta8.pil_mode == metaf.pil_mode == mode
    restored = to_uint8(Wild()(xf)[0])  # any 8-bit result, as the service's device path hands it over
    out8, outf = from_tensor(restored, meta8), from_tensor(to_float(restored), meta8)
    assert out8.mode == outf.mode == mode and np.array_equal(np.asarray(out8), np.asarray(outf))


def test_grey_from_uint8_rounds_like_the_float_mean():
    """A grey caller's answer is the mean of three channels: the uint8 path's integer rounding must match
    round(255 * mean) of the float path for every triple of levels."""
    levels = torch.arange(256, dtype=torch.uint8)
    g, b = torch.meshgrid(levels, levels, indexing="ij")
    meta = to_tensor(np.zeros((1, 1), np.uint8))[1]
    for r in range(0, 256, 5):
        x = torch.stack([torch.full_like(g, r), g, b])  # (3, 256, 256): every (g, b) with this r
        assert np.array_equal(from_tensor(x, meta), from_tensor(to_float(x), meta)), r


def test_uint8_results_are_copied_and_rounded_half_to_even():
    x, meta = to_tensor(np.full((1, 1, 3), 7, np.uint8), keep_uint8=True)
    out = from_tensor(x, meta)
    out[0, 0, 0] = 0
    assert x[0, 0, 0] == 7  # the answer is a new array, also when the tensor is already (H, W, C)-contiguous
    values = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5, 254.5 / 255, 1.0, 3.0])
    expected = np.rint(np.clip(values.numpy(), 0, 1) * np.float32(255))
    assert to_uint8(values).tolist() == expected.tolist()
    assert torch.equal(to_uint8(to_uint8(values)), to_uint8(values)) and torch.equal(to_float(to_float(values)), values)
    for convert in (to_float, to_uint8):
        with pytest.raises(TypeError, match="uint8 pixel values"):
            convert(torch.zeros(3, dtype=torch.int32))


# ---------------------------------------------------------------- sizes and padding


@pytest.mark.parametrize("size", [(1, 1), (3, 50), (50, 3), (7, 9), (4000, 8), (8, 8), (9, 8)])
def test_any_size_restores(identity, size):
    image = _random((*size, 3))
    out = _restorer(identity, tile=4096).restore(image)  # whole image, no tiling
    assert np.array_equal(out, image)
    (shape,) = identity.calls
    assert shape[2] % 8 == 0 and shape[3] % 8 == 0
    assert shape[2] - size[0] < 8 and shape[3] - size[1] < 8  # padded to the next multiple only


def test_pad_reflects_then_replicates():
    row = torch.tensor([[[10.0, 20.0, 30.0]]])  # (1, 1, 3)
    padded = pad_to(row, 1, 8)
    # reflection reaches size-1 = 2 pixels (20, 10), then the edge pixel repeats
    assert padded.tolist() == [[[10, 20, 30, 20, 10, 10, 10, 10]]]
    col = row.transpose(1, 2)  # (1, 3, 1): height 3, width 1
    assert pad_to(col, 8, 2)[0, :, 0].tolist() == [10, 20, 30, 20, 10, 10, 10, 10]
    assert pad_to(col, 8, 2)[0, :, 1].tolist() == pad_to(col, 8, 2)[0, :, 0].tolist()  # 1 wide: replicate only
    assert pad_to(torch.tensor([[[5.0]]]), 8, 8).unique().tolist() == [5.0]  # 1x1: replicate only
    long = torch.arange(12.0).view(1, 1, 12)
    assert pad_to_multiple(long)[0, 0, 12:].tolist() == [10, 9, 8, 7]  # pure reflection (no edge repeat)


def test_pad_batch_and_integer_tensors():
    x = torch.randint(0, 255, (2, 3, 5, 6), dtype=torch.uint8)
    y = pad_to_multiple(x)
    assert y.shape == (2, 3, 8, 8) and y.dtype == torch.uint8
    assert torch.equal(y[..., :5, :6], x)
    assert torch.equal(y[..., 5, :6], x[..., 3, :6])  # reflected row
    with pytest.raises(ValueError):
        pad_to(x, 4, 8)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (5, 1), (2, 3), (5, 6), (9, 40)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.uint16])
def test_integer_padding_gives_the_float_paths_pixels(size, dtype):
    """uint8 (the service's 8-bit images) is padded as it is, uint16 through float: the same pixels either way."""
    x = torch.randint(0, 256, (3, *size)).to(dtype)
    for height, width in [(8, 8), (64, 48), (size[0], 40)]:
        y = pad_to(x, max(height, size[0]), max(width, size[1]))
        assert y.dtype == dtype
        assert torch.equal(y.long(), pad_to(x.float(), *y.shape[1:]).long())


def test_restore_pads_the_model_input_by_reflection(photo):
    seen: list[Tensor] = []

    class Record(nn.Module):
        def forward(self, x: Tensor) -> list[Tensor]:
            seen.append(x.clone())
            return [x]

    image = photo[:3, :50]
    _restorer(Record()).restore(image)
    x = seen[0][0]  # (3, 8, 56)
    rows = (x[0, :, 0] * 255).round().tolist()
    col0 = image[:, 0, 0].tolist()
    assert rows == col0 + [col0[1], col0[0]] + [col0[0]] * 3
    cols = (x[0, 0, 48:] * 255).round().tolist()
    assert cols == image[0, 48:50, 0].tolist() + image[0, 43:49, 0][::-1].tolist()


# ---------------------------------------------------------------- the run_batch contract, device and precision


def test_run_batch_contract(identity):
    r = _restorer(identity)
    x = torch.rand(3, 3, 16, 8)
    y = r.run_batch(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device == x.device
    assert torch.equal(y, x)
    y = _restorer(Wild()).run_batch(x)
    assert y.min() >= 0 and y.max() <= 1


def test_model_runs_in_eval_and_inference_mode():
    states = []

    class Check(nn.Module):
        def forward(self, x: Tensor) -> list[Tensor]:
            states.append((self.training, torch.is_inference_mode_enabled(), x.requires_grad))
            return [x]

    model = Check().train()
    _restorer(model).restore(_random((4, 4, 3)))
    assert states == [(False, True, False)]


def test_bf16_on_cpu_is_close_to_fp32(tiny_checkpoint, photo):
    from model.checkpoint import load_mprnet

    image = photo[:16, :24]
    fp32 = Restorer(load_mprnet(tiny_checkpoint), device="cpu", precision="fp32").restore(image)
    bf16 = Restorer(load_mprnet(tiny_checkpoint), device="cpu", precision="bf16").restore(image)
    assert np.abs(fp32.astype(int) - bf16.astype(int)).mean() < 4


@pytest.mark.parametrize("capability, precision", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, precision):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    assert resolve_precision("auto", torch.device("cuda:1")) == precision  # V100 and T4: fp16; A100, H100: bf16
    assert asked == [torch.device("cuda:1")]  # that GPU's, not the current one's
    assert resolve_precision("bf16", torch.device("cuda:1")) == "bf16"  # asked for: kept


def test_device_and_precision_settings():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", torch.device("cpu"))
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_a_cuda_device_is_resolved_with_its_index(monkeypatch):
    """Threads set the engine's device as current; torch.cuda.set_device refuses one without an index."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.gpu
@pytest.mark.parametrize("precision, tol", [("fp32", 2 / 255), ("bf16", 6 / 255), ("fp16", 3 / 255)])
def test_cuda_matches_cpu(tiny_checkpoint, photo, precision, tol):
    from model.checkpoint import load_mprnet

    x = torch.from_numpy(photo[:32, :48].astype(np.float32) / 255).permute(2, 0, 1).contiguous()
    cpu = Restorer(load_mprnet(tiny_checkpoint), device="cpu", precision="fp32").restore_tensor(x)
    cuda = Restorer(load_mprnet(tiny_checkpoint), device="cuda", precision=precision)
    assert cuda.channels_last
    out = cuda.restore_tensor(x.cuda())
    assert out.device.type == "cuda"
    assert (out.cpu() - cpu).abs().mean() < tol
