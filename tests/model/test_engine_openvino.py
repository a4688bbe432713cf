"""The OpenVINO engine against the torch engine: parity in float and 8 bits, at padded sizes and through
tiling, for the tiny configuration, the bundled weights and the released configurations (random
weights, small images); static shapes, chunked batches, the on-disk cache, and the engine choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.arch import MPRNet
from model.bundled import bundled_weights
from model.checkpoint import load_mprnet
from model.engine_api import InferenceEngine, TileSettings, build_engine, resolve_engine
from model.images import from_tensor, to_float, to_tensor
from model.variants import TASKS, TINY, VARIANTS

pytest.importorskip("openvino")
from model.engine_openvino import OpenVINOEngine  # noqa: E402 - needs openvino

FLOAT_TOL = 1e-4
TILES = TileSettings(size=48, overlap=16, batch=2)


def _net(name: str) -> torch.nn.Module:
    if name == "tiny":
        torch.manual_seed(7)
        return MPRNet(**TINY)
    if name.startswith("bundled-"):
        return load_mprnet(bundled_weights(name.removeprefix("bundled-")))
    torch.manual_seed(11)
    return MPRNet(**VARIANTS[name.removeprefix("released-")])  # default-init random weights


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[InferenceEngine, InferenceEngine]]:
    """name -> (torch engine, OpenVINO engine) on the same weights; built once per module (exports take seconds)."""
    cache = tmp_path_factory.mktemp("engine-cache")
    built = {}

    def get(name: str) -> tuple[InferenceEngine, InferenceEngine]:
        if name not in built:
            net = _net(name)
            built[name] = (
                build_engine(net, "torch", device="cpu", precision="fp32", tiles=TILES),
                build_engine(net, "openvino", device="cpu", precision="fp32", tiles=TILES, threads=1, cache_dir=str(cache),
                             max_batch=4),
            )
        return built[name]

    return get


MODELS = ["tiny", *(f"bundled-{t}" for t in TASKS), *(f"released-{t}" for t in TASKS)]


@pytest.mark.parametrize("name", MODELS)
def test_float_parity_at_a_padded_size_and_through_tiling(pairs, name):
    torch_engine, ov_engine = pairs(name)
    gen = torch.Generator().manual_seed(3)
    whole = torch.rand(3, 61, 45, generator=gen)  # padded to 64x48 inside restore_tensor
    torch.testing.assert_close(ov_engine.restore_tensor(whole), torch_engine.restore_tensor(whole), atol=FLOAT_TOL, rtol=0)
    if name.startswith("released-"):
        return  # the wide configurations: one size is enough on 2 cores
    tiled = torch.rand(3, 70, 100, generator=gen)  # 48-pixel tiles, two to a batch
    torch.testing.assert_close(ov_engine.restore_tensor(tiled), torch_engine.restore_tensor(tiled), atol=FLOAT_TOL, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "bundled-denoise", "released-derain"])
def test_uint8_items_within_one_level_and_float_items_within_tolerance(pairs, name):
    """The service's path: 8- and 16-bit items in one batch of 3 (runs as static batches 2 + 1)."""
    torch_engine, ov_engine = pairs(name)
    gen = torch.Generator().manual_seed(5)
    eight = [torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8, generator=gen) for _ in range(2)]
    items = [eight[0], torch.rand(3, 64, 48, generator=gen), eight[1]]
    got, want = ov_engine.run_items(items), torch_engine.run_items(items)
    assert [g.dtype for g in got] == [torch.uint8, torch.float32, torch.uint8]
    for g, w in zip(got, want, strict=True):
        if g.dtype == torch.uint8:
            assert (g.int() - w.int()).abs().max() <= 1
        else:
            torch.testing.assert_close(g, w, atol=FLOAT_TOL, rtol=0)


def test_whole_image_restore_in_8_bits(pairs, photo):
    torch_engine, ov_engine = pairs("bundled-denoise")
    a, b = np.asarray(ov_engine.restore(photo[:61, :45])), np.asarray(torch_engine.restore(photo[:61, :45]))
    assert a.shape == (61, 45, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_warm_up_compiles_the_static_batches_and_batches_run_in_chunks(pairs):
    _, ov_engine = pairs("tiny")
    done = ov_engine.warmup([(3, 32, 40)])
    assert set(done) == {(1, 32, 40), (2, 32, 40)}  # batch sizes up to the one that holds 3
    assert ov_engine._chunks(7) == [4, 2, 1] and ov_engine._chunks(3) == [2, 1]
    x = torch.rand(7, 3, 32, 40)
    y = ov_engine.run_batch(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    for k in (0, 4, 6):  # each row is computed on its own: the same answer alone
        torch.testing.assert_close(ov_engine.run_batch(x[k : k + 1])[0], y[k], atol=1e-6, rtol=0)
    shapes = {(s["batch"], s["height"], s["width"]) for s in ov_engine.describe()["shapes"]}
    assert {(4, 32, 40), (2, 32, 40), (1, 32, 40)} <= shapes
    assert ov_engine.describe()["name"] == "openvino" and ov_engine.describe()["precision_hint"] == "f32"


def test_bad_input_is_a_clear_error(pairs):
    _, ov_engine = pairs("tiny")
    with pytest.raises(ValueError, match="multiples of 8"):
        ov_engine.run_batch(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        ov_engine.warmup([(1, 30, 32)])


def test_a_restart_reuses_the_export_and_the_compiled_shapes(tmp_path, monkeypatch):
    net = _net("tiny")
    first = OpenVINOEngine(net, threads=1, cache_dir=tmp_path, max_batch=1)
    first.warmup([(1, 32, 32)])
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1
    blobs = sorted((tmp_path / "openvino").glob("*.blob"))
    assert blobs, "OpenVINO kept no compiled blob"

    def no_export(model):
        raise AssertionError("exported again despite the cache")

    monkeypatch.setattr("model.export.onnx_bytes", no_export)
    second = OpenVINOEngine(net, threads=1, cache_dir=tmp_path, max_batch=1)
    second.warmup([(1, 32, 32)])
    assert sorted((tmp_path / "openvino").glob("*.blob")) == blobs  # the same shape: no new blob
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(second.run_batch(x), first.run_batch(x))
    other = MPRNet(**TINY)  # other weights: another export
    with pytest.raises(AssertionError, match="exported again"):
        OpenVINOEngine(other, cache_dir=tmp_path)


def test_engine_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_engine("auto", cpu) == "openvino"
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_engine("openvino", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown engine"):
        resolve_engine("tensorrt", cpu)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert resolve_engine("auto", cpu) == "torch"  # not installed: torch, not an error
    with pytest.raises(ValueError, match=r"pip install 'mprnet-serve\[openvino\]'"):
        resolve_engine("openvino", cpu)


def test_precision_choices():
    with pytest.raises(ValueError, match="fp16"):
        OpenVINOEngine(MPRNet(**TINY), precision="fp16")
    with pytest.raises(ValueError, match="threads"):
        OpenVINOEngine(MPRNet(**TINY), threads=-1)


def test_float_items_round_like_the_float_path(pairs):
    """An 8-bit item through run_items equals the float path converted on the host, to one level."""
    _, ov_engine = pairs("tiny")
    image = np.random.default_rng(2).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    x, meta = to_tensor(image, keep_uint8=True)
    (eight,) = ov_engine.run_items([x])
    float_path = from_tensor(ov_engine.run_batch(to_float(x)[None])[0], meta)
    assert np.abs(from_tensor(eight, meta).astype(int) - float_path.astype(int)).max() == 0
