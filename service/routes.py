"""The HTTP API: restore, task information, health and metrics."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model.variants import PAPER_TASKS

from . import codec
from .batcher import Job
from .errors import DeadlineExceeded, Disconnected, ServiceError, error_responses
from .http_io import image_upload, output_format, wait_for_disconnect
from .runtime import Service

router = APIRouter()
_bearer = HTTPBearer(auto_error=False, description="Needed only when the server sets MPRNET_API_TOKEN")
# error code -> reason label of mprnet_rejected_total
_REASONS = {"queue_full": "queue_full", "deadline": "deadline", "disconnected": "disconnected", "draining": "draining", "not_ready": "not_ready",
            "too_large": "too_large", "uploads_busy": "uploads_busy", "out_of_memory": "oom", "bad_input": "bad_input", "unsupported": "unsupported", "not_acceptable": "unsupported"}


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_token(request: Request, service: ServiceDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    token = service.settings.api_token
    if token is None:
        return
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.get_secret_value().encode()):
        task = request.path_params.get("task", "unknown")
        service.metrics.reject(task, "unauthorized")
        raise ServiceError(401, "unauthorized", "A valid 'Authorization: Bearer <token>' header is required.", {"WWW-Authenticate": "Bearer"})


Authorized = [Depends(require_token)]

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_RESTORE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: a multipart form with a file field `image`, or the raw bytes with an image/* content type.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}, "required": ["image"]}},
            **{t: _BINARY for t in ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff", "application/octet-stream")},
        },
    }
}
_RESTORED = {
    200: {
        "description": "The restored image, same size and mode as the input (first frame of an animation)",
        "content": {t: _BINARY for t in codec.OUTPUTS.values()},
        "headers": {
            "X-Request-ID": {"schema": {"type": "string"}, "description": "The client's id, or a new one"},
            "Server-Timing": {"schema": {"type": "string"}, "description": "decode, queue, inference and encode durations in ms"},
        },
    },
    **error_responses(400, 401, 404, 406, 413, 415, 422, 429, 500, 503, 504),
}
TASK_DOC = ", ".join(f"`{t}` ({p})" for t, p in PAPER_TASKS.items())


@router.post("/restore/{task}", dependencies=Authorized, response_class=Response, responses=_RESTORED, openapi_extra=_RESTORE_BODY, summary="Restore an image")
async def restore(
    task: Annotated[Literal["deblur", "derain", "denoise"], Path(description=f"What to restore: {TASK_DOC}")],
    request: Request,
    service: ServiceDep,
    format: Annotated[Literal["png", "jpeg", "webp"] | None, Query(description="Output format; default from Accept, else PNG")] = None,
    quality: Annotated[int | None, Query(ge=1, le=100, description="JPEG/WebP quality (default 90)")] = None,
    timeout: Annotated[float | None, Header(alias="X-Request-Timeout", gt=0, le=86400, description="Seconds before compute must start; can only shorten the server's default")] = None,
) -> Response:
    """Restore one image with the task's model; the answer is the image in the same size and mode."""
    if task not in service.models:
        raise ServiceError(404, "unknown_task", f"Unknown task {task!r}; this server restores: {', '.join(service.tasks)}.")
    try:
        return await _restore(task, request, service, output_format(format, request.headers.get("accept")), quality, timeout)
    except ServiceError as e:
        if e.code in _REASONS:
            service.metrics.reject(task, _REASONS[e.code])
        raise


async def _restore(task: str, request: Request, service: ServiceDep, fmt: str, quality: int | None, timeout: float | None) -> Response:
    s = service.settings
    with service.admitted(task):  # 503 while draining; a drain waits for everything inside
        service.check_ready(task)
        deadline = request.scope["arrived"] + min(timeout or s.request_timeout_s, s.request_timeout_s)
        # 429 before the upload is read when the queue is full or cannot be expected to serve it in time
        with service.batcher.admit(task, deadline) as ticket:
            # the upload's bytes count against MPRNET_MAX_INFLIGHT_UPLOAD_BYTES until it is decoded and queued
            async with image_upload(request, s.max_upload_bytes, service.uploads) as data:
                t0 = time.monotonic()
                with service.batcher.arriving(task):
                    decoded, plan = await service.in_codec_pool(_decode_and_plan, service, data)
                    t1 = time.monotonic()
                    if t1 >= deadline:
                        raise DeadlineExceeded(t1 - request.scope["arrived"])
                    # submit inside `arriving`: no await between, so an open batch never misses this request
                    job = service.batcher.submit(ticket, plan, decoded.image, request.scope["request_id"])
        outputs = await _outputs(job, request, service)
        t2 = time.monotonic()
        body = await service.in_codec_pool(_assemble_and_encode, job, outputs, decoded, fmt, quality, s.png_effort)
        t3 = time.monotonic()
    assert job.started is not None and job.finished is not None
    timing = f"decode;dur={(t1 - t0) * 1e3:.1f}, queue;dur={(job.started - job.enqueued) * 1e3:.1f}, inference;dur={(job.finished - job.started) * 1e3:.1f}, encode;dur={(t3 - t2) * 1e3:.1f}"
    return Response(body, media_type=codec.OUTPUTS[fmt], headers={"Server-Timing": timing})


def _decode_and_plan(service: Service, data: bytes) -> tuple[codec.Decoded, Any]:
    decoded = codec.decode(data, service.settings.max_pixels, service.settings.decode_budget_s)
    return decoded, service.planner.plan(decoded.image)


def _assemble_and_encode(job: Job, outputs: list, decoded: codec.Decoded, fmt: str, quality: int | None, png_effort: str) -> bytes:
    return codec.encode(job.plan.assemble(outputs), decoded, fmt, quality, png_effort)


async def _outputs(job: Job, request: Request, service: Service) -> list:
    """The job's outputs; if the client goes away first, the job is dropped before (further) compute."""
    watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({job.future, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        service.batcher.cancel(job, Disconnected())
        raise
    finally:
        watch.cancel()
    if not job.future.done() and watch.done() and not watch.cancelled() and watch.exception() is not None:
        return await job.future  # the connection cannot be watched (receive failed): wait for the answer alone
    if not job.future.done():
        service.batcher.cancel(job, Disconnected())
    return job.future.result()


@router.get("/tasks", dependencies=Authorized, responses=error_responses(401), summary="Tasks, models and batching settings")
async def tasks(service: ServiceDep) -> dict[str, Any]:
    """Each task's readiness, model configuration, parameter count, weights and SHA-256, device and precision."""
    return service.describe()


@router.get("/livez", summary="Liveness", responses={503: {"description": "Unrecoverable device error: restart the process"}})
async def livez(service: ServiceDep) -> JSONResponse:
    """200 while the process runs (also while warming up or draining); 503 after an unrecoverable device
    error (a sticky CUDA error needs a new process)."""
    if service.worker.failure:
        return JSONResponse({"status": "device_failed", "detail": service.worker.failure}, status_code=503)
    return JSONResponse({"status": "alive"})


_READY = {"type": "object", "properties": {"status": {"type": "string"}, "tasks": {"type": "object"}, "device": {"type": "object"}}}


@router.get("/readyz", summary="Readiness", responses={200: {"description": "Ready"}, 503: {"description": "Warming up, draining or device failure", "content": {"application/json": {"schema": _READY}}}})
async def readyz(service: ServiceDep) -> JSONResponse:
    """200 only when every task is warm and the device answers a tiny operation; per-task detail in the body."""
    ok, body = await service.readiness()
    return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}})
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format (no token needed)."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
