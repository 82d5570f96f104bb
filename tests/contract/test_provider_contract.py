"""Every provider passes the same tests (STYLE.md habit 12); skips only by declared capability.

Parametrized over the real ``NovitaProvider`` against the simulated Novita app, the real
``SurfProvider`` against the simulated SURF app, and ``StaticProvider``. A ``Harness`` gives
each test what differs: how to get a live instance, how to let time pass, and what the
cloud itself holds (checked on the simulated cloud's own state, not the client's view).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from gpufleet import errors
from gpufleet.providers.base import (
    ACTIONS,
    Capability,
    InstanceState,
    Provider,
    RetryPolicy,
    Unsupported,
)
from gpufleet.providers.novita import NovitaProvider
from gpufleet.providers.simulated import (
    FakeClock,
    Fault,
    SimNovitaConfig,
    SimSurfConfig,
    create_novita_app,
    create_surf_app,
)
from gpufleet.providers.static import StaticProvider
from gpufleet.providers.surf import SurfProvider
from gpufleet.settings import NovitaSettings, PoolSpec, SurfSettings


@dataclass
class Harness:
    provider: Provider
    pool: PoolSpec
    clock: FakeClock
    # ids the cloud itself holds as live (None: no remote state, e.g. static)
    cloud_ids: Callable[[], set[str]]
    cloud_status: Callable[[str], str] = lambda _id: ""
    faults: list[Fault] | None = None
    wrong_credentials: Callable[[], Provider] | None = None
    closers: list[Provider] = field(default_factory=list)

    async def live_instance(self) -> str:
        """A running instance id: created (Novita), resumed (SURF), or configured (static)."""
        caps = self.provider.capabilities
        if Capability.create in caps:
            inst = await self.provider.create(self.pool, f"{self.pool.name}-contract")
            instance_id = inst.id
        else:
            instance_id = (await self.provider.list(self.pool))[0].id
            if Capability.resume in caps:
                await self.provider.resume(instance_id)
        await self.settle()
        return instance_id

    async def settle(self) -> None:
        self.clock.advance(3600)


NOVITA_POOL = PoolSpec(name="comfy", provider="novita", engine="comfyui", product_id="4090.sim",
                       image="ghcr.io/example/comfyui:latest")
SURF_POOL = PoolSpec(name="gpu", provider="surf", engine="ollama", name_filter="gpufleet-gpu")
STATIC_POOL = PoolSpec(name="home", provider="static", engine="ollama",
                       urls=["http://gpu-box.lan:11434", "http://gpu-box-2.lan:11434/"])


def _novita(clock: FakeClock) -> Harness:
    app = create_novita_app(SimNovitaConfig(), clock=clock)
    sim = app.state.sim

    def make(key: str) -> NovitaProvider:
        settings = NovitaSettings(api_key=key, base_url="http://novita.sim/gpu-instance/openapi/v1")
        return NovitaProvider(settings, pools=[NOVITA_POOL], transport=httpx.ASGITransport(app=app),
                              retry=RetryPolicy(sleep=clock.sleep))

    def cloud_ids() -> set[str]:
        sim.advance()
        return {i.id for i in sim.instances.values()
                if i.status not in ("toRemove", "removing", "removed")}

    return Harness(make("sim-novita-key"), NOVITA_POOL, clock, cloud_ids,
                   cloud_status=lambda i: sim.instances[i].status, faults=sim.faults,
                   wrong_credentials=lambda: make("wrong"))


def _surf(clock: FakeClock) -> Harness:
    app = create_surf_app(SimSurfConfig(workspaces=["gpufleet-gpu-01", "desktop"]), clock=clock)
    sim = app.state.sim

    def make(token: str) -> SurfProvider:
        settings = SurfSettings(api_token=token, base_url="http://surf.sim/v1/workspace")
        return SurfProvider(settings, pools=[SURF_POOL], transport=httpx.ASGITransport(app=app),
                            retry=RetryPolicy(sleep=clock.sleep), clock=clock, sleep=clock.sleep)

    def cloud_ids() -> set[str]:
        return {w.id for w in sim.workspaces.values()
                if not w.deleted and "gpufleet-gpu" in w.name}

    def status(ws_id: str) -> str:
        sim.advance()
        return str(sim.workspaces[ws_id].status)

    return Harness(make("sim-surf-token"), SURF_POOL, clock, cloud_ids, cloud_status=status,
                   faults=sim.faults, wrong_credentials=lambda: make("wrong"))


def _static(clock: FakeClock) -> Harness:
    provider = StaticProvider([STATIC_POOL])
    return Harness(provider, STATIC_POOL, clock, lambda: {"home-0", "home-1"})


MAKERS: dict[str, Callable[[FakeClock], Harness]] = {
    "novita": _novita,
    "surf": _surf,
    "static": _static,
}
# What each provider can do (and whether it has credentials / makes HTTP calls), read
# once from a throw-away harness so tests run only where they apply, never skipped.
TRAITS: dict[str, set[str]] = {}
for _name, _make in MAKERS.items():
    _probe = _make(FakeClock())
    TRAITS[_name] = {str(c) for c in _probe.provider.capabilities}
    if _probe.wrong_credentials is not None:
        TRAITS[_name].add("credentials")
    if _probe.faults is not None:
        TRAITS[_name].add("calls")


def needs(*traits: str) -> pytest.MarkDecorator:
    """Run the test only with the providers that have every one of ``traits``."""
    return pytest.mark.needs(*traits)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "h" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("needs")
    wanted = set(marker.args) if marker else set()
    names = [n for n in MAKERS if wanted <= TRAITS[n]]
    assert names, f"no provider has {wanted}"
    metafunc.parametrize("h", names, indirect=True)


@pytest.fixture
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    harness = MAKERS[request.param](FakeClock())
    yield harness
    await harness.provider.aclose()


async def test_list_shows_exactly_the_cloud_s_own_instances(h: Harness) -> None:
    if Capability.create in h.provider.capabilities:
        await h.provider.create(h.pool, f"{h.pool.name}-listed")
    listed = await h.provider.list(h.pool)
    assert {i.id for i in listed} == h.cloud_ids()
    assert all(i.provider == h.provider.name for i in listed)
    assert {i.id for i in await h.provider.list()} == h.cloud_ids()


async def test_get_matches_list(h: Harness) -> None:
    instance_id = await h.live_instance()
    got = await h.provider.get(instance_id)
    assert got.id == instance_id
    assert got.state is InstanceState.running
    assert got.base_url is not None
    assert got.base_url.startswith(("http://", "https://"))
    assert got.base_url == next(i for i in await h.provider.list(h.pool) if i.id == got.id).base_url


async def test_get_unknown_is_not_found(h: Harness) -> None:
    with pytest.raises(errors.NotFound):
        await h.provider.get("0000000000000000")


async def test_unsupported_operations_say_so(h: Harness) -> None:
    undeclared = (ACTIONS | {Capability.create, Capability.products}) - h.provider.capabilities
    for cap in undeclared:
        call = getattr(h.provider, str(cap))
        args = () if cap is Capability.products else (
            (h.pool, "x") if cap is Capability.create else ("some-id",))
        with pytest.raises(Unsupported):
            await call(*args)


@needs("create", "delete")
async def test_create_then_delete(h: Harness) -> None:
    inst = await h.provider.create(h.pool, f"{h.pool.name}-round-trip")
    assert inst.id in h.cloud_ids()
    assert inst.name.endswith("round-trip")
    again = await h.provider.create(h.pool, f"{h.pool.name}-round-trip")  # same name: same instance
    assert again.id == inst.id
    await h.provider.delete(inst.id)
    assert inst.id not in h.cloud_ids()
    assert inst.id not in {i.id for i in await h.provider.list()}
    await h.provider.delete(inst.id)  # repeat: still fine
    await h.provider.delete("0000000000000000")  # never existed: fine


@needs("stop", "start")
async def test_stop_then_start(h: Harness) -> None:
    instance_id = await h.live_instance()
    await h.provider.stop(instance_id)
    with pytest.raises(errors.InvalidState):
        await h.provider.start(instance_id)  # still stopping
    await h.settle()
    assert (await h.provider.get(instance_id)).state is InstanceState.stopped
    assert h.cloud_status(instance_id) == "exited"
    with pytest.raises(errors.InvalidState):
        await h.provider.stop(instance_id)
    await h.provider.start(instance_id)
    await h.settle()
    assert (await h.provider.get(instance_id)).state is InstanceState.running
    with pytest.raises(errors.InvalidState) as caught:
        await h.provider.start(instance_id)
    assert not caught.value.transient


@needs("pause", "resume")
async def test_pause_then_resume(h: Harness) -> None:
    instance_id = await h.live_instance()
    await h.provider.pause(instance_id)
    await h.settle()
    assert (await h.provider.get(instance_id)).state is InstanceState.paused
    assert h.cloud_status(instance_id) == "paused"
    with pytest.raises(errors.InvalidState):
        await h.provider.pause(instance_id)
    await h.provider.resume(instance_id)
    await h.settle()
    assert (await h.provider.get(instance_id)).state is InstanceState.running
    assert h.cloud_status(instance_id) == "running"


async def test_actions_on_unknown_instance_are_not_found(h: Harness) -> None:
    for cap in sorted(ACTIONS & h.provider.capabilities - {Capability.delete}):
        with pytest.raises(errors.NotFound):
            await getattr(h.provider, str(cap))("00000000-0000-4000-8000-000000000000")


@needs("credentials")
async def test_wrong_credentials_are_auth_failed(h: Harness) -> None:
    assert h.wrong_credentials is not None
    bad = h.wrong_credentials()
    with pytest.raises(errors.AuthFailed):
        await bad.list(h.pool)
    await bad.aclose()


@needs("calls")
async def test_a_passing_5xx_is_retried(h: Harness) -> None:
    assert h.faults is not None
    before = h.cloud_ids()
    h.faults.append(Fault(status=503, times=2))
    assert {i.id for i in await h.provider.list(h.pool)} == before
    assert len(h.clock.sleeps) == 2
