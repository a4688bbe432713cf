"""8-bit pixels to and from the device: a quarter of float32's bytes over PCIe, conversion on the device.

`Uint8Transfer.submit` takes a uint8 batch (B, H, W, 3) or (B, 3, H, W) of any H and W and:

1. copies it into pinned host memory and uploads it on an upload stream (non-blocking);
2. on the compute stream, once the upload is done: converts to float in [0, 1] (a (B, H, W, 3)
   batch becomes a channels-last (B, 3, H, W) view for free), pads to a multiple of 8, runs the
   network, crops, scales, rounds and converts back to uint8;
3. downloads the result on a download stream into pinned memory.

It returns a `Pending` at once. Uploads and downloads run on their own streams, so a caller that
submits batch n+1 before waiting on batch n uploads n+1 while n computes. On the CPU the same calls
run synchronously. Rounding matches `images.from_tensor` (round half to even of x * 255), so the
result equals the float path's, bit for bit, when the network's output is the same.

`items_to_device` / `items_from_device` are the same boundary for the service's batches: same-shaped
items, each uint8 or float32, cross as one stacked copy per dtype (staged in pinned memory on CUDA)
and are scaled to one float batch on the device; results cross back rounded to uint8 on the device
for the uint8 items, float32 for the others. `stage_items` starts that upload on a stream of its own
and hands back a `StagedItems`, whose `take()` makes the compute stream wait for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .images import to_float, to_uint8
from .tiling import ceil_to, pad_to

LAYOUTS = ("BHWC", "BCHW")


def infer_layout(shape: tuple[int, ...], layout: str | None = None) -> str:
    """'BHWC' or 'BCHW' for a 4-D uint8 batch; ambiguous shapes (3 on both axes) must say which."""
    if len(shape) != 4:
        raise ValueError(f"expected a 4-D batch (B, H, W, 3) or (B, 3, H, W), got shape {tuple(shape)}")
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: use BHWC or BCHW")
        if shape[3 if layout == "BHWC" else 1] != 3:
            raise ValueError(f"a {layout} batch needs 3 channels, got shape {tuple(shape)}")
        return layout
    last, first = shape[3] == 3, shape[1] == 3
    if last and first:
        raise ValueError(f"shape {tuple(shape)} could be BHWC or BCHW: pass layout=")
    if not (last or first):
        raise ValueError(f"expected 3 color channels in (B, H, W, 3) or (B, 3, H, W), got shape {tuple(shape)}")
    return "BHWC" if last else "BCHW"


def staged(x: Tensor) -> Tensor:
    """A host tensor in pinned memory (itself when it is already pinned): a copy from it to CUDA need not block."""
    return x if x.is_pinned() else torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x)


def _rows(keys: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    """Item indices grouped by key, groups in the order their first item comes."""
    groups: dict[Hashable, list[int]] = {}
    for k, key in enumerate(keys):
        groups.setdefault(key, []).append(k)
    return groups


def _upload(items: list[Tensor], device: torch.device) -> Tensor:
    """Same-dtype host items -> one (B, 3, h, w) batch of that dtype on `device`."""
    if device.type != "cuda":
        return torch.stack(items).to(device)
    # The caching host allocator keeps the pinned block until the copy has read it, and the compute
    # stream orders after the copy.
    pinned = torch.empty((len(items), *items[0].shape), dtype=items[0].dtype, pin_memory=True)
    torch.stack(items, out=pinned)
    return pinned.to(device, non_blocking=True)


def items_to_device(items: Sequence[Tensor], device: torch.device) -> Tensor:
    """Same-shaped (3, h, w) host items, uint8 or float -> one (B, 3, h, w) float32 batch in [0, 1] on `device`."""
    items = list(items)
    parts = [(rows, to_float(_upload([items[k] for k in rows], device))) for rows in _rows(i.dtype for i in items).values()]
    if len(parts) == 1:
        return parts[0][1]
    x = torch.empty((len(items), *items[0].shape), dtype=torch.float32, device=device)  # 8- and 16-bit items
    for rows, part in parts:
        x[rows] = part  # each item in its place
    return x


class StagedItems:
    """Items on their way to the device (`stage_items`): the host items, their float batch on the device, and
    on CUDA the event that the upload recorded on its own stream."""

    def __init__(self, items: list[Tensor], x: Tensor, uploaded: torch.cuda.Event | None = None) -> None:
        self.items = items  # kept: a batch that runs out of memory is split and sent again from these
        self.quantise = [i.dtype == torch.uint8 for i in items]  # which results go back as uint8
        self._x: Tensor | None = x
        self._uploaded = uploaded

    def take(self) -> Tensor:
        """The (B, 3, h, w) float batch, once, for the current stream: on CUDA that stream waits for the upload,
        and the batch's memory is not reused before that stream is done with it. The handle lets go of it."""
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError("a staged batch runs once")
        if self._uploaded is not None:
            stream = torch.cuda.current_stream(x.device)
            stream.wait_event(self._uploaded)
            x.record_stream(stream)  # allocated on the upload stream, read on this one
        return x


