"""structlog set-up: JSON lines by default, LOG_FORMAT=console for people."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog


def configure_logging(level: str = "INFO", fmt: str = "json", **always: str) -> None:
    """`always`: fields on every line, from every thread (the worker's consumer and group)."""
    renderer = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()

    def add_always(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        return {**always, **event}

    structlog.configure(
        processors=[
            add_always,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # psycopg_pool logs each failed reconnect; the service logs the outage itself, once per retry.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
