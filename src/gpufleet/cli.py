"""The ``gpufleet`` command. Parses arguments, loads settings, configures logging,
calls one function. Nothing else lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer

from gpufleet import __version__
from gpufleet.errors import ConfigError
from gpufleet.server import run_server, settings_with_overrides
from gpufleet.settings import Settings, redacted
from gpufleet.store.apikeys import ROLES, ApiKey, ApiKeyStore, Role
from gpufleet.store.teams import Periods, Team, TeamError, TeamStore

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
teams_app = typer.Typer(
    help="Manage teams: groups of keys that own their work, with limits and a spend budget "
    "(talks to Redis directly, like `keys`).",
    no_args_is_help=True,
)
app.add_typer(teams_app, name="teams")

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


def _load(config: Path | None, *, host: str | None = None, port: int | None = None) -> Settings:
    try:
        return settings_with_overrides(config, host=host, port=port)
    except ConfigError as exc:
        typer.echo(f"gpufleet: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(config: ConfigOption = None, host: HostOption = None, port: PortOption = None) -> None:
    """Run the API, proxy, dispatcher and reconciler (embedded Redis if no URL is set)."""
    # The console script (gpufleet.entry) runs a plain `serve` command line without typer;
    # this is the way in for the rest (and for tests that invoke the typer app).
    code = run_server(_load(config, host=host, port=port))
    if code:
        raise typer.Exit(code)


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
async def _redis_client(settings: Settings) -> AsyncIterator[Any]:
    from gpufleet.store.connection import EmbeddedRedis, connect, running_embedded_url

    url = settings.redis.url or running_embedded_url(settings.redis.data_dir)
    embedded = None
    if not url:
        embedded = EmbeddedRedis(settings.redis.data_dir, appendfsync=settings.redis.appendfsync)
        url = await asyncio.to_thread(embedded.start)
    client = connect(url)
    try:
        yield client
    finally:
        await client.aclose()
        if embedded is not None:
            embedded.stop()


@contextlib.asynccontextmanager
async def _key_store(settings: Settings) -> AsyncIterator[ApiKeyStore]:
    async with _redis_client(settings) as client:
        secret = settings.auth.secret.get_secret_value() if settings.auth.secret else None
        yield await ApiKeyStore.open(client, secret, prefix=settings.redis.key_prefix)


@contextlib.asynccontextmanager
async def _team_stores(settings: Settings) -> AsyncIterator[tuple[ApiKeyStore, TeamStore]]:
    async with _key_store(settings) as keys:
        teams = TeamStore(
            keys.redis,
            prefix=settings.redis.key_prefix,
            cache_ttl_s=0,
            max_teams=settings.usage.max_teams,
            periods=Periods(settings.usage.timezone),
        )
        yield keys, teams


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
        team = f"team={key.team}  " if key.team else ""
        typer.echo(
            f"{key.id}  {key.role:<10}  {state:<7}  {key.name} <{key.email}>  {team}{limits}"
        )


def _role(role: str) -> Role:
    for known in ROLES:
        if role == known:
            return known
    raise typer.BadParameter(" or ".join(ROLES), param_hint="--role")


async def _known_team(teams: TeamStore, team: str | None) -> None:
    if team and await teams.get(team) is None:
        typer.echo(f"gpufleet: no team {team!r} (gpufleet teams create {team})", err=True)
        raise typer.Exit(1)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    email: Annotated[str, typer.Option(help="Contact e-mail.")] = "",
    role: Annotated[str, typer.Option(help="admin, team_admin or user.")] = "user",
    rate_limit: Annotated[str | None, typer.Option(help="e.g. 60/min")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1)] = None,
    max_queued: Annotated[int | None, typer.Option(min=1)] = None,
    max_priority: Annotated[int | None, typer.Option(min=0, max=9)] = None,
    team: Annotated[str | None, typer.Option(help="The team that owns the key's work.")] = None,
    config: ConfigOption = None,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    checked = _role(role)
    per_minute = _per_minute(rate_limit)

    async def run() -> tuple[ApiKey, str]:
        async with _team_stores(_load(config)) as (store, teams):
            await _known_team(teams, team)
            return await store.create(
                name,
                email=email,
                role=checked,
                rate_limit_per_min=per_minute,
                max_concurrent=max_concurrent,
                max_queued=max_queued,
                max_priority=max_priority,
                team=team,
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


@keys_app.command("update")
def keys_update(
    key_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    email: Annotated[str | None, typer.Option()] = None,
    role: Annotated[str | None, typer.Option(help="admin, team_admin or user.")] = None,
    rate_limit: Annotated[str | None, typer.Option(help="e.g. 60/min")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1)] = None,
    max_queued: Annotated[int | None, typer.Option(min=1)] = None,
    max_priority: Annotated[int | None, typer.Option(min=0, max=9)] = None,
    team: Annotated[str | None, typer.Option(help="Move the key to this team.")] = None,
    no_team: Annotated[bool, typer.Option("--no-team", help="Take the key out of its team.")]
    = False,
    clear: Annotated[
        list[str] | None,
        typer.Option(help="Clear a limit: rate_limit_per_min, max_concurrent, ... (repeat)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Change a key's name, role, team or limits (its secret stays)."""
    fields: dict[str, Any] = {
        k: v
        for k, v in {
            "name": name,
            "email": email,
            "role": _role(role) if role else None,
            "rate_limit_per_min": _per_minute(rate_limit),
            "max_concurrent": max_concurrent,
            "max_queued": max_queued,
            "max_priority": max_priority,
            "team": team,
        }.items()
        if v is not None
    }
    if no_team:
        fields["team"] = None
    for limit in clear or []:
        if limit not in ("rate_limit_per_min", "max_concurrent", "max_queued", "max_priority"):
            raise typer.BadParameter(f"{limit!r} is not a key limit", param_hint="--clear")
        fields[limit] = None

    async def run() -> ApiKey | None:
        async with _team_stores(_load(config)) as (store, teams):
            await _known_team(teams, fields.get("team"))
            return await store.update(key_id, **fields)

    key = asyncio.run(run())
    if key is None:
        typer.echo(f"gpufleet: no key {key_id!r}", err=True)
        raise typer.Exit(1)
    _print_key(key, False)


