"""Logging configuration. Only the CLI calls ``configure_logging``; modules just log.

Two formats (``[log] format``): readable text, or one JSON object per line for log
collectors. Ids that say what a line is about are passed as ``extra`` fields —
``logger.info("...", extra={"task_id": t, "worker_id": w, "pool": p})`` — and become
top-level JSON keys (and a ``[pool=... worker_id=...]`` suffix in text).

Secrets never reach a log line: settings hold them as ``SecretStr`` (printed as
``**********``), URLs are logged through ``settings.redact_url``, and ``SecretFilter`` masks
anything shaped like a gpufleet API key or a bearer token as a last line of defence.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
from datetime import UTC, datetime
from typing import Any, Literal

# Fields a record may carry (via ``extra``) that both formats show.
CONTEXT_FIELDS = ("pool", "worker_id", "task_id", "instance_id", "action", "reason")
_SECRET = re.compile(r"(gpf_[A-Za-z0-9_\-]{8})[A-Za-z0-9_\-]+|(Bearer\s+)\S+", re.I)


def _mask(text: str) -> str:
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


class SecretFilter(logging.Filter):
    """Masks API keys (``gpf_…``) and bearer tokens in the rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = _mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_FIELDS if getattr(record, k, None) is not None}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if context:
            line += " [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            entry["exception"] = _mask(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"secrets": {"()": SecretFilter}},
            "formatters": {
                "text": {"()": TextFormatter},
                "json": {"()": JsonFormatter},
            },
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": fmt,
                    "filters": ["secrets"],
                },
            },
            "loggers": {
                "gpufleet": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
                "uvicorn": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
                "uvicorn.access": {"level": "WARNING"},
            },
        }
    )
