"""The simulated cloud for the multi-process chaos tests, as a process of its own.

    python -m tests.chaos.cloud --out urls.json [--first-token-s 0.0] [--boot-s 0.3]

Serves, on loopback ports:

- a simulated **Novita** API (``providers/simulated``), fast boots;
- one ``WorkerHost`` port where every *running* instance is a simulated **Ollama**
  under ``/w/<instance id>`` (the instance's public endpoint), removed when it stops;
- a **control** API for the test, which sees the cloud's own view, not gpufleet's:
  ``GET /state`` (instances, every instance ever created, executions per prompt),
  ``POST /hold-lists`` (``{"hold": true}``: instance listings wait until released, so a
  test can freeze the leader in the middle of a tick) and ``POST /engine``
  (``{"first_token_s": 2.0}``: how long every inference takes from now on).

Executions are counted by the engines themselves (every ``/api/generate`` body they
received, by its ``prompt``), across every engine that ever ran, so a task that ran
twice — on a worker whose gpufleet replica was killed, then again elsewhere — shows 2.

It writes ``{"novita": url, "workers": url, "control": url}`` to ``--out`` once every
server listens, and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gpufleet.engines.simulated import OllamaConfig, SimulatedOllama
from gpufleet.loopback import LoopbackServer, WorkerHost
from gpufleet.providers.simulated import SimNovitaConfig, SimProduct, create_novita_app
from gpufleet.providers.simulated.novita_app import SimInstance, SimNovita

MODEL = "chaos:1b"
API_KEY = "sim-novita-key"
PRODUCT = SimProduct("4090.18c.60g", "RTX 4090 24GB", 0.67, capacity_gpus=64)


class Cloud:
    def __init__(self, boot_s: float, first_token_s: float) -> None:
        self.first_token_s = first_token_s
        self.host = WorkerHost()
        self.engines: dict[str, SimulatedOllama] = {}  # running instances
        self.all_engines: list[SimulatedOllama] = []  # every engine ever started
        self.names: dict[str, str] = {}  # instance id -> name, for every instance ever seen
        self.hold = asyncio.Event()  # set: listings pass; clear: they wait
        self.hold.set()
        self.held = 0  # listings waiting right now
        self.lists = 0
        self.workers = LoopbackServer(self.host, name="chaos-workers")
        app = create_novita_app(
            SimNovitaConfig(
                api_key=API_KEY, products=[PRODUCT], create_s=boot_s / 2, pull_s=boot_s / 2,
                start_s=boot_s, stop_s=boot_s, remove_s=boot_s, seed=11,
            ),
            engine_url=lambda inst, port: f"{self.workers.url}/w/{inst.id}",
            on_change=self.on_change,
        )
        self.sim: SimNovita = app.state.sim
        self.novita = LoopbackServer(self.held_lists(app), name="chaos-novita")
        self.control = LoopbackServer(Starlette(routes=[
            Route("/state", self.state, methods=["GET"]),
            Route("/hold-lists", self.set_hold, methods=["POST"]),
            Route("/engine", self.set_engine, methods=["POST"]),
        ]), name="chaos-control")

    def on_change(self, inst: SimInstance, old: str, new: str) -> None:
        self.names.setdefault(inst.id, inst.name)
        if new == "running" and inst.id not in self.engines:
            engine = SimulatedOllama(OllamaConfig(
                models=(MODEL,), first_token_s=self.first_token_s, tokens_per_s=None,
                reply="ok",
            ))
            self.engines[inst.id] = engine
            self.all_engines.append(engine)
            self.host.add(inst.id, engine)
        elif new != "running" and inst.id in self.engines:
            self.host.remove(inst.id)
            del self.engines[inst.id]

    def held_lists(self, app: ASGIApp) -> ASGIApp:
        async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"].endswith("/gpu/instances"):
                self.lists += 1
                if not self.hold.is_set():
                    self.held += 1
                    try:
                        await self.hold.wait()
                    finally:
                        self.held -= 1
            await app(scope, receive, send)

        return wrapper

    async def state(self, request: Request) -> Response:
        self.sim.advance()
        for inst in self.sim.instances.values():
            self.names.setdefault(inst.id, inst.name)
        executions: Counter[str] = Counter()
        for engine in self.all_engines:
            for body in engine.recorder.bodies:
                prompt = body.get("prompt") if isinstance(body, dict) else None
                if isinstance(prompt, str):
                    executions[prompt] += 1
        return JSONResponse({
            "instances": [
                {"id": i.id, "name": i.name, "status": i.status}
                for i in self.sim.instances.values()
            ],
            "created": self.names,
            "executions": executions,
            "held": self.held,
            "lists": self.lists,
        })

    async def set_hold(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        if body.get("hold"):
            self.hold.clear()
        else:
            self.hold.set()
        return JSONResponse({"held": self.held})

    async def set_engine(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        self.first_token_s = float(body["first_token_s"])
        for engine in self.engines.values():
            engine.config.first_token_s = self.first_token_s
        return JSONResponse({"first_token_s": self.first_token_s})


async def main(out: Path, boot_s: float, first_token_s: float) -> None:
    cloud = Cloud(boot_s, first_token_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await cloud.workers.start()
    await cloud.novita.start()
    await cloud.control.start()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "novita": cloud.novita.url, "workers": cloud.workers.url, "control": cloud.control.url,
    }))
    tmp.rename(out)
    try:
        await stop.wait()
    finally:
        cloud.hold.set()
        for server in (cloud.control, cloud.novita, cloud.workers):
            with contextlib.suppress(Exception):
                await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--boot-s", type=float, default=0.3)
    parser.add_argument("--first-token-s", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(main(args.out, args.boot_s, args.first_token_s))
