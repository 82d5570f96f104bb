"""Issue 10, fault test 3: the clouds misbehave, the fleet still converges and leaks nothing.

The real reconciler, health checker and dispatcher (``tests/chaos/inproc.py``) drive the
simulated Novita and SURF clouds through the real clients while each cloud fails about one
request in five at random (429 with ``Retry-After``, 500, a hang past the client's timeout,
or work done with the answer lost), one Novita boot never leaves ``pulling`` and one SURF
resume fails. A burst of ComfyUI and Ollama tasks still all succeeds; once demand ends and
the idle and park timeouts pass, the clouds' own state shows no gpufleet instance running
beyond ``min_workers`` (Novita: every instance deleted; SURF: ``min_workers`` running, the
rest paused). Time is a ``FakeClock``; nothing asserts a duration.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gpufleet.providers.simulated import Chaos
from tests.chaos.inproc import LLM_POOL, CloudFleet

pytestmark = pytest.mark.timeout(120)

# Novita statuses that hold a GPU or bill for it (or will): anything but on the way out.
GONE = frozenset({"toRemove", "removing", "removed"})


@pytest.fixture
async def fleet(redis: aioredis.Redis) -> AsyncIterator[CloudFleet]:
    f = CloudFleet(redis)
    try:
        yield f
    finally:
        await f.aclose()


async def scale_events(fleet: CloudFleet) -> list[dict[str, str]]:
    return [e for e in await fleet.events.recent(limit=5000) if e.get("kind") == "scale"]


def live_novita(fleet: CloudFleet) -> list[str]:
    return [f"{i.name}:{i.status}" for i in fleet.novita.instances.values()
            if i.status not in GONE]


def running_surf(fleet: CloudFleet) -> list[str]:
    return [w.name for w in fleet.surf.workspaces.values() if w.status != "paused"]


@pytest.mark.parametrize("seed", [11, 37, 53])
async def test_burst_converges_and_nothing_runs_after_idle_under_cloud_faults(
    fleet: CloudFleet, seed: int
) -> None:
    fleet.novita.chaos = Chaos(rate=0.2, seed=seed)
    fleet.surf.chaos = Chaos(rate=0.2, seed=seed + 1)
    fleet.novita.config.hang_in_pulling = 1  # the first create never leaves "pulling"
    fleet.surf.config.fail_resumes = 1  # the first resume comes back paused

    comfy = await fleet.submit_comfy(16)
    chat = await fleet.submit_chat(8)
    steps = await fleet.run_until(lambda: fleet.all_done(comfy + chat))

    statuses = await fleet.statuses(comfy + chat)
    assert Counter(statuses.values()) == {"succeeded": 24}
    for task_id in comfy:  # a real render: the prompt is in a live worker's history
        task = await fleet.queue.get(task_id)
        prompt_id = task.result["prompt_id"]
        assert any(prompt_id in sim.history and sim.history[prompt_id]["status"]["completed"]
                   for sim in fleet.comfy_workers.values())
    for task_id in chat:
        task = await fleet.queue.get(task_id)
        assert task.result["message"]["content"].startswith("answer from gpufleet-gpu-")

    # Demand is over: past idle (60 s) and park (300 s) timeouts, still under faults.
    for _ in range(60):
        await fleet.step(15.0)
    # The stuck boot: failed after boot_timeout_s (120 s) and deleted at the cloud.
    stuck = [i for i in fleet.novita_made.values()
             if "pulling" in i.transitions and "running" not in i.transitions]
    assert len(stuck) == 1
    assert stuck[0].status == "removed"
    events = await scale_events(fleet)
    assert any(e["action"] == "markfailed" and e["outcome"] == "ok" for e in events)

    assert live_novita(fleet) == []
    assert len(running_surf(fleet)) == LLM_POOL["min_workers"]
    # The cloud saw every kind of failure, and answered for itself through it.
    for chaos in (fleet.novita.chaos, fleet.surf.chaos):
        assert set(chaos.counts) == {"429", "500", "hang", "lost"}, chaos.counts
    print(f"\ncloud faults: {steps} ticks to finish 24 tasks; novita injected "
          f"{dict(fleet.novita.chaos.counts)}, surf {dict(fleet.surf.chaos.counts)}; "
          f"{len(fleet.novita_made)} novita instances made, all deleted")
