"""Ollama's ``keep_alive``: how gpufleet reads the client's value and what it sends.

gpufleet sets ``keep_alive`` on every Ollama inference call (``/api/chat`` …) to at least
the pool's idle timeout plus a margin, so Ollama keeps the model loaded while gpufleet
counts the worker warm, and at most ``[proxy] keep_alive_max_s``. The client's body bytes
are kept as they are when possible (the field is spliced in after the opening brace); only
a body that already names another ``keep_alive`` is re-encoded.

Consumer: ``gpufleet.proxy.relay.ProxyService`` (the body it sends upstream).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Any

from gpufleet.proxy.config import ProxySettings
from gpufleet.settings import PoolSpec

_GO_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive in seconds: a number, or a Go duration ("5m", "1h30m"); None if
    unreadable. Negative means "forever"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):  # a 400-digit integer is "very long", not an error
        if abs(value) < 10**300:
            return float(value)
        return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        text = value.strip()
        with contextlib.suppress(ValueError):
            return float(text)
        parts = _GO_DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text.replace("+", ""):
            return sum(float(n) * _UNIT_S[u] for n, u in parts)
    return None


def clamp_keep_alive(value: Any, pool: PoolSpec, settings: ProxySettings) -> int:
    """The keep_alive gpufleet sends: at least the pool's idle timeout plus a margin (so
    Ollama keeps the model while gpufleet counts the worker warm), at most the cap."""
    floor = pool.idle_timeout_ceiling_s + settings.keep_alive_margin_s
    if value is None:  # the client named none (most requests)
        return int(min(floor, settings.keep_alive_max_s))
    seconds = parse_keep_alive(value)
    if seconds is not None and math.isnan(seconds):  # "nan", NaN: unreadable
        seconds = None
    if seconds is None or seconds < 0:
        seconds = settings.keep_alive_max_s if seconds is not None else floor
    return int(min(max(seconds, floor), settings.keep_alive_max_s))


def _splicable(body: bytes) -> bool:
    """UTF-8 JSON without a BOM (json.loads also reads UTF-16/32, where inserting ASCII
    bytes would corrupt the text)."""
    return b"\x00" not in body[:4] and not body.startswith(b"\xef\xbb\xbf")




def upstream_body(body: bytes, payload: dict[str, Any], pool: PoolSpec,
                  settings: ProxySettings) -> bytes:
    """``body`` with the ``keep_alive`` gpufleet sends for ``pool``."""
    keep_alive = clamp_keep_alive(payload.get("keep_alive"), pool, settings)
    if "keep_alive" not in payload and _splicable(body):
        # The client's bytes stay as they are: the field goes in after the opening
        # brace (the body parsed as an object with a model, so a comma follows).
        start = body.index(b"{") + 1
        return b'%s"keep_alive":%d,%s' % (body[:start], keep_alive, body[start:])
    current = payload.get("keep_alive")
    if type(current) is int and current == keep_alive and _splicable(body):
        return body
    payload = dict(payload)
    payload["keep_alive"] = keep_alive
    return json.dumps(payload, separators=(",", ":")).encode()
