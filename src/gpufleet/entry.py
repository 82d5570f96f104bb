"""The ``gpufleet`` console script (and ``python -m gpufleet``).

A plain ``gpufleet serve [--config/-c PATH] [--host HOST] [--port N]`` is parsed here and
run by ``gpufleet.server`` without importing typer or rich: a serving process
stays resident for weeks, and those libraries would cost it megabytes for a command
line read once (issue 18). Every other command line (help, other commands, ``serve
--help``, an option this parser does not know, anything unusual) goes to the typer
app in ``gpufleet.cli``, so its behaviour and messages are exactly typer's.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpufleet import server

# Options of `gpufleet serve` (gpufleet.cli.serve), by every spelling click accepts.
_VALUE_OPTIONS = {"--config": "config", "-c": "config", "--host": "host", "--port": "port"}
_PORT = re.compile(r"[0-9]+")

# Optional modules that libraries on the serve path import whenever they are installed,
# for features a serving gpufleet never uses. Marked absent (``None`` in ``sys.modules``:
# importing one raises ImportError) before the server is imported, each library takes the
# fallback it has for that module not being installed. About 7 MB of an idle server's
# resident memory (bench/serve_rss.py).
NOT_FOR_SERVE = (
    # httpx's command-line client (click, rich, pygments): httpx then defines a `main`
    # that says to install httpx[cli]; nothing here calls it.
    "httpx._main",
    # uvicorn's --reload watcher: uvicorn.supervisors falls back to its StatReload, and
    # serve never reloads anyway.
    "watchfiles",
    # httpcore's trio locks and backend: used only under a trio event loop; gpufleet runs
    # on asyncio, where httpcore uses anyio.
    "trio",
)


@dataclass(frozen=True)
class ServeArgs:
    config: Path | None = None
    host: str | None = None
    port: int | None = None


def parse_serve(argv: Sequence[str]) -> ServeArgs | None:
    """``argv`` (without the program name) as a plain ``serve`` command line, or ``None``
    if typer should handle it.

    Plain means: ``serve`` then only ``--config``/``-c``, ``--host`` and ``--port``,
    each as ``--opt VALUE`` or ``--opt=VALUE`` (``-cVALUE`` too), the last one winning as
    with click. A value that is empty or starts with ``-``, a port that is not all digits,
    an unknown option, ``--help``, ``--`` or a stray argument: ``None``, and typer parses
    (and prints its help, or its error where it has one).
    """
    if not argv or argv[0] != "serve":
        return None
    values: dict[str, str] = {}
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg.startswith("--") and "=" in arg:
            option, value = arg.split("=", 1)
        elif arg in _VALUE_OPTIONS:
            if not rest:
                return None  # typer: "Option '--port' requires an argument."
            option, value = arg, rest.pop(0)
        elif arg.startswith("-c") and not arg.startswith("--"):
            option, value = "-c", arg[2:]
        else:
            return None
        name = _VALUE_OPTIONS.get(option)
        if name is None or not value or value.startswith("-"):
            return None
        values[name] = value
    port = values.get("port")
    if port is not None and not _PORT.fullmatch(port):
        return None
    config = values.get("config")
    return ServeArgs(
        config=Path(config) if config is not None else None,
        host=values.get("host"),
        port=int(port) if port is not None else None,
    )


def skip_unused_imports() -> None:
    """Mark ``NOT_FOR_SERVE`` absent, those not imported yet (one that is stays as it is)."""
    for name in NOT_FOR_SERVE:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gpufleet``; its exit status (or typer's ``SystemExit`` for other commands)."""
    args = parse_serve(sys.argv[1:] if argv is None else argv)
    if args is None:
        from gpufleet.cli import main as cli_main

        cli_main(None if argv is None else list(argv))  # exits (SystemExit)
        return 0
    skip_unused_imports()
    try:
        return server.serve(args.config, host=args.host, port=args.port)
    except KeyboardInterrupt:
        return 130  # what typer exits with on Ctrl-C


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
