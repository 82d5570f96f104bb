"""Each provider error body maps to one class of the error tree (provider-apis.md §1.2, §2.9)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gpufleet import errors
from gpufleet.providers.base import RetryPolicy
from gpufleet.providers.novita import NovitaProvider
from gpufleet.providers.simulated import FakeClock
from gpufleet.providers.surf import SurfProvider
from gpufleet.settings import NovitaSettings, SurfSettings


def _novita(handler: Any, clock: FakeClock | None = None, attempts: int = 1) -> NovitaProvider:
    retry = RetryPolicy(attempts=attempts, sleep=(clock or FakeClock()).sleep)
    return NovitaProvider(NovitaSettings(api_key="k"), transport=httpx.MockTransport(handler),
                          retry=retry)


def _kratos(status: int, reason: str, message: str = "m") -> httpx.Response:
    body = {"code": status, "reason": reason, "message": message, "metadata": {}}
    return httpx.Response(status, json=body)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (_kratos(400, "RESOURCE_NOT_FOUND", "instance not found"), errors.NotFound),
        (httpx.Response(404, text="404 page not found"), errors.NotFound),
        (_kratos(400, "CONFLICT", "invalid state change"), errors.InvalidState),
        (_kratos(400, "REQUEST", "invalid state change"), errors.InvalidState),
        (_kratos(400, "INSUFFICIENT_RESOURCE"), errors.InsufficientCapacity),
        (_kratos(400, "MIGRATE_INSUFFICIENT_RESOURCE"), errors.InsufficientCapacity),
        (_kratos(400, "BALANCE_NOT_ENOUGH"), errors.QuotaOrBalance),
        (_kratos(400, "EXPIRED_OR_BALANCE_NOT_ENOUGH"), errors.QuotaOrBalance),
        (_kratos(400, "CREATE_INSTANCE_LIMIT"), errors.QuotaOrBalance),
        (_kratos(401, "UNAUTHORIZED"), errors.AuthFailed),
        (_kratos(403, "INVALID_API_KEY"), errors.AuthFailed),
        (httpx.Response(403, text="forbidden"), errors.AuthFailed),
        (_kratos(429, "RATE_LIMIT_EXCEEDED"), errors.RateLimited),
        (_kratos(500, "UNKNOWN"), errors.ProviderUnavailable),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), errors.ProviderUnavailable),
        (httpx.Response(200, text="<html>maintenance</html>"), errors.ProviderBadResponse),
        (_kratos(400, "VALIDATOR_PARAM", "gpuNum must be 1-8"), errors.ProviderError),
    ],
)
async def test_novita_error_bodies(response: httpx.Response, expected: type) -> None:
    provider = _novita(lambda request: response)
    with pytest.raises(expected) as caught:
        await provider.get("9f2c41d07ab35e18")
    assert type(caught.value) is expected
    assert caught.value.provider == "novita"
    assert caught.value.status == response.status_code
    await provider.aclose()


async def test_novita_message_is_kept_and_long_bodies_truncated() -> None:
    provider = _novita(lambda r: _kratos(400, "VALIDATOR_PARAM", "imageUrl too long"))
    with pytest.raises(errors.ProviderError, match="imageUrl too long.*VALIDATOR_PARAM"):
        await provider.get("x")
    await provider.aclose()
    provider = _novita(lambda r: httpx.Response(500, text="x" * 5000))
    with pytest.raises(errors.ProviderUnavailable) as caught:
        await provider.get("x")
    assert len(str(caught.value)) < 400
    await provider.aclose()


async def test_connection_error_is_unavailable_and_chained() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    clock = FakeClock()
    provider = _novita(refuse, clock, attempts=3)
    with pytest.raises(errors.ProviderUnavailable) as caught:
        await provider.list()
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert caught.value.transient
    assert len(clock.sleeps) == 2  # three attempts, bounded
    await provider.aclose()


async def test_retry_after_is_read_and_capped() -> None:
    calls: list[int] = []

    def limited(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(429, headers={"Retry-After": "120"},
                              json={"code": 429, "reason": "RATE_LIMIT_EXCEEDED"})

    clock = FakeClock()
    provider = _novita(limited, clock, attempts=4)
    with pytest.raises(errors.RateLimited) as caught:
        await provider.list()
    assert caught.value.retry_after == 120
    # Longer than max_retry_after_s: not waited for here, the next tick tries again.
    assert calls == [1]
    assert clock.sleeps == []
    await provider.aclose()


async def test_terminal_errors_are_not_retried() -> None:
    calls: list[int] = []

    def no_money(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return _kratos(400, "BALANCE_NOT_ENOUGH")

    provider = _novita(no_money, attempts=4)
    with pytest.raises(errors.QuotaOrBalance):
        await provider.delete("x")
    assert calls == [1]
    await provider.aclose()


async def test_delete_of_a_gone_instance_is_success() -> None:
    provider = _novita(lambda r: _kratos(400, "RESOURCE_NOT_FOUND", "instance not found"))
    await provider.delete("9f2c41d07ab35e18")
    await provider.aclose()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"code": 404, "status": "Not Found", "message": "Not found."}, errors.NotFound),
        (400, {"code": 400, "status": "Bad Request",
               "message": ["Action pause is not allowed in status paused"]}, errors.InvalidState),
        (400, {"code": 400, "status": "Bad Request", "message": ["bad rule"]},
         errors.ProviderError),
        (401, {"detail": "Invalid token."}, errors.AuthFailed),
        (403, {"detail": "Token expired."}, errors.AuthFailed),
        (429, {"detail": "Request was throttled."}, errors.RateLimited),
        (503, None, errors.ProviderUnavailable),
    ],
)
async def test_surf_error_bodies(status: int, body: Any, expected: type) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status, text="upstream connect error")
        return httpx.Response(status, json=body)

    provider = SurfProvider(SurfSettings(api_token="t"), transport=httpx.MockTransport(answer),
                            retry=RetryPolicy(attempts=1))
    with pytest.raises(expected) as caught:
        await provider.pause("451226aa-5ca5-460a-a6d1-5718fcc10e3c")
    assert type(caught.value) is expected
    if isinstance(body, dict) and isinstance(body.get("message"), list):
        assert body["message"][0] in str(caught.value)
    await provider.aclose()
