"""The Open Inference Protocol's (KServe v2) inference messages, as pure functions: bytes in, tensors out.

A request body is a JSON object, optionally followed by the binary tensor data extension's raw tensor
bytes; the `Inference-Header-Content-Length` header then says where the JSON ends. Each binary input
says how many of those bytes are its own (`parameters.binary_data_size`), in input order. Binary data is
row-major and little-endian; a BYTES element is a 4-byte little-endian length and then its bytes.

In the JSON form a UINT8 tensor's `data` is a list of integers (flat or nested, row-major), and a BYTES
tensor's is a list of strings. JSON strings cannot hold arbitrary bytes, so BYTES elements in JSON are
base64 (the convention KServe's own image examples use); the binary form carries them as they are.

Anything a client can get wrong raises `ServiceError` 400 (`bad_input`) with a message that names the
tensor and what was expected; nothing here knows about images or the service.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadInput, ServiceError

HEADER = "Inference-Header-Content-Length"
DATATYPES = ("UINT8", "BYTES")  # the ones this server reads and writes
_LENGTH = struct.Struct("<I")


def bad_request(detail: str) -> ServiceError:
    return BadInput(detail)


@dataclass
class RequestTensor:
    """An input: UINT8 data as an array of `shape`; BYTES data as a row-major list of its elements."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    parameters: dict[str, Any] = field(default_factory=dict)
    binary: bool = False  # it came as binary data (not JSON)


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[RequestTensor]
    outputs: list[RequestedOutput]  # empty: the client did not choose
    parameters: dict[str, Any]
    id: str | None = None


@dataclass
class ResponseTensor:
    """An output: UINT8 as an array (its shape is the tensor's), BYTES as a list of elements with `shape`."""

    name: str
    datatype: str
    data: np.ndarray | list[bytes]
    binary: bool
    shape: tuple[int, ...] | None = None  # BYTES only; default (len(data),)

    def dims(self) -> list[int]:
        if isinstance(self.data, np.ndarray):
            return list(self.data.shape)
        return list(self.shape) if self.shape is not None else [len(self.data)]


# ---- requests ------------------------------------------------------------------------------------


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """A whole request body (and its `Inference-Header-Content-Length`, if any) -> InferRequest."""
    json_part, binary = _split(body, header_length)
    try:
        doc = json.loads(json_part)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad_request(f"The inference request is not valid JSON ({e}).") from None
    if not isinstance(doc, dict):
        raise bad_request("The inference request must be a JSON object with an 'inputs' list.")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("'id' must be a string.")
    parameters = _parameters(doc.get("parameters"), "the request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad_request("The inference request needs a non-empty 'inputs' list.")
    offset = 0
    inputs = []
    for i, raw in enumerate(raw_inputs):
        tensor, offset = _input(raw, i, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise bad_request(
            f"The body has {len(binary):,} bytes of binary tensor data after the JSON, but the inputs' "
            f"binary_data_size parameters add up to {offset:,}."
        )
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise bad_request(f"Input names must be unique; got {names}.")
    raw_outputs = doc.get("outputs")
    if raw_outputs is None:
        raw_outputs = []
    if not isinstance(raw_outputs, list):
        raise bad_request("'outputs' must be a list of objects with a 'name'.")
    outputs = []
    for i, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise bad_request(f"outputs[{i}] must be an object with a string 'name'.")
        outputs.append(RequestedOutput(raw["name"], _parameters(raw.get("parameters"), f"output {raw['name']!r}")))
    return InferRequest(inputs, outputs, parameters, request_id)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit():
        raise bad_request(f"{HEADER} must be a non-negative integer, got {header_length!r}.")
    n = int(text)
    if n > len(body):
        raise bad_request(f"{HEADER} is {n:,} but the body has only {len(body):,} bytes.")
    return body[:n], body[n:]


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"The parameters of {where} must be a JSON object.")
    return value


def _input(raw: Any, index: int, binary: bytes, offset: int) -> tuple[RequestTensor, int]:
    if not isinstance(raw, dict):
        raise bad_request(f"inputs[{index}] must be an object with name, shape, datatype and data.")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"inputs[{index}] needs a string 'name'.")
    what = f"Input {name!r}"
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise bad_request(f"{what} has datatype {datatype!r}; this server takes {' or '.join(DATATYPES)}.")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad_request(f"{what} needs a 'shape' list of non-negative integers, got {shape!r}.")
    parameters = _parameters(raw.get("parameters"), what)
    size = parameters.get("binary_data_size")
    has_data = "data" in raw
    if size is None:
        if not has_data:
            raise bad_request(f"{what} has neither 'data' nor a binary_data_size parameter.")
        data = _from_json(raw["data"], datatype, shape, what)
        return RequestTensor(name, datatype, tuple(shape), data, parameters), offset
    if has_data:
        raise bad_request(f"{what} has both 'data' and a binary_data_size parameter; send one.")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad_request(f"{what}: binary_data_size must be a non-negative integer, got {size!r}.")
    if offset + size > len(binary):
        raise bad_request(
            f"{what} declares {size:,} bytes of binary data, but only {len(binary) - offset:,} remain after the JSON "
            f"(is {HEADER} right?)."
        )
    chunk = binary[offset : offset + size]
    data = _from_binary(chunk, datatype, shape, what)
    return RequestTensor(name, datatype, tuple(shape), data, parameters, binary=True), offset + size


