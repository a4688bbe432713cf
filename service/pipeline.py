"""The pieces of one restore request that do not depend on the protocol it came in by.

`Service.restore` (encoded image out) and `Service.restore_pixels` (raw pixels out) run
decode -> plan -> submit -> wait -> assemble -> encode with these. A front-end hands in a `Source`:

- encoded image bytes (PNG, JPEG, ...), decoded in the codec threads;
- raw pixels, a (H, W, 3) uint8 RGB array, which skip decoding;
- a zero-argument callable returning an async context manager of image bytes (e.g. an HTTP upload
  being read), opened only after admission and left (releasing the upload's memory budget) once the
  request is queued, so a full queue answers before the body is read.

A front-end that can tell when its client went away passes `gone`: called once the request is queued,
it returns an awaitable that completes when the client is gone; the request is then dropped before
(further) compute. If that awaitable raises, the connection cannot be watched and the answer is
awaited alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, Union

import numpy as np
from torch import Tensor

from model.images import to_tensor, to_uint8

from . import codec
from .batcher import Job, MicroBatcher
from .errors import BadInput, Disconnected, TooLarge

Source = Union[bytes, np.ndarray, Callable[[], AbstractAsyncContextManager[bytes]]]
Gone = Callable[[], Awaitable[Any]]


@dataclass
class Timings:
    """Seconds one request spent in each step (decode is ~0 for raw pixels)."""

    decode: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    encode: float = 0.0

    def server_timing(self) -> str:
        """The value of a `Server-Timing` header, durations in ms."""
        steps = (("decode", self.decode), ("queue", self.queue), ("inference", self.inference), ("encode", self.encode))
        return ", ".join(f"{name};dur={seconds * 1e3:.1f}" for name, seconds in steps)


def opened(source: Source) -> AbstractAsyncContextManager[bytes | np.ndarray]:
    """The source's image (bytes or pixels) for an `async with`."""
    if isinstance(source, (bytes, np.ndarray)):
        return contextlib.nullcontext(source)
    return source()


def from_pixels(pixels: np.ndarray, max_pixels: int) -> codec.Decoded:
    """A (H, W, 3) uint8 RGB array -> what `codec.decode` would give for a PNG of it."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        shape = getattr(pixels, "shape", None)
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        detail = f"Raw pixels must be a height x width x 3 array of uint8 RGB values, got {dtype} of shape {shape}."
        raise BadInput(detail)
    height, width, _ = pixels.shape
    if height < 1 or width < 1:
        raise BadInput(f"The image has no pixels ({width}x{height}).")
    if height * width > max_pixels:
        detail = f"The image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}."
        raise TooLarge(detail)
    image, meta = to_tensor(pixels, keep_uint8=True)  # (3, H, W) uint8, a copy: the caller's array is not kept
    # as if it came as an RGB PNG, so every output format (JPEG, WebP too) can encode it
    meta = replace(meta, pil_mode="RGB")
    return codec.Decoded(image, meta, icc=None, exif=None, format="pixels")


def to_pixels(restored: Tensor) -> np.ndarray:
    """(3, H, W) restored image (uint8, or float in [0, 1] for a 16-bit input) -> a new (H, W, 3) uint8 RGB array."""
    return to_uint8(restored.detach().cpu()).permute(1, 2, 0).contiguous().numpy()


async def outputs(job: Job, batcher: MicroBatcher, gone: Gone | None) -> list[Tensor]:
    """The job's outputs; if the client goes away first, the job is dropped before (further) compute."""
    if gone is None:
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            batcher.cancel(job, Disconnected())
            raise
    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({job.future, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        batcher.cancel(job, Disconnected())
        raise
    finally:
        watch.cancel()
    if not job.future.done() and watch.done() and not watch.cancelled() and watch.exception() is not None:
        return await job.future  # the connection cannot be watched: wait for the answer alone
    if not job.future.done():
        batcher.cancel(job, Disconnected())
    return job.future.result()
