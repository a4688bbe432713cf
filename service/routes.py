"""The HTTP API: restore, task information, health and metrics."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model.variants import PAPER_TASKS, TASKS

from . import codec
from .deps import Authorized, ServiceDep
from .errors import NOT_READY_RETRY_S, ServiceError, error_responses, retry_after
from .http_io import image_upload, output_format, wait_for_disconnect

router = APIRouter()

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff")
_RESTORE_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "The image: a multipart form with a file field `image`, or the raw bytes with an image/* content type."
        ),
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": _BINARY["schema"]}, "required": ["image"]}
            },
            **{t: _BINARY for t in (*_IMAGE_TYPES, "application/octet-stream")},
        },
    }
}
_RESTORED = {
    200: {
        "description": "The restored image, same size and mode as the input (first frame of an animation)",
        "content": {t: _BINARY for t in codec.OUTPUTS.values()},
        "headers": {
            "X-Request-ID": {"schema": {"type": "string"}, "description": "The client's id, or a new one"},
            "Server-Timing": {
                "schema": {"type": "string"}, "description": "decode, queue, inference and encode durations in ms"
            },
        },
    },
    **error_responses(400, 401, 404, 406, 408, 413, 415, 422, 429, 500, 503, 504),
}
_TIMEOUT_DOC = "Seconds before compute must start; can only shorten the server's default"
TASK_DOC = ", ".join(f"`{t}` ({PAPER_TASKS[t]})" for t in TASKS)
# Path and query values as enums in the OpenAPI schema, from the one list of each
TaskName = Literal[TASKS]  # type: ignore[valid-type]
OutputFormat = Literal[tuple(codec.OUTPUTS)]  # type: ignore[valid-type]


@router.post(
    "/restore/{task}", dependencies=Authorized, response_class=Response, responses=_RESTORED,
    openapi_extra=_RESTORE_BODY, summary="Restore an image",
)
async def restore(
    task: Annotated[TaskName, Path(description=f"What to restore: {TASK_DOC}")],
    request: Request,
    service: ServiceDep,
    format: Annotated[OutputFormat | None, Query(description="Output format; default from Accept, else PNG")] = None,
    quality: Annotated[int | None, Query(ge=1, le=100, description="JPEG/WebP quality (default 90)")] = None,
    timeout: Annotated[
        float | None, Header(alias="X-Request-Timeout", gt=0, le=86400, description=_TIMEOUT_DOC)
    ] = None,
) -> Response:
    """Restore one image with the task's model; the answer is the image in the same size and mode."""
    s = service.settings
    try:
        fmt = output_format(format, request.headers.get("accept"))
        deadline = service.deadline(request.scope["arrived"], timeout)
        body, timings = await service.restore(
            task,
            lambda: image_upload(request, s.max_upload_bytes, service.uploads, deadline),  # read only once admitted
            fmt=fmt,
            quality=quality,
            arrived=request.scope["arrived"],
            deadline=deadline,
            request_id=request.scope["request_id"],
            gone=lambda: wait_for_disconnect(request.receive),
        )
    except ServiceError as e:
        service.metrics.reject(task, e)  # counted under the error's reason, if it has one
        raise
    return Response(body, media_type=codec.OUTPUTS[fmt], headers={"Server-Timing": timings.server_timing()})


@router.get(
    "/tasks", dependencies=Authorized, responses=error_responses(401), summary="Tasks, models and batching settings"
)
async def tasks(service: ServiceDep) -> dict[str, Any]:
    """Each task's readiness, model configuration, parameter count, weights and SHA-256, device and precision."""
    return service.describe()


@router.get(
    "/livez", summary="Liveness", responses={503: {"description": "Unrecoverable device error: restart the process"}}
)
async def livez(service: ServiceDep) -> JSONResponse:
    """200 while the process runs (also while warming up or draining); 503 once the device is lost: a sticky
    CUDA error, a device error a fresh probe confirmed, or several device probes in a row that failed or
    timed out (each call probes; a dead or hung GPU needs a new process); also once the batcher has stopped
    (a bug: no request of this process could be computed again)."""
    failure = await service.liveness()
    if failure:
        status = "batcher_failed" if service.consumer_failure else "device_failed"
        return JSONResponse({"status": status, "detail": failure}, status_code=503)
    return JSONResponse({"status": "alive"})


_READY = {
    "type": "object",
    "properties": {"status": {"type": "string"}, "tasks": {"type": "object"}, "device": {"type": "object"}},
}


_NOT_READY = {
    "description": "Warming up, draining or device failure", "content": {"application/json": {"schema": _READY}}
}


@router.get("/readyz", summary="Readiness", responses={200: {"description": "Ready"}, 503: _NOT_READY})
async def readyz(service: ServiceDep) -> JSONResponse:
    """200 only when every task is warm and the device answers a tiny operation; per-task detail in the body."""
    ok, body = await service.readiness()
    return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else retry_after(NOT_READY_RETRY_S))


_PROMETHEUS = {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={200: _PROMETHEUS})
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format (no token needed)."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
