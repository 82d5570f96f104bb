"""Log formats: JSON lines with context ids, readable text, secrets masked in both."""

from __future__ import annotations

import json
import logging

import pytest

from gpufleet.logs import JsonFormatter, SecretFilter, TextFormatter


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("gpufleet.test", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_carry_context_ids_as_fields() -> None:
    rec = record("scale up %s", "comfy", pool="comfy", worker_id="w1", task_id="t9", other=1)
    entry = json.loads(JsonFormatter().format(rec))
    assert entry["message"] == "scale up comfy"
    assert entry["level"] == "info"
    assert entry["logger"] == "gpufleet.test"
    assert (entry["pool"], entry["worker_id"], entry["task_id"]) == ("comfy", "w1", "t9")
    assert "other" not in entry
    assert entry["time"].endswith("+00:00")


def test_json_includes_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record("failed")
        rec.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(rec))
    assert "ValueError: boom" in entry["exception"]


def test_text_appends_context() -> None:
    line = TextFormatter().format(record("drained", pool="llm", worker_id="w2"))
    assert line.endswith("gpufleet.test: drained [pool=llm worker_id=w2]")


@pytest.mark.parametrize(
    "message",
    [
        "key gpf_abcdefgh0123456789SECRETSECRET used",
        "header Authorization: Bearer sk-live-SECRETSECRET",
    ],
)
def test_secret_filter_masks_keys_and_bearer_tokens(message: str) -> None:
    rec = record(message)
    assert SecretFilter().filter(rec)
    assert "SECRETSECRET" not in rec.getMessage()
    assert "***" in rec.getMessage()
