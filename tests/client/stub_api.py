"""A stand-in for the restore API, served by uvicorn in a thread on 127.0.0.1.

For answers the real service gives only under load or mid-deploy (429 and 503 with Retry-After), and
for client and page tests that should not depend on the model. It speaks the API's contract:
`POST /restore/{task}` with a multipart field `image` or a raw `image/*` body, `?format=`, errors as
`{"detail", "code"}`, `X-Request-ID` and `Server-Timing` on success. The "restoration" inverts the
colours, so before and after visibly differ. It also mounts the real page (`service.ui.router`).
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps, UnidentifiedImageError

from service.ui import router as ui_router

TASKS = ("deblur", "derain", "denoise")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class Scripted:
    """One canned error answer, given instead of a restoration."""

    status: int
    code: str
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StubState:
    tasks: tuple[str, ...] = TASKS  # what GET /tasks lists, like a server started with MPRNET_TASKS
    script: deque[Scripted] = field(default_factory=deque)  # answered first, in order, one per request
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each POST
    tokens: list[str | None] = field(default_factory=list)  # Authorization header of each POST
    deadlines: list[str | None] = field(default_factory=list)  # X-Request-Timeout header of each POST
    in_flight: int = 0
    max_in_flight: int = 0
    # Hold each request until this many are in flight at once (or hold_timeout passes): proves
    # a client's concurrency with an event instead of hoping that sleeps overlap.
    rendezvous: int = 1
    hold_timeout: float = 3.0
    _gathered: asyncio.Event = field(default_factory=asyncio.Event)


def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def create_stub_app(state: StubState | None = None) -> FastAPI:
    app = FastAPI()
    app.state.stub = state or StubState()
    app.include_router(ui_router)

    @app.get("/tasks")
    async def tasks() -> dict:  # the real service's shape, less its model details
        limits = {"max_upload_bytes": 50 * 1024 * 1024, "max_pixels": 25_000_000, "request_timeout_s": 60.0}
        return {"tasks": {t: {"ready": True} for t in app.state.stub.tasks}, "limits": limits}

    @app.post("/restore/{task}")
    async def restore(task: str, request: Request, format: str = "png") -> Response:
        s: StubState = app.state.stub
        s.arrivals.append(time.monotonic())
        s.tokens.append(request.headers.get("Authorization"))
        s.deadlines.append(request.headers.get("X-Request-Timeout"))
        s.in_flight += 1
        s.max_in_flight = max(s.max_in_flight, s.in_flight)
        try:
            if s.in_flight >= s.rendezvous:
                s._gathered.set()
            try:
                await asyncio.wait_for(s._gathered.wait(), s.hold_timeout)
            except TimeoutError:
                pass  # fewer requests came at once than expected: the test's assertion will say so
            if s.script:
                canned = s.script.popleft()
                return error(canned.status, canned.code, canned.detail, canned.headers)
            if task not in s.tasks:
                return error(404, "unknown_task", f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
            return await _restore(request, format)
        finally:
            s.in_flight -= 1

    return app


async def _restore(request: Request, fmt: str) -> Response:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        upload = (await request.form()).get("image")
        if upload is None or isinstance(upload, str):
            return error(422, "missing_image", "Send the image in a form field named 'image'.")
        data = await upload.read()
    elif content_type.startswith("image/"):
        data = await request.body()
    else:
        return error(415, "unsupported_media_type", "Send an image/* body or multipart/form-data.")
    if fmt not in MEDIA_TYPES:
        return error(422, "bad_format", f"Unknown format {fmt!r}.")
    t0 = time.perf_counter()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError):
        return error(400, "invalid_image", "This file is not an image the service can read.")
    decoded = time.perf_counter()
    out = ImageOps.invert(rgb)
    restored = time.perf_counter()
    buf = io.BytesIO()
    out.save(buf, format=fmt.upper())
    encoded = time.perf_counter()
    timing = (
        f"decode;dur={(decoded - t0) * 1e3:.2f}, queue;dur=0.10, "
        f"inference;dur={(restored - decoded) * 1e3:.2f}, encode;dur={(encoded - restored) * 1e3:.2f}"
    )
    headers = {"X-Request-ID": uuid.uuid4().hex, "Server-Timing": timing}
    return Response(buf.getvalue(), media_type=MEDIA_TYPES[fmt], headers=headers)


@contextmanager
def serve(app: FastAPI, start_timeout: float = 10.0) -> Iterator[str]:
    """Run app on 127.0.0.1 in a thread; yields its base URL (no trailing slash)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound before start, so the port is known and nothing races for it
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:  # uvicorn offers a flag, not an event: poll it, bounded
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the stub API server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
