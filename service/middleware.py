"""Per-request context as plain ASGI middleware (no BaseHTTPMiddleware: it would hide disconnects).

Gives every request an id (the client's `X-Request-ID` when sane, else a new one), puts it on every
response and in every log line of the request, and counts restore requests by task, status and protocol.

What a client sent is logged through `printable`: a URL-decoded path may hold a line feed (a forged
log line) or an escape sequence (driving the terminal that shows the log). `PrintableFormatter`, the
formatter of `python -m service`, also escapes such characters in every message, whoever logged it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import InternalError
from .metrics import Metrics

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
log = logging.getLogger("service.access")


# C0 and C1 controls and DEL, Unicode line and paragraph separators, bidirectional overrides
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS |= {c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_ESCAPES = {**_CONTROLS, ord("\\"): "\\\\"}


def printable(text: str) -> str:
    """`text` with control characters escaped (`\\x0a`), and backslashes doubled so that an escape cannot
    be faked: safe to log on one line and to show on a terminal."""
    return text.translate(_ESCAPES)


class PrintableFormatter(logging.Formatter):
    """Escapes control characters in each message (a traceback after it keeps its lines): one record is one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return super().formatMessage(record).translate(_CONTROLS)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (for the format string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        scope["request_id"], scope["arrived"] = rid, start
        token = request_id_var.set(rid)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send_with_id(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            # Answered here rather than by Starlette's outermost handler, so the 500 carries the id too.
            log.error("unhandled error in %s %s", scope["method"], printable(scope["path"]), exc_info=exc)
            if started:
                raise
            error = InternalError(rid)
            body = json.dumps(error.body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send_with_id({"type": "http.response.start", "status": error.status, "headers": headers})
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            path = scope["path"]
            counted = _restore_request(path) if scope["method"] == "POST" else None
            if counted is not None:
                task, protocol = counted
                task = self.metrics.task_label(task)
                elapsed = time.monotonic() - start
                self.metrics.requests.labels(task, str(status), protocol).inc()
                self.metrics.request_duration.labels(task, protocol).observe(elapsed)
                log.info("POST %s %s %.1f ms", printable(path), status, elapsed * 1000)
            request_id_var.reset(token)


_V2_INFER = re.compile(r"^/v2/models/([^/]+)/infer$")


def _restore_request(path: str) -> tuple[str, str] | None:
    """(task, protocol) of a restore request's path: our own API or the Open Inference Protocol's; else None."""
    if path.startswith("/restore/"):
        return path.removeprefix("/restore/"), "native"
    if m := _V2_INFER.match(path):
        return m.group(1), "v2"
    return None
