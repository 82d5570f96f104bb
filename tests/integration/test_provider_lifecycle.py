"""The real Novita and SURF clients against the simulated clouds: whole lifecycles.

Every outcome is checked on the simulated cloud's own state (``app.state.sim``), not only
through the client. Time moves by a ``FakeClock``; retry sleeps advance it too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gpufleet import errors
from gpufleet.providers.base import InstanceState, RetryPolicy
from gpufleet.providers.novita import NovitaProvider
from gpufleet.providers.simulated import (
    FakeClock,
    Fault,
    SimNovitaConfig,
    SimSurfConfig,
    create_novita_app,
    create_surf_app,
)
from gpufleet.providers.surf import SurfProvider
from gpufleet.settings import NovitaSettings, PoolSpec, SurfSettings
from tests.servers import serve

NOVITA_KEY = "sim-novita-key"
SURF_TOKEN = "sim-surf-token"
POOL = PoolSpec(name="comfy", provider="novita", engine="comfyui", product_id="4090.sim",
                image="ghcr.io/example/comfyui:latest")
A100_POOL = POOL.model_copy(update={"name": "big", "product_id": "a100.sim"})
SURF_POOL = PoolSpec(name="gpu", provider="surf", engine="ollama", name_filter="gpufleet-gpu")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def novita(app: httpx.ASGITransport | None, clock: FakeClock, *, timeout_s: float = 5.0,
           base_url: str = "http://novita.sim/gpu-instance/openapi/v1",
           page_size: int = 100) -> NovitaProvider:
    settings = NovitaSettings(api_key=NOVITA_KEY, base_url=base_url, timeout_s=timeout_s)
    return NovitaProvider(settings, pools=[POOL, A100_POOL], transport=app,
                          retry=RetryPolicy(sleep=clock.sleep), page_size=page_size)


@pytest.fixture
async def nov(clock: FakeClock) -> AsyncIterator[tuple[NovitaProvider, object]]:
    app = create_novita_app(SimNovitaConfig(create_s=2, pull_s=10, stop_s=2, start_s=4,
                                            remove_s=2, removed_ttl_s=10), clock=clock)
    provider = novita(httpx.ASGITransport(app=app), clock)
    yield provider, app.state.sim
    await provider.aclose()


async def test_novita_create_stop_start_delete(nov, clock: FakeClock) -> None:
    provider, sim = nov
    created = await provider.create(POOL, "comfy-0001")
    assert created.name == "gpufleet-comfy-0001"
    cloud = sim.instances[created.id]
    assert cloud.name == "gpufleet-comfy-0001"
    assert cloud.status == "toCreate"
    assert (await provider.get(created.id)).state is InstanceState.pending

    clock.advance(5)
    assert (await provider.get(created.id)).state is InstanceState.booting  # pulling
    clock.advance(10)
    running = await provider.get(created.id)
    assert running.state is InstanceState.running
    assert running.base_url == f"https://{created.id}-8188.sim-1.gpu-instance.novita.ai"
    assert cloud.transitions == ["toCreate", "creating", "pulling", "running"]

    await provider.stop(created.id)
    clock.advance(3)
    assert (await provider.get(created.id)).state is InstanceState.stopped
    assert cloud.transitions[-3:] == ["toStop", "stopping", "exited"]

    await provider.start(created.id)
    clock.advance(5)
    assert (await provider.get(created.id)).state is InstanceState.running
    assert cloud.transitions[-3:] == ["toStart", "starting", "running"]

    await provider.delete(created.id)
    assert [i.id for i in await provider.list()] == []
    clock.advance(3)
    await provider.delete(created.id)  # already removed: success
    assert cloud.status == "removed"
    clock.advance(20)
    with pytest.raises(errors.NotFound):
        await provider.get(created.id)
    assert created.id in sim.gone
    await provider.delete(created.id)  # gone altogether: still success


async def test_novita_bills_pulling_and_running_seconds_only(nov, clock: FakeClock) -> None:
    provider, sim = nov
    inst = await provider.create(POOL, "bill")
    clock.advance(2 + 10 + 100)  # create, pull, then 100 s running
    await provider.stop(inst.id)
    clock.advance(1000)  # stopped: not billed
    await provider.get(inst.id)
    cloud = sim.instances[inst.id]
    assert cloud.billed_s == pytest.approx(10 + 100)  # pulling + running
    assert sim.billed_usd == pytest.approx(0.67 * cloud.billed_s / 3600)


async def test_capacity_exhausted_then_freed(nov, clock: FakeClock) -> None:
    provider, sim = nov
    first = await provider.create(A100_POOL, "big-1")
    await provider.create(A100_POOL, "big-2")
    with pytest.raises(errors.InsufficientCapacity) as caught:
        await provider.create(A100_POOL, "big-3")
    assert caught.value.transient
    assert len(sim.instances) == 2
    products = {p.id: p for p in await provider.products()}
    assert products["a100.sim"].available is False
    assert products["a100.sim"].price_per_hour == pytest.approx(1.60)
    await provider.delete(first.id)
    third = await provider.create(A100_POOL, "big-3")
    assert sim.instances[third.id].name == "gpufleet-big-3"


async def test_start_beyond_capacity_is_insufficient(nov, clock: FakeClock) -> None:
    provider, sim = nov
    a = await provider.create(A100_POOL, "big-a")
    clock.advance(20)
    await provider.stop(a.id)
    clock.advance(5)
    await provider.create(A100_POOL, "big-b")
    await provider.create(A100_POOL, "big-c")
    with pytest.raises(errors.InsufficientCapacity):
        await provider.start(a.id)
    assert sim.instances[a.id].status == "exited"


async def test_boot_that_hangs_in_pulling(clock: FakeClock) -> None:
    app = create_novita_app(SimNovitaConfig(hang_in_pulling=1), clock=clock)
    provider = novita(httpx.ASGITransport(app=app), clock)
    stuck = await provider.create(POOL, "stuck")
    fine = await provider.create(POOL, "fine")
    clock.advance(3600)
    assert (await provider.get(stuck.id)).state is InstanceState.booting
    assert (await provider.get(fine.id)).state is InstanceState.running
    assert app.state.sim.instances[stuck.id].status == "pulling"
    await provider.aclose()


async def test_429_storm_honours_retry_after(nov, clock: FakeClock) -> None:
    provider, sim = nov
    sim.faults.append(Fault(status=429, path="/gpu/instances", times=3, retry_after_s=7))
    assert await provider.list() == []
    assert clock.sleeps == [7, 7, 7]
    assert sim.count("GET", "/gpu/instances") == 4


async def test_429_storm_longer_than_retries_raises_rate_limited(nov, clock: FakeClock) -> None:
    provider, sim = nov
    sim.faults.append(Fault(status=429, times=10, retry_after_s=2))
    with pytest.raises(errors.RateLimited) as caught:
        await provider.list()
    assert caught.value.retry_after == 2
    assert sim.count("GET", "/gpu/instances") == RetryPolicy().attempts


async def test_5xx_is_retried_with_backoff(nov, clock: FakeClock) -> None:
    provider, sim = nov
    inst = await provider.create(POOL, "x")
    sim.faults.append(Fault(status=502, path="/gpu/instance", method="GET", times=2))
    assert (await provider.get(inst.id)).id == inst.id
    assert len(clock.sleeps) == 2
    assert all(s > 0 for s in clock.sleeps)


async def test_create_timeout_retried_makes_one_instance(clock: FakeClock) -> None:
    app = create_novita_app(SimNovitaConfig(), clock=clock)
    sim = app.state.sim
    provider = novita(httpx.ASGITransport(app=app), clock, timeout_s=0.05)
    # The cloud accepts the create, but its answer never arrives in time.
    sim.faults.append(Fault(status=0, path="/gpu/instance/create", hang_s=5))
    inst = await provider.create(POOL, "comfy-7")
    assert [i.name for i in sim.instances.values()] == ["gpufleet-comfy-7"]
    assert inst.id in sim.instances
    assert sim.count("POST", "/gpu/instance/create") == 1
    # The next tick creating the same deterministic name again finds it too.
    again = await provider.create(POOL, "gpufleet-comfy-7")
    assert again.id == inst.id
    assert len(sim.instances) == 1
    await provider.aclose()


@pytest.mark.parametrize("page_base", [0, 1])
async def test_list_pages_0_or_1_based_without_duplicates(clock: FakeClock, page_base) -> None:
    app = create_novita_app(SimNovitaConfig(page_base=page_base, max_page_size=2), clock=clock)
    provider = novita(httpx.ASGITransport(app=app), clock, page_size=2)
    made = {(await provider.create(POOL, f"p{i}")).id for i in range(5)}
    listed = [i.id for i in await provider.list()]
    assert sorted(listed) == sorted(made)
    assert len(app.state.sim.instances) == 5
    await provider.aclose()


async def test_list_filters_by_prefix_and_pool(nov, clock: FakeClock) -> None:
    provider, sim = nov
    mine = await provider.create(POOL, "comfy-1")
    big = await provider.create(A100_POOL, "big-1")
    # Someone else's instance on the same account, without gpufleet's prefix.
    await provider.api._http.post("/gpu/instance/create", json={
        "name": "someone-else", "productId": "4090.sim", "gpuNum": 1, "rootfsSize": 50,
        "imageUrl": "x", "kind": "gpu"})
    assert len(sim.instances) == 3
    assert {i.id for i in await provider.list()} == {mine.id, big.id}
    assert [i.id for i in await provider.list(POOL)] == [mine.id]
    assert [i.id for i in await provider.list(A100_POOL)] == [big.id]


async def test_engine_url_hook_over_a_real_socket(clock: FakeClock) -> None:
    changes: list[tuple[str, str]] = []
    app = create_novita_app(
        SimNovitaConfig(create_s=0, pull_s=0), clock=clock,
        engine_url=lambda inst, port: f"http://127.0.0.1:9/w/{inst.id}",
        on_change=lambda inst, old, new: changes.append((old, new)),
    )
    async with serve(app, name="sim-novita") as url:
        provider = novita(None, clock, base_url=f"{url}/gpu-instance/openapi/v1")
        inst = await provider.create(POOL, "sock")
        got = await provider.get(inst.id)
        await provider.aclose()
    assert got.state is InstanceState.running
    assert got.base_url == f"http://127.0.0.1:9/w/{inst.id}"
    assert changes == [("toCreate", "creating"), ("creating", "pulling"), ("pulling", "running")]


# -- SURF ------------------------------------------------------------------------------------


def surf(app: object, clock: FakeClock, **settings: object) -> SurfProvider:
    return SurfProvider(
        SurfSettings(api_token=SURF_TOKEN, base_url="http://surf.sim/v1/workspace", **settings),
        pools=[SURF_POOL], transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        retry=RetryPolicy(sleep=clock.sleep, attempts=1), clock=clock, sleep=clock.sleep,
    )


async def test_surf_resume_then_pause(clock: FakeClock) -> None:
    app = create_surf_app(SimSurfConfig(resume_s=30, pause_s=10,
                                         workspaces=["gpufleet-gpu-01", "lab-desktop"]),
                          clock=clock)
    sim = app.state.sim
    provider = surf(app, clock)
    listed = await provider.list()
    assert [i.name for i in listed] == ["gpufleet-gpu-01"]
    ws_id = listed[0].id
    assert listed[0].state is InstanceState.paused
    assert listed[0].base_url is None

    answer = await provider.resume(ws_id)
    assert answer is not None
    assert answer.provider_status == "resuming"
    clock.advance(31)
    running = await provider.get(ws_id)
    assert running.state is InstanceState.running
    assert running.base_url == f"http://{sim.workspaces[ws_id].ip}:11434"
    with pytest.raises(errors.InvalidState):
        await provider.resume(ws_id)

    clock.advance(100)
    await provider.pause(ws_id)
    clock.advance(11)
    assert (await provider.get(ws_id)).state is InstanceState.paused
    assert sim.workspaces[ws_id].transitions == ["resuming", "running", "pausing", "paused"]
    assert [a["status"] for a in sim.workspaces[ws_id].actions] == ["success", "success"]
    assert sim.billed_usd == pytest.approx(1.20 * 101 / 3600)
    await provider.aclose()


async def test_surf_failed_resume_is_reported(clock: FakeClock) -> None:
    app = create_surf_app(SimSurfConfig(fail_resumes=1, resume_error="no A10 free"), clock=clock)
    sim = app.state.sim
    provider = surf(app, clock)
    ws_id = (await provider.list())[0].id
    await provider.resume(ws_id)
    clock.advance(10)
    after = await provider.get(ws_id)
    assert after.state is InstanceState.paused
    assert after.last_error == "resume failed: no A10 free"
    assert sim.workspaces[ws_id].status == "paused"
    assert sim.workspaces[ws_id].actions[-1]["status"] == "failed"
    # A later resume that works clears the report.
    await provider.resume(ws_id)
    clock.advance(10)
    assert (await provider.get(ws_id)).last_error == ""
    await provider.aclose()


async def test_surf_resume_fails_without_gpu_capacity(clock: FakeClock) -> None:
    app = create_surf_app(SimSurfConfig(gpu_capacity=1), clock=clock)
    provider = surf(app, clock)
    a, b = (i.id for i in await provider.list())
    await provider.resume(a)
    await provider.resume(b)
    clock.advance(10)
    assert (await provider.get(a)).state is InstanceState.running
    assert "resume failed" in (await provider.get(b)).last_error
    await provider.aclose()


async def test_surf_limiter_stays_under_the_server_limit(clock: FakeClock) -> None:
    # The server answers 429 past 5/min and the client does not retry: any excess would raise.
    app = create_surf_app(SimSurfConfig(requests_per_minute=5), clock=clock)
    sim = app.state.sim
    provider = surf(app, clock, requests_per_minute=5)
    for _ in range(12):
        await provider.list()
    times = [r.at for r in sim.log]
    assert len(times) == 12
    assert max(sum(1 for t in times if start <= t < start + 60) for start in times) <= 5
    assert clock.sleeps  # it had to wait
    await provider.aclose()
