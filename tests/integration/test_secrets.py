"""No secret in /metrics, error bodies or start-up errors of the whole app."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import redis.asyncio as aioredis

from gpufleet.app import create_app
from gpufleet.errors import StoreError
from gpufleet.settings import load_settings

NOVITA = "sk-novita-very-secret"
HMAC = "hmac-very-secret"
METRICS = "metrics-very-secret"


async def test_metrics_and_error_bodies_carry_no_secret(
    redis_url: str, redis: aioredis.Redis
) -> None:
    settings = load_settings(
        env_file=None,
        redis={"url": redis_url},
        auth={"secret": HMAC, "metrics_token": METRICS},
        providers={"novita": {"api_key": NOVITA, "base_url": "http://127.0.0.1:9/openapi/v1"}},
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        _, key = await app.state.services.apikeys.create("a", role="admin")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            auth = {"Authorization": f"Bearer {key}"}
            answers = [
                await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"}),
                await client.get("/metrics"),
                await client.get("/api/v1/workers"),
                await client.get("/api/v1/tasks/nope", headers=auth),
                await client.post("/api/v1/tasks", headers=auth, json={"payload": {}}),
                await client.post("/api/v1/keys", headers=auth, json={"name": ""}),
                await client.get("/api/v1/providers/novita/products", headers=auth),
                await client.post("/api/chat", headers=auth, json={"model": "nope"}),
                await client.get("/openapi.json"),
            ]
    assert answers[0].status_code == 200
    for answer in answers:
        text = answer.text + str(answer.headers)
        for secret in (NOVITA, HMAC, METRICS, key):
            assert secret not in text, (answer.request.url, answer.status_code)


async def test_unreachable_redis_error_hides_the_password() -> None:
    app = create_app(
        load_settings(env_file=None, redis={"url": "redis://u:pw-very-secret@127.0.0.1:9/0"})
    )
    with pytest.raises(StoreError) as caught:
        async with app.router.lifespan_context(app):
            pass
    assert "pw-very-secret" not in str(caught.value)
    assert "127.0.0.1:9" in str(caught.value)


async def test_redis_url_is_logged_without_its_password(assert_logs: Callable[..., None]) -> None:
    """The "using Redis at" line goes through ``settings.redact_url``, like ``config show``."""
    app = create_app(
        load_settings(env_file=None, redis={"url": "redis://u:pw-very-secret@127.0.0.1:9/0"})
    )
    with pytest.raises(StoreError):
        async with app.router.lifespan_context(app):
            pass
    assert_logs(
        [r"using Redis at redis://u:\*{10}@127\.0\.0\.1:9/0"], prohibited=["pw-very-secret"]
    )
