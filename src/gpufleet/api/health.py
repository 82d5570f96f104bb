"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from gpufleet import __version__
from gpufleet.api.deps import get_services
from gpufleet.api.errors import error_body
from gpufleet.errors import Unauthenticated

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/ready", summary="Redis answers and background loops run", response_model=None)
async def ready(request: Request) -> dict[str, Any] | JSONResponse:
    services = get_services(request)
    try:
        await asyncio.wait_for(services.redis.ping(), timeout=2.0)
    except Exception as exc:  # any failure to answer means not ready
        return JSONResponse(
            error_body("not_ready", f"redis not answering: {type(exc).__name__}"),
            status_code=503,
        )
    dead = [t.get_name() for t in services.loops if t.done()]
    if dead:
        return JSONResponse(
            error_body("not_ready", f"background loops stopped: {', '.join(dead)}"),
            status_code=503,
        )
    return {"status": "ready", "redis": "ok", "loops": [t.get_name() for t in services.loops]}


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    token = get_services(request).settings.auth.metrics_token
    if token is not None:
        expected = f"Bearer {token.get_secret_value()}".encode()
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise Unauthenticated("/metrics needs the configured bearer token")
    return Response(render_metrics(REGISTRY), media_type=CONTENT_TYPE_LATEST)


# Prometheus text format 0.0.4, as ``prometheus_client.generate_latest`` writes it, faster:
# every gpufleet name and label name is a valid legacy name (no escaping needed), and the
# rendered label block of a label set is cached (label sets change rarely; the cache is reset
# when it grows past what bounded labels produce). A test checks the output against
# ``generate_latest``.
_TYPES = {"counter": "counter", "info": "gauge", "stateset": "gauge",
          "gaugehistogram": "histogram", "unknown": "untyped"}
_SUFFIX = {"counter": "_total", "info": "_info"}
_LABELS: dict[tuple[tuple[str, str], ...], str] = {}
_LABELS_MAX = 50_000


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    key = tuple(sorted(labels.items()))
    text = _LABELS.get(key)
    if text is None:
        if len(_LABELS) >= _LABELS_MAX:
            _LABELS.clear()
        text = _LABELS[key] = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in key) + "}"
    return text


def _value(value: float) -> str:
    if value.is_integer() and -1e6 < value < 1e6:
        return f"{value:.1f}"  # what floatToGoString gives for these, without its branches
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


def _line(sample: Sample) -> str:
    labels = _labels(sample.labels) if sample.labels else ""
    stamp = f" {int(float(sample.timestamp) * 1000):d}" if sample.timestamp is not None else ""
    return f"{sample.name}{labels} {_value(float(sample.value))}{stamp}\n"


def render_metrics(registry: Collector) -> bytes:
    out: list[str] = []
    for metric in registry.collect():
        name = metric.name + _SUFFIX.get(metric.type, "")
        kind = _TYPES.get(metric.type, metric.type)
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        extra: dict[str, list[str]] = {}
        for sample in metric.samples:
            suffix = sample.name[len(metric.name):] if sample.name.startswith(metric.name) else ""
            if suffix in ("_created", "_gsum", "_gcount"):
                extra.setdefault(suffix, []).append(_line(sample))
            else:
                out.append(_line(sample))
        for suffix, lines in sorted(extra.items()):
            out.append(f"# HELP {metric.name}{suffix} {doc}\n")
            out.append(f"# TYPE {metric.name}{suffix} gauge\n")
            out.extend(lines)
    return "".join(out).encode()
