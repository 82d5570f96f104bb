"""Metric updates the proxy queues (``metrics.DEFERRED``): every reader of the registry
sees them, summed right, whichever thread reads; a long queue is applied on its own."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, Counter, Histogram

from gpufleet.metrics import DEFERRED, DeferredUpdates

ANSWERS = Counter("test_deferred_answers_total", "test", ["model", "outcome"])
SECONDS = Histogram("test_deferred_seconds", "test", ["model"], buckets=(0.1, 1.0))


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_collection_sees_every_queued_update() -> None:
    before = value("test_deferred_answers_total", model="m", outcome="ok")
    count_before = value("test_deferred_seconds_count", model="m")
    low_before = value("test_deferred_seconds_bucket", model="m", le="0.1")
    DEFERRED.inc(ANSWERS, ("m", "ok"))
    DEFERRED.inc(ANSWERS, ("m", "ok"), 2.5)
    DEFERRED.inc(ANSWERS, ("m", "error"))
    DEFERRED.observe(SECONDS, ("m",), 0.05)
    DEFERRED.observe(SECONDS, ("m",), 0.5)
    assert DEFERRED.queued >= 5
    assert value("test_deferred_answers_total", model="m", outcome="ok") == before + 3.5
    assert DEFERRED.queued == 0  # the collection applied them
    assert value("test_deferred_seconds_count", model="m") == count_before + 2
    assert value("test_deferred_seconds_bucket", model="m", le="0.1") == low_before + 1


def test_a_long_queue_is_applied_without_a_collection() -> None:
    updates = DeferredUpdates()  # not registered: only its own cap applies it
    child = ANSWERS.labels("capped", "ok")
    start = child._value.get()
    for _ in range(updates.MAX_QUEUED + 1):
        updates.inc(ANSWERS, ("capped", "ok"))
    assert updates.queued == 0
    assert child._value.get() == start + updates.MAX_QUEUED + 1


def test_collections_on_other_threads_lose_nothing() -> None:
    before = value("test_deferred_answers_total", model="threads", outcome="ok")
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            REGISTRY.get_sample_value("test_deferred_answers_total",
                                      {"model": "threads", "outcome": "ok"})

    readers = [threading.Thread(target=scrape) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for _ in range(20_000):
            DEFERRED.inc(ANSWERS, ("threads", "ok"))
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert value("test_deferred_answers_total", model="threads", outcome="ok") == before + 20_000
