"""``gpufleet demo``: the whole service on one machine, against simulated clouds.

One process, one event loop:

- a simulated **Novita** cloud (``providers/simulated``) on a loopback port; each of its
  instances that reaches ``running`` gets a simulated **ComfyUI** worker served under
  ``/w/<instance id>`` of one ``WorkerHost`` port (its public endpoint), removed again
  when the instance stops or is deleted;
- a simulated **SURF** cloud with a few paused workspaces; each workspace has its own
  loopback address (127.0.0.2, 127.0.0.3, ...: Linux routes all of 127.0.0.0/8 to
  ``lo``) and a simulated **Ollama** listening on the pool's port there while the
  workspace runs, because SURF's client calls ``http://{resource_meta.ip}:{port}``.
  Where those addresses cannot be bound (macOS without aliases), every workspace
  shares 127.0.0.1 and one Ollama serves while any of them runs;
- gpufleet itself (``create_app``) with an embedded Redis in a demo data directory and
  two pools pointing at the simulated clouds through the real provider clients.

Boot, pull and resume delays are compressed to seconds (``--fast``: fractions of a
second); prices are the clouds' real list prices. On start it creates a fresh admin
key and prints a cheat sheet of copy-paste commands. Ctrl-C stops everything.

Only this module (and tests) import the simulated clouds and engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from starlette.applications import Starlette
from starlette.types import ASGIApp

from gpufleet.app import create_app
from gpufleet.engines.simulated.comfyui_app import ComfyUIConfig, SimulatedComfyUI
from gpufleet.engines.simulated.ollama_app import OllamaConfig, SimulatedOllama
from gpufleet.errors import ConfigError
from gpufleet.examples import example_path
from gpufleet.loopback import LoopbackServer, WorkerHost, free_port
from gpufleet.providers.simulated import (
    SimNovitaConfig,
    SimProduct,
    SimSurfConfig,
    create_novita_app,
    create_surf_app,
)
from gpufleet.providers.simulated.novita_app import SimInstance, SimNovita
from gpufleet.providers.simulated.surf_app import SimSurf, SimWorkspace
from gpufleet.settings import (
    LEGACY_ENV,
    LEGACY_POOL_ENV,
    Settings,
    load_settings,
    resolve_config_path,
)
from gpufleet.store.connection import default_data_dir
from gpufleet.worker_auth import TOKEN_ENV, new_token

logger = logging.getLogger(__name__)

NOVITA_POOL = "comfyui"
SURF_POOL = "llm"
OLLAMA_MODEL = "llama3.2:1b"
# Real list prices (provider-apis.md §1: Novita's RTX 4090 on demand is $0.67/GPU-hour);
# SURF bills wallet credits, shown here at roughly what an A10 workspace costs per hour.
RTX_4090 = SimProduct("4090.18c.60g", "RTX 4090 24GB", 0.67, capacity_gpus=8,
                      spot_price_per_hour=0.35)
A100 = SimProduct("a100.16c.120g", "A100 SXM4 80GB", 1.60, capacity_gpus=2)
SURF_PRICE_PER_HOUR = 1.20
SURF_WORKSPACES = ("gpufleet-gpu-01", "gpufleet-gpu-02", "gpufleet-gpu-03")
COMFYUI_IMAGE = "ghcr.io/ai-dock/comfyui:latest"


@dataclass(frozen=True)
class DemoTimings:
    """Seconds. The simulated clouds' delays, the workers' speed and gpufleet's loops."""

    novita_create_s: float = 2.0  # toCreate → creating → pulling
    novita_pull_s: float = 4.0  # pulling → running (the image pull)
    novita_start_s: float = 2.0  # a stopped instance starting again
    novita_stop_s: float = 2.0
    novita_remove_s: float = 2.0
    surf_resume_s: float = 3.0
    surf_pause_s: float = 2.0
    comfyui_step_s: float = 0.1  # the example graph has 20 steps: 2 s per image
    ollama_first_token_s: float = 0.3
    ollama_tokens_per_s: float | None = 20.0
    # "auto" (the shipped default): learned from each pool's idle gaps; `gpufleet events`
    # names the timeout and the numbers behind each park. A number fixes it (tests, --fast).
    idle_timeout_s: float | str = "auto"
    scaling_interval_s: float = 2.0
    health_interval_s: float = 1.0

    @classmethod
    def fast(cls) -> DemoTimings:
        return cls(
            novita_create_s=0.4, novita_pull_s=0.6, novita_start_s=0.4, novita_stop_s=0.4,
            novita_remove_s=0.4, surf_resume_s=0.5, surf_pause_s=0.4, comfyui_step_s=0.005,
            ollama_first_token_s=0.02, ollama_tokens_per_s=None, idle_timeout_s=5.0,
            scaling_interval_s=0.5, health_interval_s=0.25,
        )


