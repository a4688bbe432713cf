"""uvicorn's HTTP/1.1 protocol (httptools) with limits on the request head: 431 beyond them.

Neither httptools nor uvicorn bounds the size or number of request headers, and httptools gathers a
header value by appending each piece to what it holds, so one header of tens of megabytes keeps the
event loop busy for seconds and every other request waits. Here the bytes and lines of each request
head are counted as they arrive, before the parser sees them; a head over `max_bytes` or with more
than `max_count` header lines is answered 431 with a JSON body and the connection is closed: after a
short linger, reading and dropping what the client still sends, so that the answer is not lost to the
TCP reset a close with unread data would cause.
"""

from __future__ import annotations

import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("service.access")
LINGER_S, LINGER_BYTES = 2.0, 8 << 20  # how long, and how much, a refused client may still send


class LimitedHeadProtocol(HttpToolsProtocol):
    max_bytes = 32 * 1024  # request line and headers together
    max_count = 100  # header lines

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def, override]
        super().connection_made(transport)
        self._in_head, self._head_bytes, self._head_lines, self._tail = True, 0, 0, b""
        self._dropped: int | None = None  # bytes dropped after a 431 (None: not refused)

    def data_received(self, data: bytes) -> None:
        if self._dropped is not None:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        if self._in_head and not self._count(data):
            self._refuse()
            return
        super().data_received(data)

    def _count(self, data: bytes) -> bool:
        """Count the part of `data` that belongs to the head; False when the head is over a limit."""
        end = (self._tail + data).find(b"\r\n\r\n")
        part = data if end < 0 else data[: max(0, end + 4 - len(self._tail))]
        self._head_bytes += len(part)
        self._head_lines += part.count(b"\n")
        if end >= 0:
            self._in_head = False  # until the end of this request's body (`on_message_complete`)
        else:
            self._tail = (self._tail + data)[-3:]
        # lines: the request line, one per header, and the empty line that ends the head
        return self._head_bytes <= self.max_bytes and self._head_lines - 2 <= self.max_count

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes, self._head_lines, self._tail = False, 0, 0, b""
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what comes next on this connection is the head of the next request

    def _refuse(self) -> None:
        over = "bytes" if self._head_bytes > self.max_bytes else "lines"
        detail = (
            f"The request's headers are over the server's limit of {self.max_bytes:,} bytes and {self.max_count} lines "
            f"(received {self._head_bytes:,} bytes in {max(0, self._head_lines - 1)} lines so far)."
        )
        client = "%s:%d" % self.client if self.client else "-"
        log.warning("431 to %s: request head over its limit of %s", client, over)
        body = json.dumps({"detail": detail, "code": "headers_too_large"}).encode()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self._in_head, self._dropped = False, 0
        self.transport.write(head + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then end of stream; keep reading a moment, then close
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def limited_head_protocol(max_bytes: int, max_count: int) -> type[LimitedHeadProtocol]:
    """The protocol class for `uvicorn.Config(http=...)` with these limits."""
    return type("LimitedHeadProtocol", (LimitedHeadProtocol,), {"max_bytes": max_bytes, "max_count": max_count})
