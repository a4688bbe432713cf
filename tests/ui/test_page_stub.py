"""The try-it page in headless Chromium against the stub API (tests/client/stub_api.py), which can
answer what the real service answers only under load or mid-deploy (429, 503) or with a large image
(413). The same page against the real service: test_page_live.py."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import pytest
from PIL import Image

from tests.client.stub_api import Scripted, StubState, create_stub_app, serve
from tests.ui.conftest import assert_stayed_home
from tests.ui.pageflow import make_photo, restore, result_size, timing_steps, wait_for_result

FAILED_LOAD = ("Failed to load resource",)  # Chromium logs every 4xx/5xx fetch to the console


@pytest.fixture
def stub() -> Iterator[tuple[str, StubState]]:
    state = StubState()
    with serve(create_stub_app(state)) as url:
        yield url, state


def test_restore_shows_comparison_timings_and_download(page_and_watch, stub, tmp_path):
    page, watch = page_and_watch
    url, _ = stub
    image = make_photo(tmp_path / "street.png", (123, 77))  # odd sizes: nothing may round them

    restore(page, url, image, task="derain")
    wait_for_result(page)

    assert result_size(page) == (123, 77)
    assert set(timing_steps(page)) == {"decode", "queue", "inference", "encode"}
    assert "123 × 77 px" in page.locator("#fact-size").inner_text()
    assert len(page.locator("#fact-request-id").inner_text()) == 32
    assert "Done: street.png restored (derain)" in page.get_by_role("status").inner_text()
    assert page.get_by_role("button", name="Cancel").is_hidden()

    with page.expect_download() as info:
        page.get_by_role("link", name="Download the result").click()
    saved = tmp_path / "downloaded.png"
    info.value.save_as(saved)
    assert info.value.suggested_filename == "street-derain.png"
    with Image.open(saved) as img:
        assert img.size == (123, 77)

    page.screenshot(path=str(tmp_path / "stub-result.png"), full_page=True)
    assert_stayed_home(watch, url)


def test_slider_moves_with_keyboard_and_side_by_side_view(page_and_watch, stub, tmp_path):
    page, watch = page_and_watch
    url, _ = stub
    restore(page, url, make_photo(tmp_path / "p.png", (640, 480)))
    wait_for_result(page)
    slider = page.get_by_role("slider", name="Before")
    after = page.locator("figure.after")
    # The frame hugs the picture, so "30%" on the slider is 30% of the image, not of empty space.
    assert after.bounding_box()["width"] == pytest.approx(page.locator("#after").bounding_box()["width"], abs=1)

    slider.focus()
    page.keyboard.press("End")  # all "before"
    assert slider.get_attribute("aria-valuetext") == "100% before, 0% after"
    assert "100%" in after.evaluate("el => getComputedStyle(el).clipPath")
    page.keyboard.press("Home")  # all "after"
    assert after.evaluate("el => getComputedStyle(el).clipPath") in ("inset(0px 0px 0px 0%)", "inset(0px)", "none")

    page.get_by_role("button", name="Side by side").click()
    assert page.get_by_role("button", name="Side by side").get_attribute("aria-pressed") == "true"
    assert after.evaluate("el => getComputedStyle(el).clipPath") == "none"
    assert not slider.is_visible()
    before_box, after_box = page.locator("figure.before").bounding_box(), after.bounding_box()
    assert after_box["x"] >= before_box["x"] + before_box["width"]  # really side by side
    assert_stayed_home(watch, url)


def test_drop_a_file_on_the_zone(page_and_watch, stub, tmp_path):
    page, watch = page_and_watch
    url, _ = stub
    data = base64.b64encode(make_photo(tmp_path / "dropped.png", (40, 30)).read_bytes()).decode()
    page.goto(url + "/")
    transfer = page.evaluate_handle(
        """b64 => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    const dt = new DataTransfer(); dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
                    return dt; }""",
        data,
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    assert "dropped.png" in page.locator("#file-info").inner_text()
    page.get_by_role("button", name="Restore").click()
    wait_for_result(page)
    assert result_size(page) == (40, 30)
    assert_stayed_home(watch, url)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            Scripted(429, "busy", "All workers are busy.", {"Retry-After": "7"}),
            ["The server is busy", r"You can try again in [1-7] seconds?\.", "All workers are busy."],
        ),
        (
            Scripted(503, "not_ready", "The model is still loading.", {"Retry-After": "5"}),
            ["The service is not ready", r"You can try again (in [1-5] seconds?|now)\.", "The model is still loading."],
        ),
        (
            Scripted(413, "too_many_pixels", "The image has 80 megapixels; the limit is 40."),
            ["This image is too large", "The image has 80 megapixels; the limit is 40."],
        ),
        (
            Scripted(415, "unsupported_media_type", "HEIC images are not supported."),
            ["This file type is not supported", "HEIC images are not supported."],
        ),
        (Scripted(504, "deadline_exceeded", "The request ran past its deadline."), ["could not finish this image in time"]),
        (Scripted(401, "unauthorized", "Missing or wrong bearer token."), ["needs a valid API token"]),
    ],
    ids=["429", "503", "413", "415", "504", "401"],
)
def test_api_errors_read_plainly(page_and_watch, stub, tmp_path, answer, expected):
    page, watch = page_and_watch
    url, state = stub
    state.script.append(answer)

    restore(page, url, make_photo(tmp_path / "p.png", (16, 16)))

    alert = page.get_by_role("alert")
    alert.wait_for(state="visible")
    text = alert.inner_text()
    for pattern in expected:  # the countdown may have ticked by the time the text is read
        assert re.search(pattern, text), (pattern, text)
    page.screenshot(path=str(tmp_path / "error.png"))
    assert page.get_by_role("button", name="Restore").is_enabled()  # the person can try again
    assert page.locator("#result").is_hidden()
    assert_stayed_home(watch, url, allowed_console=FAILED_LOAD)


def test_busy_countdown_ends_and_a_retry_works(page_and_watch, stub, tmp_path):
    page, watch = page_and_watch
    url, state = stub
    state.script.append(Scripted(429, "busy", "All workers are busy.", {"Retry-After": "1"}))
    restore(page, url, make_photo(tmp_path / "p.png", (16, 16)))
    page.get_by_text("You can try again now.").wait_for(timeout=5_000)

    page.get_by_role("button", name="Restore").click()
    wait_for_result(page)
    assert page.get_by_role("alert").is_hidden()
    assert_stayed_home(watch, url, allowed_console=FAILED_LOAD)


def test_a_non_image_file_gets_a_readable_message(page_and_watch, stub, tmp_path):
    page, watch = page_and_watch
    url, _ = stub
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: milk, eggs")

    restore(page, url, notes)

    alert = page.get_by_role("alert")
    alert.wait_for(state="visible")
    assert "could not read this file as an image" in alert.inner_text()
    assert_stayed_home(watch, url, allowed_console=FAILED_LOAD)


def test_narrow_screen_has_no_sideways_scrolling(browser, stub, tmp_path):
    url, _ = stub
    context = browser.new_context(viewport={"width": 360, "height": 740})
    try:
        page = context.new_page()
        restore(page, url, make_photo(tmp_path / "p.png", (300, 200)))
        wait_for_result(page)
        page.get_by_role("button", name="Side by side").click()
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(tmp_path / "narrow.png"), full_page=True)
    finally:
        context.close()


def test_a_tall_image_fits_the_screen_and_the_frame_hugs_it(page_and_watch, stub, tmp_path):
    page, watch = page_and_watch
    url, _ = stub
    restore(page, url, make_photo(tmp_path / "tall.png", (300, 2000)))
    wait_for_result(page)
    img, frame = page.locator("#after").bounding_box(), page.locator("figure.after").bounding_box()
    viewport = page.viewport_size["height"]
    assert img["height"] <= 0.75 * viewport + 1
    assert img["width"] == pytest.approx(300 * img["height"] / 2000, abs=1)  # aspect ratio kept
    assert frame["width"] == pytest.approx(img["width"], abs=1)
    assert_stayed_home(watch, url)


def test_tasks_the_server_does_not_offer_are_disabled(page_and_watch, stub):
    page, watch = page_and_watch
    url, state = stub
    state.tasks = ("denoise",)
    page.goto(url + "/")
    derain = page.get_by_role("radio", name="Derain")
    derain.wait_for()
    page.get_by_text("not on this server").first.wait_for()  # filled in from GET tasks
    assert derain.is_disabled() and page.get_by_role("radio", name="Deblur").is_disabled()
    assert page.get_by_role("radio", name="Denoise").is_checked()  # moved off the disabled default
    assert "Up to 50.0 MB and 25 megapixels." in page.locator("#drop-zone").inner_text()
    assert_stayed_home(watch, url)


def test_cancel_stops_waiting(page_and_watch, stub, tmp_path):
    page, watch = page_and_watch
    url, state = stub
    state.rendezvous, state.hold_timeout = 2, 3.0  # the one request is held: the page stays busy
    restore(page, url, make_photo(tmp_path / "p.png", (16, 16)))
    cancel = page.get_by_role("button", name="Cancel")
    cancel.click()
    page.get_by_role("status").filter(has_text="Cancelled.").wait_for()
    assert cancel.is_hidden() and page.get_by_role("button", name="Restore").is_enabled()
    assert page.locator("#result").is_hidden() and page.get_by_role("alert").is_hidden()
    assert_stayed_home(watch, url)
