"""A simulated Novita GPU-instance API (OpenAPI v1) as a Starlette app.

Paths, fields, statuses and errors as in provider-apis.md §1: Kratos-style four-field error
bodies, business errors on HTTP 400 (``RESOURCE_NOT_FOUND``, ``INSUFFICIENT_RESOURCE``,
``CONFLICT`` "invalid state change"), 1-based ``pageNum`` with 0 read as 1, prices in
1/100000 USD. Statuses follow the clock:

    create: toCreate → creating → pulling → running      stop:   toStop → stopping → exited
    start:  toStart → starting → running                 delete: toRemove → removing → removed

and a removed instance answers ``RESOURCE_NOT_FOUND`` after ``removed_ttl_s``. Billing accrues
per second spent in ``pulling``/``running`` (Novita bills from the pull on).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpufleet.providers.simulated import Clock, SimCloud, bill_usd

BILLED = frozenset({"pulling", "running", "toRestart", "restarting"})
# Statuses whose GPUs are not held: a stopped or released instance frees its card.
FREE = frozenset({"exited", "toRemove", "removing", "removed"})
PRICE_UNIT = 100_000
# The balance endpoint answers strings of 1/10000 USD (provider-apis.md, "Novita account
# balance"); it lives under /openapi/v1, beside the GPU API's /gpu-instance/openapi/v1.
BALANCE_UNIT = 10_000
BALANCE_PATH = "/openapi/v1/billing/balance/detail"


@dataclass
class SimProduct:
    id: str
    name: str
    price_per_hour: float  # USD per GPU-hour
    capacity_gpus: int = 8  # GPUs free for this product in the whole (simulated) cloud
    spot_price_per_hour: float | None = None


def _default_products() -> list[SimProduct]:
    return [
        SimProduct("4090.sim", "RTX 4090 24GB", 0.67, 8, 0.35),
        SimProduct("a100.sim", "A100 SXM4 80GB", 1.60, 2),
    ]


@dataclass
class SimNovitaConfig:
    """Knobs of the simulated cloud. Delays are seconds of the injected clock."""

    api_key: str = "sim-novita-key"
    products: list[SimProduct] = field(default_factory=_default_products)
    create_s: float = 2.0  # toCreate → creating → pulling
    pull_s: float = 5.0  # pulling → running
    start_s: float = 2.0  # toStart → starting → running
    stop_s: float = 2.0  # toStop → stopping → exited
    remove_s: float = 2.0  # toRemove → removing → removed
    removed_ttl_s: float = 30.0  # a removed instance is still listed this long
    hang_in_pulling: int = 0  # the next N creates never leave pulling
    page_base: int = 1  # 0: pageNum=0 is the first page (the other reading of the docs)
    default_page_size: int = 1000  # when pageSize is missing
    max_page_size: int = 100
    requests_per_minute: int | None = None  # over it: 429 RATE_LIMIT_EXCEEDED
    retry_after_s: float = 1.0
    cluster_id: str = "1"
    cluster_name: str = "SIM-01"
    cluster_slug: str = "sim-1"
    # The account: top-up (cash) plus credit; what instances bill is taken off the cash.
    balance_usd: float = 100.0
    credit_limit_usd: float = 0.0
    seed: int | None = None


@dataclass
class SimInstance:
    id: str
    name: str
    product: SimProduct
    gpu_num: int
    rootfs_gb: int
    image: str
    ports: list[tuple[int, str]]
    envs: list[dict[str, str]]
    command: str
    cluster_id: str
    created_at: float
    status: str = "toCreate"
    since: float = 0.0
    steps: deque[tuple[float, str]] = field(default_factory=deque)
    billed_until: float = 0.0
    billed_s: float = 0.0
    transitions: list[str] = field(default_factory=list)

    @property
    def cost_usd(self) -> float:
        return bill_usd(self.product.price_per_hour * self.gpu_num, self.billed_s)


EngineUrl = Callable[[SimInstance, int], str]
OnChange = Callable[[SimInstance, str, str], None]


class SimNovita(SimCloud):
    provider = "novita"

    def __init__(
        self,
        config: SimNovitaConfig,
        clock: Clock,
        engine_url: EngineUrl | None,
        on_change: OnChange | None,
    ) -> None:
        super().__init__(clock, config.requests_per_minute, config.retry_after_s)
        self.config = config
        self.instances: dict[str, SimInstance] = {}
        self.gone: set[str] = set()
        self.engine_url = engine_url
        self.on_change = on_change
        self._rng = random.Random(config.seed)

    def error(self, status: int, reason: str, message: str) -> JSONResponse:
        body = {"code": status, "reason": reason, "message": message, "metadata": {}}
        return JSONResponse(body, status_code=status)

    def authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.config.api_key}"

    # -- state ---------------------------------------------------------------------------------

    @property
    def billed_usd(self) -> float:
        return sum(i.cost_usd for i in self.instances.values())

    def product(self, product_id: str) -> SimProduct | None:
        return next((p for p in self.config.products if p.id == product_id), None)

    def gpus_in_use(self, product_id: str) -> int:
        return sum(
            i.gpu_num
            for i in self.instances.values()
            if i.product.id == product_id and i.status not in FREE
        )

    def _set(self, inst: SimInstance, status: str, at: float) -> None:
        self._accrue(inst, at)
        old, inst.status, inst.since = inst.status, status, at
        inst.transitions.append(status)
        if self.on_change is not None and old != status:
            self.on_change(inst, old, status)

    def _accrue(self, inst: SimInstance, until: float) -> None:
        if inst.status in BILLED and until > inst.billed_until:
            inst.billed_s += until - inst.billed_until
        inst.billed_until = max(inst.billed_until, until)

    def _schedule(
        self, inst: SimInstance, now: float, first: str, *later: tuple[float, str]
    ) -> None:
        """``first`` now, then each ``(after_s, status)`` counted from now."""
        self._set(inst, first, now)
        inst.steps = deque((now + after, status) for after, status in later)

    def advance(self) -> None:
        now = self.clock()
        for inst in list(self.instances.values()):
            while inst.steps and inst.steps[0][0] <= now:
                at, status = inst.steps.popleft()
                self._set(inst, status, at)
            self._accrue(inst, now)
            if inst.status == "removed" and now - inst.since >= self.config.removed_ttl_s:
                del self.instances[inst.id]
                self.gone.add(inst.id)

    def endpoint(self, inst: SimInstance, port: int, kind: str) -> str:
        if inst.status != "running":
            return ""
        if kind != "http":
            return f"proxy.{self.config.cluster_slug}.gpu-instance.novita.ai:{30000 + port % 1000}"
        if self.engine_url is not None:
            return self.engine_url(inst, port)
        return f"https://{inst.id}-{port}.{self.config.cluster_slug}.gpu-instance.novita.ai"

    def to_json(self, inst: SimInstance) -> dict[str, Any]:
        return {
            "id": inst.id,
            "name": inst.name,
            "clusterId": inst.cluster_id,
            "clusterName": self.config.cluster_name,
            "status": inst.status,
            "statusError": {"state": "", "message": ""},
            "imageUrl": inst.image,
            "imageAuthId": "",
            "command": inst.command,
            "entrypoint": "",
            "cpuNum": str(16 * inst.gpu_num),
            "memory": str(62 * inst.gpu_num),
            "gpuNum": str(inst.gpu_num),
            "productId": inst.product.id,
            "productName": inst.product.name,
            "rootfsSize": inst.rootfs_gb,
            "portMappings": [
                {"port": port, "endpoint": self.endpoint(inst, port, kind), "type": kind}
                for port, kind in inst.ports
            ],
            "volumeMounts": [{"type": "local", "size": str(inst.rootfs_gb), "id": "",
                              "mountPath": "/"}],
            "envs": inst.envs,
            "kind": "gpu",
            "billingMode": "onDemand",
            "endTime": "-1",
            "spotStatus": "",
            "spotReclaimTime": "0",
            "createdAt": str(int(inst.created_at)),
        }

    # -- endpoints -----------------------------------------------------------------------------

    async def clusters(self, request: Request, body: Any) -> Response:
        gpus = [p.name for p in self.config.products]
        cluster = {"id": self.config.cluster_id, "name": self.config.cluster_name,
                   "availableGpuType": gpus, "supportNetworkStorage": True,
                   "supportInstanceNetwork": False}
        return JSONResponse({"data": [cluster]})

    async def balance(self, request: Request, body: Any) -> Response:
        """``GET /openapi/v1/billing/balance/detail``: every value a string of 1/10000 USD."""
        cash = self.config.balance_usd - self.billed_usd
        available = max(0.0, cash) + self.config.credit_limit_usd

        def units(usd: float) -> str:
            return str(round(usd * BALANCE_UNIT))

        return JSONResponse({
            "availableBalance": units(available),
            "cashBalance": units(max(0.0, cash)),
            "creditLimit": units(self.config.credit_limit_usd),
            "pendingCharges": "0",
            "outstandingInvoices": units(max(0.0, -cash)),
        })

    async def products(self, request: Request, body: Any) -> Response:
        name = request.query_params.get("productName", "").lower()
        data = []
        for p in self.config.products:
            if name and name not in p.name.lower():
                continue
            free = p.capacity_gpus - self.gpus_in_use(p.id)
            spot = p.spot_price_per_hour
            data.append({
                "id": p.id, "name": p.name, "cpuPerGpu": 16, "memoryPerGpu": 62,
                "diskPerGpu": 100, "availableDeploy": free > 0, "minRootFS": 10,
                "maxRootFS": 6144, "minLocalStorage": 0, "maxLocalStorage": 0,
                "regions": [self.config.cluster_name],
                "price": round(p.price_per_hour * PRICE_UNIT),
                "monthlyPrice": [], "billingMethods": ["onDemand"] + (["spot"] if spot else []),
                "spotPrice": str(round(spot * PRICE_UNIT)) if spot else "0",
                "inventoryState": "none" if free <= 0 else "low" if free <= 2 else "normal",
            })
        return JSONResponse({"data": data})

    async def create(self, request: Request, body: Any) -> Response:
        if not isinstance(body, dict):
            return self.error(400, "VALIDATOR_PARAM", "body must be an object")
        missing = [k for k in ("productId", "gpuNum", "rootfsSize", "imageUrl", "kind")
                   if body.get(k) in (None, "")]
        if missing:
            return self.error(400, "VALIDATOR_PARAM", f"missing {', '.join(missing)}")
        product = self.product(str(body["productId"]))
        if product is None:
            return self.error(400, "VALIDATOR_PARAM", "productId not found")
        gpu_num = int(body["gpuNum"])
        if self.gpus_in_use(product.id) + gpu_num > product.capacity_gpus:
            return self.error(400, "INSUFFICIENT_RESOURCE", "insufficient resource")
        now = self.clock()
        ports = []
        for part in str(body.get("ports") or "").split(","):
            if part.strip():
                port, _, kind = part.strip().partition("/")
                ports.append((int(port), kind or "http"))
        inst = SimInstance(
            id=f"{self._rng.getrandbits(64):016x}", name=str(body.get("name") or ""),
            product=product, gpu_num=gpu_num, rootfs_gb=max(10, int(body["rootfsSize"])),
            image=str(body["imageUrl"]), ports=ports, envs=list(body.get("envs") or []),
            command=str(body.get("command") or ""),
            cluster_id=str(body.get("clusterId") or self.config.cluster_id), created_at=now,
            since=now, billed_until=now,
        )
        self.instances[inst.id] = inst
        c = self.config
        steps = [(c.create_s / 2, "creating"), (c.create_s, "pulling")]
        if c.hang_in_pulling > 0:
            c.hang_in_pulling -= 1
        else:
            steps.append((c.create_s + c.pull_s, "running"))
        self._schedule(inst, now, "toCreate", *steps)
        self.advance()
        return JSONResponse({"id": inst.id})

    async def list_instances(self, request: Request, body: Any) -> Response:
        q = request.query_params
        size = self.config.default_page_size
        if q.get("pageSize") and int(q["pageSize"]) > 0:
            size = min(int(q["pageSize"]), self.config.max_page_size)
        index = max(0, int(q.get("pageNum") or 0) - self.config.page_base)
        name, status = q.get("name", ""), q.get("status", "")
        items = sorted(self.instances.values(), key=lambda i: (i.created_at, i.id))
        items = [i for i in items if (not name or name in i.name)
                 and (not status or i.status == status)]
        page_items = items[index * size:(index + 1) * size]
        return JSONResponse({"instances": [self.to_json(i) for i in page_items],
                             "total": len(items)})

    def _find(self, instance_id: Any) -> SimInstance | None:
        return self.instances.get(str(instance_id or ""))

    async def get_instance(self, request: Request, body: Any) -> Response:
        inst = self._find(request.query_params.get("instanceId"))
        if inst is None:
            return self.error(400, "RESOURCE_NOT_FOUND", "instance not found")
        return JSONResponse(self.to_json(inst))

    async def action(self, request: Request, body: Any) -> Response:
        verb = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        inst = self._find(body.get("instanceId") if isinstance(body, dict) else None)
        if inst is None or (verb == "delete" and inst.status == "removed"):
            return self.error(400, "RESOURCE_NOT_FOUND", "instance not found")
        now, c = self.clock(), self.config
        if verb == "delete":
            if inst.status not in ("toRemove", "removing"):
                self._schedule(inst, now, "toRemove", (c.remove_s / 2, "removing"),
                               (c.remove_s, "removed"))
            return JSONResponse({})
        if verb == "stop" and inst.status == "running":
            self._schedule(inst, now, "toStop", (c.stop_s / 2, "stopping"), (c.stop_s, "exited"))
        elif verb == "start" and inst.status == "exited":
            if self.gpus_in_use(inst.product.id) + inst.gpu_num > inst.product.capacity_gpus:
                return self.error(400, "INSUFFICIENT_RESOURCE", "insufficient resource")
            self._schedule(inst, now, "toStart", (c.start_s / 2, "starting"),
                           (c.start_s, "running"))
        elif verb == "restart" and inst.status == "running":
            self._schedule(inst, now, "toRestart", (c.start_s / 2, "restarting"),
                           (c.start_s, "running"))
        else:
            return self.error(400, "CONFLICT", "invalid state change")
        self.advance()
        return JSONResponse({"instanceId": inst.id, "state": inst.status})


def create_novita_app(
    config: SimNovitaConfig | None = None,
    clock: Clock = time.time,
    engine_url: EngineUrl | None = None,
    on_change: OnChange | None = None,
) -> Starlette:
    """The simulated Novita API, mounted at ``/gpu-instance/openapi/v1`` and at ``/``; the
    account's balance at ``/openapi/v1/billing/balance/detail``.

    ``engine_url(instance, port)`` gives the public URL of a running instance's HTTP port
    (default ``https://{id}-{port}.sim-1.gpu-instance.novita.ai``); ``on_change(instance,
    old, new)`` is called on every status change (the demo starts and stops simulated
    workers there). ``app.state.sim`` is the ``SimNovita`` holding the cloud's state.
    """
    sim = SimNovita(config or SimNovitaConfig(), clock, engine_url, on_change)

    def route(path: str, fn: Any, method: str) -> list[Route]:
        async def endpoint(request: Request) -> Response:
            return await sim.handle(request, fn)

        return [Route(prefix + path, endpoint, methods=[method])
                for prefix in ("", "/gpu-instance/openapi/v1")]

    async def balance(request: Request) -> Response:
        return await sim.handle(request, sim.balance)

    routes = [
        Route(BALANCE_PATH, balance, methods=["GET"]),  # at the host's root, as on Novita
        *route("/clusters", sim.clusters, "GET"),
        *route("/products", sim.products, "GET"),
        *route("/gpu/product/list", sim.products, "GET"),
        *route("/gpu/instance/create", sim.create, "POST"),
        *route("/gpu/instances", sim.list_instances, "GET"),
        *route("/gpu/instance", sim.get_instance, "GET"),
        *[r for verb in ("start", "stop", "restart", "delete")
          for r in route(f"/gpu/instance/{verb}", sim.action, "POST")],
    ]
    app = Starlette(routes=routes)
    app.state.sim = sim
    return app
