"""Steps a person takes on the try-it page, found the way assistive technology finds them (by role
and label), so a control that loses its label breaks these tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_photo(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A smooth colour gradient with noise: something to look at in a screenshot."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 0 * x], axis=-1)
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def restore(page, base_url: str, image: Path, task: str = "denoise", fmt: str | None = None, token: str | None = None) -> None:
    """Open the page, choose the task and the file, press Restore (does not wait for the answer)."""
    page.goto(base_url + "/")
    if fmt or token:
        page.locator("summary", has_text="Options").click()
    if token:
        page.get_by_label("API token").fill(token)
        page.get_by_label("API token").dispatch_event("change")
    if fmt:
        page.get_by_label("Result format").select_option(fmt)
    page.get_by_role("radio", name=task.capitalize()).check()
    page.get_by_label("choose a file").set_input_files(str(image))
    page.get_by_role("button", name="Restore").click()


def wait_for_result(page, timeout_ms: float = 60_000) -> None:
    page.get_by_role("heading", name="Before and after").wait_for(state="visible", timeout=timeout_ms)


def result_size(page) -> tuple[int, int]:
    """The restored image's own size in pixels, as the browser decoded it."""
    w, h = page.evaluate("() => [document.getElementById('after').naturalWidth, document.getElementById('after').naturalHeight]")
    return int(w), int(h)


def timing_steps(page) -> dict[str, float]:
    """The Server-Timing breakdown as the page shows it: step name -> ms."""
    rows = page.locator("#timings tbody tr[data-step]")
    return {
        rows.nth(i).get_attribute("data-step"): float(rows.nth(i).locator("td.num").inner_text()) for i in range(rows.count())
    }
