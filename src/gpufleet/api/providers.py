"""Manual control of the clouds: ``/api/v1/providers/...``.

List a provider's instances (gpufleet's own), Novita's GPU products with price and
availability, and create / start / stop / delete / pause / resume one instance by hand.
The cloud checks the transition: starting a running instance is a 409 (``InvalidState``),
never a crash. Errors come back as ``{"error": {"code", "message"}}``; provider errors are
answered here (not left to the app's handlers) so this router behaves the same in any app.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from gpufleet import errors
from gpufleet.api.deps import get_providers, get_settings
from gpufleet.providers.base import (
    ACTIONS,
    Capability,
    Instance,
    Product,
    Provider,
    Unsupported,
)

router = APIRouter(
    prefix="/api/v1/providers",
    tags=["providers"],
    responses={
        404: {"description": "No such provider configured, or no such instance."},
        405: {"description": "The provider cannot do this (e.g. pause on Novita)."},
        409: {"description": "The instance's state or the account forbids it now."},
        502: {"description": "The cloud answered with an error gpufleet cannot use."},
    },
)

STATUS_BY_ERROR: list[tuple[type[errors.ProviderError], int]] = [
    (errors.NotFound, 404),
    (errors.InvalidState, 409),
    (errors.AuthFailed, 502),
    (errors.RateLimited, 503),
    (errors.ProviderUnavailable, 503),
    (errors.InsufficientCapacity, 503),
    (errors.QuotaOrBalance, 409),  # the account's balance or instance limit forbids it now
]


class CreateInstance(BaseModel):
    pool: str = Field(description="Name of a configured pool of this provider.")
    name: str | None = Field(
        None, description="Instance name (gpufleet prefixes it); default: <pool>-manual-<6 hex>."
    )


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def _provider_error(exc: errors.ProviderError) -> JSONResponse:
    status = next((s for cls, s in STATUS_BY_ERROR if isinstance(exc, cls)), 502)
    headers = None
    if isinstance(exc, errors.RateLimited) and exc.retry_after:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    return _error(status, exc.code, str(exc), headers)


def _provider(request: Request, name: str) -> Provider | JSONResponse:
    provider: Provider | None = get_providers(request).get(name)
    if provider is None:
        return _error(404, "not_found", f"no provider {name!r} is configured")
    return provider


def _lacks(provider: Provider, capability: Capability) -> JSONResponse | None:
    if capability in provider.capabilities:
        return None
    has = ", ".join(sorted(provider.capabilities))
    return _error(405, "unsupported",
                  f"provider {provider.name!r} cannot {capability} (it can: {has})")


def instance_json(inst: Instance) -> dict[str, Any]:
    data = dataclasses.asdict(inst)
    data.pop("worker_token", None)  # the worker gate's secret is never shown, to admins either
    data["state"] = str(inst.state)
    data["endpoints"] = {str(k): v for k, v in inst.endpoints.items()}
    return data


def product_json(product: Product) -> dict[str, Any]:
    return dataclasses.asdict(product)


@router.get("/{name}/instances")
async def list_instances(request: Request, name: str, pool: str | None = None) -> Any:
    provider = _provider(request, name)
    if isinstance(provider, JSONResponse):
        return provider
    spec = None
    if pool is not None:
        spec = next((p for p in get_settings(request).pools if p.name == pool), None)
        if spec is None or spec.provider != name:
            return _error(404, "not_found", f"no {name} pool {pool!r}")
    try:
        instances = await provider.list(spec)
    except errors.ProviderError as exc:
        return _provider_error(exc)
    return {"provider": name, "instances": [instance_json(i) for i in instances]}


@router.get(
    "/{name}/account",
    summary="The cloud account's balance (Novita); SURF: unknown; static: 404",
)
async def provider_account(request: Request, name: str) -> Any:
    if name == "static":
        return _error(404, "not_found", "static endpoints have no cloud account")
    provider = _provider(request, name)
    if isinstance(provider, JSONResponse):
        return provider
    try:
        balance = await provider.balance()
    except Unsupported:
        return {
            "provider": name,
            "known": False,
            "balance": None,
            "message": f"gpufleet cannot read the {name} account's balance (its wallet API is "
            "not documented); see the provider's own dashboard",
        }
    except errors.ProviderError as exc:
        return _provider_error(exc)
    data = dataclasses.asdict(balance)
    data.pop("provider")
    return {"provider": name, "known": True, "currency": "USD", "balance": data}


@router.get("/novita/products")
async def novita_products(request: Request) -> Any:
    provider = _provider(request, "novita")
    if isinstance(provider, JSONResponse):
        return provider
    if (lacking := _lacks(provider, Capability.products)) is not None:
        return lacking
    try:
        products = await provider.products()
    except errors.ProviderError as exc:
        return _provider_error(exc)
    return {"provider": "novita", "products": [product_json(p) for p in products]}


@router.post("/{name}/instances", status_code=201)
async def create_instance(request: Request, name: str, body: CreateInstance) -> Any:
    provider = _provider(request, name)
    if isinstance(provider, JSONResponse):
        return provider
    if (lacking := _lacks(provider, Capability.create)) is not None:
        return lacking
    spec = next((p for p in get_settings(request).pools if p.name == body.pool), None)
    if spec is None or spec.provider != name:
        return _error(404, "not_found", f"no {name} pool {body.pool!r}")
    instance_name = body.name or f"{spec.name}-manual-{secrets.token_hex(3)}"
    try:
        inst = await provider.create(spec, instance_name)
    except errors.ProviderError as exc:
        return _provider_error(exc)
    return instance_json(inst)


@router.post("/{name}/instances/{instance_id}/{action}")
async def instance_action(request: Request, name: str, instance_id: str, action: str) -> Any:
    provider = _provider(request, name)
    if isinstance(provider, JSONResponse):
        return provider
    if action not in {str(a) for a in ACTIONS}:
        return _error(404, "not_found", f"unknown action {action!r}")
    if (lacking := _lacks(provider, Capability(action))) is not None:
        return lacking
    try:
        result = await getattr(provider, action)(instance_id)
        inst = result if isinstance(result, Instance) else None
        if inst is None and action != "delete":
            inst = await provider.get(instance_id)
    except errors.ProviderError as exc:
        return _provider_error(exc)
    return {"provider": name, "action": action, "instance_id": instance_id,
            "instance": instance_json(inst) if inst is not None else None}
