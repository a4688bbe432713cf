"""The HTTP edges of a restore request: reading a capped body, multipart or raw, choosing the output
format from `?format=` or `Accept`, and noticing a client that went away.

Bodies are held in memory from their first byte until the image is decoded. Each upload is capped
(`MPRNET_MAX_UPLOAD_BYTES`), and so is their sum (`UploadBudget`, `MPRNET_MAX_INFLIGHT_UPLOAD_BYTES`):
without it, many slow or large uploads at once could take all the memory before the queue limits,
which count decoded pixels, ever see them. An upload that does not fit is answered 429 at once
(from its Content-Length when declared, else as soon as its bytes overflow the budget).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from .codec import OUTPUTS
from .errors import Disconnected, ServiceError, retry_after

RAW_TYPES = ("image/", "application/octet-stream")


def too_large(limit: int, size: str) -> ServiceError:
    return ServiceError(413, "too_large", f"The upload is {size} bytes; the limit is {limit:,} bytes.")


def check_content_type(request: Request) -> str:
    """'multipart' or 'raw'; raise 415 for anything that cannot carry an image."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return "multipart"
    if not ctype or ctype.startswith(RAW_TYPES):
        return "raw"
    raise ServiceError(
        415,
        "unsupported",
        f"Content-Type {ctype!r} cannot carry an image: send multipart/form-data with a field 'image', or the raw bytes as image/png, image/jpeg, ...",
    )


class UploadBudget:
    """Bytes of request bodies being received or waiting to be decoded, summed over all requests.

    Used only from the event loop thread, so plain arithmetic is safe.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise ServiceError(
                429, "uploads_busy",
                f"The server is receiving {self.used:,} bytes of other uploads; with this one's {n:,} more that is over its limit of "
                f"{self.limit:,} bytes. Retry shortly.",
                retry_after(1),
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class _Held:
    """The bytes one request holds in an `UploadBudget`."""

    def __init__(self, budget: UploadBudget | None) -> None:
        self.budget = budget
        self.bytes = 0

    def grow_to(self, n: int) -> None:
        if self.budget is not None and n > self.bytes:
            self.budget.take(n - self.bytes)
            self.bytes = n

    def release(self) -> None:
        if self.budget is not None:
            self.budget.give(self.bytes)
        self.bytes = 0


async def read_body(request: Request, limit: int, held: _Held | None = None) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` (before it is all read),
    and with 429 when `held`'s budget cannot take it."""
    held = held or _Held(None)
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit():
        if int(declared) > limit:
            raise too_large(limit, f"{int(declared):,}")
        held.grow_to(int(declared))  # the whole upload is reserved before its first byte is read
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large(limit, f"over {limit:,}")
            held.grow_to(len(body))  # chunked uploads (or a short Content-Length) reserve as they come
    except ClientDisconnect:
        raise Disconnected() from None
    return bytes(body)


@contextlib.asynccontextmanager
async def image_upload(request: Request, limit: int, budget: UploadBudget | None = None) -> AsyncIterator[bytes]:
    """The image bytes (see `image_bytes`), counted in `budget` until the block exits (after decoding)."""
    held = _Held(budget)
    try:
        yield await image_bytes(request, limit, held)
    finally:
        held.release()


async def image_bytes(request: Request, limit: int, held: _Held | None = None) -> bytes:
    """The image from a multipart field `image` or from the raw body."""
    kind = check_content_type(request)
    body = await read_body(request, limit, held)
    if kind == "raw":
        return body

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=4, max_fields=16).parse()
    except MultiPartException as e:
        raise ServiceError(400, "bad_input", f"The multipart body could not be parsed: {e.message}") from None
    try:
        field = form.get("image")
        if isinstance(field, UploadFile):
            return await field.read()
        if isinstance(field, str):
            raise ServiceError(400, "bad_input", "The multipart field 'image' must be a file upload, not a text field.")
        raise ServiceError(400, "bad_input", f"The multipart body has no field 'image' (fields: {', '.join(form.keys()) or 'none'}).")
    finally:
        await form.close()


def _accept_ranges(header: str) -> list[tuple[str, float]]:
    ranges = []
    for part in header.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.lower().startswith("q="):
                try:
                    q = max(0.0, min(1.0, float(p[2:])))
                except ValueError:
                    q = 0.0
        if media:
            ranges.append((media.lower(), q))
    return ranges


def output_format(fmt: str | None, accept: str | None) -> str:
    """png, jpeg or webp: `?format=` wins; else the best `Accept` match (ties and wildcards: PNG)."""
    if fmt:
        return fmt
    if not accept or not accept.strip():
        return "png"
    ranges = _accept_ranges(accept)

    def quality(media: str) -> float:
        # the most specific matching range decides (RFC 9110 §12.5.1)
        for pattern in (media, media.split("/")[0] + "/*", "*/*"):
            for r, q in ranges:
                if r == pattern:
                    return q
        return 0.0

    best = max(OUTPUTS, key=lambda f: (quality(OUTPUTS[f]), -list(OUTPUTS).index(f)))
    if quality(OUTPUTS[best]) <= 0:
        raise ServiceError(406, "not_acceptable", f"Accept {accept!r} allows none of {', '.join(OUTPUTS.values())}; use ?format=png|jpeg|webp.")
    return best


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client goes away. Only call once the body has been read: after that, the
    server's next message is `http.disconnect` (or nothing until the response is sent)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
