"""The raw ASGI endpoint of every forwarded inference route (``POST /api/chat``,
``/v1/chat/completions`` …): who calls, what they send, then ``ProxyService.forward``.

In order: the API key (before a byte of the body is read), the priority header against
the key's ``max_priority``, the body (bounded in size and in time), its JSON and model,
then the key's ``max_concurrent`` place (a Redis script, only when the key has that limit),
held for the whole relay.

Consumers: ``gpufleet.proxy.ollama`` / ``.openai`` (their routers) and
``gpufleet.proxy.forward_routes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from gpufleet.proxy.coarse_timer import coarse_timer
from gpufleet.proxy.relay import Call, Flavor, get_service, send_error
from gpufleet.routing import normalize_model

# Returns the caller (an object with ``owner``: the API key id, or None); raises to refuse.
Authenticator = Callable[[Request], Awaitable[Any]]


class ClientGone(Exception):
    """The client disconnected before its request body was read."""



def model_of(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    return normalize_model(model) if isinstance(model, str) else ""



class BodyTimeout(Exception):
    """The client did not send its whole body within ``[server] body_timeout_s`` (408)."""


async def read_body(
    receive: Receive,
    limit: int,
    *,
    timeout_s: float | None = None,
    declared: str | None = None,
) -> bytes | None:
    """The whole request body, or None if it is larger than ``limit`` bytes.

    ``declared`` (the ``Content-Length`` header) over the limit answers None before a
    byte is read. ``timeout_s`` bounds the whole read (``BodyTimeout``): a client that
    sends slowly, or stops one byte short, cannot hold a buffer open. The body grows in
    one buffer that is dropped as soon as the read fails.
    """
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    buf = bytearray()
    # A coarse timer (``coarse_timer``) that cancels this task, not asyncio.timeout(): the
    # same bound (up to a tick late) for a fraction of the cost, on every proxied request.
    task = asyncio.current_task()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        if task is not None:
            task.cancel()

    timers = coarse_timer()
    timer = timers.call_later(timeout_s, expire) if timeout_s is not None else None
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            buf += message.get("body", b"")
            if len(buf) > limit:
                return None
            if not message.get("more_body", False):
                return bytes(buf)
    except asyncio.CancelledError:
        if not expired or task is None or task.uncancel() > 0:
            raise  # cancelled by someone else (too)
        raise BodyTimeout(f"request body not complete within {timeout_s:g} s") from None
    finally:
        if timer is not None:
            timers.cancel(timer)
        del buf


def header(scope: Scope, name: bytes) -> str | None:
    """One request header's value (latin-1), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _priority(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"x-gpufleet-priority":
            with contextlib.suppress(ValueError):
                return max(-10, min(10, int(value)))
    return 0


class ForwardEndpoint:
    """A raw ASGI endpoint that forwards a JSON POST for a model to a worker."""

    def __init__(
        self,
        flavor: Flavor,
        path: str,
        *,
        auth: Authenticator | None = None,
        set_keep_alive: bool = False,
    ) -> None:
        self.flavor: Flavor = flavor
        self.path = path
        self.auth = auth
        self.set_keep_alive = set_keep_alive

    def __repr__(self) -> str:
        return f"<ForwardEndpoint {self.flavor} {self.path}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = get_service(scope["app"])
        owner = "anonymous"
        principal: Any = None
        if self.auth is not None:  # the key first: an anonymous body is never read
            principal = await self.auth(Request(scope, receive))
            owner = getattr(principal, "owner", None) or owner
        priority = _priority(scope)
        max_priority = getattr(principal, "max_priority", None)
        if max_priority is not None and priority > max_priority:  # as the REST API: refused
            message = f"priority {priority} is above this key's limit {max_priority}"
            await send_error(send, self.flavor, 403, message)
            return
        try:
            body = await read_body(
                receive,
                service.max_body_bytes,
                timeout_s=service.body_timeout_s,
                declared=header(scope, b"content-length"),
            )
        except ClientGone:
            return
        except BodyTimeout as exc:
            await send_error(send, self.flavor, 408, str(exc), {"Connection": "close"})
            return
        if body is None:
            await send_error(send, self.flavor, 413, "request body too large")
            return
        if not body.strip():
            await send_error(send, self.flavor, 400, "missing request body")
            return
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            await send_error(send, self.flavor, 400, f"invalid JSON body: {exc}")
            return
        model = model_of(payload) if isinstance(payload, dict) else ""
        if not model:
            await send_error(send, self.flavor, 400, "model is required")
            return
        call = Call(
            flavor=self.flavor,
            path=self.path,
            model=model,
            payload=payload,
            body=body,
            owner=owner,
            priority=priority,
            set_keep_alive=self.set_keep_alive,
            admin=bool(getattr(principal, "is_admin", True)),
        )
        key = getattr(principal, "key", None) if self.auth is not None else None
        team = getattr(principal, "team", None)
        if key is not None:
            call.key_id = key.id
            call.team = key.team or ""
        # The key's (and its team's) max_concurrent, exact across replicas: a place in a
        # Redis ZSET (Lua), held for the whole request; a replica that dies frees it after
        # the TTL.
        limiter = scope["app"].state.services.apikeys if key else None
        limit = getattr(key, "max_concurrent", None)
        team_limit = getattr(team, "max_concurrent", None)
        if limiter is None or not (limit or team_limit):
            await service.forward(call, scope, receive, send)
            return
        token = uuid.uuid4().hex
        ttl_s = max(600.0, service.config.max_wait_s + service.config.load_timeout_s)
        full = await limiter.take_place(key, team, token, ttl_s=ttl_s)
        if full:
            message = (
                f"this key already has {limit} requests in flight"
                if full == "key"
                else f"this key's team already has {team_limit} requests in flight"
            )
            await send_error(send, self.flavor, 429, message, {"Retry-After": "1"})
            return
        try:
            await service.forward(call, scope, receive, send)
        finally:
            await limiter.give_place(key, team, token)
