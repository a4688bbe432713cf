"""Headless Chromium from Debian, driven by Playwright. Never a downloaded browser: there is none here.

A missing Chromium fails the browser tests (it does not skip them): CI installs it with
scripts/setup-dev.sh, and a suite that silently skips its only browser test proves nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MPRNET_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Package scope, not session: Playwright's sync API keeps an asyncio loop marked running in this
# thread while it is started, which would break asyncio.run() in any test that comes after.
@pytest.fixture(scope="package")
def browser() -> Iterator:
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: run scripts/setup-dev.sh (it installs Debian's chromium), "
            "or point MPRNET_CHROMIUM at a Chromium executable",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class PageWatch:
    """What the page did that a test should know about: script errors and every URL it requested."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []


@pytest.fixture
def page_and_watch(browser) -> Iterator[tuple]:
    context = browser.new_context(viewport={"width": 1200, "height": 1000}, accept_downloads=True)
    context.set_default_timeout(30_000)
    page = context.new_page()
    watch = PageWatch()
    page.on("pageerror", lambda exc: watch.errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and watch.errors.append(msg.text))
    page.on("request", lambda req: watch.requests.append(req.url))
    yield page, watch
    context.close()


def assert_stayed_home(watch: PageWatch, base_url: str, allowed_console: tuple[str, ...] = ()) -> None:
    """No script errors, and nothing fetched from anywhere but the service (blob: and data: are local)."""
    foreign = [u for u in watch.requests if not u.startswith((base_url + "/", "blob:", "data:"))]
    assert foreign == [], f"the page fetched from elsewhere: {foreign}"
    errors = [e for e in watch.errors if not any(a in e for a in allowed_console)]
    assert errors == [], f"errors in the page: {errors}"
