"""examples/client.py against the stub API: names kept, retries honour Retry-After, bounded
concurrency, failures summarised with a non-zero exit. The stub inverts colours, so an output that
equals the inverted input came from the server and not from a copy of the file."""

from __future__ import annotations

import time
from email.utils import formatdate
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.client.stub_api import Scripted


def make_image(path: Path, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def run(client_module, *args: str) -> int:
    return client_module.main([*args, "--no-progress"])


def test_restores_a_folder_keeping_relative_names(client_module, stub, tmp_path, capsys):
    url, state = stub
    src, out = tmp_path / "in", tmp_path / "out"
    a = make_image(src / "a.png", (37, 21), seed=1)
    b = make_image(src / "nested" / "b.png", (16, 9), seed=2)
    (src / "notes.txt").write_text("not an image, and not picked up")

    rc = run(client_module, str(src), "-o", str(out), "--url", url, "--task", "denoise", "--token", "t0k", "--deadline", "2.5")

    assert rc == 0, capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["a.png", "nested/b.png"]
    for name, original in [("a.png", a), ("nested/b.png", b)]:
        with Image.open(out / name) as restored:
            assert restored.size == original.size
            assert np.array_equal(np.asarray(restored), np.asarray(ImageOps.invert(original)))
    assert state.tokens == ["Bearer t0k"] * 2
    assert state.deadlines == ["2.5"] * 2
    assert "restored 2 of 2 images" in capsys.readouterr().err


def test_changing_the_format_changes_only_the_suffix(client_module, stub, tmp_path):
    url, _ = stub
    make_image(tmp_path / "in" / "photo.png", (8, 8))
    assert run(client_module, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--url", url, "--format", "webp") == 0
    with Image.open(tmp_path / "out" / "photo.webp") as img:
        assert img.format == "WEBP"


def test_retries_429_and_503_waiting_out_retry_after(client_module, stub, tmp_path, capsys):
    url, state = stub
    state.script.extend(
        [
            Scripted(429, "busy", "The server is busy.", {"Retry-After": "1"}),
            Scripted(503, "draining", "The server is shutting down.", {"Retry-After": formatdate(time.time() + 4, usegmt=True)}),
        ]
    )
    make_image(tmp_path / "in" / "x.png", (8, 8))

    rc = run(client_module, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--url", url, "--retries", "3")

    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "x.png").is_file()
    assert len(state.arrivals) == 3
    first_wait, second_wait = np.diff(state.arrivals)
    assert first_wait >= 1.0  # Retry-After: 1 (seconds)
    # An HTTP date 4 s after scripting, whole seconds only, served about 1 s later: 2 to 3 s ahead.
    assert second_wait >= 1.5
    assert "(2 retries)" in capsys.readouterr().err


def test_gives_up_after_the_bounded_number_of_retries(client_module, stub, tmp_path, capsys):
    url, state = stub
    state.script.extend([Scripted(429, "busy", "The server is busy.", {"Retry-After": "0"})] * 10)
    make_image(tmp_path / "in" / "x.png", (8, 8))

    rc = run(client_module, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--url", url, "--retries", "2")

    err = capsys.readouterr().err
    assert rc == 1
    assert len(state.arrivals) == 3
    assert "HTTP 429 busy: The server is busy. (gave up after 3 attempts)" in err
    assert not (tmp_path / "out" / "x.png").exists()


def test_concurrency_is_used_and_bounded(client_module, stub, tmp_path):
    url, state = stub
    state.rendezvous = 2  # the stub holds each request until two are in flight at once
    for i in range(6):
        make_image(tmp_path / "in" / f"{i}.png", (8, 8), seed=i)

    rc = run(client_module, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--url", url, "-j", "2")

    assert rc == 0
    assert state.max_in_flight == 2
    assert len(list((tmp_path / "out").iterdir())) == 6


def test_a_bad_file_fails_alone_with_the_servers_message(client_module, stub, tmp_path, capsys):
    url, state = stub
    make_image(tmp_path / "in" / "good.png", (8, 8))
    (tmp_path / "in" / "broken.png").write_bytes(b"this is text, not a PNG")

    rc = run(client_module, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--url", url)

    err = capsys.readouterr().err
    assert rc == 1
    assert len(state.arrivals) == 2  # a 400 is not retried
    assert (tmp_path / "out" / "good.png").is_file()
    assert "restored 1 of 2 images" in err
    assert "broken.png: HTTP 400 invalid_image: This file is not an image the service can read." in err


def test_a_rejected_token_stops_the_run(client_module, stub, tmp_path, capsys):
    url, state = stub
    state.script.append(Scripted(401, "unauthorized", "Missing or wrong bearer token."))
    for i in range(3):
        make_image(tmp_path / "in" / f"{i}.png", (8, 8))

    rc = run(client_module, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--url", url, "-j", "1", "--token", "s3cret")

    err = capsys.readouterr().err
    assert rc == 1
    assert state.tokens == ["Bearer s3cret"]  # one request, then the others are not attempted
    assert err.count("not attempted: HTTP 401 unauthorized") == 2


def test_no_images_is_a_usage_error(client_module, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert client_module.main([str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 2
    assert "no images found" in capsys.readouterr().err


def test_an_unreachable_server_fails_after_bounded_retries(client_module, tmp_path, capsys):
    make_image(tmp_path / "in" / "x.png", (8, 8))
    # Port 9 (discard) on 127.0.0.1: nothing listens, the connection is refused at once.
    rc = run(
        client_module,
        str(tmp_path / "in"),
        "-o",
        str(tmp_path / "out"),
        "--url",
        "http://127.0.0.1:9",
        "--retries",
        "1",
        "--max-wait",
        "0.1",
    )
    assert rc == 1
    assert "network error: ConnectError" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "expected"), [("3", 3.0), (" 0 ", 0.0), ("soon", None), (None, None)])
def test_parse_retry_after(client_module, value, expected):
    assert client_module.parse_retry_after(value) == expected


def test_parse_retry_after_http_date(client_module):
    assert 8 <= client_module.parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
