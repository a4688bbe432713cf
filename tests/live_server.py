"""Run the real server (`python -m service`) on 127.0.0.1 for tests: service, UI and deployment tests.

    from tests.live_server import live_server, tiny_weights

    with live_server(tmp_path) as server:          # tiny random weights, small buckets, 1 torch thread
        httpx.get(server.url + "/readyz")

`live_server` starts the process with `MPRNET_*` settings (`TEST_ENV`, then yours), waits until
/readyz answers 200, yields a `LiveServer`, and on exit sends SIGTERM (a graceful drain) and waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

# Small and quick on a shared 2-core CPU: tiny model, 32/64 px buckets, 64 px tiles.
TEST_ENV = {
    "MPRNET_DEVICE": "cpu",
    "MPRNET_ENGINE": "torch",  # the tiny test model on torch; the OpenVINO engine has tests of its own
    "MPRNET_TORCH_THREADS": "1",
    "MPRNET_BUCKETS": "32,64",
    "MPRNET_TILE_SIZE": "64",
    "MPRNET_TILE_OVERLAP": "16",
    "MPRNET_BATCH_MEGAPIXELS": "0.07",
    "MPRNET_LOG_LEVEL": "warning",
    "MPRNET_GRACE_PERIOD_S": "20",
}


def tiny_weights(directory: Path) -> Path:
    """Write seeded tiny random checkpoints `<task>.safetensors` for every task into `directory`."""
    import torch

    from model.arch import MPRNet
    from model.checkpoint import save_safetensors
    from model.variants import TASKS, TINY

    directory.mkdir(parents=True, exist_ok=True)
    for i, task in enumerate(TASKS):
        path = directory / f"{task}.safetensors"
        if not path.exists():
            torch.manual_seed(1000 + i)
            save_safetensors(MPRNet(**TINY), path)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        return metric_value(self.metrics(), name, **labels)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"server did not exit {timeout} s after SIGTERM; log:\n{self.log()}") from None


def metric_value(text: str, name: str, **labels: str) -> float:
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            inner = line[line.find("{") + 1 : line.find("}")] if "{" in line else ""
            if want <= set(inner.split(",")):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def start_server(tmp_path: Path, env: dict[str, str] | None = None, weights: Path | None = None) -> LiveServer:
    port = free_port()
    full_env = {**os.environ, **TEST_ENV, "MPRNET_HOST": "127.0.0.1", "MPRNET_PORT": str(port)}
    if weights is None and "MPRNET_WEIGHTS_DIR" not in (env or {}):
        weights = tiny_weights(tmp_path / "weights")
    if weights is not None:
        full_env["MPRNET_WEIGHTS_DIR"] = str(weights)
    full_env.update(env or {})
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return LiveServer(f"http://127.0.0.1:{port}", port, proc, log_path)


def wait_ready(server: LiveServer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode} before it was ready; log:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"server not ready within {timeout} s; log:\n{server.log()}")


@contextlib.contextmanager
def live_server(
    tmp_path: Path, env: dict[str, str] | None = None, weights: Path | None = None, ready_timeout: float = 60
) -> Iterator[LiveServer]:
    """A running server on 127.0.0.1 (ready), stopped with SIGTERM afterwards."""
    server = start_server(tmp_path, env, weights)
    try:
        wait_ready(server, ready_timeout)
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()
