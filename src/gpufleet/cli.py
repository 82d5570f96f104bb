"""The ``gpufleet`` command. Parses arguments, loads settings, configures logging,
calls one function. Nothing else lives here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gpufleet import __version__
from gpufleet.errors import ConfigError
from gpufleet.settings import Settings, load_settings, redacted

app = typer.Typer(
    name="gpufleet",
    help="Rent GPUs only while there is work for them: queue, autoscaler and Ollama proxy.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect and validate configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

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


def _serve(settings: Settings) -> None:
    import uvicorn

    from gpufleet.app import create_app
    from gpufleet.logs import configure_logging

    configure_logging(settings.server.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


@app.command()
def serve(config: ConfigOption = None, host: HostOption = None, port: PortOption = None) -> None:
    """Run the API, proxy, dispatcher and reconciler (embedded Redis if no URL is set)."""
    _serve(_load(config, host=host, port=port))


@app.command()
def demo(config: ConfigOption = None, host: HostOption = None, port: PortOption = None) -> None:
    """Run gpufleet with an embedded Redis, ready to try on one machine."""
    _serve(_load(config, host=host, port=port))


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


def main() -> None:
    app(prog_name="gpufleet")


if __name__ == "__main__":  # pragma: no cover
    main()
