"""A simulated SURF Research Cloud workspace API as a Starlette app (provider-apis.md §2).

DRF style: trailing slashes, ``count/next/previous/results`` with ``limit``/``offset``,
deleted workspaces listed unless ``deleted=false``, the bare token in ``authorization``
(``X-CSRFTOKEN`` accepted, never required). Workspaces are pre-made and move

    paused → resuming → running → pausing → paused

by the injected clock. Actions answer 200 with the workspace already in its transitional
status; an action the workspace does not allow answers 400 ``{"code", "status", "message":
[...]}``. A resume fails (back to ``paused``, newest ``workspace_actions`` entry ``failed``
with ``result.error``) when ``fail_resumes`` > 0 or the GPU capacity is used up.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpufleet.providers.simulated import Clock, SimCloud, bill_usd

PREFIX = "/v1/workspace"
ALLOWED = {"running": ["pause", "reboot", "update_nsgs"], "paused": ["resume"]}


@dataclass
class SimSurfConfig:
    """Knobs of the simulated SURF. Delays are seconds of the injected clock."""

    api_token: str = "sim-surf-token"
    workspaces: list[str] = field(default_factory=lambda: ["gpufleet-gpu-01", "gpufleet-gpu-02"])
    initial_status: str = "paused"
    flavor_name: str = "gpu-a10-11core-88gb-50gb-2tb"
    gpu_name: str = "1 GPU - A10"
    price_per_hour: float = 1.20  # what a running workspace costs (wallet credits as USD)
    resume_s: float = 3.0
    pause_s: float = 2.0
    gpu_capacity: int | None = None  # running + resuming workspaces allowed at once
    fail_resumes: int = 0  # the next N resumes fail
    resume_error: str = "No GPU capacity available for flavour gpu-a10"
    requests_per_minute: int | None = None  # over it: 429
    retry_after_s: float = 1.0
    max_limit: int = 100
    seed: int | None = None


@dataclass
class SimWorkspace:
    id: str
    name: str
    ip: str
    status: str
    since: float
    steps: deque[tuple[float, str]] = field(default_factory=deque)
    actions: list[dict[str, Any]] = field(default_factory=list)
    deleted: bool = False
    billed_until: float = 0.0
    billed_s: float = 0.0
    transitions: list[str] = field(default_factory=list)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


OnChange = Callable[[SimWorkspace, str, str], None]


class SimSurf(SimCloud):
    provider = "surf"

    def __init__(self, config: SimSurfConfig, clock: Clock, on_change: OnChange | None) -> None:
        super().__init__(clock, config.requests_per_minute, config.retry_after_s)
        self.config = config
        self.on_change = on_change
        self._rng = random.Random(config.seed)
        self.workspaces: dict[str, SimWorkspace] = {}
        for name in config.workspaces:
            self.add_workspace(name, config.initial_status)

    def add_workspace(
        self, name: str, status: str = "paused", ip: str | None = None
    ) -> SimWorkspace:
        """A pre-made workspace; ``ip`` defaults to a made-up public address."""
        now = self.clock()
        ws = SimWorkspace(
            id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)), name=name,
            ip=ip or f"145.38.{self._rng.randint(0, 255)}.{self._rng.randint(1, 254)}",
            status=status, since=now, billed_until=now,
        )
        self.workspaces[ws.id] = ws
        return ws

    def error(self, status: int, reason: str, message: str) -> JSONResponse:
        if status in (401, 403):
            return JSONResponse({"detail": message}, status_code=status)
        text = {400: "Bad Request", 404: "Not Found", 429: "Too Many Requests"}.get(status, "Error")
        return JSONResponse({"code": status, "status": text, "message": [message]},
                            status_code=status)

    def authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == self.config.api_token

    @property
    def billed_usd(self) -> float:
        return sum(bill_usd(self.config.price_per_hour, w.billed_s)
                   for w in self.workspaces.values())

    def busy(self) -> int:
        return sum(1 for w in self.workspaces.values() if w.status in ("running", "resuming"))

    def _accrue(self, ws: SimWorkspace, until: float) -> None:
        if ws.status == "running" and until > ws.billed_until:
            ws.billed_s += until - ws.billed_until
        ws.billed_until = max(ws.billed_until, until)

    def _set(self, ws: SimWorkspace, status: str, at: float) -> None:
        self._accrue(ws, at)
        old, ws.status, ws.since = ws.status, status, at
        ws.transitions.append(status)
        if self.on_change is not None and old != status:
            self.on_change(ws, old, status)

    def advance(self) -> None:
        now = self.clock()
        for ws in self.workspaces.values():
            while ws.steps and ws.steps[0][0] <= now:
                at, status = ws.steps.popleft()
                self._set(ws, status, at)
                if ws.actions and ws.actions[-1]["status"] == "pending":
                    done = status != "paused" or ws.actions[-1]["type"] == "pause"
                    ws.actions[-1]["status"] = "success" if done else "failed"
                    ws.actions[-1]["time_updated"] = _iso(at)
                    if not done:
                        ws.actions[-1]["result"] = {"error": self.config.resume_error}
            self._accrue(ws, now)

    def to_json(self, ws: SimWorkspace) -> dict[str, Any]:
        allowed = ALLOWED.get(ws.status, [])
        return {
            "id": ws.id, "name": ws.name, "description": "simulated GPU workspace",
            "status": ws.status, "active": ws.status == "running",
            "actions": allowed, "allowed_actions": allowed,
            "deletable": True, "editable": True,
            "resource_meta": {"id": ws.id[:8], "ip": ws.ip, "vm_id": ws.id[-8:],
                              "workspace_fqdn": f"{ws.name}.sim.src.surf-hosted.nl",
                              "flavor_name": self.config.flavor_name, "instance_user": "ubuntu"},
            "meta": {"host_name": ws.name, "flavours": [
                {"id": "f1", "name": self.config.gpu_name, "category": "size"}]},
            "workspace_actions": ws.actions,
            "end_time": "2030-12-31T00:00:00Z", "time_created": _iso(ws.since),
            "time_deleted": None,
        }

    async def list_workspaces(self, request: Request, body: Any) -> Response:
        q = request.query_params
        limit = min(int(q.get("limit") or self.config.max_limit), self.config.max_limit)
        offset = int(q.get("offset") or 0)
        items = [w for w in self.workspaces.values()
                 if (q.get("deleted") != "false" or not w.deleted)
                 and (not q.get("name") or q["name"].lower() in w.name.lower())
                 and (not q.get("status") or w.status == q["status"])]
        page = items[offset:offset + limit]

        def link(at: int) -> str:
            params = dict(q) | {"limit": str(limit), "offset": str(at)}
            return str(request.url.replace_query_params(**params))

        return JSONResponse({
            "count": len(items),
            "next": link(offset + limit) if offset + limit < len(items) else None,
            "previous": link(max(0, offset - limit)) if offset > 0 else None,
            "results": [self.to_json(w) for w in page],
        })

    def _find(self, request: Request) -> SimWorkspace | None:
        ws = self.workspaces.get(request.path_params["id"])
        return ws if ws is not None and not ws.deleted else None

    async def get_workspace(self, request: Request, body: Any) -> Response:
        ws = self._find(request)
        if ws is None:
            return self.error(404, "", "Not found.")
        return JSONResponse(self.to_json(ws))

    async def action(self, request: Request, body: Any) -> Response:
        ws = self._find(request)
        if ws is None:
            return self.error(404, "", "Not found.")
        verb = request.path_params["action"]
        if verb not in ALLOWED.get(ws.status, []) or verb not in ("pause", "resume"):
            return self.error(400, "", f"Action {verb} is not allowed in status {ws.status}")
        now, c = self.clock(), self.config
        ws.actions.append({
            "id": str(uuid.UUID(int=self._rng.getrandbits(128), version=4)), "type": verb,
            "status": "pending", "reason": "API", "time_created": _iso(now),
            "time_updated": _iso(now), "issuer_display_name": None, "result": {},
        })
        if verb == "pause":
            self._set(ws, "pausing", now)
            ws.steps = deque([(now + c.pause_s, "paused")])
        else:
            fails = c.fail_resumes > 0 or (c.gpu_capacity is not None
                                           and self.busy() >= c.gpu_capacity)
            if c.fail_resumes > 0:
                c.fail_resumes -= 1
            self._set(ws, "resuming", now)
            ws.steps = deque([(now + c.resume_s, "paused" if fails else "running")])
        self.advance()
        return JSONResponse(self.to_json(ws))


def create_surf_app(
    config: SimSurfConfig | None = None,
    clock: Clock = time.time,
    on_change: OnChange | None = None,
) -> Starlette:
    """The simulated SURF workspace API under ``/v1/workspace`` (and at ``/``).

    ``on_change(workspace, old, new)`` is called on every status change; ``app.state.sim``
    is the ``SimSurf`` (``add_workspace``, ``workspaces``, ``billed_usd``, ``log``, ``faults``).
    The engine of a running workspace is ``http://{resource_meta.ip}:{port}``: the demo gives
    ``SimWorkspace.ip`` a loopback address (e.g. ``127.0.0.1``) to point it at a local worker.
    """
    sim = SimSurf(config or SimSurfConfig(), clock, on_change)

    def route(path: str, fn: Any, method: str) -> list[Route]:
        async def endpoint(request: Request) -> Response:
            return await sim.handle(request, fn)

        return [Route(prefix + path, endpoint, methods=[method]) for prefix in ("", PREFIX)]

    app = Starlette(routes=[
        *route("/workspaces/", sim.list_workspaces, "GET"),
        *route("/workspaces/{id}/", sim.get_workspace, "GET"),
        *route("/workspaces/{id}/actions/{action}/", sim.action, "POST"),
    ])
    app.state.sim = sim
    return app
