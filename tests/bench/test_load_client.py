"""bench/load.py's RawClient against a scripted HTTP/1.1 server: keep-alive, chunked, close."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.load import Call, RawClient, Sample, native_calls, one, overload, saturation, status_mix, v2_calls

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def scripted_server(answers: list[bytes]):
    """Answers each request (read by its content-length) with the next canned response; records
    (connection number, request line, body)."""
    seen: list[tuple[int, str, bytes]] = []
    conns = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        me = conns
        while answers:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            lines = head.decode().split("\r\n")
            length = next(int(v) for k, _, v in (line.partition(":") for line in lines) if k.lower() == "content-length")
            seen.append((me, lines[0], await reader.readexactly(length)))
            answer = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            if b"connection: close" in answer:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def test_keep_alive_chunked_and_close():
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nserver-timing: queue;dur=1.5, inference;dur=20.0\r\n\r\nhello",
        b"HTTP/1.1 429 Too Many Requests\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ]
    server, port, seen = await scripted_server(answers)
    url = f"http://127.0.0.1:{port}/restore/denoise?format=png"
    async with server, RawClient() as client:
        r1 = await client.post(url, content=b"IMAGE", headers={"content-type": "image/png"})
        assert (r1.status_code, r1.content, r1.headers["server-timing"]) == (200, b"hello", "queue;dur=1.5, inference;dur=20.0")
        r2 = await client.post(url, content=b"x" * 70000, headers={})
        assert (r2.status_code, r2.content) == (429, b"abcde")
        r3 = await client.post(url, content=b"", headers={})
        assert r3.status_code == 503
        r4 = await client.post(url, content=b"again", headers={})
        assert (r4.status_code, r4.content) == (200, b"ok")
    assert [s[1] for s in seen] == ["POST /restore/denoise?format=png HTTP/1.1"] * 4
    assert [len(s[2]) for s in seen] == [5, 70000, 0, 5]
    assert [s[0] for s in seen] == [1, 1, 1, 2]  # kept alive until the server said close


CALL = Call("/restore/denoise", b"png", {"content-type": "image/png"}, 16)


async def test_one_records_timing_and_connection_failure():
    server, port, _ = await scripted_server(
        [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nserver-timing: decode;dur=2.0, queue;dur=0.5\r\n\r\n"]
    )
    async with server, RawClient() as client:
        ok = await one(client, f"http://127.0.0.1:{port}", CALL)
    assert ok.status == 200 and ok.timing == {"decode": 2.0, "queue": 0.5} and ok.pixels == 16
    async with RawClient() as client:  # the server is gone: a failed sample, not an exception
        failed = await one(client, f"http://127.0.0.1:{port}", CALL)
    assert failed.status == 0


def test_v2_calls_carry_the_same_pixels_as_the_native_ones():
    from service.v2.images import image_call
    from service.v2.protocol import parse_request
    from tests.service.conftest import decode, png, rand_image

    images = [png(rand_image(5, 7, seed=1)), png(rand_image(3, 2, seed=2))]
    sizes = [(7, 5), (2, 3)]
    native, v2 = native_calls("deblur", images, sizes), v2_calls("deblur", images, sizes)
    for n, v, data in zip(native, v2, images, strict=True):
        assert (n.path, n.body, n.pixels) == ("/restore/deblur", data, v.pixels)
        assert v.path == "/v2/models/deblur/infer" and v.headers["content-type"] == "application/octet-stream"
        call = image_call(parse_request(v.body, v.headers["inference-header-content-length"]), 1)
        assert np.array_equal(call.pixels[0], decode(data)) and call.outputs[0].binary


async def test_overload_clients_wait_out_retry_after_and_the_mix_counts_each_status():
    answers = [b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nretry-after: 1\r\n\r\n"]
    answers += [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"] * 50
    server, port, seen = await scripted_server(answers)
    async with server:
        samples, elapsed = await overload(f"http://127.0.0.1:{port}", [CALL], 1, 0.3)
    assert samples[0].status == 429 and samples[0].retry_after == 1.0
    assert len(samples) == 1  # it waited (the rest of the run) instead of asking again at once
    (row,) = status_mix(samples, elapsed)
    assert row["status"] == "429" and row["answers"] == 1 and row["share %"] == 100.0


def test_status_mix_and_saturation():
    samples = [Sample(10.0, 200), Sample(30.0, 200), Sample(2.0, 429), Sample(0.0, 0)]
    rows = {r["status"]: r for r in status_mix(samples, 2.0)}
    assert rows["200"]["answers"] == 2 and rows["200"]["max ms"] == 30.0 and rows["200"]["per s"] == 1.0
    assert rows["429"]["share %"] == 25.0 and rows["failed"]["answers"] == 1
    sweep = [{"req/s": 1.0}, {"req/s": 1.9}, {"req/s": 2.0}, {"req/s": 1.95}]
    assert saturation(sweep, [1, 2, 4, 8]) == 2  # within 10 % of the best


async def test_a_connection_the_server_closed_while_idle_is_not_reused():
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        fields = (line.partition(":") for line in head.decode().split("\r\n"))
        length = next(int(v) for k, _, v in fields if k == "content-length")
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # keep-alive, then closed anyway
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, RawClient() as client:
        assert (await client.post(url, b"a", {})).status_code == 200
        (idle_reader, _), = next(iter(client._idle.values()))
        await asyncio.wait_for(idle_reader.read(), 10)  # returns at EOF: the server's FIN reaches the pooled connection
        assert (await client.post(url, b"b", {})).status_code == 200


async def test_a_kept_alive_connection_closed_as_the_request_goes_out_is_retried_once_on_a_new_one():
    conns = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        await reader.readuntil(b"\r\n\r\n")
        if conns == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the next request on this connection: closed unanswered
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nsecond")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, RawClient() as client:
        assert (await client.post(url, b"", {})).content == b"first"
        assert (await client.post(url, b"", {})).content == b"second"
    assert conns == 2
