"""Kept so that ``from gpufleet.proxy.streaming import …`` goes on working: the proxy's
relay now lives in ``relay`` (``ProxyService``), the forwarded routes' endpoint in
``endpoint`` (``ForwardEndpoint``) and Ollama's keep_alive handling in ``keep_alive``.
"""

from __future__ import annotations

from gpufleet.proxy.endpoint import (
    Authenticator,
    BodyTimeout,
    ClientGone,
    ForwardEndpoint,
    header,
    model_of,
    read_body,
)
from gpufleet.proxy.keep_alive import clamp_keep_alive, parse_keep_alive, upstream_body
from gpufleet.proxy.relay import (
    Call,
    Flavor,
    ProxyService,
    UsageMeter,
    error_bytes,
    error_payload,
    get_service,
    make_http_client,
    send_error,
)

__all__ = [
    "Authenticator",
    "BodyTimeout",
    "Call",
    "ClientGone",
    "Flavor",
    "ForwardEndpoint",
    "ProxyService",
    "UsageMeter",
    "clamp_keep_alive",
    "error_bytes",
    "error_payload",
    "get_service",
    "header",
    "make_http_client",
    "model_of",
    "parse_keep_alive",
    "read_body",
    "send_error",
    "upstream_body",
]