def stage_items(items: Sequence[Tensor], device: torch.device, stream: torch.cuda.Stream | None = None) -> StagedItems:
    """`items_to_device`, started: on CUDA with `stream` the copy and the conversion run on that stream and
    return at once, so a batch staged while the device computes the one before uploads meanwhile."""
    items = list(items)
    if stream is None or device.type != "cuda":
        return StagedItems(items, items_to_device(items, device))
    with torch.cuda.device(device), torch.cuda.stream(stream):
        x = items_to_device(items, device)
        uploaded = torch.cuda.Event()
        uploaded.record(stream)
    return StagedItems(items, x, uploaded)


def items_from_device(y: Tensor, quantise: Sequence[bool]) -> list[Tensor]:
    """(B, 3, h, w) float results on the device -> B host tensors: uint8 (rounded on the device, a quarter
    of the bytes back) where `quantise` says so, float32 elsewhere; in item order."""
    results: dict[int, Tensor] = {}
    groups = _rows(quantise)
    for to_8bit, rows in groups.items():
        part = y if len(groups) == 1 else y[rows]
        part = (to_uint8(part) if to_8bit else part.float()).cpu()
        results.update(zip(rows, part.unbind(0), strict=True))
    return [results[k] for k in range(len(quantise))]


class Pending:
    """A submitted batch. `result()` waits for it and returns the uint8 output (numpy if numpy went in)."""

    def __init__(self, out: Tensor, done: torch.cuda.Event | None, as_numpy: bool) -> None:
        self._out = out
        self._done = done
        self._as_numpy = as_numpy

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def result(self):
        if self._done is not None:
            self._done.synchronize()
        return self._out.numpy() if self._as_numpy else self._out


class Uint8Transfer:
    def __init__(self, device: torch.device, core: Callable[[Tensor], Tensor], lock: threading.RLock) -> None:
        self.device = device
        self.core = core  # (B, 3, H, W) float32 [0, 1] on the device -> same shape float32 [0, 1]
        self.lock = lock
        cuda = device.type == "cuda"
        self.upload = torch.cuda.Stream(device) if cuda else None
        self.download = torch.cuda.Stream(device) if cuda else None

    @torch.inference_mode()
    def restore_on_device(self, x: Tensor, layout: str) -> Tensor:
        """uint8 batch on the device -> restored uint8 batch of the same layout and shape, on the device."""
        _, h, w = (x.shape[0], x.shape[1], x.shape[2]) if layout == "BHWC" else (x.shape[0], x.shape[2], x.shape[3])
        f = x.permute(0, 3, 1, 2) if layout == "BHWC" else x  # (B, 3, H, W); channels-last strides for BHWC
        f = to_float(f)
        hp, wp = ceil_to(h), ceil_to(w)
        if (hp, wp) != (h, w):
            f = pad_to(f, hp, wp)  # reflect, then replicate: the same padding as the float path
        y = self.core(f)[:, :, :h, :w]  # (B, 3, H, W) float32 in [0, 1], valid until the next pass
        y = to_uint8(y)  # same rounding as images.from_tensor (np.rint)
        return y.permute(0, 2, 3, 1).contiguous() if layout == "BHWC" else y.contiguous()

    def submit(self, pixels: np.ndarray | Tensor, layout: str | None = None) -> Pending:
        as_numpy = isinstance(pixels, np.ndarray)
        x = torch.from_numpy(np.ascontiguousarray(pixels)) if as_numpy else pixels
        if x.dtype != torch.uint8:
            raise TypeError(f"expected uint8 pixels, got {x.dtype}")
        layout = infer_layout(tuple(x.shape), layout)
        if self.device.type != "cuda":
            with self.lock:
                y = self.restore_on_device(x.to(self.device), layout)
            return Pending(y.to(x.device), None, as_numpy)

        compute = torch.cuda.current_stream(self.device)
        on_host = x.device.type == "cpu"
        if on_host:
            with torch.cuda.stream(self.upload):
                dev = staged(x).to(self.device, non_blocking=True)
            compute.wait_stream(self.upload)
            dev.record_stream(compute)  # allocated on the upload stream, read on the compute stream
        else:
            dev = x.to(self.device)
        with self.lock:
            y = self.restore_on_device(dev, layout)
            if not on_host:
                return Pending(y, None, False)
            self.download.wait_stream(compute)
        with torch.cuda.stream(self.download):
            host = torch.empty(y.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(y, non_blocking=True)
            y.record_stream(self.download)  # keep y's memory until the download has read it
            done = torch.cuda.Event()
            done.record()
        return Pending(host, done, as_numpy)
