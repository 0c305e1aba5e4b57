"""Structured logs (structlog): JSON lines in production, readable on a terminal.

No PHI: log calls name UIDs, AE titles and hosts, never patient name, ID or birth date.
"""

from __future__ import annotations

import logging
import sys

import structlog

from config.settings import LoggingSettings


def configure_logging(settings: LoggingSettings) -> None:
    level = getattr(logging, settings.level)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if settings.json_format else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # kombu warns on every filesystem-transport connection (the embedded broker has no hostname by design).
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
