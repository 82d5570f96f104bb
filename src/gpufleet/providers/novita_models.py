"""Novita wire format: request bodies, status mapping, instance/product parsing, error bodies.

Pure functions over JSON (no I/O); ``novita.py`` does the calls. Field names are spelled as
the API spells them (shared/reference/provider-apis.md §1). Parsing is tolerant where the
reference marks a fact unconfirmed: numbers may come as strings, ``portMappings[].endpoint``
may lack a scheme or be empty, unknown statuses read as ``pending``, never a crash.
"""

from __future__ import annotations

from typing import Any

import httpx

from gpufleet import errors
from gpufleet.providers.base import AccountBalance, Instance, InstanceState, Product
from gpufleet.settings import PoolSpec
from gpufleet.worker_auth import TOKEN_ENV

PROVIDER = "novita"
# Prices on the wire are in 1/100000 USD per GPU-hour: 67000 -> $0.67/h.
PRICE_UNIT = 100_000
# The balance endpoint's strings are in 1/10000 USD: "10000" -> $1.00.
BALANCE_UNIT = 10_000
GPU_BASE_PATH = "/gpu-instance/openapi/v1"
BALANCE_PATH = "/openapi/v1/billing/balance/detail"

STATUS_MAP: dict[str, InstanceState] = {
    "pending": InstanceState.pending,
    "toCreate": InstanceState.pending,
    "creating": InstanceState.pending,
    "pulling": InstanceState.booting,
    "toStart": InstanceState.booting,
    "starting": InstanceState.booting,
    "toRestart": InstanceState.booting,
    "restarting": InstanceState.booting,
    "toReset": InstanceState.booting,
    "resetting": InstanceState.booting,
    "migrating": InstanceState.booting,
    "running": InstanceState.running,
    "toStop": InstanceState.stopping,
    "stopping": InstanceState.stopping,
    "freezing": InstanceState.stopping,
    "exited": InstanceState.stopped,
    "toRemove": InstanceState.deleted,
    "removing": InstanceState.deleted,
    "removed": InstanceState.deleted,
}

NOT_FOUND_REASONS = frozenset({"RESOURCE_NOT_FOUND"})
CAPACITY_REASONS = frozenset({"INSUFFICIENT_RESOURCE", "MIGRATE_INSUFFICIENT_RESOURCE"})
QUOTA_REASONS = frozenset(
    {"BALANCE_NOT_ENOUGH", "EXPIRED_OR_BALANCE_NOT_ENOUGH", "CREATE_INSTANCE_LIMIT"}
)
AUTH_REASONS = frozenset({"UNAUTHORIZED", "FORBIDDEN", "INVALID_API_KEY"})
STATE_REASONS = frozenset({"CONFLICT"})


def parse_error(response: httpx.Response, body: Any) -> tuple[str, str]:
    """``(reason, message)`` of the four-field body ``{code, reason, message, metadata}``."""
    if not isinstance(body, dict):
        return "", str(body)
    return str(body.get("reason") or ""), str(body.get("message") or "")


def classify(status: int, reason: str, message: str) -> type[errors.ProviderError] | None:
    """Novita's business errors are HTTP 400 told apart by ``reason`` (404 also means gone)."""
    if reason in NOT_FOUND_REASONS:
        return errors.NotFound
    if reason in CAPACITY_REASONS:
        return errors.InsufficientCapacity
    if reason in QUOTA_REASONS:
        return errors.QuotaOrBalance
    if reason in AUTH_REASONS:
        return errors.AuthFailed
    if reason == "RATE_LIMIT_EXCEEDED":
        return errors.RateLimited
    # "invalid state change" is the observed message; its reason is unconfirmed.
    if reason in STATE_REASONS or "invalid state" in message.lower():
        return errors.InvalidState
    return None


def create_body(pool: PoolSpec, name: str, token: str = "") -> dict[str, Any]:
    """The ``POST /gpu/instance/create`` body for one worker of ``pool``; ``token`` goes
    into the container's env as ``GPUFLEET_WORKER_TOKEN`` (its worker gate reads it)."""
    envs = {k: v for k, v in pool.envs.items() if k != TOKEN_ENV}
    if token:
        envs[TOKEN_ENV] = token
    body: dict[str, Any] = {
        "name": name,
        "productId": pool.product_id,
        "gpuNum": pool.gpu_num,
        "rootfsSize": pool.rootfs_gb,
        "imageUrl": pool.image,
        "ports": f"{pool.engine_port}/http",
        "envs": [{"key": k, "value": v} for k, v in envs.items()],
        "kind": "gpu",
        "billingMode": "onDemand",
        "month": 0,
    }
    if pool.command:
        body["command"] = pool.command
    if pool.cluster_id:
        body["clusterId"] = pool.cluster_id
    return body


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def endpoints(data: dict[str, Any]) -> dict[int, str]:
    """Container port -> public base URL of the instance's HTTP port mappings."""
    out: dict[int, str] = {}
    for mapping in data.get("portMappings") or []:
        if not isinstance(mapping, dict):
            continue
        endpoint = str(mapping.get("endpoint") or "")
        kind = str(mapping.get("type") or "http").lower()
        if not endpoint or kind != "http":
            continue
        if "://" not in endpoint:
            endpoint = "https://" + endpoint
        out[_int(mapping.get("port"))] = endpoint.rstrip("/")
    return out


