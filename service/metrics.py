"""Prometheus metrics. The names are a contract: the Grafana dashboard, autoscaling and alerts use them.

Each app gets its own registry, so tests can build several apps in one process. Gauges that
describe the present (queue depth, oldest wait, GPU memory) are computed when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .errors import REJECT_REASONS, ServiceError

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
RATIOS = (0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 0.9, 1)


class Metrics:
    def __init__(self, tasks: tuple[str, ...]) -> None:
        self.registry = r = CollectorRegistry()
        self.tasks = tasks
        # protocol: "native" (POST /restore/{task}) or "v2" (the Open Inference Protocol's POST /v2/models/{task}/infer)
        self.requests = Counter(
            "mprnet_requests", "Restore requests answered, by HTTP status", ["task", "status", "protocol"], registry=r
        )
        self.request_duration = Histogram(
            "mprnet_request_duration_seconds", "Restore request time, arrival to last byte queued",
            ["task", "protocol"], buckets=LATENCY, registry=r,
        )
        self.queue_wait = Histogram(
            "mprnet_queue_wait_seconds", "Time from queueing to the start of compute",
            ["task"], buckets=LATENCY, registry=r
        )
        self.inference = Histogram(
            "mprnet_inference_duration_seconds", "Device time per batch", ["task"], buckets=LATENCY, registry=r
        )
        self.batch_requests = Histogram(
            "mprnet_batch_size_requests", "Distinct requests per batch", ["task"], buckets=COUNTS, registry=r
        )
        self.batch_tiles = Histogram(
            "mprnet_batch_size_tiles", "Items (whole images or tiles) per batch", ["task"], buckets=COUNTS, registry=r
        )
        self.queue_depth = Gauge("mprnet_queue_depth_requests", "Requests waiting for compute", ["task"], registry=r)
        self.queue_pixels = Gauge(
            "mprnet_queue_depth_megapixels", "Megapixels (as computed, padding included) waiting for compute",
            ["task"], registry=r
        )
        self.oldest_wait = Gauge(
            "mprnet_queue_oldest_wait_seconds", "Age of the oldest request waiting for compute", ["task"], registry=r
        )
        self.expected_wait = Gauge(
            "mprnet_queue_expected_wait_seconds",
            "Expected wait before compute of a request arriving now (admission refuses it when over its deadline)",
            ["task"], registry=r,
        )
        self.megapixels = Counter("mprnet_megapixels_processed", "Image megapixels restored", ["task"], registry=r)
        self.padding_waste = Histogram(
            "mprnet_padding_waste_ratio", "Per request: share of computed pixels that were padding or tile overlap",
            ["task"], buckets=RATIOS, registry=r
        )
        self.rejected = Counter(
            "mprnet_rejected", "Requests refused, shed or dropped, by reason", ["task", "reason"], registry=r
        )
        self.uploads = Gauge(
            "mprnet_upload_bytes_in_flight", "Bytes of request bodies being received or waiting to be decoded",
            registry=r
        )
        self.model_ready = Gauge(
            "mprnet_model_ready", "1 when the task's model is loaded and warm", ["task"], registry=r
        )
        self.gpu_allocated = Gauge(
            "mprnet_gpu_memory_allocated_bytes", "Device memory held by tensors", ["device"], registry=r
        )
        self.gpu_reserved = Gauge(
            "mprnet_gpu_memory_reserved_bytes", "Device memory reserved by the caching allocator",
            ["device"], registry=r
        )
        self.engine_memory = Gauge(
            "mprnet_engine_memory_bytes",
            "Peak device memory of one pass of a static shape (WIDTHxHEIGHT, batch), measured at warm-up",
            ["task", "shape", "batch"], registry=r,
        )
        for task in tasks:  # series exist from the start, so dashboards and alerts see zeros, not gaps
            self.model_ready.labels(task).set(0)
            self.megapixels.labels(task)
            for reason in REJECT_REASONS:
                self.rejected.labels(task, reason)

    def task_label(self, task: str) -> str:
        """Bound label cardinality: a task name from a URL is only a label if it is served."""
        return task if task in self.tasks else "unknown"

    def reject(self, task: str, error: ServiceError) -> None:
        """Count a refusal under its error's reason (errors without one, e.g. a failed model, are not refusals)."""
        if error.reason is not None:
            self.rejected.labels(self.task_label(task), error.reason).inc()

    def engine_memory_from(self, task: str, report: dict) -> None:
        """Gauges from an engine's memory report {(batch, h, w): MemoryUse}; the CPU measures none."""
        for (batch, h, w), use in report.items():
            if use.peak_bytes is not None:
                self.engine_memory.labels(task, f"{w}x{h}", str(batch)).set(use.peak_bytes)

    def watch_queue(
        self, depth: Callable[[str], int], pixels: Callable[[str], float], oldest: Callable[[str], float],
        expected: Callable[[str], float],
    ) -> None:
        for task in self.tasks:
            self.queue_depth.labels(task).set_function(lambda t=task: depth(t))
            self.queue_pixels.labels(task).set_function(lambda t=task: pixels(t) / 1e6)
            self.oldest_wait.labels(task).set_function(lambda t=task: oldest(t))
            self.expected_wait.labels(task).set_function(lambda t=task: expected(t))

    def watch_device(self, device: torch.device) -> None:
        label = str(device)
        if device.type == "cuda":
            self.gpu_allocated.labels(label).set_function(lambda: torch.cuda.memory_allocated(device))
            self.gpu_reserved.labels(label).set_function(lambda: torch.cuda.memory_reserved(device))
        else:
            self.gpu_allocated.labels(label).set(0)
            self.gpu_reserved.labels(label).set(0)
