"""structlog set-up: a console renderer on a terminal, JSON lines otherwise.

Context variables make every line about a task carry task_id, node_id and trace_id:
the consumer loop (`bus.consume`) binds subject, delivered and trace_id for each
message, and task_id / node_id from the subject (``tasks.<id>.<event>[.<node>]``,
``work.<node>.*``); handlers add theirs with `tracing.bind_task`; the gateway binds
trace_id per request and task_id when it submits; work done outside a handler (the
dispatcher's queue pump and timers) binds its task's in `tracing.task_span`.
docs/observability.md lists the fields.
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

    def add_service(_logger: object, _method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        event.setdefault("service", service)  # on every line, whichever module's logger wrote it
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_service,
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
