"""structlog set-up: a console renderer on a terminal, JSON lines otherwise.

Context variables make every line about a task carry task_id, node_id and trace_id:
the consumer loop (`bus.consume`) binds subject, delivered and trace_id for each
message, and task_id / node_id from the subject (``tasks.<id>.<event>[.<node>]``,
``work.<node>.*``); handlers add theirs with `tracing.bind_task`; the gateway binds
trace_id per request and task_id when it submits; work done outside a handler (the
dispatcher's queue pump and timers) binds its task's in `tracing.task_span`.
docs/observability.md lists the fields.

No line carries a password: `redact` masks the password of every ``scheme://user:password@``
URL in a line's values (STIPPLE_NATS_URL holds the service's NATS password).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):[^@\s]+@")


def redact(text: str) -> str:
    """`text` with the password of each ``scheme://user:password@host`` URL in it masked:
    ``nats://gateway:***@nats:4222``."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value) if "://" in value else value
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    return value


def redact_event(_logger: object, _method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """structlog processor: no URL password reaches a log line (values, and the rendered exception)."""
    return {k: _redact_value(v) for k, v in event.items()}


def setup_logging(service: str, *, level: str = "info", fmt: str = "auto") -> structlog.typing.FilteringBoundLogger:
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
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # wrapper_class above: the logger is a filtering bound logger (get_logger itself is typed Any)
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(service=service).bind(service=service)
    return logger
