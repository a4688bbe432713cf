"""8-bit pixels travel as uint8 from decode to the device and back: decode keeps them uint8 (16-bit
stays float), the planner pads and tiles them as they are, the device worker scales them on the device
and rounds the answers there, and the answer is what the old all-float path gave (bit for bit for a
bucket, within 1 LSB for blended tiles), also through the real tiny MPRNet."""

from __future__ import annotations

import asyncio
import io

import anyio
import numpy as np
import pytest
import torch
from PIL import Image

from model.images import from_tensor, to_float, to_tensor, to_uint8
from service import codec
from service.app import create_app
from service.loading import load_task
from service.planner import Planner
from service.worker import DeviceWorker
from tests.service.conftest import FakeModel, decode, fake_app, png, rand_image, running, test_settings, until, wait_ready

RAW = {"content-type": "image/png"}


def deep_grey(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (h, w), dtype=np.uint16)


# ---------------------------------------------------------------- decode and encode


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P"])
def test_8_bit_images_decode_to_uint8_channels_first(mode):
    alpha = mode in ("LA", "RGBA")
    img = Image.fromarray(rand_image(9, 13, seed=1, channels=4 if alpha else 3)).convert(mode)
    decoded = codec.decode(_encoded(img), max_pixels=10_000)
    rgb = np.asarray(img.convert("RGB")) if mode != "LA" else np.repeat(np.asarray(img)[:, :, :1], 3, axis=2)
    assert decoded.image.dtype == torch.uint8 and decoded.image.shape == (3, 9, 13) and decoded.image.is_contiguous()
    assert np.array_equal(decoded.image.permute(1, 2, 0).numpy(), rgb)  # grey broadcast to 3 channels
    assert decoded.meta.dtype == np.uint8 and decoded.meta.pil_mode == mode
    assert (decoded.meta.alpha is not None) == alpha


def test_16_bit_images_decode_to_float():
    deep = deep_grey(7, 5, seed=2)
    decoded = codec.decode(png(deep), max_pixels=10_000)
    assert decoded.image.dtype == torch.float32 and decoded.meta.dtype == np.uint16
    assert torch.allclose(decoded.image, torch.from_numpy(deep.astype(np.float32) / 65535).expand(3, 7, 5))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P"])
def test_a_uint8_answer_encodes_as_its_float_equivalent(fmt, mode):
    """The same bytes whether the worker hands back uint8 or the float it stands for (PNG: the fast writer
    for all but P)."""
    img = Image.fromarray(rand_image(11, 10, seed=3, channels=4), "RGBA").convert(mode)
    decoded = codec.decode(_encoded(img), max_pixels=10_000)
    answer = to_uint8(1 - to_float(decoded.image))  # any restored image
    as_uint8 = codec.encode(answer, decoded, fmt, None)
    assert as_uint8 == codec.encode(to_float(answer), decoded, fmt, None)
    out = Image.open(io.BytesIO(as_uint8))
    if fmt == "png":
        expected = from_tensor(to_float(answer), decoded.meta)
        assert out.mode == mode and np.array_equal(np.asarray(out), np.asarray(expected))


def _encoded(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- planner


@pytest.mark.parametrize(("h", "w"), [(40, 50), (100, 150), (3, 200)])
def test_uint8_images_are_padded_and_tiled_as_uint8_with_the_float_paths_pixels(h, w):
    planner = Planner(((32, 32), (64, 64)), tile_size=64, overlap=16)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    plan, reference = planner.plan(image), planner.plan(to_float(image))
    assert plan.inputs.dtype == torch.uint8 and plan.shape == reference.shape and plan.tiles == reference.tiles
    assert torch.equal(to_float(plan.inputs), reference.inputs)
    back = plan.assemble(list(plan.inputs))  # identity model
    assert torch.equal(to_uint8(back), image)
    assert back.dtype == (torch.uint8 if plan.tiles is None else torch.float32)  # tiles are blended in float
    smaller = planner.smaller(image, plan)
    assert smaller is not None and smaller.inputs.dtype == torch.uint8
    assert torch.equal(to_uint8(smaller.assemble(list(smaller.inputs))), image)


# ---------------------------------------------------------------- device worker


class Recording(FakeModel):
    """Records the dtype and range of every batch it is given; answers 0.8 - 0.6 x (changes every level)."""

    def __init__(self, fn=None) -> None:
        super().__init__(fn or (lambda x: 0.8 - 0.6 * x))
        self.seen: list[tuple[torch.dtype, float, float]] = []

    def run_batch(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.dtype, float(x.min()), float(x.max())))
        return super().run_batch(x)


@pytest.mark.anyio
async def test_worker_scales_uint8_on_the_device_and_answers_in_the_items_dtype():
    model = Recording()
    worker = DeviceWorker({"a": model}, torch.device("cpu"))
    eight = [torch.full((3, 8, 8), v, dtype=torch.uint8) for v in (0, 255, 128)]
    deep = torch.full((3, 8, 8), 0.3)
    try:
        results = await worker.run("a", [eight[0], deep, eight[1], eight[2]])  # 8- and 16-bit items in one batch
    finally:
        worker.close()
    assert model.seen == [(torch.float32, 0.0, 1.0)]  # one float batch in [0, 1]
    (batch,) = model.batches
    assert torch.equal(batch[1], deep) and torch.equal(batch[3], to_float(eight[2]))  # each item in its place
    assert [r.dtype for r in results] == [torch.uint8, torch.float32, torch.uint8, torch.uint8]
    for item, result in zip([eight[0], deep, eight[1], eight[2]], results, strict=True):
        expected = 0.8 - 0.6 * to_float(item)
        assert torch.equal(result, to_uint8(expected) if item.dtype == torch.uint8 else expected)


