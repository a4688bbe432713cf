"""The restoration models' tensors in the Open Inference Protocol: names, datatypes, shapes, parameters.

Inputs (send one of them):
    image       UINT8 [H, W, 3] or [N, H, W, 3]: RGB pixels, N images of one size
    image_file  BYTES [N]: encoded images (PNG, JPEG, WebP, GIF, BMP, TIFF), sizes may differ
Outputs (the request's `outputs` choose; by default the same kind as the input):
    restored       UINT8, the input's pixel shape (or [N, H, W, 3] for files of one size): 8-bit RGB
    restored_file  BYTES, the input's file shape (or [N] for pixels): files as GET /restore answers them
                   (PNG unless the `format` parameter says jpeg or webp; `quality` for those)
Parameters: `binary_data_output` (request) and `binary_data` (output) as the binary data extension says;
`timeout` in microseconds, as Triton's clients send it (a deadline for compute to start); `format` and
`quality` on the request or on the restored_file output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import InferRequest, ResponseTensor, bad_request

IMAGE, IMAGE_FILE = "image", "image_file"
RESTORED, RESTORED_FILE = "restored", "restored_file"
INPUTS = {IMAGE: "UINT8", IMAGE_FILE: "BYTES"}
OUTPUTS = {RESTORED: "UINT8", RESTORED_FILE: "BYTES"}
FILE_FORMATS = ("png", "jpeg", "webp")


def metadata_tensors() -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) as model metadata lists them: -1 for every size the client chooses."""
    pixels, files = [-1, -1, -1, 3], [-1]
    inputs = [
        {"name": IMAGE, "datatype": "UINT8", "shape": pixels},
        {"name": IMAGE_FILE, "datatype": "BYTES", "shape": files},
    ]
    outputs = [
        {"name": RESTORED, "datatype": "UINT8", "shape": pixels},
        {"name": RESTORED_FILE, "datatype": "BYTES", "shape": files},
    ]
    return inputs, outputs


@dataclass
class Wanted:
    """One output the client wants, and how."""

    name: str
    binary: bool
    format: str = "png"
    quality: int | None = None


@dataclass
class ImageCall:
    """A request as images: pixel arrays (H, W, 3) uint8, or encoded files; what to answer with."""

    input_name: str
    shape: tuple[int, ...]  # the input tensor's shape
    pixels: list[np.ndarray] | None
    files: list[bytes] | None
    outputs: list[Wanted]
    timeout_s: float | None
    id: str | None

    def __len__(self) -> int:
        return len(self.pixels if self.pixels is not None else self.files or [])


def image_call(request: InferRequest, max_images: int) -> ImageCall:
    """Check the request against the model's tensors; raise ServiceError 400 with the reason."""
    if len(request.inputs) != 1:
        names = [t.name for t in request.inputs]
        raise bad_request(
            f"Send exactly one input, {IMAGE!r} (UINT8 pixels) or {IMAGE_FILE!r} (BYTES files); got {names}."
        )
    tensor = request.inputs[0]
    if tensor.name not in INPUTS:
        raise bad_request(
            f"Unknown input {tensor.name!r}; this model takes {IMAGE!r} (UINT8 pixels) or {IMAGE_FILE!r} (BYTES files)."
        )
    if tensor.datatype != INPUTS[tensor.name]:
        raise bad_request(f"Input {tensor.name!r} must be {INPUTS[tensor.name]}, not {tensor.datatype}.")
    pixels = files = None
    if tensor.name == IMAGE:
        pixels = _pixel_images(tensor.data, tensor.shape)
    else:
        assert isinstance(tensor.data, list)
        if not tensor.data:
            raise bad_request(f"Input {IMAGE_FILE!r} holds no files (shape {list(tensor.shape)}).")
        files = tensor.data
    count = len(pixels if pixels is not None else files or [])
    if count > max_images:
        raise bad_request(
            f"Input {tensor.name!r} holds {count} images; this server takes at most {max_images} per request."
        )
    params = request.parameters
    default_binary = _flag(params, "binary_data_output", "the request", False)
    fmt, quality = _file_format(params, "the request", "png", None)
    outputs = []
    for out in request.outputs:
        if out.name not in OUTPUTS:
            raise bad_request(
                f"Unknown output {out.name!r}; this model gives {RESTORED!r} (UINT8 pixels) "
                f"or {RESTORED_FILE!r} (BYTES files)."
            )
        where = f"output {out.name!r}"
        binary = _flag(out.parameters, "binary_data", where, default_binary)
        out_fmt, out_quality = _file_format(out.parameters, where, fmt, quality)
        outputs.append(Wanted(out.name, binary, out_fmt, out_quality))
    if len({w.name for w in outputs}) != len(outputs):
        raise bad_request("Each output may be requested once.")
    if not outputs:
        outputs = [Wanted(RESTORED if pixels is not None else RESTORED_FILE, default_binary, fmt, quality)]
    return ImageCall(tensor.name, tensor.shape, pixels, files, outputs, _timeout(params), request.id)


