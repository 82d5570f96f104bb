"""The ``gpufleet`` command. Parses arguments, loads settings, configures logging,
calls one function. Nothing else lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer

from gpufleet import __version__
from gpufleet.errors import ConfigError
from gpufleet.settings import Settings, load_settings, redacted
from gpufleet.store.apikeys import ApiKey, ApiKeyStore

app = typer.Typer(
    name="gpufleet",
    help="Rent GPUs only while there is work for them: queue, autoscaler and Ollama proxy.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect and validate configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
keys_app = typer.Typer(
    help="Manage API keys (talks to Redis directly: the configured URL, or the embedded "
    "server of a running gpufleet, or a private one started for the command).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="config.toml path (default: $GPUFLEET_CONFIG, else ./config.toml)"
    ),
]
HostOption = Annotated[str | None, typer.Option(help="Interface to listen on ([server] host).")]
PortOption = Annotated[int | None, typer.Option(help="Port to listen on ([server] port).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gpufleet {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """gpufleet: autoscaling GPU workers for ComfyUI and Ollama."""


def _load(config: Path | None, **server: Any) -> Settings:
    overrides = {k: v for k, v in server.items() if v is not None}
    try:
        settings = load_settings(config)
        if overrides:
            settings = settings.model_copy(
                update={"server": settings.server.model_copy(update=overrides)}
            )
        return settings
    except ConfigError as exc:
        typer.echo(f"gpufleet: {exc}", err=True)
        raise typer.Exit(2) from None


# SIGTERM: the listening socket closes and the loops stop at once (no new leases, the
# leader lock is released); open requests (long polls, proxy streams) and running tasks get
# this long to finish, then the lifespan hands back the leases of tasks still running.
GRACEFUL_SHUTDOWN_S = 30


def _serve(settings: Settings) -> None:
    import uvicorn

    from gpufleet.app import create_app, request_shutdown
    from gpufleet.logs import configure_logging

    configure_logging(settings.server.log_level, settings.log.format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _graceful_server_class()(config, on_exit=lambda: request_shutdown(app))
    server.run()
    if not server.started:  # what uvicorn.run does when it could not bind or start
        raise typer.Exit(3)


def _graceful_server_class() -> type[Any]:
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

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            self.on_exit()

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


@app.command()
def serve(config: ConfigOption = None, host: HostOption = None, port: PortOption = None) -> None:
    """Run the API, proxy, dispatcher and reconciler (embedded Redis if no URL is set)."""
    _serve(_load(config, host=host, port=port))


@app.command()
def demo(
    host: Annotated[
        str | None,
        typer.Option(help="Interface gpufleet listens on [default: [server] host, else "
                     "127.0.0.1]."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port of gpufleet's API and proxy [default: [server] port / PORT, "
                     "else 8000]."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Embedded Redis and task outputs (default: <data dir>/gpufleet/demo)."),
    ] = None,
    fast: Annotated[
        bool, typer.Option("--fast", help="Sub-second boots and a 5 s idle timeout.")
    ] = False,
    no_auth: Annotated[
        bool,
        typer.Option("--no-auth", help="No API keys (lets the ollama CLI in); same as "
                     "GPUFLEET_AUTH__ENABLED=false."),
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(help="debug, info, warning or error [default: [server] log_level, else "
                     "info]."),
    ] = None,
) -> None:
    """Run gpufleet against simulated Novita and SURF clouds on this machine; prints a
    cheat sheet with a fresh admin key. Ctrl-C stops everything.

    Configuration and environment apply as for serve, except the demo's own pools, clouds
    and embedded Redis (it names at start any such setting it ignores)."""
    from gpufleet.demo import DemoOptions
    from gpufleet.demo import main as run_demo

    if log_level is not None and log_level not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter("debug, info, warning or error", param_hint="--log-level")
    options = DemoOptions(
        host=host, port=port, data_dir=data_dir, fast=fast, auth=False if no_auth else None,
        log_level=log_level,
    )
    raise typer.Exit(run_demo(options))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def simulate(ctx: typer.Context) -> None:
    """Replay demand traces through the scaling policy and compare it with other scalers
    (report + chart). Options are python -m gpufleet.scaling.sim's; see --help."""
    from gpufleet.scaling.sim import main as run_simulation

    raise typer.Exit(run_simulation(list(ctx.args)) or 0)


