"""CLI commands that talk to a running gpufleet over HTTP (``--url``/``--key`` or
``GPUFLEET_URL``/``GPUFLEET_API_KEY``).

Exit codes, for scripts: 0 ok; 1 the server answered an error (or a task failed);
2 bad usage; 3 the server could not be reached; 4 timed out waiting.
Every read command takes ``--json``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 1, 2, 3, 4
STATE_COLORS = {
    "ready": "green",
    "provisioning": "dark_orange",
    "booting": "dark_orange",
    "draining": "dark_orange",
    "stopping": "dark_orange",
    "stopped": "red",
    "paused": "red",
    "failed": "red",
    "deleted": "grey50",
    "succeeded": "green",
    "running": "dark_orange",
    "queued": "cyan",
    "cancelled": "grey50",
}

UrlOption = Annotated[str, typer.Option("--url", envvar="GPUFLEET_URL", help="gpufleet base URL.")]
KeyOption = Annotated[
    str, typer.Option("--key", envvar="GPUFLEET_API_KEY", help="API key.", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
IntervalOption = Annotated[
    float, typer.Option("--interval", min=0.2, help="Seconds between refreshes with --watch.")
]
DEFAULT_URL = "http://127.0.0.1:8000"

console = Console()
err_console = Console(stderr=True)


class Remote:
    """One short-lived HTTP client per call: CLI commands make a handful of calls."""

    def __init__(self, url: str, key: str, timeout_s: float = 30.0) -> None:
        self.base_url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout_s = timeout_s

    def client(self, timeout_s: float | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers=self.headers,
            timeout=timeout_s if timeout_s is not None else self.timeout_s,
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The parsed JSON answer (raw bytes if it is not JSON); exits with the CLI's codes."""
        answer = self.request(method, path, **kwargs)
        if answer.headers.get("content-type", "").startswith("application/json"):
            return answer.json()
        return answer.content

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            with self.client() as client:
                answer = client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            err_console.print(f"[red]timed out talking to {self.base_url}[/red]")
            raise typer.Exit(EXIT_TIMEOUT) from None
        except httpx.HTTPError as exc:
            err_console.print(f"[red]cannot reach {self.base_url}: {exc}[/red]")
            raise typer.Exit(EXIT_UNREACHABLE) from None
        if answer.status_code >= 400:
            try:
                message = answer.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = answer.text[:300]
            err_console.print(f"[red]{method} {path}: HTTP {answer.status_code}: {message}[/red]")
            raise typer.Exit(EXIT_ERROR)
        return answer