# -- teams ---------------------------------------------------------------------------------

TEAM_CLEARABLE = (
    "max_concurrent",
    "max_queued",
    "max_priority",
    "rate_limit_per_min",
    "budget_day_usd",
    "budget_month_usd",
)


def _print_team(team: Team, as_json: bool, spent: tuple[float, float], members: int) -> None:
    if as_json:
        typer.echo(
            json.dumps(
                {
                    **team.public(),
                    "keys": members,
                    "spent_today_usd": round(spent[0], 6),
                    "spent_this_month_usd": round(spent[1], 6),
                }
            )
        )
        return
    limits = ", ".join(
        f"{name}={value}"
        for name, value in (
            ("rate/min", team.rate_limit_per_min),
            ("concurrent", team.max_concurrent),
            ("queued", team.max_queued),
            ("priority", team.max_priority),
            ("budget/day", team.budget_day_usd),
            ("budget/month", team.budget_month_usd),
        )
        if value is not None
    )
    typer.echo(
        f"{team.name:<20} keys={members:<3} today=${spent[0]:.2f} month=${spent[1]:.2f}  "
        f"{limits}  {team.description}".rstrip()
    )


TeamName = Annotated[str, typer.Argument(help="Team name: lowercase letters, digits, - and _.")]
RateOption = Annotated[str | None, typer.Option(help="All the team's keys together, e.g. 600/min")]
ConcurrentOption = Annotated[
    int | None, typer.Option(min=1, help="Proxied requests of the team in flight.")
]
QueuedOption = Annotated[int | None, typer.Option(min=1, help="Waiting tasks of the team.")]
PriorityOption = Annotated[int | None, typer.Option(min=0, max=9, help="Highest priority.")]
BudgetDayOption = Annotated[
    float | None, typer.Option(min=0, help="USD per calendar day ([usage] timezone).")
]
BudgetMonthOption = Annotated[float | None, typer.Option(min=0, help="USD per calendar month.")]


