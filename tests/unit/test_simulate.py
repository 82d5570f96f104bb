"""The trace simulator on small synthetic traces, and on the real trace files.

The real traces are found like the simulator finds them (``$GPUFLEET_TRACES_DIR``, else
``../shared/traces`` beside the repository); a missing file fails its test with a message
saying where it was looked for, never a silent skip.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gpufleet.domain import Engine, ProviderKind
from gpufleet.scaling import sim
from gpufleet.scaling.snapshot import PoolView

POOL = PoolView(
    "p",
    ProviderKind.novita,
    Engine.comfyui,
    max_workers=6,
    price_per_hour=0.5,
    parked_cost_per_hour=0.005,
)
CONFIG = sim.SimConfig(POOL, load_latency_s=(5.0, 20.0))
JOBS = sim.bursty(seed=3, duration_s=86400.0, bursts_per_day=8, burst_size=(1, 20))


def all_policies() -> list[sim.SimPolicy]:
    return sim.policies(POOL)


@pytest.mark.parametrize("index", range(len(all_policies())))
def test_every_arrival_finishes_exactly_once(index):
    result = sim.simulate(JOBS, CONFIG, all_policies()[index])
    assert result.finished == len(JOBS)
    assert len(result.waits_s) == len(JOBS)
    assert min(result.waits_s) >= 0.0
    assert result.succeeded == sum(j.succeeded for j in JOBS)


def test_clairvoyant_is_never_costlier_than_any_policy():
    bound = sim.clairvoyant(JOBS, CONFIG)
    for policy in all_policies():
        result = sim.simulate(JOBS, CONFIG, policy)
        assert bound.cost_usd <= result.cost_usd, policy.name
    assert bound.cost_usd >= sum(j.service_s for j in JOBS) / 3600 * POOL.price_per_hour


def test_jobs_are_billed_boot_plus_work_plus_idle_until_the_last_one_ends():
    pool = replace(POOL, idle_timeout_s=600.0, park_timeout_s=0.0)
    config = sim.SimConfig(pool, create_boot_s=(100.0, 100.0), revive_boot_s=(50.0, 50.0))
    jobs = [sim.Job(0.0, 100.0), sim.Job(500.0, 100.0)]
    result = sim.simulate(jobs, config, sim.Gpufleet())
    # boots 0-100 s, works 100-200 s, idles 200-500 s (< 600 s), works 500-600 s; the idle
    # tail after the last job is where the trace ends, not what serving it cost
    assert result.gpu_hours == pytest.approx(600 / 3600)
    assert result.idle_gpu_hours == pytest.approx(300 / 3600)
    assert result.cost_usd == pytest.approx(600 / 3600 * pool.price_per_hour)
    assert result.waits_s == [100.0, 0.0]
    assert result.boots == 1


def test_replay_is_deterministic_for_a_seed():
    first = sim.simulate(JOBS, CONFIG, sim.Gpufleet())
    again = sim.simulate(JOBS, CONFIG, sim.Gpufleet())
    assert (first.cost_usd, first.waits_s) == (again.cost_usd, again.waits_s)


def test_bursty_generator_is_seeded_and_sorted():
    assert sim.bursty(seed=1) == sim.bursty(seed=1)
    assert sim.bursty(seed=1) != sim.bursty(seed=2)
    arrivals = [j.arrival_s for j in sim.bursty(seed=1)]
    assert arrivals == sorted(arrivals)


def test_traces_dir_prefers_argument_then_env(monkeypatch, tmp_path):
    given = tmp_path / "given"
    given.mkdir()
    monkeypatch.setenv("GPUFLEET_TRACES_DIR", str(tmp_path))
    assert sim.traces_dir() == tmp_path
    assert sim.traces_dir(given) == given
    monkeypatch.delenv("GPUFLEET_TRACES_DIR")
    assert sim.DEFAULT_TRACE_DIR.parts[-2:] == ("shared", "traces")


def test_a_missing_traces_dir_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUFLEET_TRACES_DIR", str(tmp_path / "nope"))
    with pytest.raises(sim.TracesNotFound, match="GPUFLEET_TRACES_DIR"):
        sim.traces_dir()
    with pytest.raises(sim.TracesNotFound, match="--traces"):
        sim.traces_dir(tmp_path / "also-nope")
    # a report asking for a trace whose directory is missing stops with exit 2
    assert sim.main(["--only", "gentd26", "--no-chart"]) == 2


def trace(name: str) -> Path:
    """A shared trace file, which must exist: the tests below are about these very files."""
    path = sim.traces_dir() / name
    assert path.is_file(), (
        f"trace file {path} is missing: put the shared traces there, or point "
        f"GPUFLEET_TRACES_DIR at the directory that holds {name}"
    )
    return path


def test_reads_gentd26_as_it_is():
    jobs = sim.read_gentd26(trace(sim.GENTD26), limit=200)
    assert len(jobs) == 200
    assert jobs[0].arrival_s == 0.0
    assert all(j.service_s >= 1.0 and j.model.startswith("M") for j in jobs)


def test_reads_load_latency_in_seconds():
    loads = sim.read_load_latency_s(trace(sim.LOAD_LATENCY))
    assert len(loads) > 7000
    assert 10.0 < sorted(loads)[len(loads) // 2] < 40.0  # README: median 22.7 s


def test_reads_azure_hour():
    jobs = sim.read_azure(trace(sim.AZURE))
    assert len(jobs) > 19_000
    assert 3000.0 < jobs[-1].arrival_s <= 3600.0