def _from_binary(chunk: bytes, datatype: str, shape: list[int], what: str) -> np.ndarray | list[bytes]:
    count = math.prod(shape)
    if datatype == "UINT8":
        if len(chunk) != count:
            raise bad_request(
                f"{what}: shape {shape} is {count:,} UINT8 bytes, but its binary data is {len(chunk):,} bytes."
            )
        return np.frombuffer(chunk, dtype=np.uint8).reshape(shape)
    elements = []
    view = memoryview(chunk)
    pos = 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise bad_request(f"{what}: BYTES element {len(elements)} is cut off inside its 4-byte length prefix.")
        (n,) = _LENGTH.unpack_from(chunk, pos)
        if pos + 4 + n > len(chunk):
            raise bad_request(
                f"{what}: BYTES element {len(elements)} declares {n:,} bytes but only {len(chunk) - pos - 4:,} remain."
            )
        elements.append(bytes(view[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    if len(elements) != count:
        raise bad_request(f"{what}: shape {shape} has {count} elements, but the binary data holds {len(elements)}.")
    return elements


def _from_json(data: Any, datatype: str, shape: list[int], what: str) -> np.ndarray | list[bytes]:
    count = math.prod(shape)
    if not isinstance(data, list):
        raise bad_request(f"{what}: 'data' must be a list.")
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise bad_request(f"{what}: shape {shape} has {count} elements, but 'data' holds {len(flat)}.")
        return [_base64(s, what, i) for i, s in enumerate(flat)]
    try:
        arr = np.asarray(data)
    except (ValueError, OverflowError) as e:
        raise bad_request(f"{what}: 'data' is not a regular array of integers ({e}).") from None
    if arr.size != count:
        raise bad_request(f"{what}: shape {shape} has {count:,} elements, but 'data' holds {arr.size:,}.")
    if count and arr.dtype.kind not in "iu":
        raise bad_request(f"{what}: UINT8 'data' must hold integers 0-255, not {_kind(arr)}.")
    if count and (arr.min() < 0 or arr.max() > 255):
        raise bad_request(f"{what}: UINT8 values must be 0-255; found {int(arr.min())}..{int(arr.max())}.")
    return arr.astype(np.uint8).reshape(shape)


def _kind(arr: np.ndarray) -> str:
    return {"b": "booleans", "f": "numbers with fractions", "U": "strings", "O": "mixed values"}.get(
        arr.dtype.kind, str(arr.dtype)
    )


def _flatten(data: list) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _base64(value: Any, what: str, index: int) -> bytes:
    if not isinstance(value, str):
        raise bad_request(f"{what}: BYTES element {index} must be a base64 string in JSON, got {type(value).__name__}.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(
            f"{what}: BYTES element {index} is not valid base64 ({e}); in JSON, files are base64 strings "
            "(or send them as binary data)."
        ) from None


# ---- responses -----------------------------------------------------------------------------------


def serialize_response(
    model_name: str, request_id: str | None, outputs: list[ResponseTensor]
) -> tuple[bytes, int | None]:
    """(body, JSON length for the `Inference-Header-Content-Length` header, None when no output is binary)."""
    doc: dict[str, Any] = {"model_name": model_name}
    if request_id is not None:
        doc["id"] = request_id
    entries = []
    chunks = []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.dims()}
        if out.binary:
            chunk = _to_binary(out)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = _to_json(out)
        entries.append(entry)
    doc["outputs"] = entries
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def _to_binary(out: ResponseTensor) -> bytes:
    if isinstance(out.data, np.ndarray):
        return np.ascontiguousarray(out.data).tobytes()
    return b"".join(_LENGTH.pack(len(e)) + e for e in out.data)


def _to_json(out: ResponseTensor) -> list:
    if isinstance(out.data, np.ndarray):
        return out.data.ravel().tolist()
    return [base64.b64encode(e).decode("ascii") for e in out.data]