def pick_base_url(found: dict[int, str], port: int | None) -> str | None:
    """The endpoint of ``port``; without one, the only HTTP port, else a known engine port."""
    if port is not None:
        return found.get(port)
    if len(found) == 1:
        return next(iter(found.values()))
    for known in (8188, 11434):
        if known in found:
            return found[known]
    return None


def parse_instance(
    data: Any, *, port: int | None = None, price_per_hour: float | None = None
) -> Instance:
    if not isinstance(data, dict) or not data.get("id"):
        raise errors.ProviderBadResponse(
            f"novita: instance without id: {str(data)[:200]}", provider=PROVIDER
        )
    status = str(data.get("status") or "")
    state = STATUS_MAP.get(status, InstanceState.pending)
    status_error = data.get("statusError")
    last_error = ""
    if isinstance(status_error, dict) and status_error.get("message"):
        last_error = str(status_error["message"])
        if state not in (InstanceState.running, InstanceState.deleted):
            state = InstanceState.failed
    found = endpoints(data)
    return Instance(
        id=str(data["id"]),
        name=str(data.get("name") or ""),
        state=state,
        provider=PROVIDER,
        provider_status=status,
        base_url=pick_base_url(found, port) if state is InstanceState.running else None,
        endpoints=found,
        gpu_name=str(data.get("productName") or data.get("productId") or ""),
        price_per_hour=price_per_hour,
        created_at=_float(data.get("createdAt")),
        last_error=last_error,
        worker_token=env_value(data, TOKEN_ENV),
    )


def env_value(data: dict[str, Any], key: str) -> str:
    """One variable of an instance's ``envs`` (``[{"key", "value"}]``), or ""."""
    envs = data.get("envs")
    for item in envs if isinstance(envs, list) else []:
        if isinstance(item, dict) and item.get("key") == key:
            return str(item.get("value") or "")
    return ""


def parse_product(data: dict[str, Any]) -> Product:
    spot = _float(data.get("spotPrice"))
    return Product(
        id=str(data.get("id") or ""),
        name=str(data.get("name") or ""),
        price_per_hour=_int(data.get("price")) / PRICE_UNIT,
        spot_price_per_hour=spot / PRICE_UNIT if spot else None,
        available=bool(data.get("availableDeploy", True)),
        inventory_state=str(data.get("inventoryState") or ""),
        regions=tuple(str(r) for r in data.get("regions") or ()),
        cpu_per_gpu=_int(data.get("cpuPerGpu")),
        memory_per_gpu_gb=_int(data.get("memoryPerGpu")),
    )


def balance_url(base_url: str) -> str:
    """The balance endpoint beside the GPU API: it lives under ``/openapi/v1``, not under
    ``/gpu-instance/openapi/v1`` (``https://api.novita.ai/openapi/v1/billing/balance/detail``)."""
    url = httpx.URL(base_url)
    path = url.path.rstrip("/")
    root = path[: -len(GPU_BASE_PATH)] if path.endswith(GPU_BASE_PATH) else path
    return str(url.copy_with(path=root + BALANCE_PATH, query=None))


def _usd(body: dict[str, Any], name: str) -> float | None:
    value = _float(body.get(name))
    return value / BALANCE_UNIT if value is not None else None


def parse_balance(body: Any) -> AccountBalance:
    """``{"availableBalance": "1000000", ...}`` (strings of 1/10000 USD) as USD."""
    available = _usd(body, "availableBalance") if isinstance(body, dict) else None
    if available is None:
        raise errors.ProviderBadResponse(
            f"novita: balance answer without availableBalance: {str(body)[:200]}",
            provider=PROVIDER,
        )
    return AccountBalance(
        provider=PROVIDER,
        available_usd=available,
        cash_usd=_usd(body, "cashBalance"),
        credit_limit_usd=_usd(body, "creditLimit"),
        pending_charges_usd=_usd(body, "pendingCharges"),
        outstanding_invoices_usd=_usd(body, "outstandingInvoices"),
    )