def _team_fields(
    rate_limit: str | None,
    max_concurrent: int | None,
    max_queued: int | None,
    max_priority: int | None,
    budget_day: float | None,
    budget_month: float | None,
) -> dict[str, Any]:
    return {
        k: v
        for k, v in {
            "rate_limit_per_min": _per_minute(rate_limit),
            "max_concurrent": max_concurrent,
            "max_queued": max_queued,
            "max_priority": max_priority,
            "budget_day_usd": budget_day,
            "budget_month_usd": budget_month,
        }.items()
        if v is not None
    }


async def _show_team(keys: ApiKeyStore, teams: TeamStore, team: Team, as_json: bool) -> None:
    members = sum(1 for k in await keys.list_keys() if k.team == team.name and not k.revoked)
    _print_team(team, as_json, await teams.spent(team.name), members)


@teams_app.command("create")
def teams_create(
    name: TeamName,
    description: Annotated[str, typer.Option()] = "",
    rate_limit: RateOption = None,
    max_concurrent: ConcurrentOption = None,
    max_queued: QueuedOption = None,
    max_priority: PriorityOption = None,
    budget_day: BudgetDayOption = None,
    budget_month: BudgetMonthOption = None,
    config: ConfigOption = None,
) -> None:
    """Create a team. Put keys in it with `keys create --team` or `keys update --team`."""
    fields = _team_fields(
        rate_limit, max_concurrent, max_queued, max_priority, budget_day, budget_month
    )

    async def run() -> None:
        async with _team_stores(_load(config)) as (keys, teams):
            team = await teams.create(name, description=description, **fields)
            await _show_team(keys, teams, team, False)

    try:
        asyncio.run(run())
    except TeamError as exc:
        typer.echo(f"gpufleet: {exc}", err=True)
        raise typer.Exit(1) from None