def oom_over(pixels: int):
    def fn(x):
        if x.shape[0] * x.shape[2] * x.shape[3] > pixels:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return 1 - x

    return fn


@pytest.mark.anyio
async def test_worker_splits_a_mixed_batch_on_out_of_memory_and_keeps_each_items_dtype():
    model = Recording(oom_over(64))  # one 8x8 item at a time
    worker = DeviceWorker({"a": model}, torch.device("cpu"))
    items = [torch.full((3, 8, 8), 10 * k, dtype=torch.uint8) if k % 2 else torch.full((3, 8, 8), k / 10) for k in range(4)]
    try:
        results = await worker.run("a", items)
    finally:
        worker.close()
    assert [len(b) for b in model.batches] == [4, 2, 1, 1, 2, 1, 1]  # 4 and both 2s ran out of memory
    assert all(dtype == torch.float32 and 0 <= lo <= hi <= 1 for dtype, lo, hi in model.seen)
    for item, result in zip(items, results, strict=True):
        assert result.dtype == item.dtype
        assert torch.equal(result, to_uint8(1 - to_float(item)) if item.dtype == torch.uint8 else 1 - item)


# ---------------------------------------------------------------- through the service


@pytest.mark.anyio
async def test_8_and_16_bit_requests_batched_together_each_get_their_own_answer():
    model = FakeModel(lambda x: 1 - x)
    async with fake_app(model) as (client, _, app):
        warm_up = len(model.batches)
        model.gate.clear()
        model.entered.clear()
        first = asyncio.create_task(client.post("/restore/deblur", content=png(rand_image(8, 8, seed=99)), headers=RAW))
        await anyio.to_thread.run_sync(model.entered.wait)  # the device is busy: the next two queue together
        eight, deep = rand_image(20, 30, seed=4), deep_grey(18, 22, seed=5)
        answers = [asyncio.create_task(client.post("/restore/deblur", content=png(a), headers=RAW)) for a in (eight, deep)]
        await until(lambda: app.state.service.batcher.depth() >= 2)
        model.gate.set()
        assert (await first).status_code == 200
        r8, r16 = [await a for a in answers]
    assert [len(b) for b in model.batches[warm_up:]] == [1, 2]  # the first request, then both together
    assert model.batches[-1].dtype == torch.float32 and 0 <= model.batches[-1].min() and model.batches[-1].max() <= 1
    assert r8.status_code == 200 and r16.status_code == 200
    assert np.array_equal(decode(r8.content), 255 - eight)
    assert Image.open(io.BytesIO(r16.content)).mode == "I;16" and np.array_equal(decode(r16.content), 65535 - deep)


@pytest.mark.anyio
async def test_out_of_memory_re_plans_an_8_bit_image_into_smaller_tiles():
    model = FakeModel(lambda x: 1 - x)
    async with fake_app(model) as (client, _, _):
        warm_up = len(model.batches)
        model.fn = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("fake")) if x.shape[-1] > 32 else 1 - x
        image = rand_image(40, 50, seed=6)
        r = await client.post("/restore/deblur", content=png(image), headers=RAW)
    assert r.status_code == 200, r.text
    assert np.abs(decode(r.content).astype(int) - (255 - image.astype(int))).max() == 0  # a linear model blends back exactly
    assert [(b.shape, b.dtype) for b in model.batches[warm_up:]] == [
        ((1, 3, 64, 64), torch.float32),
        ((4, 3, 32, 32), torch.float32),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(("h", "w", "tiled"), [(40, 50, False), (100, 150, True)])
async def test_tiny_mprnet_answers_as_the_float_path_did(weights_dir, h, w, tiled):
    """The real tiny network through the service, against the old all-float path computed by hand: the
    same planner on the float image, float outputs assembled, converted once at the end."""
    settings = test_settings(weights_dir=weights_dir, ui_enabled=False, tasks="denoise")
    model = load_task(settings, "denoise")
    image = rand_image(h, w, seed=h)
    x, meta = to_tensor(image)  # float32, as decode gave before
    plan = Planner(settings.buckets, settings.tile_size, settings.tile_overlap).plan(x)
    assert (plan.tiles is not None) == tiled
    reference = from_tensor(plan.assemble(list(model.engine.run_batch(plan.inputs))), meta)
    app = create_app(settings, models={"denoise": model})
    async with running(app) as client:
        await wait_ready(client)
        r = await client.post("/restore/denoise", content=png(image), headers=RAW)
    assert r.status_code == 200, r.text
    got = decode(r.content)
    assert got.shape == image.shape and not np.array_equal(got, image)  # the network changed it
    diff = np.abs(got.astype(int) - reference.astype(int))
    # one bucket item: the same float output, rounded the same way on the device: bit for bit. Tiles are
    # rounded before blending: at most 1 LSB.
    assert diff.max() <= (1 if tiled else 0), f"max difference {diff.max()} LSB"
