"""The HTTP edges of a restore request: reading a capped body, multipart or raw, choosing the output
format from `?format=` or `Accept`, and noticing a client that went away.

Bodies are held in memory from their first byte until the image is decoded. Each upload is capped
(`MPRNET_MAX_UPLOAD_BYTES`), and so is their sum (`UploadBudget`, `MPRNET_MAX_INFLIGHT_UPLOAD_BYTES`):
without it, many slow or large uploads at once could take all the memory before the queue limits,
which count decoded pixels, ever see them. Bytes are counted as they arrive, not as declared, so a
client that declares a large Content-Length and sends nothing holds nothing; an upload that overflows
the budget is answered 429 at once. A body from which no byte arrives for `idle_timeout_s`, or that
is still arriving at the request's deadline, is answered 408; a drain cuts stalled uploads (503).

A multipart body is parsed as it arrives: the image part goes to a spooled file (memory up to 1 MB,
then disk) and is read out once, so what is held is the image's bytes, which is what the budget counts,
not the whole body and a copy of the image besides.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import AsyncIterator, Callable

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.types import Receive

from .codec import OUTPUTS
from .errors import (
    BadInput,
    Disconnected,
    Draining,
    NotAcceptable,
    ServiceError,
    TooLarge,
    Unsupported,
    UploadsBusy,
    UploadTimeout,
)

RAW_TYPES = ("image/", "application/octet-stream")
IDLE_TIMEOUT_S = 15.0  # default of MPRNET_UPLOAD_IDLE_TIMEOUT_S
# Once a drain has begun, an upload that goes this long without a byte is cut: its client can send
# it to another instance sooner than this one could finish it.
DRAIN_IDLE_S = 1.0
# Answered before the body was read to its end: the connection cannot carry another request.
_CLOSE = {"Connection": "close"}


def too_large(limit: int, size: str) -> ServiceError:
    return TooLarge(f"The upload is {size} bytes; the limit is {limit:,} bytes.", _CLOSE)


def upload_timeout(why: str) -> ServiceError:
    return UploadTimeout(f"{why}; the upload was not processed. Send the body promptly.", _CLOSE)


def upload_cut() -> ServiceError:
    error = Draining()
    error.headers.update(_CLOSE)
    return error


def check_content_type(request: Request) -> str:
    """'multipart' or 'raw'; raise 415 for anything that cannot carry an image."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return "multipart"
    if not ctype or ctype.startswith(RAW_TYPES):
        return "raw"
    raise Unsupported(
        f"Content-Type {ctype!r} cannot carry an image: send multipart/form-data with a field 'image', "
        "or the raw bytes as image/png, image/jpeg, ..."
    )


