"""`python -m service` / `mprnet-serve`: check the settings, load the models, serve with a graceful drain.

On SIGTERM, SIGHUP or Ctrl+C (SIGINT): /readyz turns 503 at once, new restore requests get 503
`draining`, admitted requests finish, then the server closes and the process exits 0, all within
MPRNET_GRACE_PERIOD_S. A second signal, or the end of the grace period, exits at once. Every signal
is logged. (SIGHUP would otherwise end the process at once, losing every request in flight: a closed
terminal or a supervisor's "reload" must not do that.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .loading import StartupError
from .middleware import PrintableFormatter, RequestIdFilter
from .protocol import limited_head_protocol
from .runtime import Service
from .settings import Settings, settings_error, unknown_variables

log = logging.getLogger("service")
DRAIN_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, grace_s: float) -> None:
        super().__init__(config)
        self.service, self.grace_s = service, grace_s
        self.draining_since: float | None = None
        self.timed_out = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, with SIGHUP too, and without re-raising the signal after the drain (that would
        turn a clean exit 0 into death by the signal)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in DRAIN_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler on the main thread: only hand the work (and the logging) to the loop.
        name = signal.Signals(sig).name
        if self.draining_since is not None or self._loop is None:
            self.force_exit = self.should_exit = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(log.warning, "%s received while draining: exiting now", name)
            return
        self.draining_since = time.monotonic()
        self._loop.call_soon_threadsafe(log.warning, "%s received: draining (grace period %.1f s)", name, self.grace_s)
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self._drain())
        self._loop.call_later(self.grace_s, self._out_of_time)

    async def _drain(self) -> None:
        self.service.start_drain()
        margin = min(1.0, self.grace_s * 0.1)  # leave time to send the last answers and close
        if not await self.service.wait_idle(max(0.0, self.grace_s - 2 * margin)):
            # bodies still arriving now could not be served in time: answer them (503) and close
            self.service.uploads.drain(0)
            if not await self.service.wait_idle(margin):
                log.warning("grace period ending with admitted requests still running")
        assert self.draining_since is not None
        self.config.timeout_graceful_shutdown = max(0.1, self.grace_s - (time.monotonic() - self.draining_since))
        self.should_exit = True

    def _out_of_time(self) -> None:
        if not self.force_exit:
            log.error("grace period of %.1f s over; exiting now", self.grace_s)
        self.timed_out = self.force_exit = self.should_exit = True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line takes no options beyond --help and --version: every setting is an MPRNET_* variable."""
    names = ", ".join(f"MPRNET_{name.upper()}" for name in Settings.model_fields)
    parser = argparse.ArgumentParser(
        prog="mprnet-serve",
        description="Serve MPRNet image restoration over HTTP (POST /restore/{task}). Settings come from the "
        "environment, never from options: " + names + ". See docs/settings.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser.parse_args(argv)


def _version() -> str:
    try:
        return importlib.metadata.version("mprnet-serve")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"mprnet-serve: {settings_error(e)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    for warning in unknown_variables(os.environ):
        log.warning(warning)
    try:
        app = create_app(settings)
    except StartupError as e:
        print(f"mprnet-serve: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=settings.grace_period_s,
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # uvicorn's hint says int; a float works
        http=limited_head_protocol(settings.max_header_bytes, settings.max_header_count),  # 431 beyond them
    )
    server = DrainingServer(config, app.state.service, settings.grace_period_s)
    server.run()
    if server.timed_out:
        # Do not wait for a device or codec thread that is still busy: the grace period is over.
        logging.shutdown()
        os._exit(1)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