@teams_app.command("list")
def teams_list(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List teams with their limits, keys and spend today and this month."""

    async def run() -> None:
        async with _team_stores(_load(config)) as (keys, teams):
            for team in await teams.list_teams():
                await _show_team(keys, teams, team, as_json)

    asyncio.run(run())


@teams_app.command("update")
def teams_update(
    name: TeamName,
    description: Annotated[str | None, typer.Option()] = None,
    rate_limit: RateOption = None,
    max_concurrent: ConcurrentOption = None,
    max_queued: QueuedOption = None,
    max_priority: PriorityOption = None,
    budget_day: BudgetDayOption = None,
    budget_month: BudgetMonthOption = None,
    clear: Annotated[
        list[str] | None,
        typer.Option(help=f"Clear a limit or budget ({', '.join(TEAM_CLEARABLE)}); repeat."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Change a team's description, limits or budgets."""
    fields = _team_fields(
        rate_limit, max_concurrent, max_queued, max_priority, budget_day, budget_month
    )
    if description is not None:
        fields["description"] = description
    for limit in clear or []:
        if limit not in TEAM_CLEARABLE:
            raise typer.BadParameter(f"{limit!r}: one of {', '.join(TEAM_CLEARABLE)}",
                                     param_hint="--clear")
        fields[limit] = None

    async def run() -> None:
        async with _team_stores(_load(config)) as (keys, teams):
            team = await teams.update(name, **fields)
            await _show_team(keys, teams, team, False)

    try:
        asyncio.run(run())
    except TeamError as exc:
        typer.echo(f"gpufleet: {exc}", err=True)
        raise typer.Exit(1) from None


@teams_app.command("delete")
def teams_delete(name: TeamName, config: ConfigOption = None) -> None:
    """Delete a team that has no live keys left (move or revoke them first)."""

    async def run() -> str:
        async with _team_stores(_load(config)) as (keys, teams):
            members = [k.id for k in await keys.list_keys() if k.team == name and not k.revoked]
            if members:
                return f"team {name!r} still has key(s) {', '.join(members)}: move or revoke them"
            return "" if await teams.delete(name) else f"no team {name!r}"

    problem = asyncio.run(run())
    if problem:
        typer.echo(f"gpufleet: {problem}", err=True)
        raise typer.Exit(1)
    typer.echo(f"deleted team {name}")


# -- usage ---------------------------------------------------------------------------------


@app.command("usage")
def usage_report(
    start: Annotated[
        str | None, typer.Option("--from", help="First day YYYY-MM-DD (default: the 1st).")
    ] = None,
    end: Annotated[str | None, typer.Option("--to", help="Last day (default: today).")] = None,
    team: Annotated[str | None, typer.Option(help="Only this team ('' = no team).")] = None,
    key: Annotated[str | None, typer.Option(help="Only this key id.")] = None,
    pool: Annotated[str | None, typer.Option(help="Only this pool.")] = None,
    group_by: Annotated[str, typer.Option(help="day, team, key, pool or model.")] = "team",
    as_json: Annotated[bool, typer.Option("--json", help="The whole report as JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Rows as CSV.")] = False,
    config: ConfigOption = None,
) -> None:
    """GPU seconds, dollars and tokens attributed to teams and keys, and each pool's overhead
    (spend not attributed: idle and boot time). Reads Redis directly, like `keys`."""
    from gpufleet.store.usage import GROUPS, UsageStore, summarize

    if group_by not in GROUPS:
        raise typer.BadParameter(" | ".join(GROUPS), param_hint="--group-by")
    settings = _load(config)
    periods = Periods(settings.usage.timezone)
    try:
        today = datetime.datetime.now(periods.tz).date()
        last = datetime.date.fromisoformat(end) if end else today
        first = datetime.date.fromisoformat(start) if start else last.replace(day=1)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc}: use YYYY-MM-DD", param_hint="--from/--to") from None
    if first > last:
        raise typer.BadParameter("--from is after --to", param_hint="--from")

    async def run() -> dict[str, dict[str, float]]:
        async with _redis_client(settings) as client:
            store = UsageStore(client, prefix=settings.redis.key_prefix, periods=periods)
            return await store.read(first, last)

    report = summarize(
        asyncio.run(run()),
        group_by,  # type: ignore[arg-type]
        teams=[team] if team is not None else None,
        key=key,
        pool=pool,
    )
    rows = [r.public() for r in report.rows]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "from": first.isoformat(),
                    "to": last.isoformat(),
                    "timezone": periods.tz.key,
                    "group_by": group_by,
                    "rows": rows,
                    "total": report.total.public(),
                    "overhead": [p.public() for p in report.overhead],
                }
            )
        )
        return
    columns = ["group", "requests", "tasks", "gpu_seconds", "usd", "tokens_in", "tokens_out"]
    if as_csv:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(out.getvalue(), nl=False)
        return
    typer.echo(f"usage {first} .. {last} ({periods.tz.key}), by {group_by}")
    typer.echo(
        f"{group_by:<24} {'requests':>9} {'tasks':>7} {'gpu s':>10} {'usd':>10} "
        f"{'tok in':>9} {'tok out':>9}"
    )
    for row in [*rows, report.total.public()]:
        label = row["group"] if row["group"] != "" else "(no team)"
        typer.echo(
            f"{label:<24} {row['requests']:>9} {row['tasks']:>7} {row['gpu_seconds']:>10.1f} "
            f"{row['usd']:>10.4f} {row['tokens_in']:>9} {row['tokens_out']:>9}"
        )
    if report.overhead:
        typer.echo("\npool overhead (spend not attributed: idle and boot time)")
        for p in report.overhead:
            typer.echo(
                f"{p.pool:<24} spend ${p.spend_usd:.4f}  attributed ${p.attributed_usd:.4f}  "
                f"overhead ${p.overhead_usd:.4f}"
            )


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


def main(argv: list[str] | None = None) -> None:
    """The typer app on ``argv`` (default: ``sys.argv[1:]``); exits with its status."""
    app(args=argv, prog_name="gpufleet")


if __name__ == "__main__":  # pragma: no cover
    main()
