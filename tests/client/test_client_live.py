"""examples/client.py as a person runs it (a subprocess) against the real service (tiny random
weights): sizes and modes come back unchanged, names are kept, a server with a one-request queue
answers 429 and the client waits those out, and a bad file fails the run with the server's message."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import CLIENT_PATH
from tests.live_server import LiveServer, live_server

SAMPLE = Path(__file__).resolve().parents[2] / "model" / "samples" / "coffee_noisy.png"
pytestmark = pytest.mark.slow  # starts the real service (tiny weights) once per module

TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    # A queue of one request: a client with four connections is sure to meet 429 (busy).
    env = {"MPRNET_API_TOKEN": TOKEN, "MPRNET_QUEUE_MAX_REQUESTS": "1"}
    with live_server(tmp_path_factory.mktemp("client-live"), env=env) as server:
        yield server


def run_client(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLIENT_PATH), *args], check=False, capture_output=True, text=True, timeout=timeout)


def photos(folder: Path) -> dict[str, Image.Image]:
    """A few kinds of image a photo backend meets: RGB, gray, RGBA, an odd-sized JPEG, a nested one."""
    rng = np.random.default_rng(7)
    images = {
        "coffee.png": Image.open(SAMPLE).convert("RGB").crop((0, 0, 96, 80)),
        "gray.png": Image.fromarray(rng.integers(0, 256, (30, 50), dtype=np.uint8)),
        "logo.png": Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)),
        "odd.jpg": Image.fromarray(rng.integers(0, 256, (77, 123, 3), dtype=np.uint8)),
        "album/inner.webp": Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)),
        "album/more.png": Image.fromarray(rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)),
    }
    for name, img in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / name)
    return images


def test_a_folder_round_trip_through_a_busy_server(server, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    images = photos(src)
    busy_before = server.metric("mprnet_rejected_total", reason="queue_full")

    done = run_client(
        str(src),
        "-o",
        str(out),
        "--url",
        server.url,
        "--token",
        TOKEN,
        "--task",
        "deblur",
        "-j",
        "4",
        "--retries",
        "30",
        "--max-wait",
        "2",
    )

    assert done.returncode == 0, done.stderr
    assert f"restored {len(images)} of {len(images)} images" in done.stderr
    for name, original in images.items():
        with Image.open(out / name) as restored:  # same relative name, same format as the input
            assert (restored.size, restored.mode) == (original.size, original.mode), name
    # The server really turned some requests away, and the client really waited them out.
    assert server.metric("mprnet_rejected_total", reason="queue_full") > busy_before
    assert "0 retries" not in done.stderr


def test_a_file_the_server_cannot_read_fails_the_run(server, tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16), "white").save(tmp_path / "in" / "fine.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")

    done = run_client(str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--url", server.url, "--token", TOKEN, "-j", "1")

    assert done.returncode == 1
    assert "restored 1 of 2 images" in done.stderr
    assert "broken.jpg: HTTP 400" in done.stderr
    assert (tmp_path / "out" / "fine.png").is_file() and not (tmp_path / "out" / "broken.jpg").exists()


def test_a_wrong_token_fails_fast(server, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "in" / f"{i}.png")

    done = run_client(str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--url", server.url, "--token", "wrong", "-j", "1")

    assert done.returncode == 1
    assert "HTTP 401 unauthorized" in done.stderr
    assert done.stderr.count("not attempted") == 2
