"""Counts every HTTP answer by route template and status class (``gpufleet_http_requests_total``).

A pure ASGI middleware, so streamed answers pass untouched. The label is the route's
template (``/api/v1/tasks/{task_id}``), never the concrete path: task ids, worker ids
and unknown paths would make the label set unbounded. Paths no route matched are
counted as ``unmatched``.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpufleet.metrics import HTTP_REQUESTS


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            HTTP_REQUESTS.labels(route_template(scope), f"{status['code'] // 100}xx").inc()


def route_template(scope: Scope) -> str:
    # FastAPI's routes put themselves in ``scope["route"]``; a plain Starlette route only
    # its endpoint (the proxy's ``ForwardEndpoint`` knows its path).
    route = scope.get("route") or scope.get("endpoint")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) and path else "unmatched"
