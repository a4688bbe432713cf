"""The try-it page in headless Chromium against the real service (`python -m service`, tiny random
weights): a restoration end to end, the service's own error messages, and the setting that turns the
page off. The server requires a token, so the page's token field and its 401 message are exercised."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.live_server import LiveServer, live_server
from tests.ui.conftest import assert_stayed_home
from tests.ui.pageflow import make_photo, restore, result_size, timing_steps, wait_for_result

SAMPLE = Path(__file__).resolve().parents[2] / "model" / "samples" / "coffee_noisy.png"  # 256 x 256 RGB
pytestmark = pytest.mark.slow  # starts the real service (tiny weights) once per module

TOKEN = "page-test-token"
MAX_PIXELS = 300 * 300
FAILED_LOAD = ("Failed to load resource",)  # Chromium logs every 4xx/5xx fetch to the console
# The page asks GET tasks before the token is typed in; on this server that first answer is a 401.
TASKS_401 = ("the server responded with a status of 401",)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    env = {"MPRNET_API_TOKEN": TOKEN, "MPRNET_MAX_PIXELS": str(MAX_PIXELS)}
    with live_server(tmp_path_factory.mktemp("page-live"), env=env) as server:
        yield server


def test_restore_a_photo_end_to_end(page_and_watch, server, tmp_path):
    page, watch = page_and_watch
    restore(page, server.url, SAMPLE, task="denoise", token=TOKEN)
    wait_for_result(page)

    with Image.open(SAMPLE) as original:
        assert result_size(page) == original.size
    steps = timing_steps(page)
    assert set(steps) == {"decode", "queue", "inference", "encode"}
    assert steps["inference"] > 0
    assert page.locator("#fact-request-id").inner_text().strip() not in ("", "–")
    assert page.get_by_role("alert").is_hidden()

    with page.expect_download() as info:
        page.get_by_role("link", name="Download the result").click()
    assert info.value.suggested_filename == "coffee_noisy-denoise.png"
    info.value.save_as(tmp_path / "downloaded.png")
    with Image.open(tmp_path / "downloaded.png") as restored, Image.open(SAMPLE) as original:
        assert (restored.size, restored.mode) == (original.size, original.mode)

    page.screenshot(path=str(tmp_path / "live-result.png"), full_page=True)
    assert_stayed_home(watch, server.url, allowed_console=TASKS_401)


def test_odd_sized_jpeg_comes_back_the_same_size(page_and_watch, server, tmp_path):
    page, watch = page_and_watch
    image = make_photo(tmp_path / "odd.png", (123, 77))
    Image.open(image).save(tmp_path / "odd.jpg", quality=92)
    restore(page, server.url, tmp_path / "odd.jpg", task="deblur", fmt="jpeg", token=TOKEN)
    wait_for_result(page)
    assert result_size(page) == (123, 77)
    assert "JPEG" in page.locator("#fact-result").inner_text()
    assert_stayed_home(watch, server.url, allowed_console=TASKS_401)


def test_a_non_image_file_gets_the_services_message(page_and_watch, server, tmp_path):
    page, watch = page_and_watch
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: milk, eggs")
    restore(page, server.url, notes, token=TOKEN)
    alert = page.get_by_role("alert")
    alert.wait_for(state="visible")
    text = alert.inner_text()
    assert "could not read this file as an image" in text or "not supported" in text, text
    assert "Request ID:" in text
    page.screenshot(path=str(tmp_path / "live-error.png"), full_page=True)
    assert_stayed_home(watch, server.url, allowed_console=FAILED_LOAD)


def test_too_many_pixels_says_too_large(page_and_watch, server, tmp_path):
    page, watch = page_and_watch
    restore(page, server.url, make_photo(tmp_path / "big.png", (400, 400)), token=TOKEN)  # 160,000 px > 90,000
    alert = page.get_by_role("alert")
    alert.wait_for(state="visible")
    assert "This image is too large" in alert.inner_text()
    assert_stayed_home(watch, server.url, allowed_console=FAILED_LOAD)


def test_without_the_token_the_page_asks_for_it(page_and_watch, server, tmp_path):
    page, watch = page_and_watch
    restore(page, server.url, make_photo(tmp_path / "p.png", (32, 32)))
    alert = page.get_by_role("alert")
    alert.wait_for(state="visible")
    assert "needs a valid API token" in alert.inner_text()
    assert_stayed_home(watch, server.url, allowed_console=FAILED_LOAD)


def test_the_page_is_not_in_the_api_schema(server):
    paths = httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    assert "/restore/{task}" in paths


def test_the_setting_turns_the_page_off(tmp_path):
    with live_server(tmp_path, env={"MPRNET_UI_ENABLED": "false"}) as off:
        assert httpx.get(off.url + "/", timeout=10).status_code == 404
        assert httpx.get(off.url + "/static/app.js", timeout=10).status_code == 404
        assert httpx.get(off.url + "/readyz", timeout=10).status_code == 200  # the API itself is there
