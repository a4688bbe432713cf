"""The OpenAPI description of the Open Inference Protocol routes: their error bodies, and the inference
request and response (the route reads the body itself, so FastAPI cannot derive them)."""

from __future__ import annotations

from . import images
from .protocol import HEADER

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_ERROR_TEXT = {
    400: "Bad tensor (datatype, shape, byte count, base64, binary framing), parameter or image file",
    401: "Missing or wrong bearer token",
    404: "Unknown model",
    408: "The body stopped arriving (idle) or was still arriving at the deadline",
    413: "Body or image over the limit",
    415: "Unsupported image format",
    422: "Invalid header value",
    429: "Queue full, or too many uploads being received at once; see Retry-After",
    499: "The client went away before the answer",
    500: "Internal error (logged with the request id)",
    503: "Not ready, draining, or out of device memory; see Retry-After",
    504: "Deadline passed before processing started",
}


def errors(*statuses: int) -> dict[int | str, dict]:
    """A route's `responses` for these error statuses, each with the protocol's body `{"error": "..."}`."""
    return {s: {"description": _ERROR_TEXT[s], "content": {"application/json": {"schema": _ERROR}}} for s in statuses}


_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": list(images.INPUTS)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["UINT8", "BYTES"]},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
        "data": {
            "type": "array",
            "description": "UINT8: integers 0-255, row-major (flat or nested); BYTES: base64 strings",
        },
    },
}
_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {"type": "boolean"},
                "timeout": {"type": "integer", "description": "Microseconds before compute must start"},
                "format": {"type": "string", "enum": list(images.FILE_FORMATS)},
                "quality": {"type": "integer", "minimum": 1, "maximum": 100},
            },
        },
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": list(images.OUTPUTS)},
                    "parameters": {"type": "object"},
                },
            },
        },
    },
}
_BINARY_BODY = {
    "type": "string",
    "format": "binary",
    "description": f"The JSON request, then the binary tensors; `{HEADER}` says where the JSON ends",
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": images.__doc__,
        "content": {
            "application/json": {"schema": _INFER_REQUEST},
            "application/octet-stream": {"schema": _BINARY_BODY},
        },
    },
    "parameters": [
        {
            "name": HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Length of the JSON part of a body with binary tensors",
        },
    ],
}
INFERRED = {
    200: {
        "description": f"The inference response: JSON, or JSON then binary tensors ({HEADER}: the JSON's length)",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **errors(400, 401, 404, 408, 413, 415, 422, 429, 499, 500, 503, 504),
}
