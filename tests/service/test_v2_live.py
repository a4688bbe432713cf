"""The Open Inference Protocol (KServe v2) with the clients platform teams use, against a real
`python -m service` on 127.0.0.1 (tiny random weights): NVIDIA's `tritonclient[http]` (sync and asyncio)
and KServe's own REST client. Results must equal what POST /restore/{task} answers for the same image."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest

from tests.live_server import LiveServer, live_server
from tests.service.conftest import decode, png, rand_image

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.http import aio as triton_aio  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
TASK = "denoise"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("v2")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer):
    c = tritonclient_http.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


def restored_by_our_api(server: LiveServer, image: np.ndarray | bytes, task: str = TASK, **params) -> bytes:
    data = image if isinstance(image, bytes) else png(image)
    r = httpx.post(
        f"{server.url}/restore/{task}", content=data, headers={"content-type": "image/png"}, params=params, timeout=120
    )
    assert r.status_code == 200, r.text
    return r.content


def pixel_input(images: np.ndarray, binary: bool):
    tensor = tritonclient_http.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def file_input(files: list[bytes], binary: bool):
    tensor = tritonclient_http.InferInput("image_file", [len(files)], "BYTES")
    # JSON strings cannot carry arbitrary bytes: in the JSON form, files travel as base64
    elements = files if binary else [base64.b64encode(f) for f in files]
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return tensor


def wanted(*names: str, binary: bool):
    return [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in names]


def files_of(result, binary: bool) -> list[bytes]:
    elements = result.as_numpy("restored_file").ravel().tolist()
    return [bytes(e) if binary else base64.b64decode(e) for e in elements]


# ---- health and metadata ----------------------------------------------------------------------


def test_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(TASK) and not client.is_model_ready("dehaze")
    meta = client.get_server_metadata()
    assert meta["name"] == "mprnet-serve" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(TASK)
    assert model["name"] == TASK and model["platform"] == "pytorch"
    assert {(t["name"], t["datatype"]): t["shape"] for t in model["inputs"]} == {
        ("image", "UINT8"): [-1, -1, -1, 3],
        ("image_file", "BYTES"): [-1],
    }
    assert {t["name"] for t in model["outputs"]} == {"restored", "restored_file"}
    ours = httpx.get(server.url + "/tasks", timeout=30).json()["tasks"][TASK]
    assert model["weights"]["sha256"] == ours["weights"]["sha256"] and len(model["weights"]["sha256"]) == 64
    assert model["configuration"] == ours["model"] and model["engine"]["device"] == "cpu"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("dehaze")
    assert info.value.status() == "404" and "dehaze" in info.value.message()


# ---- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_pixels_in_pixels_and_file_out_equal_our_api(client, server, binary):
    image = rand_image(40, 56, seed=7)
    expected_file = restored_by_our_api(server, image)
    result = client.infer(
        TASK, [pixel_input(image, binary)], outputs=wanted("restored", "restored_file", binary=binary)
    )
    pixels = result.as_numpy("restored")
    assert pixels.dtype == np.uint8 and pixels.shape == image.shape
    assert np.array_equal(pixels, decode(expected_file))
    assert files_of(result, binary) == [expected_file]
    assert result.get_response()["model_name"] == TASK


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_files_in_of_different_sizes_equal_our_api(client, server, binary):
    images = [rand_image(33, 21, seed=1), rand_image(48, 64, seed=2)]
    files = [png(a) for a in images]
    result = client.infer(TASK, [file_input(files, binary)], outputs=wanted("restored_file", binary=binary))
    assert files_of(result, binary) == [restored_by_our_api(server, f) for f in files]


def test_a_batch_of_pixels_and_the_default_outputs(client, server):
    batch = np.stack([rand_image(32, 32, seed=s) for s in (3, 4, 5)])
    result = client.infer(TASK, [pixel_input(batch, True)])  # no outputs named: the input's kind, binary
    out = result.as_numpy("restored")
    assert out.shape == batch.shape and result.as_numpy("restored_file") is None
    for i, image in enumerate(batch):
        # the three were batched together here, alone through our API: at most one grey level apart
        assert np.abs(out[i].astype(int) - decode(restored_by_our_api(server, image)).astype(int)).max() <= 1


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, server, algorithm):
    image = rand_image(20, 28, seed=12)
    result = client.infer(
        TASK,
        [pixel_input(image, True)],
        outputs=wanted("restored", binary=True),
        request_compression_algorithm=algorithm,
    )
    assert np.array_equal(result.as_numpy("restored"), decode(restored_by_our_api(server, image)))


def test_jpeg_output_format_parameter(client, server):
    image = rand_image(24, 24, seed=9)
    outputs = [tritonclient_http.InferRequestedOutput("restored_file", binary_data=True)]
    result = client.infer(
        TASK, [pixel_input(image, True)], outputs=outputs, parameters={"format": "jpeg", "quality": 70}
    )
    (jpeg,) = files_of(result, True)
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert jpeg == restored_by_our_api(server, image, format="jpeg", quality=70)


def test_concurrent_async_infers_each_get_their_own_answer(server):
    images = [rand_image(32, 32, seed=20 + i) for i in range(6)]

    async def run_all():
        async with triton_aio.InferenceServerClient(url=server.url.removeprefix("http://"), conn_timeout=120) as aio:
            calls = []
            for image in images:
                tensor = triton_aio.InferInput("image", list(image.shape), "UINT8")
                tensor.set_data_from_numpy(image, binary_data=True)
                calls.append(
                    aio.infer(TASK, [tensor], outputs=[triton_aio.InferRequestedOutput("restored", binary_data=True)])
                )
            return await asyncio.gather(*calls)

    results = [r.as_numpy("restored") for r in asyncio.run(run_all())]
    alone = [decode(restored_by_our_api(server, image)) for image in images]
    for i, (got, own) in enumerate(zip(results, alone, strict=True)):
        assert np.abs(got.astype(int) - own.astype(int)).max() <= 1, f"image {i} got another image's answer"
    assert len({a.tobytes() for a in alone}) == len(images)


def test_errors_come_in_the_protocols_shape(client, server):
    wrong = tritonclient_http.InferInput("image", [2, 2, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer(TASK, [wrong])
    assert info.value.status() == "400" and "UINT8" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer(TASK, [file_input([b"not an image"], True)])
    assert info.value.status() == "400" and "not an image" in info.value.message()
    # a deadline of 1 microsecond (Triton's unit) cannot be met: refused at admission (429) or, if admitted,
    # before compute (504)
    with pytest.raises(InferenceServerException) as info:
        client.infer(TASK, [pixel_input(rand_image(8, 8, seed=1), True)], timeout=1)
    assert info.value.status() in ("429", "504") and "deadline" in info.value.message()
    r = httpx.post(f"{server.url}/v2/models/{TASK}/infer", content=b'{"inputs": 3}', timeout=30)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.get(f"{server.url}/v2/models/{TASK}/versions/1", timeout=30)
    assert r.status_code == 404 and "version" in r.json()["error"]
    assert server.metric("mprnet_requests_total", task=TASK, status="400", protocol="v2") >= 2
    assert server.metric("mprnet_requests_total", task=TASK, status="200", protocol="native") >= 1


def test_kserve_sdk_rest_client(server):
    kserve = pytest.importorskip("kserve")
    image = rand_image(30, 20, seed=11)

    async def run():
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=120))
        try:
            assert await client.is_server_ready(server.url) and await client.is_server_live(server.url)
            assert await client.is_model_ready(server.url, TASK)
            tensor = kserve.InferInput("image", list(image.shape), "UINT8")
            tensor.set_data_from_numpy(image, binary_data=True)
            request = kserve.InferRequest(model_name=TASK, infer_inputs=[tensor])
            return await client.infer(server.url, request, model_name=TASK)
        finally:
            await client.close()

    response = asyncio.run(run())
    (out,) = response.outputs
    assert out.name == "restored" and np.array_equal(out.as_numpy(), decode(restored_by_our_api(server, image)))
