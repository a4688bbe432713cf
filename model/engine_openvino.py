"""The OpenVINO engine: our MPRNet, exported to ONNX (model/export.py), compiled by OpenVINO for the CPU.

Each (batch, height, width) the engine is given is compiled as a static shape, once: at warm-up for
the shapes the planner produces, else on first use. A batch of n items runs as chunks of the static
batch sizes that the warm-up prepared (5 as 4 + 1), never padded with rows that would be computed
and dropped. With a cache directory, both the exported graph and OpenVINO's compiled blobs are kept
there, so a restart neither exports nor compiles again.

Precision: fp32 by default (`INFERENCE_PRECISION_HINT` f32: OpenVINO would otherwise pick bf16 on
CPUs that have it, and the outputs would no longer match the torch engine's within 1e-4).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .engine import static_batch_sizes
from .engine_api import InferenceEngine, MemoryUse, Shape, TileSettings
from .export import cached_onnx

log = logging.getLogger("model.engine_openvino")
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVINOEngine(InferenceEngine):
    """MPRNet on OpenVINO's CPU plugin, one compiled model per static shape."""

    name = "openvino"
    prepares_shapes = True

    def __init__(
        self,
        model: nn.Module,
        precision: str = "auto",
        *,
        tiles: TileSettings | None = None,
        threads: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        max_batch: int = 16,
    ) -> None:
        import openvino as ov

        precision = "fp32" if precision == "auto" else precision
        if precision not in _PRECISION_HINTS:
            raise ValueError(f"precision {precision!r} on the openvino engine: use auto, fp32 or bf16")
        if threads < 0:
            raise ValueError(f"threads must be 0 (OpenVINO's choice) or more, got {threads}")
        self.device = torch.device("cpu")
        self.precision = precision
        self.tiles = tiles or TileSettings()
        self.threads = threads
        self.batch_sizes = static_batch_sizes(max_batch)
        self.version = ov.__version__
        self._core = ov.Core()
        self.cache_dir = Path(cache_dir).expanduser().resolve() / "openvino" if cache_dir else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._core.set_property({"CACHE_DIR": str(self.cache_dir)})
        start = time.monotonic()
        self._model = self._core.read_model(cached_onnx(model, cache_dir and Path(cache_dir).expanduser()), b"")
        self.load_s = time.monotonic() - start
        self._config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",  # one stream: every core on one request at a time
            "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision],
        }
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = threads
        self._requests: dict[Shape, Any] = {}  # static shape -> its compiled model's infer request
        self._lock = threading.Lock()  # one inference at a time: requests own their output buffers

    # ---- static shapes ---------------------------------------------------------------------------

    def _request(self, shape: Shape) -> Any:
        request = self._requests.get(shape)
        if request is None:
            start = time.monotonic()
            static = self._model.clone()
            static.reshape([shape[0], 3, shape[1], shape[2]])
            request = self._core.compile_model(static, "CPU", self._config).create_infer_request()
            self._requests[shape] = request
            self._warm_record()[shape] = MemoryUse(None, None, time.monotonic() - start)
            log.info("openvino: static shape batch=%d %dx%d compiled in %.1f s", *shape, time.monotonic() - start)
        return request

    def _chunks(self, n: int) -> list[int]:
        """n as a sum of prepared batch sizes, largest first (5 -> [4, 1] with sizes 1, 2, 4)."""
        out = []
        while n:
            b = max(s for s in self.batch_sizes if s <= n)
            out.append(b)
            n -= b
        return out

    def warmup(self, shapes: Iterable[tuple[int, int] | Shape]) -> dict[Shape, MemoryUse]:
        """Compile the static shapes that batches of the given item shapes run as: (H, W) every batch size,
        (B, H, W) the batch sizes up to B; each runs once."""
        done: dict[Shape, MemoryUse] = {}
        for s in shapes:
            top, (h, w) = (self.batch_sizes[-1] if len(s) == 2 else s[0]), s[-2:]
            if h % 8 or w % 8:
                raise ValueError(f"warm-up shape {h}x{w}: height and width must be multiples of 8")
            with self._lock:
                for b in (b for b in self.batch_sizes if b <= max(1, top)):
                    x = np.random.default_rng(b * 7919 + h * 31 + w).random((b, 3, h, w), dtype=np.float32)
                    self._request((b, h, w)).infer({0: x}, share_inputs=True)
                    done[(b, h, w)] = self._warm_record()[(b, h, w)]
        return done

    # ---- the pass --------------------------------------------------------------------------------

    def run_batch(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float in [0, 1], H and W multiples of 8 -> (B, 3, H, W) float32 in [0, 1] on x's device."""
        n, _, h, w = x.shape
        if h % 8 or w % 8:
            raise ValueError(f"the network needs H and W to be multiples of 8, got {h}x{w}; pad first")
        src = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = np.empty(src.shape, dtype=np.float32)
        with self._lock:
            row = 0
            for b in self._chunks(n):
                request = self._request((b, h, w))
                request.infer({0: src[row : row + b]}, share_inputs=True)
                out[row : row + b] = request.get_output_tensor(0).data  # copied: the buffer is reused by the next call
                row += b
        return torch.from_numpy(out).to(x.device)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "version": self.version,
            "precision_hint": self._config["INFERENCE_PRECISION_HINT"],
            "threads": self.threads or None,  # None: OpenVINO's choice (all cores)
            "static_batch_sizes": list(self.batch_sizes),
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "shapes": [{"batch": b, "height": h, "width": w, "warmup_s": round(m.warmup_s, 3)}
                       for (b, h, w), m in self._warm_record().items()],
        }
