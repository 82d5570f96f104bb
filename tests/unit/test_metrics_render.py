"""``/metrics`` renders exactly what ``prometheus_client.generate_latest`` would, faster.

The fast renderer (``api.health.render_metrics``) caches label blocks and skips name escaping;
these tests pin it to the library's own text format, escapes and number formats included,
on a private registry (so nothing else changes the values between the two renderings).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from gpufleet.api.health import render_metrics


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    c = Counter("t_things_total", "Things, with a \\ and a\nnewline in the help.", ["pool"],
                registry=reg)
    c.labels("a").inc(3)
    c.labels('we"ird\\pool\nname').inc(0.5)
    g = Gauge("t_level", "Levels.", ["pool", "state"], registry=reg)
    for value in (0.0, -2.0, 7.0, 999_999.0, 1_234_567.0, 1e21, 0.1 + 0.2, float("inf"),
                  float("nan"), -1e7):
        g.labels(repr(value), "x").set(value)
    Gauge("t_plain", "No labels.", registry=reg).set(42)
    h = Histogram("t_wait_seconds", "Waits.", ["kind"], buckets=(0.1, 1, 10), registry=reg)
    for v in (0.05, 0.5, 5, 50):
        h.labels("comfyui").observe(v)
    Info("t_build", "Build.", registry=reg).info({"version": "1.2.3"})
    return reg


def test_same_text_as_generate_latest() -> None:
    reg = registry()
    assert render_metrics(reg) == generate_latest(reg)
    assert render_metrics(reg) == generate_latest(reg)  # from the label cache too


def test_the_app_registry_renders_like_generate_latest() -> None:
    from prometheus_client import REGISTRY

    import gpufleet.metrics as m

    m.WORKERS.labels("render-test", "ready").set(3)
    ours = [line for line in render_metrics(REGISTRY).decode().splitlines()
            if line.startswith("gpufleet_")]
    theirs = [line for line in generate_latest(REGISTRY).decode().splitlines()
              if line.startswith("gpufleet_")]
    assert ours == theirs
    assert 'gpufleet_workers{pool="render-test",state="ready"} 3.0' in ours
    assert not any("_created" in line for line in ours)  # disabled: a third fewer series
    m.WORKERS.remove("render-test", "ready")