@dataclass
class DemoOptions:
    """What the command line said. ``None``: not given, so configuration and environment
    decide as for ``gpufleet serve`` (``GPUFLEET_AUTH__ENABLED=false``, ``PORT``, ...), else
    the demo's default (127.0.0.1:8000, auth on, log level info)."""

    host: str | None = None
    port: int | None = None
    data_dir: Path | None = None  # default: <user data dir>/gpufleet/demo
    fast: bool = False
    auth: bool | None = None
    timings: DemoTimings | None = None  # overrides ``fast``
    log_level: str | None = None

    @property
    def resolved_timings(self) -> DemoTimings:
        if self.timings is not None:
            return self.timings
        return DemoTimings.fast() if self.fast else DemoTimings()

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir or default_data_dir().parent / "demo"


def loopback_aliases_work() -> bool:
    """Whether 127.0.0.2 can be bound (Linux: yes; macOS: only with an ifconfig alias)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class NovitaWorkers:
    """A simulated ComfyUI per running Novita instance, under ``/w/<id>`` of one port."""

    def __init__(self, timings: DemoTimings) -> None:
        self.timings = timings
        self.host = WorkerHost()
        self.server = LoopbackServer(self.host, name="sim-novita-workers")
        self.engines: dict[str, SimulatedComfyUI] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def engine_url(self, inst: SimInstance, port: int) -> str:
        return f"{self.server.url}/w/{inst.id}"

    def on_change(self, inst: SimInstance, old: str, new: str) -> None:
        if new == "running" and inst.id not in self.engines:
            # Like a real worker image running 'gpufleet worker-gate': the secret gpufleet
            # put into the instance's envs is required on every call.
            token = next((e.get("value") for e in inst.envs if e.get("key") == TOKEN_ENV), None)
            engine = SimulatedComfyUI(ComfyUIConfig(step_time_s=self.timings.comfyui_step_s,
                                                    token=token or None))
            self.engines[inst.id] = engine
            self.host.add(inst.id, engine)
        elif new != "running" and inst.id in self.engines:
            # The container is gone: what was in its memory (queue, history) goes with it.
            self.host.remove(inst.id)
            self._close(self.engines.pop(inst.id))

    def _close(self, engine: SimulatedComfyUI) -> None:
        task = asyncio.get_running_loop().create_task(engine.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        for name in list(self.engines):
            self.host.remove(name)
            self._close(self.engines.pop(name))
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self.server.stop()


class SurfWorkers:
    """A simulated Ollama per workspace, listening on ``ip:port`` while the workspace runs.

    ``on_change`` only marks the wanted servers dirty; one task starts and stops them
    (level-based, so a pause followed at once by a resume ends with the server up).
    """

    def __init__(self, timings: DemoTimings, port: int, shared_ip: bool) -> None:
        self.timings = timings
        self.port = port
        self.shared_ip = shared_ip
        # The SURF pool's configured worker token (workspaces run a worker gate too).
        self.token = new_token()
        self.sim: SimSurf | None = None
        self.engines: dict[str, SimulatedOllama] = {}  # by ip
        self.servers: dict[str, LoopbackServer] = {}  # by ip, while wanted
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def ip_for(self, index: int) -> str:
        return "127.0.0.1" if self.shared_ip else f"127.0.0.{index + 2}"

    def engine_for(self, ip: str) -> SimulatedOllama:
        if ip not in self.engines:
            # A paused workspace keeps its disk: the model is already pulled.
            self.engines[ip] = SimulatedOllama(OllamaConfig(
                models=(OLLAMA_MODEL,),
                first_token_s=self.timings.ollama_first_token_s,
                tokens_per_s=self.timings.ollama_tokens_per_s,
                reply="Hello from a simulated Ollama on a SURF workspace that gpufleet "
                "resumed for you.",
                token=self.token,
            ))
        return self.engines[ip]

    def on_change(self, ws: SimWorkspace, old: str, new: str) -> None:
        self._dirty.set()

    def wanted(self) -> set[str]:
        if self.sim is None:
            return set()
        return {ws.ip for ws in self.sim.workspaces.values() if ws.status == "running"}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="demo-surf-workers")

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.sync()
            except Exception:
                logger.exception("demo: could not start or stop a simulated Ollama")

    async def sync(self) -> None:
        wanted = self.wanted()
        for ip in sorted(wanted - set(self.servers)):
            server = LoopbackServer(self.engine_for(ip), host=ip, port=self.port,
                                    name=f"sim-ollama-{ip}")
            await server.start()
            self.servers[ip] = server
        for ip in sorted(set(self.servers) - wanted):
            await self.servers.pop(ip).stop()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for ip in list(self.servers):
            await self.servers.pop(ip).stop()


@dataclass
class Demo:
    """Everything ``gpufleet demo`` runs. ``start()``, then ``url``/``api_key``; ``stop()``."""

    options: DemoOptions = field(default_factory=DemoOptions)
    settings: Settings | None = None
    api_key: str = ""
    url: str = ""
    started_in_s: float = 0.0
    novita_server: LoopbackServer | None = None
    surf_server: LoopbackServer | None = None
    gpufleet_server: LoopbackServer | None = None
    novita_workers: NovitaWorkers | None = None
    surf_workers: SurfWorkers | None = None
    overridden: list[str] = field(default_factory=list)  # see demo_overrides
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def novita(self) -> SimNovita:
        assert self.novita_server is not None, "start() first"
        sim: SimNovita = self.novita_server.app.state.sim  # type: ignore[attr-defined]
        return sim

    @property
    def surf(self) -> SimSurf:
        assert self.surf_server is not None, "start() first"
        sim: SimSurf = self.surf_server.app.state.sim  # type: ignore[attr-defined]
        return sim

    @property
    def app(self) -> Any:
        assert self.gpufleet_server is not None, "start() first"
        return self.gpufleet_server.app

    async def __aenter__(self) -> Demo:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        began = time.monotonic()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self.started_in_s = time.monotonic() - began

    async def _start(self) -> None:
        opts, t = self.options, self.options.resolved_timings
        stack = self._stack
        self.novita_workers = NovitaWorkers(t)
        await self.novita_workers.server.start()
        stack.push_async_callback(self.novita_workers.aclose)
        novita_app = create_novita_app(
            SimNovitaConfig(
                products=[dataclasses.replace(RTX_4090), dataclasses.replace(A100)],
                create_s=t.novita_create_s, pull_s=t.novita_pull_s, start_s=t.novita_start_s,
                stop_s=t.novita_stop_s, remove_s=t.novita_remove_s,
            ),
            engine_url=self.novita_workers.engine_url,
            on_change=self.novita_workers.on_change,
        )
        self.novita_server = await _serve(stack, novita_app, "sim-novita")

        shared_ip = not loopback_aliases_work()
        if shared_ip:
            logger.warning("cannot bind 127.0.0.2: simulated SURF workspaces share 127.0.0.1")
        ollama_port = free_port()
        self.surf_workers = SurfWorkers(t, ollama_port, shared_ip)
        surf_app = create_surf_app(
            SimSurfConfig(
                workspaces=[], price_per_hour=SURF_PRICE_PER_HOUR,
                resume_s=t.surf_resume_s, pause_s=t.surf_pause_s, seed=7,
            ),
            on_change=self.surf_workers.on_change,
        )
        sim_surf: SimSurf = surf_app.state.sim
        for index, name in enumerate(SURF_WORKSPACES):
            sim_surf.add_workspace(name, "paused", ip=self.surf_workers.ip_for(index))
        self.surf_workers.sim = sim_surf
        self.surf_workers.start()
        stack.push_async_callback(self.surf_workers.aclose)
        self.surf_server = await _serve(stack, surf_app, "sim-surf")

        try:
            self.settings = demo_settings(
                opts, novita_url=self.novita_server.url,
                surf_url=f"{self.surf_server.url}/v1/workspace", ollama_port=ollama_port,
                surf_token=self.surf_workers.token,
            )
        except ConfigError as exc:
            raise DemoError(str(exc)) from None
        self.overridden = demo_overrides()
        for name in self.overridden:
            logger.warning("demo: ignoring %s (the demo sets it itself)", name)
        host, port = self.settings.server.host, self.settings.server.port
        if not port_is_free(host, port):
            raise DemoError(f"port {port} on {host} is in use: try --port")
        server = LoopbackServer(create_app(self.settings), host=host, port=port,
                                name="gpufleet", timeout_graceful_shutdown_s=5)
        try:
            await server.start()
        except SystemExit:  # uvicorn exits when it cannot bind
            raise DemoError(f"gpufleet could not listen on {host}:{port}") from None
        except RuntimeError as exc:  # the lifespan failed (e.g. Redis did not start)
            raise DemoError(f"gpufleet did not start: {exc}") from None
        stack.push_async_callback(server.stop)
        self.gpufleet_server = server
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.url = f"http://{shown_host}:{port}"
        if self.settings.auth.enabled:
            store = self.app.state.services.apikeys
            _, self.api_key = await store.create("demo", role="admin")

    async def stop(self) -> None:
        await self._stack.aclose()

    def cheat_sheet(self) -> str:
        return cheat_sheet(self)


class DemoError(RuntimeError):
    """The demo cannot start (port in use, Redis would not start): one line for the user."""


async def _serve(stack: contextlib.AsyncExitStack, app: Starlette | ASGIApp,
                 name: str) -> LoopbackServer:
    server = LoopbackServer(app, name=name)
    await server.start()
    stack.push_async_callback(server.stop)
    return server


# What the demo sets itself, whatever the configuration or environment says: its pools on the
# simulated clouds (with the clouds' URLs and keys) and its own embedded Redis and results in
# the demo data directory (a demo never touches a real cloud account or a shared Redis).
# Everything else ([auth], [server], [queue], [proxy], ...) applies to the demo as to serve.
DEMO_OWNED = (
    "pools",
    "redis.url",
    "redis.data_dir",
    "results.dir",
    "providers.novita.base_url",
    "providers.novita.api_key",
    "providers.surf.base_url",
    "providers.surf.api_token",
    "providers.surf.csrf_token",
)
DEMO_ENV_FILE = Path(".env")


def demo_settings(opts: DemoOptions, *, novita_url: str, surf_url: str,
                  ollama_port: int, surf_token: str | None = None) -> Settings:
    """gpufleet's configuration for the demo: two pools on the simulated clouds.

    Precedence: what the demo owns (``DEMO_OWNED``) > command-line options > environment
    > ``.env`` > ``config.toml`` > the demo's defaults (127.0.0.1:8000, auth on, quick loops).
    """
    t = opts.resolved_timings
    data_dir = opts.resolved_data_dir
    pools: list[dict[str, Any]] = [
        {
            "name": NOVITA_POOL, "provider": "novita", "engine": "comfyui",
            "product_id": RTX_4090.id, "image": COMFYUI_IMAGE, "gpu_num": 1, "rootfs_gb": 50,
            "slots": 1, "min_workers": 0, "max_workers": 3,
            "idle_timeout_s": t.idle_timeout_s, "boot_timeout_s": 120.0,
            "price_per_hour": RTX_4090.price_per_hour, "port": 8188,
        },
        {
            "name": SURF_POOL, "provider": "surf", "engine": "ollama",
            "name_filter": "gpufleet-gpu", "models": [OLLAMA_MODEL], "slots": 4,
            "min_workers": 0, "max_workers": len(SURF_WORKSPACES),
            "idle_timeout_s": t.idle_timeout_s, "boot_timeout_s": 120.0,
            "price_per_hour": SURF_PRICE_PER_HOUR, "port": ollama_port,
            **({"token": surf_token} if surf_token else {}),
        },
    ]
    defaults: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 8000, "log_level": "info"},
        "auth": {"enabled": True},
        "scaling": {"interval_s": t.scaling_interval_s},
        "workers": {"health_interval_s": t.health_interval_s,
                    "dispatch_interval_s": min(1.0, t.scaling_interval_s)},
    }
    given: dict[str, Any] = {}
    server = {k: v for k, v in (("host", opts.host), ("port", opts.port),
                                ("log_level", opts.log_level)) if v is not None}
    if server:
        given["server"] = server
    if opts.auth is not None:
        given["auth"] = {"enabled": opts.auth}
    return load_settings(
        None,
        env_file=DEMO_ENV_FILE,
        defaults=defaults,
        redis={"url": "", "data_dir": data_dir / "redis"},
        results={"dir": data_dir / "results"},
        providers={
            "novita": {"base_url": novita_url, "api_key": "sim-novita-key"},
            "surf": {"base_url": surf_url, "api_token": "sim-surf-token", "csrf_token": None},
        },
        pools=pools,
        legacy_novita_pool=None,  # NOVITA_PRODUCT_ID + NOVITA_IMAGE_URL: a real pool, not here
        **given,
    )


def _owned(dotted: str) -> bool:
    return any(dotted == key or dotted.startswith(key + ".") for key in DEMO_OWNED)


def _toml_has(data: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return data not in (None, "", [], {})


def demo_overrides(environ: Mapping[str, str] | None = None,
                   config_path: Path | None = None,
                   env_file: Path | None = DEMO_ENV_FILE) -> list[str]:
    """The user's settings the demo ignores because it owns them (``DEMO_OWNED``), each
    named as the user wrote it: ``GPUFLEET_REDIS__URL``, ``REDIS_URL``, ``.env: NOVITA_API_KEY``,
    ``config.toml: pools``. Printed at start so nobody wonders why a setting did nothing."""
    legacy_owned = {name for name, dotted in LEGACY_ENV.items() if _owned(dotted)}
    legacy_owned |= {*LEGACY_POOL_ENV, "REDIS_HOST", "REDIS_PORT"}

    def owned_variable(name: str) -> bool:
        upper = name.upper()
        if upper.startswith("GPUFLEET_"):
            return _owned(upper.removeprefix("GPUFLEET_").lower().replace("__", "."))
        return upper in legacy_owned

    found: list[str] = []
    env = dict(os.environ if environ is None else environ)
    found += [name for name in sorted(env) if env[name] and owned_variable(name)]
    if env_file is not None and env_file.is_file():
        dotenv = dotenv_values(env_file)
        found += [f"{env_file}: {name}" for name in sorted(dotenv)
                  if dotenv[name] and name not in env and owned_variable(name)]
    path = config_path if config_path is not None else resolve_config_path(None)
    if path is not None and path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            data = {}  # load_settings reports it
        found += [f"{path}: {key}" for key in DEMO_OWNED if _toml_has(data, key)]
    return found


def cheat_sheet(demo: Demo) -> str:
    """What to paste into another terminal. Shows the key once (it is not stored)."""
    url, key = demo.url, demo.api_key
    assert demo.novita_server is not None
    assert demo.surf_server is not None
    graph = shlex.quote(str(example_path("txt2img.json")))
    t = demo.options.resolved_timings
    lines = [
        "",
        f"gpufleet demo is running at {url} (started in {demo.started_in_s:.1f} s)",
        "",
        f"  simulated Novita  {demo.novita_server.url}  pool '{NOVITA_POOL}': ComfyUI on "
        f"{RTX_4090.name} at ${RTX_4090.price_per_hour:.2f}/h, 0-3 instances created on demand",
        f"  simulated SURF    {demo.surf_server.url}  pool '{SURF_POOL}': Ollama "
        f"{OLLAMA_MODEL} on A10 at ${SURF_PRICE_PER_HOUR:.2f}/h, "
        f"{len(SURF_WORKSPACES)} paused workspaces",
        (
            "  idle workers are stopped/paused after a timeout learned from each pool's idle "
            "gaps (gpufleet events says which and why); "
            if t.idle_timeout_s == "auto"
            else f"  idle workers are stopped/paused after {t.idle_timeout_s:g} s; "
        )
        + f"data in {demo.options.resolved_data_dir}",
        "",
    ]
    settings = demo.settings
    if key:
        lines += [
            f"  admin API key (shown once, a new one every run): {key}",
            f"  status page:  {url}/ui#key={key}",
        ]
    else:
        why = ("--no-auth" if demo.options.auth is False
               else "[auth] enabled = false in your configuration or environment")
        lines += [
            f"  auth is OFF ({why}): anyone who can reach this port can use it",
            f"  status page:  {url}/ui",
        ]
    if settings is None or settings.server.api_docs:
        lines.append(f"  API docs:     {url}/docs")
    else:
        lines.append(f"  API docs:     off ([server] api_docs = false); {url}/openapi.json")
    if demo.overridden:
        lines += [
            "  ignored (the demo runs its own clouds, pools and Redis): "
            + ", ".join(demo.overridden),
        ]
    env = f"export GPUFLEET_URL={url}" + (f" GPUFLEET_API_KEY={key}" if key else "")
    curl_auth = ' -H "Authorization: Bearer $GPUFLEET_API_KEY"' if key else ""
    headers = f', headers={{"Authorization": "Bearer {key}"}}' if key else ""
    # Only what `pip install -e .` installs (gpufleet) and curl: the ollama SDK and CLI are
    # not gpufleet's dependencies, so their lines say how to get them.
    chat_body = json.dumps({"model": OLLAMA_MODEL, "stream": False,
                            "messages": [{"role": "user", "content": "hi"}]})
    chat_curl = f"curl -s{curl_auth} $GPUFLEET_URL/api/chat -d '{chat_body}'"
    chat_sdk = (
        f"pip install ollama && python -c 'import ollama; "
        f"c = ollama.Client(host=\"{url}\"{headers}); "
        f'print(c.chat(model="{OLLAMA_MODEL}", '
        """messages=[{"role": "user", "content": "hi"}]).message.content)'"""
    )
    ollama_cli = f"OLLAMA_HOST={url} ollama run {OLLAMA_MODEL}"
    cli_note = ("# the ollama CLI (not installed by pip: see ollama.com/download) sends no key, "
                "so it needs gpufleet demo --no-auth:" if key else
                "# the ollama CLI (not installed by pip: see ollama.com/download):")
    lines += [
        "",
        "Try it in another terminal:",
        "",
        f"  {env}",
        "",
        "  # watch the fleet and its scale decisions",
        "  gpufleet status --watch",
        "  gpufleet events --follow",
        "",
        "  # a ComfyUI image: the first task creates a Novita instance",
        f"  gpufleet tasks submit {graph} --wait --outputs ./demo-out",
        f"  curl -s{curl_auth} -H 'Content-Type: application/json' \\",
        f'    -d "{{\\"kind\\": \\"comfyui\\", \\"payload\\": $(cat {graph})}}" '
        "$GPUFLEET_URL/api/v1/tasks",
        f"  for i in $(seq 20); do gpufleet tasks submit {graph}; done",
        "",
        "  # chat through the Ollama-compatible proxy: resumes a paused SURF workspace",
        f"  {chat_curl}",
        "  # the same with the ollama Python SDK (not a gpufleet dependency):",
        f"  {chat_sdk}",
        f"  {cli_note}",
        f"  #   {ollama_cli}",
        "",
        "  # the clouds, as gpufleet's providers see them",
        "  gpufleet instances",
        "  gpufleet products",
        "",
        "  # ready worker endpoints per pool, as JSON; the Prometheus metrics",
        "  gpufleet endpoints export",
        "  curl -s $GPUFLEET_URL/metrics | grep '^gpufleet_'",
        "",
        "Ctrl-C stops the demo and its embedded Redis.",
        "",
    ]
    return "\n".join(lines)


