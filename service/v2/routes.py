"""The Open Inference Protocol's (KServe v2) REST endpoints, beside our own API and on the same service.

Health, server and model metadata, and inference (`POST /v2/models/{task}/infer`) with the JSON tensor
form and the binary tensor data extension. Everything behind the route is the one restore pipeline
(`Service.restore_many`): admission and 429s, deadlines, disconnects, drain and metrics are the same as for
`POST /restore/{task}`. Errors are the protocol's `{"error": "<message>"}`, with the status our API gives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from torch import Tensor

from .. import codec, pipeline
from ..deps import Authorized, ServiceDep
from ..errors import ServiceError, UnknownTask
from ..http_io import raw_upload, wait_for_disconnect
from ..middleware import printable
from ..runtime import Service
from . import images
from .openapi import INFER_BODY, INFERRED, errors
from .protocol import HEADER, parse_request, serialize_response

log = logging.getLogger("service")
SERVER_NAME = "mprnet-serve"
EXTENSIONS = ["binary_tensor_data"]


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class V2Route(APIRoute):
    """Answers every error of these routes in the protocol's shape, `{"error": "..."}`, with our API's status."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as e:
                return v2_error(e.status, e.detail, e.headers)
            except RequestValidationError as e:
                parts = [
                    f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in e.errors()
                ]
                return v2_error(422, "; ".join(parts) or "invalid request")
            except Exception as e:  # noqa: BLE001 - logged with the request id; the client learns nothing more
                rid = request.scope.get("request_id", "-")
                log.error("unhandled error in %s %s", request.method, printable(request.url.path), exc_info=e)
                return v2_error(500, f"Internal error; quote request id {rid}.")

        return route


router = APIRouter(prefix="/v2", route_class=V2Route, tags=["Open Inference Protocol (KServe v2)"])
ModelName = Annotated[str, Path(description="The model: a task this server restores (deblur, derain, denoise)")]


def _model(service: Service, task: str) -> None:
    if task not in service.models:
        raise UnknownTask(f"Unknown model {task!r}; this server has: {', '.join(service.tasks)}.")


# ---- health and metadata -------------------------------------------------------------------------


@router.get("", summary="Server metadata", responses=errors(500))
async def server_metadata(request: Request) -> dict[str, Any]:
    """The server's name, version and protocol extensions."""
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Server liveness", responses={503: {"description": "Unrecoverable device error"}})
async def server_live(service: ServiceDep) -> JSONResponse:
    """200 `{"live": true}` while the process can serve; 503 after an unrecoverable device error (as /livez)."""
    live = not await service.liveness()
    return JSONResponse({"live": live}, status_code=200 if live else 503)


@router.get(
    "/health/ready",
    summary="Server readiness",
    responses={503: {"description": "Warming up, draining or device failure"}},
)
async def server_ready(service: ServiceDep) -> JSONResponse:
    """200 `{"ready": true}` when every model is warm and the device answers (as /readyz); else 503."""
    ok, _ = await service.readiness()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "5"})


@router.get(
    "/models/{task}/ready",
    summary="Model readiness",
    responses={**errors(404), 503: {"description": "Warming up or draining"}},
)
async def model_ready(task: ModelName, service: ServiceDep) -> JSONResponse:
    """200 `{"name", "ready": true}` when the model is warm and the server not draining; else 503."""
    _model(service, task)
    ok = service.warm[task] and not service.draining
    return JSONResponse(
        {"name": task, "ready": ok}, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "5"}
    )


@router.get("/models/{task}", dependencies=Authorized, summary="Model metadata", responses=errors(401, 404))
async def model_metadata(task: ModelName, service: ServiceDep) -> dict[str, Any]:
    """The model's tensors (-1: any size), its platform, and our own fields: configuration, weights and engine."""
    _model(service, task)
    described = service.models[task].describe()
    engine = described.get("engine") or {}
    inputs, outputs = images.metadata_tensors()
    return {
        "name": task,
        "platform": _platform(engine),
        "inputs": inputs,
        "outputs": outputs,
        "max_batch_size": service.settings.max_batch_size,
        "configuration": described["model"],
        "weights": described["weights"],
        "engine": {"device": described["device"], "precision": described["precision"], **engine},
        "paper_task": described["paper_task"],
    }


