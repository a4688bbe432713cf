"""The Open Inference Protocol routes in-process with a fake (identity) model: the same service behind
them as behind /restore (readiness, auth, 429, deadlines, drain, disconnects, metrics), and its errors
in the protocol's shape."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import struct
import zlib

import anyio
import numpy as np
import pytest

from service.app import create_app
from service.errors import ServiceError
from service.http_io import inflate
from tests.live_server import metric_value
from tests.service.conftest import (
    FakeModel,
    asgi_call,
    decode,
    fake_app,
    fake_models,
    png,
    rand_image,
    running,
    test_settings,
)
from tests.service.test_api import RAW, as_tensor, dropped_when_gone, occupy, until

pytestmark = pytest.mark.anyio
IMG = rand_image(20, 30, seed=1)
SHORT = (
    b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 3], "parameters": {"binary_data_size": 3}}]}'
)


def binary_request(pixels: np.ndarray, outputs=("restored",), **parameters) -> tuple[bytes, dict[str, str]]:
    head = {
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": list(pixels.shape),
                "parameters": {"binary_data_size": pixels.nbytes},
            }
        ],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs],
        "parameters": parameters,
    }
    text = json.dumps(head).encode()
    return text + pixels.tobytes(), {
        "inference-header-content-length": str(len(text)),
        "content-type": "application/octet-stream",
    }


def split(response) -> tuple[dict, bytes]:
    n = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:n]), response.content[n:]


def error_of(response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


async def test_identity_model_gives_the_pixels_back_in_both_forms():
    async with fake_app() as (client, _, _):
        body, headers = binary_request(IMG, ("restored", "restored_file"))
        r = await client.post("/v2/models/deblur/infer", content=body, headers={**headers, "X-Request-ID": "v2-1"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream", r.text
        assert r.headers["x-request-id"] == "v2-1" and "inference;dur=" in r.headers["server-timing"]
        doc, rest = split(r)
        pixels_out, file_out = doc["outputs"]
        assert pixels_out["shape"] == [20, 30, 3] and pixels_out["datatype"] == "UINT8"
        n = pixels_out["parameters"]["binary_data_size"]
        assert np.array_equal(np.frombuffer(rest[:n], np.uint8).reshape(20, 30, 3), IMG)
        (length,) = struct.unpack("<I", rest[n : n + 4])
        assert length == file_out["parameters"]["binary_data_size"] - 4 and np.array_equal(decode(rest[n + 4 :]), IMG)
        plain = {
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [20, 30, 3], "data": IMG.tolist()}],
            "id": "x",
        }
        r = await client.post("/v2/models/deblur/infer", json=plain)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert "inference-header-content-length" not in r.headers
        doc = r.json()
        assert doc["id"] == "x" and doc["model_name"] == "deblur"
        assert np.array_equal(np.array(doc["outputs"][0]["data"], np.uint8).reshape(20, 30, 3), IMG)


async def test_files_in_answer_files_as_restore_does():
    async with fake_app() as (client, _, _):
        images = [rand_image(9, 7, seed=2), rand_image(5, 11, seed=3, channels=4)]  # RGBA keeps its alpha
        files = [base64.b64encode(png(a)).decode() for a in images]
        request = {"inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [2], "data": files}]}
        r = await client.post("/v2/models/denoise/infer", json=request)
        assert r.status_code == 200, r.text
        (out,) = r.json()["outputs"]
        assert out["name"] == "restored_file" and out["shape"] == [2]
        for data, image in zip(out["data"], images, strict=True):
            ours = await client.post("/restore/denoise", content=png(image), headers=RAW)
            assert base64.b64decode(data) == ours.content and np.array_equal(decode(ours.content), image)
        request["outputs"] = [{"name": "restored"}]
        r = await client.post("/v2/models/denoise/infer", json=request)
        assert r.status_code == 400 and "one size" in error_of(r)


async def test_a_batch_is_batched_and_answered_in_order():
    async with fake_app() as (client, model, _):
        batch = np.stack([rand_image(16, 16, seed=s) for s in range(4)])
        model.batches.clear()
        body, headers = binary_request(batch)
        r = await client.post("/v2/models/derain/infer", content=body, headers=headers)
        doc, rest = split(r)
        assert doc["outputs"][0]["shape"] == [4, 16, 16, 3]
        assert np.array_equal(np.frombuffer(rest, np.uint8).reshape(batch.shape), batch)
        assert len(model.batches) < 4  # the request's images shared batches


@pytest.mark.parametrize(
    ("body", "headers", "says"),
    [
        (b"{", {}, "not valid JSON"),
        (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 3], "data": [0, 0, 0]}]}', {}, "FP32"),
        (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 3], "data": [0, 0]}]}', {}, "holds 2"),
        (SHORT, {"inference-header-content-length": str(len(SHORT))}, "only 0 remain"),
        (b"{}", {"inference-header-content-length": "-1"}, "non-negative integer"),
        (b'{"inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}', {}, "base64"),
        (
            b'{"inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}]}',
            {},
            "not an image",
        ),
    ],
)
async def test_bad_requests_are_400_in_the_protocols_shape(body, headers, says):
    async with fake_app() as (client, _, _):
        r = await client.post("/v2/models/deblur/infer", content=body, headers=headers)
        assert r.status_code == 400 and says in error_of(r), r.text
        text = (await client.get("/metrics")).text
        assert metric_value(text, "mprnet_requests_total", task="deblur", status="400", protocol="v2") == 1
        assert metric_value(text, "mprnet_rejected_total", task="deblur", reason="bad_input") == 1


async def test_limits_auth_and_unknown_models():
    async with fake_app(max_upload_bytes=4096, max_batch_size=2, api_token="s3cret") as (client, _, _):
        auth = {"Authorization": "Bearer s3cret"}
        body, headers = binary_request(rand_image(40, 40, seed=4))
        r = await client.post("/v2/models/deblur/infer", content=body, headers={**headers, **auth})
        assert r.status_code == 413 and "limit" in error_of(r)
        body, headers = binary_request(np.zeros((3, 4, 4, 3), np.uint8))
        r = await client.post("/v2/models/deblur/infer", content=body, headers={**headers, **auth})
        assert r.status_code == 400 and "at most 2" in error_of(r)
        r = await client.post("/v2/models/deblur/infer", content=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and error_of(r)
        assert (await client.get("/v2/models/deblur", headers=auth)).status_code == 200
        assert (await client.get("/v2/models/deblur")).status_code == 401
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}  # health needs no token
        r = await client.post("/v2/models/dehaze/infer", content=body, headers={**headers, **auth})
        assert r.status_code == 404 and "dehaze" in error_of(r)
        assert (await client.get("/v2/models/dehaze/ready")).status_code == 404
        r = await client.post("/v2/models/deblur/versions/1/infer", content=body, headers={**headers, **auth})
        assert r.status_code == 404 and "version" in error_of(r)


async def test_not_ready_and_draining_are_503():
    model = FakeModel()
    model.gate.clear()  # warm-up blocks in the model
    app = create_app(test_settings(ui_enabled=False), models=fake_models(model=model))
    async with running(app) as client:
        assert (await client.get("/v2/health/ready")).status_code == 503
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        r = await client.get("/v2/models/deblur/ready")
        assert r.status_code == 503 and r.json() == {"name": "deblur", "ready": False}
        body, headers = binary_request(IMG)
        r = await client.post("/v2/models/deblur/infer", content=body, headers=headers)
        assert r.status_code == 503 and "warming up" in error_of(r) and r.headers["retry-after"]
        model.gate.set()
        with anyio.fail_after(20):
            while (await client.get("/v2/models/deblur/ready")).status_code != 200:
                await anyio.sleep(0.01)
        app.state.service.start_drain()
        assert (await client.get("/v2/health/ready")).status_code == 503
        r = await client.post("/v2/models/deblur/infer", content=body, headers=headers)
        assert r.status_code == 503 and "shutting down" in error_of(r)


async def test_deadlines_from_the_parameter_or_the_header_are_504_and_never_computed():
    async with fake_app() as (client, model, _):
        first = await occupy(client, model)
        late = rand_image(24, 24, seed=5)
        body, headers = binary_request(late, timeout=200_000)  # microseconds
        r = await client.post("/v2/models/deblur/infer", content=body, headers=headers)
        assert r.status_code == 504 and "deadline" in error_of(r)
        body, headers = binary_request(late)
        r = await client.post("/v2/models/deblur/infer", content=body, headers={**headers, "X-Request-Timeout": "0.2"})
        assert r.status_code == 504
        model.gate.set()
        assert (await first).status_code == 200
        assert not model.saw(as_tensor(late))


async def test_full_queue_is_429_before_the_body_is_read():
    async with fake_app(queue_max_requests=1) as (client, model, app):
        first = await occupy(client, model)
        body, headers = binary_request(IMG)
        queued = asyncio.create_task(client.post("/v2/models/deblur/infer", content=body, headers=headers))
        await until(lambda: app.state.service.batcher.depth() == 1)
        r = await client.post("/v2/models/denoise/infer", content=body, headers=headers)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and error_of(r)
        model.gate.set()
        assert (await first).status_code == 200 and (await queued).status_code == 200


async def test_openapi_documents_the_routes_and_the_page_is_unchanged():
    app = create_app(test_settings(), models=fake_models())
    async with running(app) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
        for path in (
            "/v2",
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/{task}",
            "/v2/models/{task}/ready",
            "/v2/models/{task}/infer",
        ):
            assert path in paths, path
        infer = paths["/v2/models/{task}/infer"]["post"]
        assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
        assert infer["responses"]["400"]["content"]["application/json"]["schema"]["required"] == ["error"]
        assert not any("{path}" in p for p in paths)
        page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]


async def test_a_drain_that_begins_while_the_body_arrives_still_serves_every_image():
    async with fake_app() as (_, _, app):
        service = app.state.service
        body, headers = binary_request(np.stack([rand_image(8, 8, seed=s) for s in range(3)]))
        body_ready = anyio.Event()
        call, sent = asgi_call(app, "/v2/models/deblur/infer", body, headers, body_ready)
        await until(lambda: service._in_flight == 1)  # admitted, reading its body
        service.start_drain()
        body_ready.set()
        with anyio.fail_after(20):
            await call
        assert sent[0]["status"] == 200, sent
        assert await service.wait_idle(5)


async def test_a_client_gone_while_queued_is_dropped_before_compute():
    gone_images = np.stack([rand_image(16, 16, seed=s) for s in (6, 7)])
    body, headers = binary_request(gone_images)
    text = await dropped_when_gone("/v2/models/deblur/infer", body, headers, list(gone_images))
    assert metric_value(text, "mprnet_requests_total", task="deblur", status="499", protocol="v2") == 1
    assert metric_value(text, "mprnet_rejected_total", task="deblur", reason="disconnected") == 1


def test_inflate_undoes_gzip_and_deflate_within_the_limit():
    data = b"pixels " * 1000
    assert inflate(gzip.compress(data), "gzip", len(data)) == data
    assert inflate(zlib.compress(data), "deflate", len(data)) == data
    with pytest.raises(ServiceError) as info:
        inflate(gzip.compress(data), "gzip", len(data) - 1)  # a bomb stops at the limit
    assert info.value.status == 413
    with pytest.raises(ServiceError) as info:
        inflate(gzip.compress(data)[:-20], "gzip", len(data))
    assert info.value.status == 400 and "ends before" in info.value.detail
    with pytest.raises(ServiceError) as info:
        inflate(b"not gzip", "gzip", 100)
    assert info.value.status == 400 and "could not be inflated" in info.value.detail
    with pytest.raises(ServiceError) as info:
        inflate(data, "br", 10_000)
    assert info.value.status == 415 and "gzip, deflate" in info.value.detail


async def test_a_compressed_request_is_inflated_and_counted_inflated():
    async with fake_app() as (client, _, app):
        body, headers = binary_request(IMG)
        r = await client.post(
            "/v2/models/deblur/infer", content=gzip.compress(body), headers={**headers, "content-encoding": "gzip"}
        )
        doc, rest = split(r)
        assert r.status_code == 200 and np.array_equal(np.frombuffer(rest, np.uint8).reshape(IMG.shape), IMG)
        assert app.state.service.uploads.used == 0  # given back
        r = await client.post("/v2/models/deblur/infer", content=body, headers={**headers, "content-encoding": "br"})
        assert r.status_code == 415 and "Content-Encoding" in error_of(r)