@app.command("worker-gate")
def worker_gate(
    upstream: Annotated[
        str, typer.Option(help="The engine behind the gate, e.g. http://127.0.0.1:8189.")
    ],
    listen: Annotated[
        str, typer.Option(help="host:port the gate listens on (the pool's engine port).")
    ] = "0.0.0.0:8188",
    token_env: Annotated[
        str, typer.Option(help="Environment variable that holds the worker's secret.")
    ] = "GPUFLEET_WORKER_TOKEN",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run in a worker image, in front of its engine: only calls carrying the worker's
    secret (X-Gpufleet-Worker-Token or Authorization: Bearer) get through; see
    docs/operations.md."""
    from gpufleet.worker_gate import parse_listen, run_gate, token_from_env

    try:
        token = token_from_env(token_env)
        parse_listen(listen)
    except ValueError as exc:
        typer.echo(f"gpufleet worker-gate: {exc}", err=True)
        raise typer.Exit(2) from None
    run_gate(upstream, listen, token, log_level=log_level)


@config_app.command("show")
def config_show(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the validated configuration, secrets shown as **********."""
    data = redacted(_load(config))
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    _print_toml(data)


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration; exit 2 with one line per problem if it is invalid."""
    settings = _load(config)
    typer.echo(f"configuration OK: {len(settings.pools)} pool(s)")


def _print_toml(data: dict[str, Any], prefix: str = "") -> None:
    scalars = {
        k: v
        for k, v in data.items()
        if not isinstance(v, dict | list)
        or (isinstance(v, list) and not (v and isinstance(v[0], dict)))
    }
    if prefix and scalars:
        typer.echo(f"[{prefix}]")
    for key, value in scalars.items():
        typer.echo(f"{key} = {json.dumps(value)}")
    if scalars:
        typer.echo("")
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            _print_toml(value, name)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                typer.echo(f"[[{name}]]")
                for k, v in item.items():
                    typer.echo(f"{k} = {json.dumps(v)}")
                typer.echo("")


@contextlib.asynccontextmanager
async def _key_store(settings: Settings) -> AsyncIterator[ApiKeyStore]:
    from gpufleet.store.connection import EmbeddedRedis, connect, running_embedded_url

    url = settings.redis.url or running_embedded_url(settings.redis.data_dir)
    embedded = None
    if not url:
        embedded = EmbeddedRedis(settings.redis.data_dir, appendfsync=settings.redis.appendfsync)
        url = await asyncio.to_thread(embedded.start)
    client = connect(url)
    try:
        secret = settings.auth.secret.get_secret_value() if settings.auth.secret else None
        yield await ApiKeyStore.open(client, secret, prefix=settings.redis.key_prefix)
    finally:
        await client.aclose()
        if embedded is not None:
            embedded.stop()


def _per_minute(rate: str | None) -> int | None:
    """'60/min', '2/s', '1000/h' or a bare number (per minute) -> requests per minute."""
    if not rate:
        return None
    count, _, unit = rate.partition("/")
    factor = {
        "": 1.0,
        "m": 1.0,
        "min": 1.0,
        "minute": 1.0,
        "s": 60.0,
        "sec": 60.0,
        "second": 60.0,
        "h": 1 / 60,
        "hour": 1 / 60,
    }.get(unit.strip().lower())
    if factor is None or not count.strip().isdigit():
        raise typer.BadParameter(f"{rate!r}: use N/min, N/s or N/h", param_hint="--rate-limit")
    return max(1, round(int(count) * factor))


def _print_key(key: ApiKey, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(key.public()))
    else:
        limits = ", ".join(
            f"{name}={value}"
            for name, value in (
                ("rate/min", key.rate_limit_per_min),
                ("concurrent", key.max_concurrent),
                ("queued", key.max_queued),
                ("priority", key.max_priority),
            )
            if value is not None
        )
        state = "revoked" if key.revoked else "active"
        typer.echo(f"{key.id}  {key.role:<5}  {state:<7}  {key.name} <{key.email}>  {limits}")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    email: Annotated[str, typer.Option(help="Contact e-mail.")] = "",
    role: Annotated[str, typer.Option(help="admin or user.")] = "user",
    rate_limit: Annotated[str | None, typer.Option(help="e.g. 60/min")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1)] = None,
    max_queued: Annotated[int | None, typer.Option(min=1)] = None,
    max_priority: Annotated[int | None, typer.Option(min=0, max=9)] = None,
    config: ConfigOption = None,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    if role not in ("admin", "user"):
        raise typer.BadParameter("admin or user", param_hint="--role")
    per_minute = _per_minute(rate_limit)

    async def run() -> tuple[ApiKey, str]:
        async with _key_store(_load(config)) as store:
            return await store.create(
                name,
                email=email,
                role="admin" if role == "admin" else "user",
                rate_limit_per_min=per_minute,
                max_concurrent=max_concurrent,
                max_queued=max_queued,
                max_priority=max_priority,
            )

    key, plaintext = asyncio.run(run())
    _print_key(key, False)
    typer.echo(f"\nAPI key (shown once, store it now):\n{plaintext}")


@keys_app.command("list")
def keys_list(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List keys (never their secrets)."""

    async def run() -> list[ApiKey]:
        async with _key_store(_load(config)) as store:
            return await store.list_keys()

    for key in asyncio.run(run()):
        _print_key(key, as_json)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOption = None) -> None:
    """Revoke a key at once."""

    async def run() -> bool:
        async with _key_store(_load(config)) as store:
            return await store.revoke(key_id)

    if not asyncio.run(run()):
        typer.echo(f"gpufleet: no key {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(key_id: str, config: ConfigOption = None) -> None:
    """Give a key a new secret (printed once); the old secret stops working."""

    async def run() -> tuple[ApiKey, str] | None:
        async with _key_store(_load(config)) as store:
            return await store.rotate(key_id)

    rotated = asyncio.run(run())
    if rotated is None:
        typer.echo(f"gpufleet: no active key {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"new secret for {key_id} (shown once):\n{rotated[1]}")


@keys_app.command("import")
def keys_import(path: Path, config: ConfigOption = None) -> None:
    """Import the SURF controller's api_keys.json (name, email, key), hashing each key."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        typer.echo(f"gpufleet: cannot read {path}: {exc}", err=True)
        raise typer.Exit(2) from None

    async def run() -> list[ApiKey]:
        async with _key_store(_load(config)) as store:
            return await store.import_json(data)

    imported = asyncio.run(run())
    typer.echo(f"imported {len(imported)} key(s); the file still holds them in clear: delete it")


def _register_remote() -> None:
    from gpufleet import remote

    remote.register(app)


_register_remote()


def main() -> None:
    app(prog_name="gpufleet")


if __name__ == "__main__":  # pragma: no cover
    main()
