"""Service settings: one typed class read from `MPRNET_*` environment variables, checked at start-up.

A bad value stops start-up with a message naming the variable and the value (`settings_error`).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.variants import TASKS

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
MEGA = 1_000_000  # a megapixel is 10^6 pixels
CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup: Path | None = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by the cgroup's CPU quota (a container's
    CPU limit: 1.5 CPUs count as 2). torch and os.cpu_count() count the node's cores, so in a pod
    limited to 4 CPUs on a 64-core node a thread team of 64 would fight over 4 CPUs' time."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup or CGROUP)
    return max(1, min(cpus, math.ceil(quota)) if quota is not None else cpus)


def cgroup_cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup may use per period (cgroup v2 cpu.max, else v1's CFS quota); None: no limit."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass  # no cgroup v2 limit file here: look for v1's
    for v1 in (cgroup / "cpu", cgroup / "cpu,cpuacct"):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us  # -1: no limit
    return None


def _split(value: object) -> object:
    """'a, b,c' -> ['a', 'b', 'c'] (lists pass through): comma lists are not JSON in the environment."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the service. Sizes are pixels, durations seconds unless the name says ms."""

    model_config = SettingsConfigDict(env_prefix="MPRNET_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"  # containers set 0.0.0.0; the safe default listens on loopback only
    port: int = Field(8000, ge=1, le=65535)
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tasks: Annotated[tuple[str, ...], NoDecode] = TASKS
    weights_dir: Path | None = None  # holds <task>.safetensors or <task>.pth
    weights_deblur: Path | None = None  # a file, or a directory holding deblur.safetensors / .pth
    weights_derain: Path | None = None
    weights_denoise: Path | None = None

    # Batching: a batch closes at max_batch_size items (images or tiles), at batch_megapixels, or
    # max_wait_ms after its first request (waiting only while more requests are being decoded).
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
    # Full batches handed to the device while it still runs one (0: each batch is formed when the device is
    # idle): a batch waiting there uploads during the running one's compute and starts without a round trip
    # through the event loop. Only a full batch goes early, so batching under light load is unchanged.
    batches_ahead: int = Field(1, ge=0, le=4)
    # Bucket shapes WIDTHxHEIGHT ("512x384") or squares ("256"): small images are padded to the
    # smallest bucket that holds them; larger ones are cut into tile_size tiles.
    buckets: Annotated[tuple[tuple[int, int], ...], NoDecode] = ((256, 256), (512, 512))
    tile_size: int = Field(512, ge=16, le=4096)
    tile_overlap: int = Field(32, ge=0)
    # Default: 2 MP on CUDA; on the CPU one tile's worth (there, batches beyond ~1 MP run slower per
    # image: measured 256x256 on 2 cores, 550 ms/image in batches of 1-4, 930-1070 in batches of 8).
    batch_megapixels: float | None = Field(None, gt=0)
    # auto: every static shape on CUDA or with an engine that compiles shapes (OpenVINO), else one per task
    warmup: Literal["auto", "full", "minimal"] = "auto"

    # Which runtime runs the network (model/engine_api.py): auto is OpenVINO on the CPU when it is
    # installed (scripts/setup.sh installs it; measured 2-5x torch's speed on 2 cores, docs/performance.md),
    # torch on CUDA. OpenVINO keeps its exported graph and compiled shapes under compile_cache_dir.
    engine: Literal["auto", "torch", "openvino"] = "auto"

    # The torch engine (model/engine.py): per static shape, torch.compile and CUDA-graph replay.
    # Off by default: inductor compiles each static shape and batch size once, about a minute each on
    # a GPU (the default buckets and tiles make ~19 per task), before /readyz turns green. Turn it on
    # (default, or auto = default on CUDA) with MPRNET_COMPILE_CACHE_DIR on a volume that outlives restarts.
    compile: Literal["auto", "off", "default", "reduce-overhead"] = "off"
    cuda_graphs: Literal["auto", "on", "off"] = "auto"  # auto: on with CUDA (reduce-overhead replays graphs by itself)
    compile_cache_dir: Path | None = None  # compiled kernels kept across restarts; unset: TORCHINDUCTOR_CACHE_DIR or /tmp

    # Admission control, shared by all tasks on the device.
    queue_max_requests: int = Field(256, ge=1)
    queue_max_megapixels: float = Field(100.0, gt=0)
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(25_000_000, ge=1)
    # bodies received or awaiting decode, all requests together
    max_inflight_upload_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    # Time one decode may take before it is stopped with 413 (checked between the decoder's reads of at most
    # 64 KB; a 25 MP PNG or progressive JPEG decodes in about 1 s on one core of the 2-core CPU).
    decode_budget_s: float = Field(10.0, gt=0, le=600)
    request_timeout_s: float = Field(60.0, gt=0)  # deadline before compute starts; a header may shorten it
    upload_idle_timeout_s: float = Field(15.0, gt=0)  # no byte of a request body for this long: 408
    max_header_bytes: int = Field(32 * 1024, ge=1024)  # a request's line and headers together; more: 431
    max_header_count: int = Field(100, ge=8)  # header lines of one request; more: 431
    grace_period_s: float = Field(30.0, ge=0)
    # How long an idle keep-alive connection stays open (uvicorn's timeout_keep_alive, 5 s by default): longer
    # than the 5 s Retry-After of not-ready and out-of-memory answers, so a client that waits exactly that long
    # does not send into a connection being closed; not whole seconds, so no Retry-After (whole seconds; a full
    # queue's is its expected wait) lands on the moment of closing. Behind a proxy that keeps idle upstream
    # connections open (nginx, cloud load balancers: often 60 s), set it above the proxy's timeout.
    keep_alive_s: float = Field(7.5, gt=0, le=3600)
    png_effort: Literal["fast", "small"] = "fast"  # fast: "up" filter (about 1 ms at 256x256); small: adaptive, 1-4 % smaller
    codec_threads: int = Field(default_factory=lambda: max(2, min(8, available_cpus())), ge=1, le=64)
    torch_threads: int = Field(0, ge=0, le=1024)  # the model's CPU threads (torch or OpenVINO); 0: the CPUs we may use

    api_token: SecretStr | None = None  # when set, /restore and /tasks need "Authorization: Bearer <token>"
    ui_enabled: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("log_level", "precision", "warmup", "engine", "compile", "cuda_graphs", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if not _DEVICE.match(v):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return v

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, v: object) -> object:
        names = _split(v)
        if isinstance(names, (list, tuple)):
            unknown = [n for n in names if n not in TASKS]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
            if not names:
                raise ValueError("name at least one task")
            return tuple(dict.fromkeys(names))  # dedupe, keep order
        return v

    @field_validator("buckets", mode="before")
    @classmethod
    def _buckets(cls, v: object) -> object:
        parts = _split(v)
        if not isinstance(parts, (list, tuple)):
            return v
        shapes = []
        for part in parts:
            if isinstance(part, (list, tuple)):
                w, h = part
            else:
                m = re.fullmatch(r"(\d+)(?:[xX](\d+))?", str(part))
                if not m:
                    raise ValueError(f"bucket {part!r} is not N or WIDTHxHEIGHT")
                w, h = int(m[1]), int(m[2] or m[1])
            if w <= 0 or h <= 0 or w % 8 or h % 8:
                raise ValueError(f"bucket {part!r}: width and height must be positive multiples of 8")
            shapes.append((int(w), int(h)))
        return tuple(sorted(set(shapes), key=lambda s: (s[0] * s[1], s)))

    @field_validator("weights_dir", "weights_deblur", "weights_derain", "weights_denoise")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.exists():
            raise ValueError("no such file or directory")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.tile_size % 8:
            raise ValueError(f"MPRNET_TILE_SIZE={self.tile_size}: must be a multiple of 8")
        if self.tile_overlap % 8 or self.tile_overlap * 2 >= self.tile_size:
            raise ValueError(
                f"MPRNET_TILE_OVERLAP={self.tile_overlap}: must be a multiple of 8 "
                f"and under half of MPRNET_TILE_SIZE={self.tile_size}"
            )
        largest = self.largest_item_pixels()
        if self.batch_megapixels is not None and largest > self.batch_megapixels * MEGA:
            raise ValueError(
                f"MPRNET_BATCH_MEGAPIXELS={self.batch_megapixels}: smaller than one {largest / MEGA:.3f} MP "
                "bucket or tile; raise it or shrink buckets/tiles"
            )
        if self.max_inflight_upload_bytes < self.max_upload_bytes:
            raise ValueError(
                f"MPRNET_MAX_INFLIGHT_UPLOAD_BYTES={self.max_inflight_upload_bytes}: "
                f"smaller than MPRNET_MAX_UPLOAD_BYTES={self.max_upload_bytes}, "
                "so an upload of the allowed size could never be received"
            )
        if self.max_pixels > self.queue_max_megapixels * MEGA:
            raise ValueError(
                f"MPRNET_MAX_PIXELS={self.max_pixels}: larger than "
                f"MPRNET_QUEUE_MAX_MEGAPIXELS={self.queue_max_megapixels} MP, so such an image could never be queued"
            )
        return self

    def model_threads(self) -> int:
        """The model's CPU threads: MPRNET_TORCH_THREADS, else the CPUs this container may use."""
        return self.torch_threads or available_cpus()

    def largest_item_pixels(self) -> int:
        return max([w * h for w, h in self.buckets] + [self.tile_size**2])

    def batch_pixels(self, device_type: str) -> float:
        """The pixel budget of one batch on this kind of device (see `batch_megapixels`)."""
        if self.batch_megapixels is not None:
            return self.batch_megapixels * MEGA
        return 2.0 * MEGA if device_type == "cuda" else float(max(self.largest_item_pixels(), 512 * 512))

    def weights_for(self, task: str) -> Path | None:
        """The configured weights file for `task`, or None for the bundled default."""
        candidates = ((getattr(self, f"weights_{task}"), f"MPRNET_WEIGHTS_{task.upper()}"),
                      (self.weights_dir, "MPRNET_WEIGHTS_DIR"))
        for path, setting in candidates:
            if path is None:
                continue
            if path.is_file():
                return path
            for name in (f"{task}.safetensors", f"{task}.pth"):
                if (path / name).is_file():
                    return path / name
            if setting != "MPRNET_WEIGHTS_DIR":
                raise ValueError(f"{setting}={path}: directory holds no {task}.safetensors or {task}.pth")
        return None


def settings_error(err: ValidationError) -> str:
    """A start-up message naming each bad variable and its value."""
    lines = []
    for e in err.errors():
        name = "MPRNET_" + "_".join(str(p) for p in e["loc"]).upper() if e["loc"] else "settings"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(msg if not e["loc"] else f"{name}={e.get('input')!r}: {msg}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Warnings for MPRNET_* variables that are no setting (pydantic-settings ignores them silently)."""
    known = {"MPRNET_" + name.upper() for name in Settings.model_fields}
    out = []
    for name in sorted(k for k in environ if k.upper().startswith("MPRNET_") and k.upper() not in known):
        close = difflib.get_close_matches(name.upper(), known, n=1)
        out.append(f"{name} is not a setting of the service; ignored" + (f" (did you mean {close[0]}?)" if close else ""))
    return out