def _badge(state: str) -> str:
    return f"[{STATE_COLORS.get(state, 'white')}]{state}[/]"


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _watch(render: Callable[[], RenderableType], interval_s: float) -> None:
    """Redraw ``render()`` every ``interval_s`` until Ctrl-C (exit 0). On a terminal the view is
    redrawn in place; into a pipe or file each refresh is printed after a timestamp rule."""
    try:
        if console.is_terminal:
            with Live(render(), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(interval_s)
                    live.update(render(), refresh=True)
        while True:
            console.rule(time.strftime("%H:%M:%S"))
            print_tables(render())
            console.file.flush()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return


# A column: header, and how readily it goes on a narrow terminal (0: never; higher first).
Column = tuple[str, int]


def _cell_width(cell: str) -> int:
    return max((Text.from_markup(line).cell_len for line in cell.split("\n")), default=0)


def table_width(columns: list[str], rows: list[list[str]]) -> int:
    """Cells a rich table with the default box and padding needs to show every value whole."""
    widths = [
        max([_cell_width(header)] + [_cell_width(row[i]) for row in rows])
        for i, header in enumerate(columns)
    ]
    return sum(w + 2 for w in widths) + len(widths) + 1  # padding 1+1, one border per column


def fit_table(title: str, columns: list[Column], rows: list[list[str]],
              width: int | None) -> Table:
    """A table that fits ``width`` cells without cutting any value short.

    ``width=None`` (a pipe or a file) keeps every column: the caller prints it unbounded.
    On a terminal, columns go by priority (highest first) until the rest fits whole; if even
    the columns that are never dropped do not fit, their cells fold onto more lines
    instead of ending in an ellipsis. The caption names what was left out.
    """
    keep = list(range(len(columns)))
    if width is not None:
        for index in sorted(keep, key=lambda i: -columns[i][1]):
            if table_width([columns[i][0] for i in keep], [[r[i] for i in keep] for r in rows]) \
                    <= width:
                break
            if columns[index][1] > 0:
                keep.remove(index)
    dropped = [columns[i][0] for i in range(len(columns)) if i not in keep]
    caption = (f"not shown at {width} columns: {', '.join(dropped)} (widen the terminal, "
               "or use --json)") if dropped else None
    table = Table(title=title, caption=caption)
    for i in keep:
        table.add_column(columns[i][0], overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    return table


def terminal_width() -> int | None:
    """The terminal's width, or None when printing into a pipe or a file (no limit)."""
    return console.width if console.is_terminal else None


def print_tables(*tables: RenderableType) -> None:
    """On a terminal as fitted; into a pipe or file each table whole, however wide (a
    console there is 80 columns by default, which would cut every value short)."""
    if console.is_terminal:
        for table in tables:
            console.print(table)
        return
    for table in tables:
        measured = Console(width=100_000).measure(table).maximum
        Console(file=console.file, width=max(measured, 20), no_color=True).print(table)


WORKER_COLUMNS: list[Column] = [
    ("worker", 0), ("pool", 3), ("state", 0), ("slots", 1), ("models", 4), ("url", 6),
    ("cost $", 2),
]
POOL_COLUMNS: list[Column] = [
    ("pool", 0), ("provider", 5), ("engine", 4), ("workers", 0), ("queued", 1),
    ("waiting", 2), ("min/max", 3), ("burn $/h", 3), ("spend $", 4), ("backoff", 6),
]


def workers_table(workers: list[dict[str, Any]], width: int | None = None) -> Table:
    rows = [
        [
            w["id"],
            w["pool"],
            _badge(w["state"]),
            f"{w['busy_slots']}/{w['slots']}",
            ", ".join(w.get("models_loaded") or w.get("models_present") or []),
            w.get("base_url", ""),
            f"{w.get('cost_usd', 0):.3f}",
        ]
        for w in workers
    ]
    return fit_table("workers", WORKER_COLUMNS, rows, width)


def status_tables(pools: list[dict[str, Any]], workers: list[dict[str, Any]],
                  width: int | None = None) -> list[Table]:
    rows = []
    for p in pools:
        demand = p.get("demand") or {}
        rows.append([
            p["name"],
            p["provider"],
            p["engine"],
            " ".join(f"{_badge(s)}:{n}" for s, n in (p.get("workers_by_state") or {}).items()),
            str(demand.get("queued", "")),
            str(demand.get("waiting", "")),
            f"{p['min_workers']}/{p['max_workers']}",
            f"{p.get('burn_rate_per_hour', 0):.2f}",
            f"{p.get('spend_usd', 0):.2f}",
            (p.get("backoff") or {}).get("reason", ""),
        ])
    return [fit_table("pools", POOL_COLUMNS, rows, width), workers_table(workers, width)]


ACCOUNT_COLUMNS: list[Column] = [("provider", 0), ("balance $", 0), ("note", 5)]


def accounts(remote: Remote, pools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``/api/v1/providers/{name}/account`` of each cloud the pools use; a key that may not
    see it (user role), or a cloud that does not answer, leaves that account out."""
    found = []
    for name in sorted({p.get("provider", "") for p in pools} - {"static", ""}):
        try:
            with remote.client(timeout_s=10.0) as client:
                answer = client.get(f"/api/v1/providers/{name}/account")
        except httpx.HTTPError:
            continue
        if answer.status_code == 200:
            found.append(answer.json())
    return found


def accounts_table(found: list[dict[str, Any]], width: int | None = None) -> Table:
    rows = []
    for a in found:
        balance = (a.get("balance") or {}).get("available_usd")
        shown = f"{balance:.2f}" if a.get("known") and balance is not None else "unknown"
        rows.append([a.get("provider", ""), shown, a.get("message", "")])
    return fit_table("cloud accounts", ACCOUNT_COLUMNS, rows, width)


def status(
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
    as_json: JsonOption = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")] = False,
    interval: IntervalOption = 2.0,
) -> None:
    """Pools, workers, queue and spend at a glance."""
    remote = Remote(url, key)

    def fetch() -> tuple[Any, Any]:
        return remote.call("GET", "/api/v1/pools"), remote.call("GET", "/api/v1/workers")

    def tables() -> list[Table]:
        pools, workers = fetch()
        found = accounts(remote, pools)
        extra = [accounts_table(found, terminal_width())] if found else []
        return [*status_tables(pools, workers, width=terminal_width()), *extra]

    if as_json:
        pools, workers = fetch()
        found = accounts(remote, pools)
        _emit_json({"pools": pools, "workers": workers, **({"accounts": found} if found else {})})
        return
    if not watch:
        print_tables(*tables())
        return
    _watch(lambda: Group(*tables()), interval)


def workers(
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
    as_json: JsonOption = False,
    pool: Annotated[str | None, typer.Option(help="Only this pool.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")] = False,
    interval: IntervalOption = 2.0,
) -> None:
    """List workers with state, slots, models and cost."""
    remote = Remote(url, key)
    params = {"pool": pool} if pool else {}
    if as_json:
        _emit_json(remote.call("GET", "/api/v1/workers", params=params))
        return
    if not watch:
        print_tables(workers_table(remote.call("GET", "/api/v1/workers", params=params),
                                   terminal_width()))
        return
    _watch(lambda: workers_table(remote.call("GET", "/api/v1/workers", params=params),
                                 terminal_width()), interval)


def events(
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
    as_json: JsonOption = False,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    limit: int = 50,
) -> None:
    """Recent scale decisions and worker changes; --follow streams new ones."""
    remote = Remote(url, key)
    if not follow:
        items = remote.call("GET", "/api/v1/events", params={"limit": limit})
        if as_json:
            _emit_json(items)
        for e in reversed(items) if not as_json else []:
            _print_event(e)
        return
    try:
        with (
            remote.client(timeout_s=None) as client,
            client.stream("GET", "/api/v1/events/stream") as answer,
        ):
            if answer.status_code >= 400:
                err_console.print(f"[red]HTTP {answer.status_code}[/red]")
                raise typer.Exit(EXIT_ERROR)
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if as_json:
                        sys.stdout.write(json.dumps(event) + "\n")
                        sys.stdout.flush()
                    else:
                        _print_event(event)
    except KeyboardInterrupt:
        return
    except httpx.HTTPError as exc:
        err_console.print(f"[red]stream ended: {exc}[/red]")
        raise typer.Exit(EXIT_UNREACHABLE) from None


def endpoints_export(
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
    as_json: Annotated[bool, typer.Option("--json", help="JSON (always: the default).")] = True,
) -> None:
    """Ready worker endpoints per pool, as JSON, for tools that call workers directly
    (URLs need an admin key: user keys never see where workers are)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for w in Remote(url, key).call("GET", "/api/v1/workers", params={"state": "ready"}):
        out.setdefault(w["pool"], []).append(
            {
                "worker": w["id"],
                "url": w.get("base_url"),
                "slots": w["slots"],
                "models": w.get("models_present", []),
            }
        )
    _emit_json(out)


def tasks_submit(
    file: Annotated[Path, typer.Argument(help="Task JSON, or a bare ComfyUI graph.")],
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
    as_json: JsonOption = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it finishes.")] = False,
    outputs: Annotated[Path | None, typer.Option(help="Download outputs here.")] = None,
    timeout_s: Annotated[float, typer.Option(help="Give up waiting after this.")] = 3600,
) -> None:
    """Submit a task (ComfyUI graph or ollama request) and optionally wait for it."""
    try:
        body = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        err_console.print(f"[red]cannot read {file}: {exc}[/red]")
        raise typer.Exit(EXIT_USAGE) from None
    if isinstance(body, dict) and "payload" not in body:
        body = {"kind": "comfyui", "payload": body}
    remote = Remote(url, key)
    task = remote.call("POST", "/api/v1/tasks", json=body)
    if not wait:
        _emit_json(task) if as_json else console.print(f"submitted {task['id']}")
        return
    final = _wait(remote, task["id"], timeout_s, quiet=as_json)
    if outputs is not None:
        _download(remote, final, outputs)
    _emit_json(final) if as_json else console.print(
        f"{final['id']} {_badge(final['status'])} {final.get('error') or ''}"
    )
    if final["status"] != "succeeded":
        raise typer.Exit(EXIT_ERROR)


def tasks_get(
    task_id: str,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
    as_json: Annotated[bool, typer.Option("--json", help="JSON (always: the default).")] = True,
) -> None:
    """One task, as JSON."""
    _emit_json(Remote(url, key).call("GET", f"/api/v1/tasks/{task_id}"))


def tasks_list(
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
    as_json: JsonOption = False,
    status: Annotated[str | None, typer.Option()] = None,
    limit: int = 50,
) -> None:
    """Recent tasks."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    page = Remote(url, key).call("GET", "/api/v1/tasks", params=params)
    items = page.get("tasks", []) if isinstance(page, dict) else page
    if as_json:
        _emit_json(items)
        return
    table = Table(title="tasks")
    for column in ("id", "kind", "status", "pool", "priority", "attempts"):
        table.add_column(column)
    for t in items:
        table.add_row(
            t["id"],
            t["kind"],
            _badge(t["status"]),
            str(t.get("pool") or ""),
            str(t.get("priority", "")),
            str(t.get("attempts", "")),
        )
    print_tables(table)


def tasks_cancel(task_id: str, url: UrlOption = DEFAULT_URL, key: KeyOption = "") -> None:
    """Cancel a queued or running task."""
    task = Remote(url, key).call("POST", f"/api/v1/tasks/{task_id}/cancel")
    console.print(f"{task['id']} {_badge(task['status'])}")


INSTANCE_COLORS = {
    "running": "green",
    "pending": "dark_orange",
    "booting": "dark_orange",
    "stopping": "dark_orange",
    "stopped": "red",
    "paused": "red",
    "failed": "red",
    "deleted": "grey50",
}


def _money(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else ""


def instances_table(provider: str, items: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{provider} instances")
    table.add_column("name", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for column in ("id", "gpu", "$/h", "url"):
        table.add_column(column, overflow="fold")
    errors = any(i.get("last_error") for i in items)
    if errors:
        table.add_column("error", overflow="fold")
    for i in items:
        state, raw = str(i.get("state", "")), str(i.get("provider_status") or "")
        shown = f"[{INSTANCE_COLORS.get(state, 'white')}]{state}[/]"
        if raw and raw != state:
            shown += f" ({raw})"  # the cloud's own word: pulling, resuming, exited...
        row = [
            str(i.get("name", "")),
            shown,
            str(i.get("id", "")),
            str(i.get("gpu_name", "")),
            _money(i.get("price_per_hour")),
            str(i.get("base_url") or ""),
        ]
        table.add_row(*row, *([str(i.get("last_error") or "")] if errors else []))
    return table


def instances(
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
    as_json: JsonOption = False,
    provider: Annotated[
        str | None,
        typer.Option(help="novita, surf or static (default: every provider a pool uses)."),
    ] = None,
    pool: Annotated[str | None, typer.Option(help="Only this pool's instances.")] = None,
) -> None:
    """gpufleet's instances as the clouds list them (admin), including ones the fleet
    does not know (yet): what you would see in the providers' consoles."""
    remote = Remote(url, key)
    if provider is not None:
        providers = [provider]
    elif pool is not None:
        providers = [remote.call("GET", f"/api/v1/pools/{pool}")["provider"]]
    else:
        pools = remote.call("GET", "/api/v1/pools")
        providers = list(dict.fromkeys(p["provider"] for p in pools))
    params = {"pool": pool} if pool else {}
    found = {
        name: remote.call("GET", f"/api/v1/providers/{name}/instances", params=params)[
            "instances"
        ]
        for name in providers
    }
    if as_json:
        _emit_json(found)
        return
    if not found:
        console.print("no pools are configured, so no provider to ask")
    for name, items in found.items():
        print_tables(instances_table(name, items))


def products(
    url: UrlOption = DEFAULT_URL, key: KeyOption = "", as_json: JsonOption = False
) -> None:
    """Novita's GPU products with price and availability (admin): pick a pool's product_id."""
    found = Remote(url, key).call("GET", "/api/v1/providers/novita/products")["products"]
    if as_json:
        _emit_json(found)
        return
    table = Table(title="novita products ($ per GPU-hour)")
    table.add_column("product_id", no_wrap=True)
    for column in ("name", "on demand", "spot", "available", "inventory", "regions"):
        table.add_column(column)
    for p in sorted(found, key=lambda p: (p.get("price_per_hour") or 0, p.get("id", ""))):
        available = bool(p.get("available"))
        table.add_row(
            str(p.get("id", "")),
            str(p.get("name", "")),
            _money(p.get("price_per_hour")),
            _money(p.get("spot_price_per_hour")),
            "[green]yes[/]" if available else "[red]no[/]",
            str(p.get("inventory_state", "")),
            ", ".join(p.get("regions") or []),
        )
    print_tables(table)


def history_export(
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
    pool: Annotated[
        str | None, typer.Option("--pool", help="One pool (default: every configured pool).")
    ] = None,
    since: Annotated[
        str, typer.Option("--since", help="How far back: seconds, or 30m, 12h, 7d (at most 7d).")
    ] = "7d",
) -> None:
    """The pools' recorded arrivals and service times as CSV on stdout (admin), in the
    `gpufleet simulate --trace` format: `gpufleet history export > trace.csv`, then
    `gpufleet simulate --trace trace.csv --config config.toml`. Reconstructed from the
    bounded history (minute resolution, service times ~19 %), not a raw log."""
    params = {"since": since} | ({"pool": pool} if pool is not None else {})
    answer = Remote(url, key).request("GET", "/api/v1/history", params=params)
    sys.stdout.write(answer.text)
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add the remote commands to the ``gpufleet`` typer app."""
    tasks_app = typer.Typer(help="Submit and follow tasks.", no_args_is_help=True)
    endpoints_app = typer.Typer(help="Worker endpoints.", no_args_is_help=True)
    history_app = typer.Typer(help="The pools' recorded traffic.", no_args_is_help=True)
    app.add_typer(tasks_app, name="tasks")
    app.add_typer(endpoints_app, name="endpoints")
    app.add_typer(history_app, name="history")
    app.command()(status)
    app.command()(workers)
    app.command()(events)
    app.command()(instances)
    app.command()(products)
    endpoints_app.command("export")(endpoints_export)
    history_app.command("export")(history_export)
    tasks_app.command("submit")(tasks_submit)
    tasks_app.command("get")(tasks_get)
    tasks_app.command("list")(tasks_list)
    tasks_app.command("cancel")(tasks_cancel)


def _print_event(e: dict[str, Any]) -> None:
    when = time.strftime("%H:%M:%S", time.localtime(e.get("ts", 0)))
    what = e.get("action") or e.get("state") or e.get("kind")
    console.print(
        f"{when} {e.get('pool', '')} {what} {e.get('worker', '')} "
        f"{e.get('reason', '')} {e.get('outcome', '')}".rstrip()
    )


WAIT_POLL_S = 2.0  # the long poll returns at once when the task finishes; this only paces updates


def _wait(remote: Remote, task_id: str, timeout_s: float, *, quiet: bool) -> dict[str, Any]:
    """Long-poll until the task finishes; a spinner on stderr (none with ``quiet``) says where
    it stands: queued, running on which worker, which attempt, for how long."""
    started = time.monotonic()
    deadline = started + timeout_s
    spinner = err_console.status(f"{task_id} submitted", spinner="dots")
    if not quiet:
        spinner.start()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                err_console.print(f"[red]{task_id} still not finished after {timeout_s:g} s")
                raise typer.Exit(EXIT_TIMEOUT)
            task: dict[str, Any] = remote.call(
                "GET", f"/api/v1/tasks/{task_id}/wait",
                params={"timeout_s": round(min(WAIT_POLL_S, left), 3)},
            )
            if task["status"] in ("succeeded", "failed", "cancelled"):
                return task
            where = f" on {task['worker']}" if task["status"] == "running" and task.get(
                "worker") else ""
            attempt = f", attempt {task['attempts']}" if task.get("attempts", 0) > 1 else ""
            spinner.update(f"{task_id} {_badge(task['status'])}{where}{attempt} "
                           f"({time.monotonic() - started:.0f} s)")
    finally:
        spinner.stop()


def _download(remote: Remote, task: dict[str, Any], folder: Path) -> None:
    """Every output of ``task`` into ``folder``, byte for byte (whatever its content type)."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in (task.get("result") or {}).get("outputs", []):
        name = Path(item["filename"]).name  # never a path the server chose
        quoted = quote(str(item["filename"]), safe="")  # "?", "#", "/" or ".." stay in the name
        answer = remote.request("GET", f"/api/v1/tasks/{task['id']}/outputs/{quoted}")
        (folder / name).write_bytes(answer.content)
        err_console.print(f"saved {folder / name}")
