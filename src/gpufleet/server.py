"""What ``gpufleet serve`` does: settings with the command line's overrides, then the app
under uvicorn until a signal stops it.

Both ways in call here: the typer command (``gpufleet.cli``) and the lean console script
(``gpufleet.entry``), which parses a plain ``serve`` command line itself so that a
serving process never imports typer or rich (click it still gets, from uvicorn). Heavy
imports (uvicorn, the app) wait for ``run_server``, so importing this module costs no
more than the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

from gpufleet.errors import ConfigError
from gpufleet.loops import until_next_tick
from gpufleet.settings import Settings, load_settings

# SIGTERM: the listening socket closes and the loops stop at once (no new leases, the
# leader lock is released); open requests (long polls, proxy streams) and running tasks get
# this long to finish, then the lifespan hands back the leases of tasks still running.
GRACEFUL_SHUTDOWN_S = 30

# Exit statuses: 2 for a configuration error (as every gpufleet command), 3 when uvicorn
# could not bind or start (what ``uvicorn.run`` exits with then).
EXIT_CONFIG = 2
EXIT_STARTUP_FAILURE = 3


def settings_with_overrides(
    config: Path | None, *, host: str | None = None, port: int | None = None
) -> Settings:
    """The settings from ``config`` (default: $GPUFLEET_CONFIG, else ./config.toml) and
    the environment, with ``[server] host`` / ``port`` replaced where given.
    ``ConfigError`` if they are invalid."""
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = load_settings(config)
    if overrides:
        settings = settings.model_copy(
            update={"server": settings.server.model_copy(update=overrides)}
        )
    return settings


def serve(config: Path | None, *, host: str | None = None, port: int | None = None) -> int:
    """``gpufleet serve``: its exit status. A configuration error is one line on stderr
    (``gpufleet: <error>``) and status 2."""
    try:
        settings = settings_with_overrides(config, host=host, port=port)
    except ConfigError as exc:
        print(f"gpufleet: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_server(settings)


def run_server(settings: Settings) -> int:
    """Run the API, proxy, dispatcher and reconciler until SIGTERM / SIGINT; 0 once
    stopped, 3 if uvicorn could not bind or start."""
    import uvicorn

    from gpufleet.app import create_app, request_shutdown
    from gpufleet.logs import configure_logging

    configure_logging(settings.server.log_level, settings.log.format)
    app = create_app(settings, freeze_gc=True)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        # gpufleet.logs keeps uvicorn.access at WARNING (no access lines); off, uvicorn also
        # skips formatting each request's client address and path for a call that drops it.
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # The app has no websocket routes (ComfyUI's websocket is a client connection);
        # "none" keeps uvicorn from importing its websocket protocol stack.
        ws="none",
        # No "server: uvicorn" on every answer: it tells the internet what runs here and
        # costs a header on each proxied answer.
        server_header=False,
    )
    server = graceful_server_class()(config, on_exit=lambda: request_shutdown(app))
    server.run()
    if not server.started:  # what uvicorn.run does when it could not bind or start
        return EXIT_STARTUP_FAILURE
    return 0


def graceful_server_class() -> type[Any]:
    import signal
    import threading
    from collections.abc import Callable, Iterator
    from types import FrameType

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, but a SIGTERM that shut it down gracefully exits 0, and the
        app hears of the stop at once (``on_exit``), not once open requests have drained.

        uvicorn re-raises the signal after its graceful shutdown, so the process died of
        SIGTERM (status 143 / -15) even when everything was handed back in order; an
        orchestrator reads that as a crash. SIGINT still ends with KeyboardInterrupt.
        """

        def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
            super().__init__(config)
            self.on_exit = on_exit
            self._main_loop_wake: Callable[[], object] | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            self.on_exit()
            if self._main_loop_wake is not None:  # the signal handler runs between bytecodes
                self._main_loop_wake()

        async def main_loop(self) -> None:
            """uvicorn's housekeeping tick (the Date header, ``should_exit``), once a second
            on the process's tick grid (``gpufleet.loops``, with the background loops)
            instead of ten times a second: an idle process pays for every wakeup (about 1 ms
            of CPU each here, see bench/idle_cpu.py). A signal wakes it at once, so shutdown
            starts as soon as before."""
            exit_requested = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._main_loop_wake = lambda: loop.call_soon_threadsafe(exit_requested.set)
            try:
                while not await self.on_tick(0):  # counter 0: the Date header every tick
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(exit_requested.wait(),
                                               until_next_tick(1.0, loop.time()))
            finally:
                self._main_loop_wake = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            received: list[int] = []

            def on_signal(sig: int, frame: FrameType | None) -> None:
                received.append(sig)
                self.handle_exit(sig, frame)

            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, on_signal) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)
            if signal.SIGINT in received:
                signal.raise_signal(signal.SIGINT)

    return GracefulServer
