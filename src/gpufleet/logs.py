"""Logging configuration. Only the CLI calls ``configure_logging``; modules just log."""

from __future__ import annotations

import logging
import logging.config


def configure_logging(level: str = "info") -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "text": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"},
            },
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": "text"},
            },
            "loggers": {
                "gpufleet": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
                "uvicorn": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
                "uvicorn.access": {"level": "WARNING"},
            },
        }
    )
