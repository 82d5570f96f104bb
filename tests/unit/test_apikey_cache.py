"""The per-replica cache of verified API keys: how long a revocation elsewhere takes."""

from __future__ import annotations

from typing import Any

from gpufleet.store.apikeys import ApiKeyStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_key_revoked_elsewhere_works_here_until_the_cache_ttl(fake_redis: Any) -> None:
    clock = Clock()
    here = ApiKeyStore(fake_redis, b"s", clock=clock, cache_ttl_s=5.0)
    elsewhere = ApiKeyStore(fake_redis, b"s", clock=clock, cache_ttl_s=5.0)
    key, plaintext = await elsewhere.create("alice")
    assert await here.verify(plaintext) == key
    assert await elsewhere.revoke(key.id)
    clock.now += 4.9
    assert await here.verify(plaintext) == key  # cached: within the stated bound
    clock.now += 0.2
    assert await here.verify(plaintext) is None
    assert await elsewhere.verify(plaintext) is None


async def test_revoking_or_rotating_through_this_store_takes_effect_at_once(
    fake_redis: Any,
) -> None:
    store = ApiKeyStore(fake_redis, b"s", clock=Clock(), cache_ttl_s=60.0)
    key, plaintext = await store.create("bob")
    assert await store.verify(plaintext) == key
    rotated = await store.rotate(key.id)
    assert rotated is not None
    assert await store.verify(plaintext) is None
    assert await store.verify(rotated[1]) is not None
    await store.revoke(key.id)
    assert await store.verify(rotated[1]) is None


async def test_unknown_keys_are_not_cached_so_a_new_key_works_at_once(fake_redis: Any) -> None:
    clock = Clock()
    here = ApiKeyStore(fake_redis, b"s", clock=clock, cache_ttl_s=60.0)
    elsewhere = ApiKeyStore(fake_redis, b"s", clock=clock, cache_ttl_s=60.0)
    assert await here.verify("gpf_not-yet") is None
    await elsewhere.create("carol", plaintext="gpf_not-yet")
    assert await here.verify("gpf_not-yet") is not None


async def test_ttl_zero_asks_redis_every_time(fake_redis: Any) -> None:
    store = ApiKeyStore(fake_redis, b"s", clock=Clock(), cache_ttl_s=0.0)
    other = ApiKeyStore(fake_redis, b"s", clock=Clock(), cache_ttl_s=0.0)
    key, plaintext = await other.create("dave")
    assert await store.verify(plaintext) == key
    await other.revoke(key.id)
    assert await store.verify(plaintext) is None


async def test_a_verified_key_is_not_hashed_again_until_it_is_forgotten(
    fake_redis: Any, monkeypatch: Any
) -> None:
    clock = Clock()
    store = ApiKeyStore(fake_redis, b"s", clock=clock, cache_ttl_s=5.0)
    key, plaintext = await store.create("erin")
    hashed: list[str] = []
    digest = store._digest

    def counting(value: str) -> str:
        hashed.append(value)
        return digest(value)

    monkeypatch.setattr(store, "_digest", counting)
    assert await store.verify(plaintext) == key
    clock.now += 10  # the key's record is read again; its digest is remembered
    assert await store.verify(plaintext) == key
    assert await store.verify("gpf_unknown") is None
    assert await store.verify("gpf_unknown") is None
    assert hashed == [plaintext, "gpf_unknown", "gpf_unknown"]  # unknown keys: every time
    await store.revoke(key.id)  # through this store: forgotten, digest included
    assert await store.verify(plaintext) is None
    assert hashed[-1] == plaintext