def _pixel_images(data: Any, shape: tuple[int, ...]) -> list[np.ndarray]:
    assert isinstance(data, np.ndarray)
    if len(shape) not in (3, 4) or shape[-1] != 3 or 0 in shape:
        raise bad_request(
            f"Input {IMAGE!r} must have shape [H, W, 3] or [N, H, W, 3] with every size at least 1, got {list(shape)}."
        )
    batch = data if len(shape) == 4 else data[None]
    return list(batch)  # views of the request's bytes, (H, W, 3) each


def _flag(params: dict, key: str, where: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise bad_request(f"Parameter {key!r} of {where} must be true or false, got {value!r}.")
    return value


def _file_format(params: dict, where: str, fmt: str, quality: int | None) -> tuple[str, int | None]:
    fmt = params.get("format", fmt)
    if fmt not in FILE_FORMATS:
        raise bad_request(f"Parameter 'format' of {where} must be one of {', '.join(FILE_FORMATS)}, got {fmt!r}.")
    quality = params.get("quality", quality)
    if quality is not None and (not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100):
        raise bad_request(f"Parameter 'quality' of {where} must be an integer from 1 to 100, got {quality!r}.")
    return fmt, quality


def _timeout(params: dict) -> float | None:
    value = params.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86_400 * 1e6:
        raise bad_request(
            f"Parameter 'timeout' is in microseconds and must be a positive number up to a day, got {value!r}."
        )
    return value / 1e6


def output_tensors(
    call: ImageCall, restored: list[np.ndarray] | None, files: list[bytes] | None
) -> list[ResponseTensor]:
    """The answer's tensors, in the order the client asked for them.

    `restored`: (H, W, 3) uint8 per image, when a `restored` output is wanted; `files`: encoded per image,
    when a `restored_file` output is wanted (each with its own format: see `file_outputs`)."""
    tensors = []
    for want in call.outputs:
        if want.name == RESTORED:
            assert restored is not None
            if call.pixels is not None and len(call.shape) == 3:
                data = restored[0]
            else:
                data = np.stack(restored)  # same sizes: checked by `pixel_output_shape` before compute
            tensors.append(ResponseTensor(RESTORED, "UINT8", data, want.binary))
        else:
            assert files is not None
            shape = call.shape if call.files is not None else (len(files),)
            tensors.append(ResponseTensor(RESTORED_FILE, "BYTES", files, want.binary, shape))
    return tensors


def check_pixel_output(call: ImageCall, sizes: list[tuple[int, int]]) -> None:
    """Before compute: a `restored` tensor needs images of one size (files may differ)."""
    if any(w.name == RESTORED for w in call.outputs) and len(set(sizes)) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sizes[:8])
        raise bad_request(
            f"Output {RESTORED!r} is one tensor, so it needs images of one size; these are {shown}. "
            f"Ask for {RESTORED_FILE!r}."
        )


def wants(call: ImageCall, name: str) -> Wanted | None:
    return next((w for w in call.outputs if w.name == name), None)
