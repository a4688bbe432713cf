"""`python -m service` / `mprnet-serve`: --help and --version answer without starting a server; the keep-alive
setting reaches uvicorn."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from uvicorn.server import ServerState

from service import __main__ as entry
from service.__main__ import DrainingServer, main
from service.app import create_app
from service.errors import NOT_READY_RETRY_S, Draining, NotReady, OutOfMemory, UploadsBusy
from service.protocol import LimitedHeadProtocol
from service.settings import Settings
from tests.live_server import TEST_ENV
from tests.service.conftest import fake_models


def test_help_lists_the_settings_and_starts_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mprnet-serve" in out
    assert "MPRNET_DEVICE" in out and "MPRNET_MAX_UPLOAD_BYTES" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("mprnet-serve ")


def test_an_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--port", "9000"])
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_keep_alive_outlasts_every_fixed_retry_after() -> None:
    """uvicorn's default keep-alive (5 s) closed a connection just as a client that had waited the 5 s
    Retry-After reused it. Whole-second Retry-Afters can never fall on a keep-alive of a fraction."""
    fixed = [NotReady("x"), OutOfMemory("x"), Draining(), UploadsBusy("x")]
    longest = max(int(e.headers["Retry-After"]) for e in fixed)
    assert longest == NOT_READY_RETRY_S
    keep_alive = Settings().keep_alive_s
    assert longest < keep_alive < longest + 5 and keep_alive % 1 != 0


def test_the_keep_alive_setting_reaches_uvicorns_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mprnet-serve` hands MPRNET_KEEP_ALIVE_S to uvicorn, and the HTTP protocol it serves with uses it."""
    started: list[uvicorn.Config] = []

    def run(self: DrainingServer) -> None:  # instead of serving: keep the configuration
        started.append(self.config)
        self.started = True

    for name, value in TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MPRNET_KEEP_ALIVE_S", "12.5")
    monkeypatch.setattr(entry, "create_app", lambda settings: create_app(settings, models=fake_models()))
    monkeypatch.setattr(DrainingServer, "run", run)
    assert main([]) == 0
    (config,) = started
    assert config.timeout_keep_alive == 12.5
    loop = asyncio.new_event_loop()
    try:
        protocol = config.http(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    finally:
        loop.close()
    assert isinstance(protocol, LimitedHeadProtocol) and protocol.timeout_keep_alive == 12.5
