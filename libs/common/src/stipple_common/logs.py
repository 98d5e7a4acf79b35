"""structlog set-up: a console renderer on a terminal, JSON lines otherwise.

Bind task_id, node_id, subject and trace_id at the consumer boundary
(`structlog.contextvars.bind_contextvars`); every line about a message then carries them.
"""

from __future__ import annotations

import logging
import sys

import structlog


def setup_logging(service: str, *, level: str = "info", fmt: str = "auto") -> structlog.stdlib.BoundLogger:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if not console else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger(service=service).bind(service=service)