class UploadBudget:
    """Bytes of request bodies being received or waiting to be decoded, summed over all requests, and
    the idle limit of uploads in progress (which a drain shortens).

    Used only from the event loop thread, so plain arithmetic is safe.
    """

    def __init__(self, limit: int, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.limit = limit
        self.used = 0
        self.idle_s = idle_timeout_s
        self.draining = False
        self._receiving: set[_Held] = set()

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise UploadsBusy(
                f"The server is receiving {self.used:,} bytes of other uploads; with this one's {n:,} more that is "
                f"over its limit of {self.limit:,} bytes. Retry shortly."
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n

    def drain(self, idle_s: float = DRAIN_IDLE_S) -> None:
        """From now on cut (503 draining) every upload in progress that goes `idle_s` without a byte
        (0: all of them, at once); uploads that stalled longer ago are cut at once."""
        self.draining = True
        self.idle_s = min(self.idle_s, idle_s)
        for held in list(self._receiving):
            held.wake()


class _Held:
    """The bytes one request holds in an `UploadBudget`, and its receiving state."""

    def __init__(self, budget: UploadBudget | None) -> None:
        self.budget = budget
        self.bytes = 0
        self._poke: asyncio.Future[None] | None = None

    def grow_to(self, n: int) -> None:
        if self.budget is not None and n > self.bytes:
            self.budget.take(n - self.bytes)
            self.bytes = n

    def release(self) -> None:
        if self.budget is not None:
            self.budget.give(self.bytes)
        self.bytes = 0

    def wake(self) -> None:
        if self._poke is not None and not self._poke.done():
            self._poke.set_result(None)

    async def receive(self, receive: Receive, deadline: float | None) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive: 408 after `idle_s` without a byte or at `deadline`, 503
        when a drain cuts it, 499 when the client goes away."""
        budget = self.budget
        if budget is not None:
            budget._receiving.add(self)
        message: asyncio.Future | None = None
        last = time.monotonic()
        try:
            while True:
                idle_s = budget.idle_s if budget is not None else IDLE_TIMEOUT_S
                now = time.monotonic()
                if now - last >= idle_s:
                    if budget is not None and budget.draining:
                        raise upload_cut()
                    raise upload_timeout(f"No part of the body arrived for {idle_s:g} s")
                if deadline is not None and now >= deadline:
                    raise upload_timeout("The body was still arriving at the request's deadline")
                if message is None:
                    message = asyncio.ensure_future(receive())
                self._poke = asyncio.get_running_loop().create_future()
                until = last + idle_s if deadline is None else min(last + idle_s, deadline)
                await asyncio.wait({message, self._poke}, timeout=until - now, return_when=asyncio.FIRST_COMPLETED)
                if not message.done():
                    continue  # timed out or woken by a drain: check the limits again
                got = message.result()
                message = None
                if got["type"] == "http.disconnect":
                    raise Disconnected()
                last = time.monotonic()
                if got.get("body"):
                    yield got["body"]
                if not got.get("more_body", False):
                    return
        finally:
            if message is not None:
                message.cancel()
            if budget is not None:
                budget._receiving.discard(self)


async def _chunks(request: Request, limit: int, held: _Held, deadline: float | None) -> AsyncIterator[bytes]:
    """The body's chunks, refused with 413 as soon as it is known to exceed `limit` (from Content-Length
    before a byte is read, else as it arrives), each counted in `held`'s budget as it arrives (429)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large(limit, f"{int(declared):,}")
    size = 0
    async with contextlib.aclosing(held.receive(request.receive, deadline)) as body:
        async for chunk in body:
            size += len(chunk)
            if size > limit:
                raise too_large(limit, f"over {limit:,}")
            held.grow_to(size)
            yield chunk


@contextlib.asynccontextmanager
async def image_upload(request: Request, limit: int, budget: UploadBudget | None = None, deadline: float | None = None
                       ) -> AsyncIterator[bytes]:
    """The image bytes (see `image_bytes`), counted in `budget` until the block exits (after decoding)."""
    held = _Held(budget)
    try:
        yield await image_bytes(request, limit, held, deadline)
    finally:
        held.release()


@contextlib.asynccontextmanager
async def raw_upload(
    request: Request, limit: int, budget: UploadBudget | None = None, deadline: float | None = None
) -> AsyncIterator[tuple[bytes, Callable[[], None]]]:
    """(the whole body, whatever its content type; a `release()`): read as `image_upload` reads (413, 429,
    408, 503, 499), inflated if its Content-Encoding is gzip or deflate (`limit` applies to both sizes), its
    bytes counted in `budget` until `release()` is called (say, once what it carries is queued) or the block
    exits."""
    held = _Held(budget)
    try:
        async with contextlib.aclosing(_chunks(request, limit, held, deadline)) as chunks:
            body = b"".join([chunk async for chunk in chunks])
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            body = await asyncio.to_thread(inflate, body, encoding, limit)
            held.grow_to(len(body))  # what is held now is the inflated body (429 if the budget cannot take it)
        yield body, held.release
    finally:
        held.release()


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate (zlib) Content-Encoding undone, refused past `limit` bytes before more is inflated:
    a few kilobytes can inflate to gigabytes."""
    if encoding not in ("gzip", "deflate"):
        raise Unsupported(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none.")
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # either header, gzip's or zlib's
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadInput(f"The {encoding} body could not be inflated ({e}).") from None
    if len(out) > limit:
        raise TooLarge(f"The {encoding} body inflates to over {limit:,} bytes, the limit.")
    if not inflater.eof:
        raise BadInput(f"The {encoding} body ends before its compressed stream does.")
    return out


async def image_bytes(request: Request, limit: int, held: _Held | None = None, deadline: float | None = None) -> bytes:
    """The image from a multipart field `image` or from the raw body (`deadline`: time.monotonic() by
    which the body must have arrived)."""
    kind = check_content_type(request)
    held = held or _Held(None)
    async with contextlib.aclosing(_chunks(request, limit, held, deadline)) as chunks:
        if kind == "raw":
            return b"".join([chunk async for chunk in chunks])
        try:
            form = await MultiPartParser(request.headers, chunks, max_files=4, max_fields=16).parse()
        except MultiPartException as e:
            raise BadInput(f"The multipart body could not be parsed: {e.message}") from None
    try:
        field = form.get("image")
        if isinstance(field, UploadFile):
            return await field.read()
        if isinstance(field, str):
            raise BadInput("The multipart field 'image' must be a file upload, not a text field.")
        names = ", ".join(form.keys()) or "none"
        raise BadInput(f"The multipart body has no field 'image' (fields: {names}).")
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
        allowed = ", ".join(OUTPUTS.values())
        raise NotAcceptable(f"Accept {accept!r} allows none of {allowed}; use ?format=png|jpeg|webp.")
    return best


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client goes away. Only call once the body has been read: after that, the
    server's next message is `http.disconnect` (or nothing until the response is sent)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