def _platform(engine: dict) -> str:
    """Triton's platform names: PyTorch for our torch engine, OpenVINO where that engine runs the model."""
    name = str(engine.get("name", "torch")).lower()
    return "openvino" if "openvino" in name else "pytorch"


# ---- inference -----------------------------------------------------------------------------------

@router.post(
    "/models/{task}/infer", dependencies=Authorized, summary="Inference", responses=INFERRED, openapi_extra=INFER_BODY
)
async def infer(
    task: ModelName,
    request: Request,
    service: ServiceDep,
    timeout: Annotated[
        float | None,
        Header(
            alias="X-Request-Timeout",
            gt=0,
            le=86400,
            description="Seconds before compute must start; can only shorten the server's default",
        ),
    ] = None,
) -> Response:
    """Restore the input's images: UINT8 pixels ([H, W, 3] or [N, H, W, 3]) or BYTES files ([N])."""
    try:
        return await _infer(task, request, service, timeout)
    except ServiceError as e:
        service.metrics.reject(task, e)
        raise


async def _infer(task: str, request: Request, service: Service, timeout: float | None) -> Response:
    _model(service, task)
    s = service.settings
    header_length = request.headers.get(HEADER)

    def body(deadline: float) -> AbstractAsyncContextManager[tuple[bytes, Callable[[], None]]]:
        return raw_upload(request, s.max_upload_bytes, service.uploads, deadline)

    def parse(data: bytes) -> tuple[images.ImageCall, pipeline.Images]:
        call = images.image_call(parse_request(data, header_length), s.max_batch_size)
        items: list = list(call.pixels) if call.pixels is not None else list(call.files or [])
        return call, pipeline.Images(items, _finish(call, s.png_effort), call.timeout_s)

    call, results = await service.restore_many(
        task, body, parse, parse_inline=lambda data: _small_json(len(data), header_length),
        arrived=request.scope["arrived"], timeout=timeout, request_id=request.scope["request_id"],
        gone=lambda: wait_for_disconnect(request.receive),
    )
    restored = [r[0][0] for r in results] if images.wants(call, images.RESTORED) else None
    files = [r[0][1] for r in results] if images.wants(call, images.RESTORED_FILE) else None
    if restored is not None:
        images.check_pixel_output(call, [p.shape[:2] for p in restored])
    outputs = images.output_tensors(call, restored, files)
    if all(o.binary for o in outputs):  # a small JSON head and one copy of each tensor
        data, json_length = serialize_response(task, call.id, outputs)
    else:  # a JSON array of every pixel value, or base64 of every file: in a codec thread
        data, json_length = await service.in_codec_pool(serialize_response, task, call.id, outputs)
    headers = {"Server-Timing": _slowest([r[1] for r in results]).server_timing()}
    if json_length is None:
        return Response(data, media_type="application/json", headers=headers)
    return Response(data, media_type="application/octet-stream", headers={**headers, HEADER: str(json_length)})


# A JSON part up to this size is parsed on the event loop (tens of microseconds): the binary form's JSON
# is a few hundred bytes. Larger ones (tensors as JSON arrays) go to a codec thread.
INLINE_JSON_BYTES = 16 * 1024


def _small_json(body_size: int, header_length: str | None) -> bool:
    size = int(header_length) if header_length is not None and header_length.strip().isdigit() else body_size
    return size <= INLINE_JSON_BYTES


Finished = tuple[np.ndarray | None, bytes | None]


def _finish(call: images.ImageCall, png_effort: int) -> Callable[[Tensor, codec.Decoded], Finished]:
    """What each restored image of `call` becomes (in a codec thread): its pixels, its file, or both."""
    pixels_wanted = images.wants(call, images.RESTORED) is not None
    file_wanted = images.wants(call, images.RESTORED_FILE)

    def finish(restored: Tensor, decoded: codec.Decoded) -> Finished:
        pixels = codec.to_pixels(restored) if pixels_wanted else None
        encoded = None
        if file_wanted is not None:
            encoded = codec.encode(restored, decoded, file_wanted.format, file_wanted.quality, png_effort)
        return pixels, encoded

    return finish


def _slowest(timings: list[pipeline.Timings]) -> pipeline.Timings:
    return max(timings, key=lambda t: t.decode + t.queue + t.inference + t.encode)


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def not_found(path: str) -> JSONResponse:
    return v2_error(
        404, f"No route /v2/{path}. This server keeps one version of each model (leave out /versions/<v>); see /docs."
    )
