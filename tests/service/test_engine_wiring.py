"""The service on the engine (model/engine.py): settings reach it, warm-up prepares each shape's batches,
/tasks shows the engine, and its memory report becomes the `mprnet_engine_memory_bytes` gauge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from pydantic import ValidationError

from model.engine import Engine, MemoryUse
from model.engine_api import InferenceEngine
from service.app import create_app
from service.loading import StartupError, load_task
from service.metrics import Metrics
from service.runtime import Service
from service.worker import DeviceWorker
from tests.live_server import metric_value, tiny_weights
from tests.service.conftest import decode, fake_models, png, rand_image, running, test_settings, wait_ready


def test_models_run_on_the_engine_with_the_service_settings(tmp_path):
    settings = test_settings(weights_dir=tiny_weights(tmp_path), max_batch_size=6)
    model = load_task(settings, "derain")
    assert isinstance(model.engine, Engine)
    assert model.engine.settings.max_batch == 6
    engine = model.describe()["engine"]
    assert engine["name"] == "torch"
    assert engine["compile"] == "off" and engine["cuda_graphs"] is False  # auto on the CPU


@pytest.mark.anyio
async def test_the_batcher_hands_batches_ahead_as_configured():
    for ahead in (0, 2):
        app = create_app(test_settings(ui_enabled=False, batches_ahead=ahead), models=fake_models(("deblur",)))
        async with running(app):
            assert app.state.service.batcher.batches_ahead == ahead
    with pytest.raises(ValidationError, match="batches_ahead"):
        test_settings(batches_ahead=-1)


def test_engine_settings_are_checked(tmp_path):
    with pytest.raises(ValidationError, match="compile"):
        test_settings(compile="max-autotune")
    settings = test_settings(weights_dir=tiny_weights(tmp_path), cuda_graphs="on")
    with pytest.raises(StartupError, match="MPRNET_CUDA_GRAPHS='on'.*CUDA"):
        load_task(settings, "derain")


class Recorder(InferenceEngine):
    def __init__(self) -> None:
        self.warmed: list = []

    def run_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def warmup(self, shapes):
        self.warmed.extend(shapes)
        return {}


@pytest.mark.anyio
async def test_warm_up_asks_the_engine_for_the_largest_batch_of_each_shape():
    settings = test_settings(max_batch_size=16, batch_megapixels=0.07, buckets="32,64", tile_size=64)
    recorder = Recorder()
    service = Service(settings, fake_models(("derain",), recorder))
    await service.warm_up()
    # 0.07 MP holds 68 items of 32x32 (capped at 16), 17 of 32x64, 17 of 64x32 (capped), 17 of 64x64 (capped)
    assert recorder.warmed == [(16, h, w) for h, w in service.warmup_shapes()]
    service.worker.close()
    assert Service.max_items(service, (256, 256)) == 1  # 0.07 MP < one 256x256 item: still one


@pytest.mark.anyio
async def test_a_model_without_warmup_runs_one_item():
    seen = []

    class Plain(InferenceEngine):
        def run_batch(self, x):
            seen.append(tuple(x.shape))
            return x

    worker = DeviceWorker({"derain": Plain()}, torch.device("cpu"))
    await worker.warm_up("derain", (32, 64), max_items=8)
    worker.close()
    assert seen == [(1, 3, 32, 64)]


def test_memory_report_becomes_gauges():
    metrics = Metrics(("deblur",))
    metrics.engine_memory_from("deblur", {(4, 256, 512): MemoryUse(123, 45), (1, 32, 32): MemoryUse(None, None)})
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, "mprnet_engine_memory_bytes", task="deblur", shape="512x256", batch="4") == 123
    assert 'shape="32x32"' not in text  # the CPU measures nothing: no made-up zero


@pytest.mark.anyio
async def test_the_openvino_engine_serves_what_torch_serves(tmp_path):
    """MPRNET_ENGINE=openvino with the threads and cache settings; GET /tasks names it; a padded 8-bit request
    and a tiled one answer within one level of the torch engine's answer."""
    pytest.importorskip("openvino")
    cache = tmp_path / "cache"
    # one shape warmed, batches of one: few compiles, so that a loaded 2-core machine is ready within the wait
    common = dict(weights_dir=tiny_weights(tmp_path), ui_enabled=False, tasks="denoise", compile_cache_dir=cache,
                  max_batch_size=1, warmup="minimal")
    ov_model = load_task(test_settings(engine="openvino", **common), "denoise")
    torch_model = load_task(test_settings(engine="torch", **common), "denoise")
    assert ov_model.engine.prepares_shapes and not torch_model.engine.prepares_shapes
    images = [rand_image(45, 61, seed=1), rand_image(100, 70, seed=2)]  # a padded bucket, then 64-pixel tiles
    answers = {}
    for name, model in (("openvino", ov_model), ("torch", torch_model)):
        async with running(create_app(test_settings(engine=name, **common), models={"denoise": model})) as client:
            await wait_ready(client)
            engine = (await client.get("/tasks")).json()["tasks"]["denoise"]["engine"]
            assert engine["name"] == name
            if name == "openvino":
                assert [(s["batch"], s["height"], s["width"]) for s in engine["shapes"]] == [(1, 32, 32)]
            raw = {"content-type": "image/png"}
            answers[name] = [await client.post("/restore/denoise", content=png(a), headers=raw) for a in images]
    assert engine["name"] == "torch" and ov_model.describe()["engine"]["threads"] == 1  # MPRNET_TORCH_THREADS=1
    assert ov_model.describe()["engine"]["cache_dir"] == str((cache / "openvino").resolve())
    for ov, ref, image in zip(answers["openvino"], answers["torch"], images, strict=True):
        assert ov.status_code == ref.status_code == 200
        got, want = decode(ov.content).astype(int), decode(ref.content).astype(int)
        assert got.shape == image.shape and np.abs(got - want).max() <= 1


def test_unknown_engine_is_refused():
    with pytest.raises(ValidationError, match="engine"):
        test_settings(engine="tensorrt")


def test_an_engine_that_compiles_shapes_is_warmed_on_every_shape():
    class Compiling(Recorder):
        prepares_shapes = True

    settings = test_settings(max_batch_size=4, buckets="32,64", tile_size=64)  # MPRNET_WARMUP=auto
    plain = Service(settings, fake_models(("derain",), Recorder()))
    compiling = Service(settings, fake_models(("derain",), Compiling()))
    try:
        assert plain.warmup_shapes() == plain.planner.static_shapes()[:1]  # torch on the CPU: one shape
        assert compiling.warmup_shapes() == compiling.planner.static_shapes()  # OpenVINO: all of them
    finally:
        plain.worker.close()
        compiling.worker.close()
