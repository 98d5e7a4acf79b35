"""The event loop a service process runs on: uvloop (libuv) by default, or asyncio's own
(``STIPPLE_EVENT_LOOP=asyncio``).

Every service is I/O on many small NATS messages, and in their profiles a quarter of the
busy time was the event loop itself (the selector, socket writes, callbacks). uvloop does
that work in C; bench/RESULTS.md ("uvloop against asyncio's loop") measures what it saves per task.
Tests run the services in process on pytest's asyncio loop, and as processes (through
this) on uvloop, so both loops stay covered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: Literal["uvloop", "asyncio"] = "uvloop") -> T:
    """Run `main` to its end on a new event loop of the kind `loop` names."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