async def run(options: DemoOptions, out: Callable[[str], None] = print,
              on_start: Callable[[Demo], None] | None = None) -> None:
    """Start the demo, print the cheat sheet, run until SIGINT/SIGTERM, stop cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        async with Demo(options) as demo:
            if on_start is not None:
                on_start(demo)
            out(demo.cheat_sheet())
            await stop.wait()
            out("stopping the demo ...")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(options: DemoOptions) -> int:
    """Blocking entry point for the CLI; returns the exit code."""
    from gpufleet.logs import configure_logging

    def configure(level: str, fmt: Literal["text", "json"] = "text") -> None:
        configure_logging(level, fmt)
        # Every reconcile tick lists both clouds: at info that drowns the scale decisions,
        # which the reconciler logs itself. --log-level debug shows every provider call.
        logging.getLogger("gpufleet.providers.base").setLevel(
            logging.WARNING if level == "info" else logging.NOTSET)

    def configured(demo: Demo) -> None:
        # [server] log_level / [log] format from the configuration or the environment.
        assert demo.settings is not None
        server, log = demo.settings.server, demo.settings.log
        if (server.log_level, log.format) != (options.log_level or "info", "text"):
            configure(server.log_level, log.format)

    configure(options.log_level or "info")
    try:
        asyncio.run(run(options, out=lambda text: print(text, flush=True),
                        on_start=configured))
    except DemoError as exc:
        print(f"gpufleet demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
