"""The Open Inference Protocol layer alone (service/v2/protocol.py, service/v2/images.py): no service, no HTTP."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from service.errors import ServiceError
from service.v2 import images
from service.v2.protocol import ResponseTensor, parse_request, serialize_response


def binary_body(doc: dict, *chunks: bytes) -> tuple[bytes, str]:
    head = json.dumps(doc).encode()
    return head + b"".join(chunks), str(len(head))


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def refused(body: bytes, header: str | None = None) -> str:
    with pytest.raises(ServiceError) as info:
        parse_request(body, header)
    assert info.value.status == 400 and info.value.code == "bad_input"
    return info.value.detail


def test_json_uint8_flat_and_nested_give_the_same_array() -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    for data in (pixels.ravel().tolist(), pixels.tolist()):
        doc = {"id": "r1", "inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 3, 3], "data": data}]}
        req = parse_request(json.dumps(doc).encode(), None)
        assert req.id == "r1" and not req.outputs
        (t,) = req.inputs
        assert t.shape == (2, 3, 3) and not t.binary
        assert np.array_equal(t.data, pixels)


def test_binary_inputs_are_split_in_order() -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    files = bytes_tensor(b"first", b"", b"\x00\xff")
    doc = {
        "inputs": [
            {"name": "a", "datatype": "UINT8", "shape": [2, 2, 3], "parameters": {"binary_data_size": 12}},
            {"name": "b", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(files)}},
        ],
        "outputs": [{"name": "restored", "parameters": {"binary_data": True}}],
        "parameters": {"binary_data_output": True},
    }
    req = parse_request(*binary_body(doc, pixels.tobytes(), files))
    a, b = req.inputs
    assert a.binary and np.array_equal(a.data, pixels)
    assert b.data == [b"first", b"", b"\x00\xff"]
    assert req.outputs[0].name == "restored" and req.outputs[0].parameters == {"binary_data": True}
    assert req.parameters == {"binary_data_output": True}


def test_json_bytes_are_base64() -> None:
    doc = {
        "inputs": [
            {
                "name": "image_file",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(b"\x89PNG").decode(), ""],
            }
        ]
    }
    assert parse_request(json.dumps(doc).encode(), None).inputs[0].data == [b"\x89PNG", b""]


def uint8_doc(**changes) -> dict:
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 2, 3], "data": [1, 2, 3, 4, 5, 6]}
    tensor.update(changes)
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    ("body", "header", "says"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty 'inputs'"),
        (json.dumps(uint8_doc(datatype="FP32")).encode(), None, "datatype 'FP32'"),
        (json.dumps(uint8_doc(shape=[1, -2, 3])).encode(), None, "non-negative integers"),
        (json.dumps(uint8_doc(shape=[1, 2, 2])).encode(), None, "has 4 elements, but 'data' holds 6"),
        (json.dumps(uint8_doc(data=[1, 2, 3, 4, 5, 256])).encode(), None, "0-255"),
        (json.dumps(uint8_doc(data=[1, 2, 3, 4, 5, 0.5])).encode(), None, "fractions"),
        (json.dumps(uint8_doc(data=[[1, 2, 3], [4, 5]])).encode(), None, "not a regular array"),
        (json.dumps(uint8_doc(data="AAEC")).encode(), None, "must be a list"),
        (
            json.dumps(uint8_doc(parameters={"binary_data_size": 6})).encode(),
            None,
            "both 'data' and a binary_data_size",
        ),
        (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1]}]}', None, "neither 'data'"),
        (b"{}", "x1", "non-negative integer"),
        (b"{}", "99", "has only 2 bytes"),
        (
            b'{"inputs": [{"name": "f", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}',
            None,
            "not valid base64",
        ),
        (b'{"inputs": [{"name": "f", "datatype": "BYTES", "shape": [1], "data": [7]}]}', None, "base64 string"),
    ],
)
def test_bad_requests_are_400_with_the_reason(body: bytes, header: str | None, says: str) -> None:
    assert says in refused(body, header)


def test_binary_framing_errors_are_400() -> None:
    doc = {
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2, 3], "parameters": {"binary_data_size": 12}}]
    }
    assert "only 11 remain" in refused(*binary_body(doc, bytes(11)))
    assert "add up to 12" in refused(*binary_body(doc, bytes(13)))
    doc["inputs"][0]["parameters"]["binary_data_size"] = 11
    assert "is 12 UINT8 bytes, but its binary data is 11" in refused(*binary_body(doc, bytes(11)))
    doc["inputs"][0]["parameters"]["binary_data_size"] = "12"
    assert "non-negative integer" in refused(*binary_body(doc, bytes(12)))
    files = {"inputs": [{"name": "f", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 0}}]}
    cut = bytes_tensor(b"abc")[:-1]
    files["inputs"][0]["parameters"]["binary_data_size"] = len(cut)
    assert "declares 3 bytes but only 2 remain" in refused(*binary_body(files, cut))
    files["inputs"][0]["parameters"]["binary_data_size"] = 2
    assert "inside its 4-byte length prefix" in refused(*binary_body(files, b"\x01\x00"))
    one = bytes_tensor(b"abc")
    files["inputs"][0]["parameters"]["binary_data_size"] = len(one)
    assert "has 2 elements, but the binary data holds 1" in refused(*binary_body(files, one))


def test_response_json_and_binary_forms_round_trip() -> None:
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    outs = [
        ResponseTensor("restored", "UINT8", pixels, binary=False),
        ResponseTensor("restored_file", "BYTES", [b"\x00a", b"b"], binary=False),
    ]
    body, header = serialize_response("deblur", "id-1", outs)
    assert header is None
    doc = json.loads(body)
    assert doc["model_name"] == "deblur" and doc["id"] == "id-1"
    first, second = doc["outputs"]
    assert first == {"name": "restored", "datatype": "UINT8", "shape": [2, 2, 2, 3], "data": pixels.ravel().tolist()}
    assert second["shape"] == [2] and [base64.b64decode(s) for s in second["data"]] == [b"\x00a", b"b"]
    outs = [
        ResponseTensor("restored", "UINT8", pixels, binary=True),
        ResponseTensor("restored_file", "BYTES", [b"\x00a"], True, (1, 1)),
    ]
    body, header = serialize_response("deblur", None, outs)
    doc = json.loads(body[:header])
    assert "id" not in doc
    sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
    assert sizes == [24, 6] and doc["outputs"][1]["shape"] == [1, 1] and "data" not in doc["outputs"][0]
    assert body[header:] == pixels.tobytes() + bytes_tensor(b"\x00a")


# ---- the model's tensors ----------------------------------------------------------------------


def call(doc: dict, max_images: int = 8) -> images.ImageCall:
    return images.image_call(parse_request(json.dumps(doc).encode(), None), max_images)


def image_refused(doc: dict, max_images: int = 8) -> str:
    with pytest.raises(ServiceError) as info:
        call(doc, max_images)
    assert info.value.status == 400
    return info.value.detail


def test_pixel_input_defaults_to_a_pixel_output_and_timeout_is_microseconds() -> None:
    doc = uint8_doc()
    doc["parameters"] = {"timeout": 2_500_000}
    c = call(doc)
    assert [w.name for w in c.outputs] == ["restored"] and not c.outputs[0].binary
    assert len(c) == 1 and c.pixels[0].shape == (1, 2, 3) and c.timeout_s == 2.5
    batch = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 1, 1, 3], "data": [0] * 6}]}
    assert len(call(batch)) == 2


def test_file_input_outputs_formats_and_binary_flags() -> None:
    doc = {
        "inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [2], "data": ["AA==", "AQ=="]}],
        "parameters": {"binary_data_output": True, "format": "jpeg", "quality": 80},
        "outputs": [
            {"name": "restored_file", "parameters": {"format": "webp"}},
            {"name": "restored", "parameters": {"binary_data": False}},
        ],
    }
    c = call(doc)
    assert c.files == [b"\x00", b"\x01"]
    (f, p) = c.outputs
    assert (f.name, f.binary, f.format, f.quality) == ("restored_file", True, "webp", 80)
    assert (p.name, p.binary) == ("restored", False)
    default = call({"inputs": doc["inputs"]})
    assert [(w.name, w.binary, w.format) for w in default.outputs] == [("restored_file", False, "png")]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"name": "pixels"}, "Unknown input 'pixels'"),
        ({"datatype": "BYTES", "data": ["AA=="], "shape": [1]}, "must be UINT8"),
        ({"shape": [6], "data": [0] * 6}, "[H, W, 3] or [N, H, W, 3]"),
        ({"shape": [2, 1, 3], "data": [[0, 0, 0], [0, 0, 0]], "name": "image"}, None),
        ({"shape": [1, 3, 2]}, "[H, W, 3] or [N, H, W, 3]"),
        ({"shape": [0, 2, 3], "data": []}, "every size at least 1"),
    ],
)
def test_bad_image_tensors(change: dict, says: str | None) -> None:
    doc = uint8_doc(**change)
    if says is None:
        call(doc)
    else:
        assert says in image_refused(doc)


def test_bad_image_requests() -> None:
    assert "exactly one input" in image_refused(
        {"inputs": [*uint8_doc()["inputs"], {**uint8_doc()["inputs"][0], "name": "x"}]}
    )
    assert "at most 1 per request" in image_refused(
        {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 1, 1, 3], "data": [0] * 6}]}, 1
    )
    assert "holds no files" in image_refused(
        {"inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [0], "data": []}]}
    )
    for params, says in (
        ({"binary_data_output": "yes"}, "true or false"),
        ({"format": "gif"}, "png, jpeg, webp"),
        ({"quality": 0}, "1 to 100"),
        ({"timeout": -1}, "microseconds"),
        ({"timeout": True}, "microseconds"),
    ):
        assert says in image_refused({**uint8_doc(), "parameters": params})
    assert "Unknown output 'x'" in image_refused({**uint8_doc(), "outputs": [{"name": "x"}]})
    assert "requested once" in image_refused({**uint8_doc(), "outputs": [{"name": "restored"}, {"name": "restored"}]})


def test_output_tensors_shapes_follow_the_input() -> None:
    one = call({**uint8_doc(), "outputs": [{"name": "restored"}, {"name": "restored_file"}]})
    restored = [np.zeros((1, 2, 3), np.uint8)]
    pix, files = images.output_tensors(one, restored, [b"png"])
    assert pix.dims() == [1, 2, 3] and files.dims() == [1]
    doc = {"inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [2, 1], "data": ["AA==", "AQ=="]}]}
    two = call({**doc, "outputs": [{"name": "restored_file"}, {"name": "restored"}]})
    files, pix = images.output_tensors(two, [np.zeros((4, 5, 3), np.uint8)] * 2, [b"a", b"b"])
    assert files.dims() == [2, 1] and pix.dims() == [2, 4, 5, 3]
    with pytest.raises(ServiceError, match="needs images of one size"):
        images.check_pixel_output(two, [(4, 5), (5, 4)])
    images.check_pixel_output(call(doc), [(4, 5), (5, 4)])  # files out: sizes may differ
