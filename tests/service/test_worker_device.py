"""The device worker's hold on its GPU, on the CPU with torch.cuda's calls faked: every thread that
touches the device sets it first."""

from __future__ import annotations

import threading

import pytest
import torch

from service.worker import DeviceWorker


def test_every_thread_that_touches_the_device_sets_it_first(monkeypatch: pytest.MonkeyPatch):
    set_on: dict[str, torch.device] = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_on.__setitem__(threading.current_thread().name, d))
    worker = DeviceWorker({}, torch.device("cuda:1"), threads=2)
    try:
        names = [pool.submit(lambda: threading.current_thread().name).result() for pool in (worker._pool, worker._probe_pool)]
    finally:
        worker.close()
    assert set_on == dict.fromkeys(names, torch.device("cuda:1"))
    assert names[0].startswith("device_") and names[1].startswith("device-probe")
