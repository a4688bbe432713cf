"""Errors a client sees: JSON `{"detail": "<plain-language message>", "code": "<machine_code>"}`.

Each kind of answer other than success is one `ServiceError` subclass that carries its HTTP status,
its machine `code` and the `reason` label it counts under in `mprnet_rejected_total` (None: not
counted there, e.g. a failed model); raise it with a message for a person. The handlers here turn it,
FastAPI's validation errors and Starlette's 404/405 into that shape. Anything else is a logged 500
(`InternalError`) that leaks nothing but the request id.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.variants import TASKS

log = logging.getLogger("service")


# Retry-After of the answers that say "not ready" or "out of device memory" (and of /readyz while not
# ready): the longest fixed one the service sends. MPRNET_KEEP_ALIVE_S (7.5 s) keeps an idle connection
# open longer, so a client that waits exactly this long can still reuse its connection.
NOT_READY_RETRY_S = 5


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class ServiceError(Exception):
    """An answer other than success: a message for a person and extra headers; the class gives the rest."""

    status: ClassVar[int]
    code: ClassVar[str]
    reason: ClassVar[str | None] = None  # label of mprnet_rejected_total

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        if type(self) is ServiceError:
            raise TypeError("raise a subclass of ServiceError: it carries the status, code and metric reason")
        super().__init__(detail)
        self.detail, self.headers = detail, dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BadInput(ServiceError):
    status, code, reason = 400, "bad_input", "bad_input"


class Unauthorized(ServiceError):
    status, code, reason = 401, "unauthorized", "unauthorized"

    def __init__(self) -> None:
        super().__init__("A valid 'Authorization: Bearer <token>' header is required.", {"WWW-Authenticate": "Bearer"})


class UnknownTask(ServiceError):
    status, code = 404, "unknown_task"


class NotAcceptable(ServiceError):
    status, code, reason = 406, "not_acceptable", "unsupported"


class TooLarge(ServiceError):
    status, code, reason = 413, "too_large", "too_large"


class Unsupported(ServiceError):
    status, code, reason = 415, "unsupported", "unsupported"


class InvalidRequest(ServiceError):
    status, code = 422, "invalid_request"


class UploadTimeout(ServiceError):
    status, code, reason = 408, "upload_timeout", "upload_timeout"


class QueueFull(ServiceError):
    status, code, reason = 429, "queue_full", "queue_full"

    def __init__(self, detail: str, wait_s: float) -> None:
        super().__init__(detail, retry_after(wait_s))


class UploadsBusy(ServiceError):
    status, code, reason = 429, "uploads_busy", "uploads_busy"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after(1))


class Disconnected(ServiceError):
    """The client went away; nobody reads this answer (499, nginx's 'client closed request')."""

    status, code, reason = 499, "disconnected", "disconnected"

    def __init__(self) -> None:
        super().__init__("The client closed the connection before the answer was ready.")


class InternalError(ServiceError):
    """A bug or an unforeseen failure: the log has the details, the client only the request id."""

    status, code = 500, "internal_error"

    def __init__(self, request_id: str) -> None:
        super().__init__(f"Internal error; quote request id {request_id}.")


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"

    def __init__(self, detail: str = "The model failed on this batch; the error was logged.") -> None:
        super().__init__(detail)


class NotReady(ServiceError):
    status, code, reason = 503, "not_ready", "not_ready"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after(NOT_READY_RETRY_S))


class Draining(ServiceError):
    status, code, reason = 503, "draining", "draining"

    def __init__(self) -> None:
        super().__init__("The server is shutting down; retry on another instance.", retry_after(1))


class OutOfMemory(ServiceError):
    status, code, reason = 503, "out_of_memory", "oom"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after(NOT_READY_RETRY_S))


class DeadlineExceeded(ServiceError):
    status, code, reason = 504, "deadline", "deadline"

    def __init__(self, waited_s: float) -> None:
        super().__init__(
            f"The request waited {waited_s:.2f} s and reached its deadline before processing started; "
            "it was not processed."
        )


def _kinds(cls: type[ServiceError]) -> list[type[ServiceError]]:
    return [k for sub in cls.__subclasses__() for k in (sub, *_kinds(sub))]


ERRORS: tuple[type[ServiceError], ...] = tuple(_kinds(ServiceError))
# every label of mprnet_rejected_total, from the error classes
REJECT_REASONS: tuple[str, ...] = tuple(dict.fromkeys(k.reason for k in ERRORS if k.reason))


def _one_of(names: tuple[str, ...]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


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
        408: "The body stopped arriving (MPRNET_UPLOAD_IDLE_TIMEOUT_S), or was still arriving at the deadline",
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
            return UnknownTask(f"Unknown task {task!r}; choose {_one_of(TASKS)}.").response()
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
        return InvalidRequest("; ".join(parts) or "invalid request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        body = {"detail": detail, "code": codes.get(exc.status_code, "http_error")}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request.scope.get("request_id", "-")
        from .middleware import printable  # here, not at the top: the middleware imports this module

        path = printable(request.url.path)
        log.error("unhandled error in %s %s (request %s)", request.method, path, rid, exc_info=exc)
        return InternalError(rid).response()
