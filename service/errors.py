"""Errors a client sees: JSON `{"detail": "<plain-language message>", "code": "<machine_code>"}`.

Raise `ServiceError` (or one of its short-hands) anywhere in the request path; the handlers here turn
it, FastAPI's validation errors and Starlette's 404/405 into that shape. Anything else is a logged
500 that leaks nothing but the request id.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .middleware import printable

log = logging.getLogger("service")


class ServiceError(Exception):
    """An answer other than success: HTTP status, machine code, message for a person, extra headers."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail, "code": self.code}, status_code=self.status, headers=self.headers)


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class QueueFull(ServiceError):
    def __init__(self, detail: str, wait_s: float) -> None:
        super().__init__(429, "queue_full", detail, retry_after(wait_s))


class Draining(ServiceError):
    def __init__(self) -> None:
        super().__init__(503, "draining", "The server is shutting down; retry on another instance.", retry_after(1))


class DeadlineExceeded(ServiceError):
    def __init__(self, waited_s: float) -> None:
        super().__init__(504, "deadline", f"The request waited {waited_s:.2f} s and reached its deadline before processing started; it was not processed.")


class OutOfMemory(ServiceError):
    def __init__(self, detail: str) -> None:
        super().__init__(503, "out_of_memory", detail, retry_after(5))


class Disconnected(ServiceError):
    """The client went away; nobody reads this answer (499, nginx's 'client closed request')."""

    def __init__(self) -> None:
        super().__init__(499, "disconnected", "The client closed the connection before the answer was ready.")


class InferenceFailed(ServiceError):
    def __init__(self, detail: str = "The model failed on this batch; the error was logged.") -> None:
        super().__init__(500, "inference_failed", detail)


# Every error body has this schema; routes list it in their OpenAPI `responses`.
ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string"}, "code": {"type": "string"}},
    "required": ["detail", "code"],
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    text = {
        400: "Empty, corrupt or truncated image, or a bad header",
        401: "Missing or wrong bearer token",
        404: "Unknown task",
        406: "No acceptable output format",
        413: "Upload or pixel count over the limit",
        415: "Unsupported content type or image format",
        422: "Invalid query or header value",
        429: "Queue full, or too many uploads being received at once; see Retry-After",
        500: "Internal error (logged with the request id)",
        503: "Not ready, draining, or out of device memory; see Retry-After",
        504: "Deadline passed before processing started",
    }
    return {s: {"description": text[s], "content": {"application/json": {"schema": ERROR_SCHEMA}}} for s in statuses}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(tuple(e.get("loc", ())) == ("path", "task") for e in exc.errors()):
            task = request.path_params.get("task", "")
            return ServiceError(404, "unknown_task", f"Unknown task {task!r}; choose deblur, derain or denoise.").response()
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request", "code": "invalid_request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return JSONResponse({"detail": detail, "code": codes.get(exc.status_code, "http_error")}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request.scope.get("request_id", "-")
        path = printable(request.url.path)
        log.error("unhandled error in %s %s (request %s)", request.method, path, rid, exc_info=exc)
        return JSONResponse({"detail": f"Internal error; quote request id {rid}.", "code": "internal_error"}, status_code=500)
