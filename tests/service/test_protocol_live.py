"""Against a real `python -m service` on 127.0.0.1: request heads over their limits (431), log lines a
client cannot forge, and SIGHUP draining like SIGTERM, with a stalled upload cut by the drain."""

from __future__ import annotations

import json
import re
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.live_server import live_server, start_server, wait_ready
from tests.service.conftest import png, rand_image
from tests.service.test_live import BIG, post, wait_metric

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"MPRNET_LOG_LEVEL": "info", "MPRNET_MAX_HEADER_BYTES": "16384", "MPRNET_MAX_HEADER_COUNT": "50"}
    with live_server(tmp_path_factory.mktemp("protocol"), env=env) as s:
        yield s


def exchange(port: int, head: bytes, pieces: int = 1) -> bytes:
    """Send a request head (in `pieces`), return what the server answers before it closes (after a 431,
    or after answering a request that says `Connection: close`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        step = -(-len(head) // pieces)
        try:
            for i in range(0, len(head), step):
                s.sendall(head[i : i + step])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before all of it was sent
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "head",
    [
        b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 << 20) + b"\r\n\r\n",  # one 2 MB header
        b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(60)) + b"\r\n",
    ],
    ids=["size", "count"],
)
def test_a_request_head_over_its_limits_is_431_and_the_server_keeps_serving(server, head):
    answer = exchange(server.port, head, pieces=64)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert json.loads(body)["code"] == "headers_too_large"
    assert httpx.get(server.url + "/livez", timeout=30).status_code == 200


def test_a_request_head_within_the_limits_is_served(server):
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(45))  # 45 lines, 9.5 KB
    head = b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers
    assert exchange(server.port, head + b"\r\n", pieces=7).startswith(b"HTTP/1.1 200 ")


def test_a_client_cannot_forge_or_colour_log_lines(server):
    forged = "/restore/deblur%0a2099-01-01%2000:00:00,000%20INFO%20service%20[-]%20forged%1b[2J%e2%80%ae"
    r = httpx.post(server.url + forged, content=b"x", headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 404
    wait_metric(server, lambda t: "forged" in server.log(), "the access log line")
    log = server.log()
    assert not any(line.startswith("2099-01-01") for line in log.splitlines())
    assert "\x1b" not in log and "\u202e" not in log
    line = next(line for line in log.splitlines() if "forged" in line)
    escaped = r"POST /restore/deblur\\x0a2099-01-01 00:00:00,000 INFO service \[-\] forged\\x1b\[2J\\u202e 404"
    assert re.search(escaped, line), line


def test_sighup_drains_like_sigterm_and_a_stalled_upload_gets_a_json_503(tmp_path):
    server = start_server(tmp_path, {"MPRNET_GRACE_PERIOD_S": "60", "MPRNET_LOG_LEVEL": "info"})
    try:
        wait_ready(server)
        body = png(rand_image(32, 32, seed=3))
        head = "POST /restore/denoise HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        head += f"Content-Length: {len(body)}\r\n"
        with ThreadPoolExecutor(1) as pool, socket.create_connection(("127.0.0.1", server.port), timeout=60) as stalled:
            big = pool.submit(post, server.url, rand_image(*BIG, seed=1), "deblur")
            queued = 'mprnet_queue_depth_requests{task="deblur"} 1.0'
            wait_metric(server, lambda t: queued in t, "the big request to queue")
            stalled.sendall(head.encode() + b"\r\n" + body[:100])  # and then nothing
            wait_metric(server, lambda t: "mprnet_upload_bytes_in_flight 100.0" in t, "the stalled upload to arrive")
            server.proc.send_signal(signal.SIGHUP)
            answer = b""
            while chunk := stalled.recv(65536):
                answer += chunk
            assert big.result().status_code == 200  # admitted work finishes
        status, _, content = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 503 "), answer[:300]
        assert json.loads(content)["code"] == "draining"
        assert server.proc.wait(60) == 0
        log = server.log()
        assert "SIGHUP received: draining" in log and "Traceback" not in log, log
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
