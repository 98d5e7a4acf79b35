"""A task's events: read back from the TASKS stream, and streamed live as Server-Sent Events.

`read_task_events` reads the task's stored events (`bus.read_stored`) keeping what the
gateway needs besides the event: its ``Nats-Msg-Id`` (to tell a stored event from the
same one seen live) and the server's timestamp (when the outcome was stored, for result
expiry).

Reads cost nothing but the read. A task's status (``GET /v1/tasks/<id>``, the Horde's
status routes, images, cancels) and an events stream's stored phase are read by batched
JetStream Direct Get (TASKS has ``allow_direct``; `bus.read_direct`): one request,
answered with the task's messages and an end-of-batch status, and no consumer. They used
to be read by an ephemeral consumer per call, created and deleted on the stream's leader:
an unauthenticated caller could make the cluster's metadata layer churn with every GET of
a made-up id. We chose Direct Get over an in-memory fold fed by one consumer per gateway
because it keeps the gateway stateless: every replica of the gateway (and every replica
of the stream, all of which answer direct gets) reads the same thing, there is no cache to
size, warm or evict, no fallback for tasks not cached, and an unknown id is one 404 answer
from the server. The cost is one round trip per read, which a fold would save; the reads
are already bounded (per-IP and per-key rate limits, `StreamSlots`). A stream declared
before ``allow_direct`` is updated at the next start (`bus.ensure_streams`); until then
`bus.read_stored` falls back to the short-lived consumer.

Open streams are bounded (`StreamSlots`): a cap per gateway (``STIPPLE_MAX_SSE_STREAMS``)
and per caller, an API key or, with keys off, a client IP (``STIPPLE_MAX_SSE_PER_CLIENT``):
past either, 429 with Retry-After. A stream lasts at most ``STIPPLE_SSE_MAX_S``; the
client reconnects with ``Last-Event-ID`` and gets what it has not seen. A slot is released
when the stream is closed, however it ended (`TaskEventStream.close`).

The stream (``GET /v1/tasks/{id}/events``) has no gap and no duplicate: it subscribes
with core NATS to ``tasks.<id>.>`` and ``progress.<id>`` first, then reads what is stored
and sends it, then sends what arrives live, skipping message ids already sent. An
outcome seen live is confirmed against the stream (the first outcome stored wins; a late
one shares its message id and is dropped by JetStream), then the stream ends.

`TaskEventStream` knows NATS only; the HTTP answer that carries its frames is
`app.EventStreamResponse`, a plain Starlette `StreamingResponse` rather than
sse-starlette: our events are one-line JSON, keep-alives are a timeout on the queue,
Starlette already stops the generator when the client disconnects, and shutdown follows
the gateway's own `closing` event; sse-starlette would add a process-wide `AppStatus` and
a monkey-patch of uvicorn's ``Server.handle_exit`` for the same.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from stipple_common import bus, subjects
from stipple_common.errors import Rejected
from stipple_common.messages import (
    OUTCOME_EVENTS,
    TaskAssigned,
    TaskEvent,
    TaskReassigned,
    decode_progress,
    decode_task_event,
    event_name,
)

from .errors import ApiError
from .metrics import GatewayMetrics
from .views import event_data

log = structlog.get_logger("stipple.gateway")

KEEPALIVE = b": keep-alive\n\n"
MAX_DURATION = b": max duration reached; reconnect with Last-Event-ID\n\n"
MAX_QUEUED_PROGRESS = 1000  # progress is lossy anyway; task events are never dropped
# A core subscriber can get an outcome a moment before the stream has stored it (the server
# hands a publish to both at once): readers woken by one read again, this often, this long.
OUTCOME_CONFIRM_TRIES, OUTCOME_CONFIRM_PAUSE_S = 20, 0.05


@dataclass(frozen=True)
class StoredEvent:
    msg_id: str
    event: TaskEvent
    stored_at: float  # the server's timestamp, epoch seconds


def _msg_id(headers: dict[str, str] | None, data: bytes, fallback: str = "") -> str:
    msg_id = (headers or {}).get("Nats-Msg-Id")
    return msg_id or fallback or "sha256:" + hashlib.sha256(data).hexdigest()


async def read_task_events(js: JetStreamContext, task_id: str) -> list[StoredEvent]:
    """Every stored event of the task, in stream order (by Direct Get: no consumer). An
    event this gateway cannot decode (a newer service's) is left out and logged, not an
    error."""
    out: list[StoredEvent] = []
    for m in await bus.read_stored(js, subjects.TASKS_STREAM, subjects.task_events(task_id)):
        try:
            event = decode_task_event(m.subject, m.data)
        except Rejected as exc:
            log.warning("task_event_rejected", reason=exc.reason, sender=exc.sender, error=exc.message)
            continue
        out.append(StoredEvent(_msg_id(m.headers, m.data, f"seq:{m.seq}"), event, m.time))
    return out


_reading: dict[tuple[int, str], asyncio.Future[list[StoredEvent]]] = {}


async def read_task_events_shared(js: JetStreamContext, task_id: str) -> list[StoredEvent]:
    """`read_task_events`, one read for every caller that asks while it is in flight. An
    outcome reaches all of a task's watchers at the same moment, and each confirms it from
    the stream: with 72 watchers that was 72 reads of one task at once (bench/gateway_load.py).
    A read that starts after a caller asked is as fresh as its own would be (each caller
    re-reads while the outcome is not stored yet); a caller that goes away does not cancel
    the read the others wait for."""
    key = (id(js), task_id)
    pending = _reading.get(key)
    if pending is None:
        pending = asyncio.ensure_future(read_task_events(js, task_id))
        _reading[key] = pending

        def forget(done: asyncio.Future[list[StoredEvent]]) -> None:
            if _reading.get(key) is done:
                del _reading[key]
            if not done.cancelled():
                done.exception()  # retrieved: a failure is each caller's to handle, not the loop's to log

        pending.add_done_callback(forget)
    return await asyncio.shield(pending)


class StreamSlots:
    """How many events streams are open, on this gateway and per caller (an API key id or
    a client IP), refusing past `max_total` or `max_per_client` (0: no cap) with 429.
    `acquire` before opening, `release` exactly once after (`TaskEventStream.close`)."""

    RETRY_AFTER_S = 10

    def __init__(self, max_total: int, max_per_client: int, gateway_metrics: GatewayMetrics | None = None) -> None:
        self.max_total, self.max_per_client = max_total, max_per_client
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.metrics = gateway_metrics

    def _refuse(self, limit: str, setting: str, cap: int, message: str) -> ApiError:
        if self.metrics is not None:
            self.metrics.refused.labels(limit).inc()
        return ApiError(
            429,
            "too_many_streams",
            f"{message} ({setting}={cap}); close one, or retry in {self.RETRY_AFTER_S} s",
            field="events",
            value=cap,
            headers={"Retry-After": str(self.RETRY_AFTER_S)},
            extra={"limit": {"name": setting, "max": cap}},
        )

    def acquire(self, client: str) -> None:
        if self.max_total and self.total >= self.max_total:
            raise self._refuse(
                "sse_streams",
                "STIPPLE_MAX_SSE_STREAMS",
                self.max_total,
                "this gateway has its most events streams open",
            )
        held = self.per_client.get(client, 0)
        if self.max_per_client and held >= self.max_per_client:
            raise self._refuse(
                "sse_per_client",
                "STIPPLE_MAX_SSE_PER_CLIENT",
                self.max_per_client,
                f"{client} has {held} events streams open, the most one caller may",
            )
        self.total += 1
        self.per_client[client] = held + 1
        if self.metrics is not None:
            self.metrics.sse_streams.inc()

    def release(self, client: str) -> None:
        self.total -= 1
        held = self.per_client.pop(client, 1) - 1
        if held > 0:
            self.per_client[client] = held
        if self.metrics is not None:
            self.metrics.sse_streams.dec()


def frame(event: str, data: Any, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: ".encode() + msgspec.json.encode(data) + b"\n\n"


class TaskEventStream:
    """One client's stream of one task: `open` (subscribe, then read), then `frames`."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        task_id: str,
        *,
        keepalive_s: float,
        closing: asyncio.Event,
        max_s: float = 0.0,
        slots: StreamSlots | None = None,
        client: str = "",
    ):
        self.nc, self.js, self.task_id = nc, js, task_id
        self.keepalive_s = keepalive_s
        self.closing = closing
        self.max_s = max_s  # the stream ends after this long (0: with the task); the client resumes
        self.slots, self.client = slots, client  # the slot it holds, given back by close()
        self.opened_at = 0.0
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.subs: list[Any] = []
        self.seen: set[str] = set()
        self.nodes: set[str] = set()  # the task's nodes: the only ones whose progress is shown

    async def _on_message(self, msg: Any) -> None:
        if msg.subject.startswith("progress.") and self.queue.qsize() >= MAX_QUEUED_PROGRESS:
            return
        self.queue.put_nowait(msg)

    async def open(self) -> list[StoredEvent]:
        """Subscribe to the live subjects, then read the stored events (in this order, so
        that nothing published in between is missed). ApiError 429 when `slots` is full
        (nothing was opened then)."""
        if self.slots is not None:
            self.slots.acquire(self.client)  # held from here: close() gives it back
        self.opened_at = asyncio.get_running_loop().time()
        try:
            self.subs.append(await self.nc.subscribe(subjects.task_events(self.task_id), cb=self._on_message))
            self.subs.append(await self.nc.subscribe(subjects.progress_subject(self.task_id), cb=self._on_message))
            return await read_task_events(self.js, self.task_id)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Unsubscribe and give the slot back; a second call does nothing."""
        slots, self.slots = self.slots, None
        if slots is not None and self.opened_at:
            slots.release(self.client)
        subs, self.subs = self.subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is closing; the server drops the interest with it
                log.debug("events_unsubscribe_failed", error=str(exc))

    def _send(self, stored: StoredEvent) -> bytes:
        self.seen.add(stored.msg_id)
        if isinstance(stored.event, TaskAssigned):
            self.nodes.update(stored.event.nodes)
        elif isinstance(stored.event, TaskReassigned):
            self.nodes.add(stored.event.by)
        return frame(event_name(stored.event), event_data(stored.event), stored.msg_id)

    async def frames(self, stored: list[StoredEvent], last_event_id: str | None = None) -> AsyncIterator[bytes]:
        """The stored events (after `last_event_id`, if it is one of them), then the live ones,
        until an outcome, or until `max_s` after opening (then a comment says so, and the
        client reconnects with the last id it got); a comment every `keepalive_s` while
        nothing else is sent."""
        ids = [s.msg_id for s in stored]
        if last_event_id and last_event_id in ids:
            self.seen.update(ids[: ids.index(last_event_id) + 1])
        for s in stored:
            if s.msg_id not in self.seen:
                yield self._send(s)
            if event_name(s.event) in OUTCOME_EVENTS:
                return
        closing = asyncio.ensure_future(self.closing.wait())
        getter: asyncio.Future[Any] | None = None
        loop = asyncio.get_running_loop()
        ends_at = self.opened_at + self.max_s if self.max_s > 0 else None
        try:
            while True:
                timeout = self.keepalive_s
                if ends_at is not None:
                    left = ends_at - loop.time()
                    if left <= 0:
                        yield MAX_DURATION
                        return
                    timeout = min(timeout, left)
                getter = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter, closing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()  # an item it was woken for stays in the queue
                    if closing in done:
                        return
                    if ends_at is None or loop.time() < ends_at:
                        yield KEEPALIVE
                    continue
                msg = getter.result()
                if msg.subject.startswith("progress."):
                    try:
                        progress = decode_progress(msg.subject, msg.data)
                    except Rejected:
                        continue
                    if progress.node_id in self.nodes:  # any node may claim progress in any task
                        yield frame("progress", progress)
                    continue
                msg_id = _msg_id(msg.headers, msg.data)
                if msg_id in self.seen:
                    continue
                try:
                    event = decode_task_event(msg.subject, msg.data)
                except Rejected as exc:
                    log.warning("task_event_rejected", reason=exc.reason, sender=exc.sender, error=exc.message)
                    continue
                if event_name(event) not in OUTCOME_EVENTS:
                    yield self._send(StoredEvent(msg_id, event, 0.0))
                    continue
                async for chunk in self._confirm_outcome(StoredEvent(msg_id, event, 0.0)):
                    yield chunk
                return
        finally:
            closing.cancel()
            if getter is not None:
                getter.cancel()

    async def _confirm_outcome(self, live: StoredEvent) -> AsyncIterator[bytes]:
        """Send the outcome the stream stored (and anything stored not sent yet)."""
        for _ in range(OUTCOME_CONFIRM_TRIES):
            try:
                stored = await read_task_events_shared(self.js, self.task_id)
            except (nats.errors.Error, TimeoutError) as exc:  # the bus is down: the live event is all there is
                log.warning("outcome_not_confirmed", task_id=self.task_id, error=repr(exc))
                break
            for s in stored:
                if s.msg_id not in self.seen:
                    yield self._send(s)
                if event_name(s.event) in OUTCOME_EVENTS:
                    return
            await asyncio.sleep(OUTCOME_CONFIRM_PAUSE_S)
        else:
            log.warning("outcome_not_stored_yet", task_id=self.task_id, event_type=event_name(live.event))
        yield self._send(live)
