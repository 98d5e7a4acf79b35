"""NATS and JetStream helpers: connect, declare streams, publish with a message id,
read a subject's history (by Direct Get, or a short-lived consumer), and the
pull-consumer loop that maps every handler outcome to ack / nak / term in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import itertools
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args
from urllib.parse import urlsplit

import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StreamConfig
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServerError, ServiceUnavailableError
from nats.js.kv import KeyValue
from opentelemetry import trace

from . import ids, subjects, tracing
from .errors import JS_STREAM_CONFIG_MISMATCH, Rejected, StippleError
from .logs import redact
from .messages import Assignment, ControlMessage, NodeEvent, TaskEvent, event_name
from .metrics import Metrics
from .pullfeed import SERVICE_HEARTBEAT_S, ConsumerGone, LeaderAway, PullFeed
from .settings import InvalidSettings

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs is 3.13+

log = structlog.get_logger("stipple.bus")
_bus_tracer = trace.get_tracer("stipple.bus")  # (a proxy until the provider is set: see tracing._tracer)

UNAVAILABLE_PAUSE_S = 0.5  # a consumer's wait while JetStream elects a leader
# A consumer deleted under consume is made again at once; the server may answer 500 (10012,
# "error creating store") while it still removes the old one: asked again after a pause.
REMAKE_ATTEMPTS = 5
REMAKE_PAUSE_S = 0.2

BUS_AWAY: tuple[type[Exception], ...] = (
    ServiceUnavailableError,  # 503 from the JetStream API: no leader (an election) or no quorum
    NoStreamResponseError,  # a publish no stream answered (its leader is being elected)
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,  # a request the cluster did not answer in time (reconnecting, electing)
)
"""What a NATS call raises while the bus is away for a while (a server lost, a leader
being elected, a connection being re-established), as opposed to an answer."""
BUS_AWAY_OR_SLOW: tuple[type[Exception], ...] = (*BUS_AWAY, TimeoutError)  # a probe's own wait_for too

BUS_PATIENCE_S = 60.0
"""How long a message handler waits in place for the bus to come back (`consume`, and
`publish` inside a handler): longer than the elections seen on a loaded three-server
cluster (over 10 s on two cores), shorter than the duplicate window (2 min), so a publish
retried after a lost acknowledgement is still deduplicated."""


class BusWeather:
    """When this process found the bus away: the intervals between the first call that
    failed with a `BUS_AWAY` error (or a probe that found a stream without a leader) and
    the next that succeeded. The validator reads it to give nodes the time the bus took
    from them (a deadline is not the nodes' to miss while nothing could be stored)."""

    def __init__(self, keep: int = 256) -> None:
        self.since: float | None = None  # away now, since then (time.time())
        self.spells: deque[tuple[float, float]] = deque(maxlen=keep)

    def away(self, now: float | None = None) -> None:
        if self.since is None:
            self.since = time.time() if now is None else now
            log.warning("bus_away")

    def fair(self, now: float | None = None) -> None:
        if self.since is not None:
            end = time.time() if now is None else now
            self.spells.append((self.since, end))
            log.info("bus_back", away_s=round(end - self.since, 3))
            self.since = None

    @property
    def is_away(self) -> bool:
        return self.since is not None

    def away_seconds(self, start: float, end: float | None = None) -> float:
        """Seconds of [start, end] (end: now) during which the bus was away."""
        end = time.time() if end is None else end
        spells = [*self.spells, *([(self.since, end)] if self.since is not None else [])]
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spells)


weather = BusWeather()
"""This process's (one bus connection per process)."""

_patience: contextvars.ContextVar[float] = contextvars.ContextVar("bus_patience", default=0.0)
"""Until when (time.monotonic()) a call may wait in place for the bus: set by `consume`
for the time of one message's handler; 0 elsewhere, so a request path (the gateway's)
fails fast with 503 and the app retries."""
_handled: contextvars.ContextVar[Msg | None] = contextvars.ContextVar("bus_handled", default=None)


async def _touch_handled() -> None:
    """Tell JetStream the message being handled is still being worked on (best effort)."""
    msg = _handled.get()
    if msg is not None and msg.reply:
        with contextlib.suppress(Exception):
            await msg.in_progress()


async def watch_bus(
    js: JetStreamContext, streams: list[str], stop: asyncio.Event, *, every_s: float = 1.0, timeout_s: float = 1.0
) -> None:
    """Probe `streams` every `every_s` until `stop`, into `weather`: the bus is away while a
    stream does not answer or has no leader (an election), fair when every one answers with
    a leader. What a process's own calls find says only when it made calls; this says it
    between them too, for the streams whose absence costs nodes their deadlines."""
    while not stop.is_set():
        away = False
        for name in streams:
            try:
                info = await asyncio.wait_for(js.stream_info(name), timeout_s)
            except NotFoundError:
                continue  # not made yet: not an outage
            except BUS_AWAY_OR_SLOW:
                away = True
                break
            if info.cluster is not None and not info.cluster.leader:
                away = True
                break
        if away:
            weather.away()
        else:
            weather.fair()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def patiently(call: Callable[[], Awaitable[T]], *, whole_handler: bool = False) -> T:
    """`call()`, again and again while it fails with a `BUS_AWAY` error and the patience
    this context has left lasts (none outside a handler: the error is raised at once).
    Each try keeps the handled message alive; the pause (0.25 s doubling to 1 s) stays well
    within the shortest ack wait, 10 s. A publish that succeeds shows the bus is back
    (`weather.fair`); a whole handler that succeeds shows nothing (it may not have used it)."""
    attempt = 0
    while True:
        try:
            result = await call()
        except BUS_AWAY as exc:
            weather.away()
            attempt += 1
            left = _patience.get() - time.monotonic()
            if left <= 0:
                raise
            if whole_handler:
                log.warning("handler_waits_for_bus", error=type(exc).__name__, attempt=attempt)
            await _touch_handled()
            await asyncio.sleep(min(backoff(attempt, base=0.25, cap=1.0), left))
            continue
        if not whole_handler:
            weather.fair()
        return result


T = TypeVar("T")


def tls_context(url: str, ca_file: str = "") -> ssl.SSLContext | None:
    """The TLS context for NATS at `url` (one URL or several, comma-separated): one that
    verifies the servers against `ca_file` (PEM), or against the system's CAs when it is
    empty. None for plain ``nats://`` URLs and no CA file: nats-py still upgrades to TLS
    with a default context if a server requires it."""
    schemes = {urlsplit(u.strip()).scheme for u in url.split(",") if u.strip()}
    if not ca_file and "tls" not in schemes:
        return None
    if ca_file and not Path(ca_file).is_file():
        raise InvalidSettings(f"STIPPLE_NATS_CA_FILE={ca_file!r}: no such file")
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except ssl.SSLError as exc:
        raise InvalidSettings(f"STIPPLE_NATS_CA_FILE={ca_file!r}: not a PEM CA bundle ({exc})") from None


class NatsTlsError(StippleError):
    """The NATS server's certificate does not verify: retrying cannot help, so the first
    connection gives up (a wrong or missing STIPPLE_NATS_CA_FILE, a wrong host name)."""

    code = "nats_tls"


async def connect(url: str, name: str, *, ca_file: str = "", **options: Any) -> NATS:
    """Connect with reconnects on, and connection errors logged instead of swallowed;
    over TLS for ``tls://`` URLs or when `ca_file` is given (`tls_context`). A server
    certificate that does not verify ends the first connection with NatsTlsError instead
    of retrying forever; any other failure (a server not up yet) is retried."""
    tls = tls_context(url, ca_file)
    if tls is not None:
        options.setdefault("tls", tls)
    untrusted: asyncio.Future[ssl.SSLCertVerificationError] = asyncio.get_running_loop().create_future()

    async def error_cb(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc), client=name)
        if isinstance(exc, ssl.SSLCertVerificationError) and not untrusted.done():
            untrusted.set_result(exc)

    async def disconnected_cb() -> None:
        log.warning("nats_disconnected", client=name)

    async def reconnected_cb() -> None:
        log.info("nats_reconnected", client=name)

    # several servers, comma-separated (a cluster's seeds; the client also learns the
    # cluster's other servers from each server it reaches)
    servers: str | list[str] = [part.strip() for part in url.split(",")] if "," in url else url
    connecting = asyncio.ensure_future(
        nats.connect(
            servers,
            name=name,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            max_reconnect_attempts=-1,
            connect_timeout=5,
            **options,
        )
    )
    try:
        racing: set[asyncio.Future[Any]] = {connecting, untrusted}
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        connecting.cancel()
        raise
    if connecting.done():
        untrusted.cancel()
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await connecting
    exc = untrusted.result()
    trusted = f"STIPPLE_NATS_CA_FILE={ca_file!r}" if ca_file else "the system's CAs (STIPPLE_NATS_CA_FILE is not set)"
    raise NatsTlsError(
        f"NATS at {redact(url)}: the server's certificate does not verify against {trusted}: "
        f"{exc.verify_message or exc}. Set STIPPLE_NATS_CA_FILE to the CA that signed it, and dial a host name "
        "the certificate names."
    )


SETTLING: tuple[type[Exception], ...] = (NotFoundError, *BUS_AWAY_OR_SLOW)
"""What a declaration meets on a cluster while another process makes the same stream:
its create is answered 10058 (in use) and the stream's info 404 until the meta layer has
placed it, or a request times out on a loaded cluster."""

DECLARE_PATIENCE_S = 30.0


async def settling(step: Callable[[], Awaitable[T]], *, what: str, patience_s: float = DECLARE_PATIENCE_S) -> T:
    """`step()` (a whole declaration: made, or found and bound) again while it fails with a
    `SETTLING` error, for up to `patience_s`: two replicas that start together on a
    three-server cluster declare the same streams and buckets at once, and the loser of
    the create must not end its service (as it did: a `stream not found` after the
    create's 10058). A step that cannot settle raises its last error."""
    deadline = time.monotonic() + patience_s
    attempt = 0
    while True:
        try:
            return await step()
        except SETTLING as exc:
            if time.monotonic() >= deadline:
                raise
            attempt += 1
            log.info("declaration_settling", what=what, attempt=attempt, error=repr(exc))
            await asyncio.sleep(backoff(attempt, base=0.1, cap=2.0))


async def key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The KV bucket `config` names: made when missing, or the one there bound as it is when
    it was made with another configuration (another description, replicas or ttl: one
    replica's settings must not fail another's start, nor rewrite the bucket); `settling`
    while another process makes it."""

    async def step() -> KeyValue:
        try:
            return await js.create_key_value(config)
        except BadRequestError as exc:
            if exc.err_code != JS_STREAM_CONFIG_MISMATCH:
                raise
            return await js.key_value(config.bucket)

    return await settling(step, what=f"KV bucket {config.bucket}")


async def ensure_streams(js: JetStreamContext, configs: list[StreamConfig]) -> None:
    """Declare streams idempotently: create, or update when the config changed, each
    `settling` while another process declares it too.

    Replication is never lowered by an update: a process started without
    ``STIPPLE_STREAM_REPLICAS=3`` (whose default is 1) must not turn production's R3
    streams into R1. It keeps the stored replicas and says so; lowering them is an
    operator's deliberate act (``nats stream edit``)."""
    for config in configs:
        await settling(functools.partial(_declare_stream, js, config), what=f"stream {config.name}")


async def _declare_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
        return
    except BadRequestError as exc:
        if exc.err_code != JS_STREAM_CONFIG_MISMATCH:
            raise
    stored = (await js.stream_info(config.name or "")).config.num_replicas or 1
    if stored > (config.num_replicas or 1):
        log.warning("stream_replicas_kept", stream=config.name, stored=stored, configured=config.num_replicas or 1)
        config = dataclasses.replace(config, num_replicas=stored)
    await js.update_stream(config)


async def publish(
    js: JetStreamContext,
    subject: str,
    message: msgspec.Struct,
    *,
    msg_id: str,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> int:
    """Publish to a stream with ``Nats-Msg-Id`` so a retry is deduplicated; carries the
    trace context. Inside a message handler, a bus that is away is waited for in place
    (`patiently`; the same message id, so a publish whose acknowledgement was lost is not
    stored twice). Returns the stream sequence."""
    hdrs = tracing.inject(dict(headers or {}))
    hdrs["Nats-Msg-Id"] = msg_id
    data = msgspec.json.encode(message)
    ack = await patiently(lambda: js.publish(subject, data, headers=hdrs, timeout=timeout))
    return ack.seq


_NODE_EVENTS = get_args(NodeEvent)


def _is_node_event(event: TaskEvent | NodeEvent) -> TypeIs[NodeEvent]:
    return isinstance(event, _NODE_EVENTS)


async def publish_event(
    js: JetStreamContext,
    event: TaskEvent | NodeEvent,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> int:
    """Publish a task or node event on the subject and with the message id that the event
    itself determines (`subjects.task_subject`, `subjects.node_subject`, `ids`): no
    caller spells either. Returns the stream sequence."""
    if _is_node_event(event):
        subject, msg_id = subjects.node_subject(event.node_id, event_name(event)), ids.node_event(event)
    else:
        subject = subjects.task_subject(event.task_id, event_name(event), getattr(event, "node_id", ""))
        msg_id = ids.task_event(event)
    return await publish(js, subject, event, msg_id=msg_id, headers=headers, timeout=timeout)


async def publish_work(js: JetStreamContext, node_id: str, work: Assignment) -> int:
    """An assignment on ``work.<node_id>.task``, one per task and node."""
    return await publish(js, subjects.work_subject(node_id), work, msg_id=ids.work(work.task_id, node_id))


async def publish_control(js: JetStreamContext, node_id: str, message: ControlMessage, *, round_id: int = 0) -> int:
    """A reveal request, cancellation, pre-fetch or probe on ``work.<node_id>.control``."""
    return await publish(
        js, subjects.control_subject(node_id), message, msg_id=ids.control(message, node_id, round_id=round_id)
    )


async def read_messages(js: JetStreamContext, stream: str, subject: str) -> list[Msg]:
    """Every message stored on `subject` (wildcards allowed), in stream order, with its
    headers and metadata.

    Uses a short-lived ephemeral pull consumer, deleted after the read: exact, and three
    round trips (create, fetch, delete) for one task's handful of events. (Unsubscribing
    alone leaves the consumer to its inactivity timeout, and a stream holds at most
    1,000 consumers by default: a busy service would hit that in seconds.)"""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        filter_subject=subject,
        inactive_threshold=10.0,  # only if the delete below never happens
        mem_storage=True,
    )
    info = await js.add_consumer(stream, config)
    try:
        remaining = info.num_pending or 0
        out: list[Msg] = []
        if remaining:
            sub = await js.pull_subscribe_bind(durable=info.name, stream=stream)
            try:
                while remaining > 0:
                    msgs = await sub.fetch(min(remaining, 256), timeout=5.0)
                    out.extend(msgs)
                    remaining -= len(msgs)
            finally:
                await sub.unsubscribe()
        return out
    finally:
        try:
            await js.delete_consumer(stream, info.name)
        except Exception as exc:  # it expires by itself (inactive_threshold)
            log.debug("read_messages_delete_failed", error=str(exc))


DIRECT_BATCH = 256  # messages one Direct Get request asks for; a task holds a few dozen


@dataclass(frozen=True)
class StoredMessage:
    """A message as the stream stores it: subject, payload, headers, sequence, and the
    server's timestamp (epoch seconds)."""

    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int
    time: float


class DirectGetUnavailable(Exception):
    """The stream answers no Direct Get (``allow_direct`` is off, or no such stream)."""


def _rfc3339_seconds(stamp: str) -> float:
    """``2026-12-06T12:13:20.040896926Z`` (nanoseconds, as nats-server writes it) in epoch
    seconds, rounded as nats-py rounds a consumer's metadata timestamp."""
    whole, _, rest = stamp.partition(".")
    digits = "".join(itertools.takewhile(str.isdigit, rest))
    zone = rest[len(digits) :] or "Z"
    seconds = int(datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone)).timestamp())
    nanos = seconds * 1_000_000_000 + int((digits + "000000000")[:9])
    return datetime.fromtimestamp(nanos / 1_000_000_000.0, UTC).timestamp()


async def read_direct(
    js: JetStreamContext, stream: str, subject: str, *, batch: int = DIRECT_BATCH, timeout: float = 5.0
) -> list[StoredMessage]:
    """Every message stored on `subject` (wildcards allowed), in stream order, by batched
    JetStream Direct Get (nats-server 2.11+, a stream with ``allow_direct``): a request
    ``{"batch": N, "next_by_subj": subject, "seq": n}`` on ``$JS.API.DIRECT.GET.<stream>``
    is answered with up to N messages, then an end-of-batch status (204 EOB) that says
    how many more match (``Nats-Num-Pending``); 404 when none matches. No consumer is
    made, nothing is left on the server, and any replica may answer.

    Raises DirectGetUnavailable when nobody answers direct gets on `stream` (503), and
    TimeoutError when an answer stops coming."""
    nc: NATS = js._nc  # nats-py keeps the connection and the API prefix (a domain's) here
    api = f"{js._prefix}.DIRECT.GET.{stream}"
    out: list[StoredMessage] = []
    seq = 1
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        while True:
            before = len(out)
            request = msgspec.json.encode({"batch": batch, "next_by_subj": subject, "seq": seq})
            await nc.publish(api, request, reply=inbox)
            while True:
                try:
                    msg = await sub.next_msg(timeout)
                except nats.errors.TimeoutError:
                    raise TimeoutError(f"Direct Get on {stream} ({subject}): no answer within {timeout:g} s") from None
                headers = msg.headers or {}
                status = headers.get("Status")
                if status is None:
                    out.append(
                        StoredMessage(
                            subject=headers.get("Nats-Subject", ""),
                            data=msg.data,
                            headers={
                                k: v for k, v in headers.items() if not k.startswith("Nats-") or k == "Nats-Msg-Id"
                            },
                            seq=int(headers.get("Nats-Sequence", "0")),
                            time=_rfc3339_seconds(headers.get("Nats-Time-Stamp", "1970-01-01T00:00:00Z")),
                        )
                    )
                    continue
                if status == "404":  # nothing (more) matches
                    return out
                if status == "503":
                    raise DirectGetUnavailable(f"stream {stream} answers no Direct Get (allow_direct off?)")
                if status != "204":
                    raise nats.errors.Error(f"Direct Get on {stream}: status {status} {headers.get('Description', '')}")
                break  # end of this batch
            if int(headers.get("Nats-Num-Pending", "0")) <= 0 or len(out) == before:
                return out
            seq = out[-1].seq + 1
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def step_down_leader(js: JetStreamContext, stream: str, timeout: float = 5.0) -> str:
    """Ask `stream`'s leader to step down (``$JS.API.STREAM.LEADER.STEPDOWN.<stream>``),
    which nats-py does not wrap: "" when it did, else the server's error (a stream of one
    replica has no one to step down to)."""
    reply = await js._nc.request(f"{js._prefix}.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=timeout)
    answer = msgspec.json.decode(reply.data or b"{}")
    error = answer.get("error") if isinstance(answer, dict) else answer
    return "" if isinstance(answer, dict) and answer.get("success") and not error else str(error or answer)


async def read_stored(js: JetStreamContext, stream: str, subject: str) -> list[StoredMessage]:
    """Every message stored on `subject`, in stream order: by Direct Get (`read_direct`),
    or, on a stream that does not allow it (declared before ``allow_direct``, not updated
    yet), by a short-lived consumer (`read_messages`)."""
    try:
        return await read_direct(js, stream, subject)
    except DirectGetUnavailable:
        log.warning("direct_get_unavailable", stream=stream)
    return [
        StoredMessage(
            subject=m.subject,
            data=m.data,
            headers=dict(m.headers or {}),
            seq=m.metadata.sequence.stream,
            time=m.metadata.timestamp.timestamp(),
        )
        for m in await read_messages(js, stream, subject)
    ]


async def read_subject(js: JetStreamContext, stream: str, subject: str, decoder: msgspec.json.Decoder[T]) -> list[T]:
    """Every message stored on `subject`, decoded, in stream order (see read_messages)."""
    return [decoder.decode(m.data) for m in await read_messages(js, stream, subject)]


@dataclass(frozen=True)
class Redeliver:
    """A handler's answer: not done yet, deliver this message again after `delay` seconds."""

    delay: float


class Hold:
    """A handler's answer: the handler keeps the message and settles it later (a queue, a
    batch): through `HeldMessages`, which keeps it alive meanwhile."""


class HeldMessages:
    """Messages a handler keeps after it returned `Hold()`, until it settles them.

    The one place, besides `consume`, where a message is acknowledged: `keep_alive` tells
    JetStream every `keepalive_s` (well within the consumer's ack wait) that each held
    message is still being worked on, and `settle` acks a message, or, given the error
    that stopped the work, naks or terms it by the same table as `consume` (a retryable
    StippleError: nak with back-off; a final one: term; anything else: nak with back-off,
    bounded by the consumer's max_deliver). A message JetStream no longer knows (acked
    elsewhere, or its connection gone) is dropped with a log line, never an exception."""

    def __init__(self, *, keepalive_s: float, name: str = "held") -> None:
        self.keepalive_s = keepalive_s
        self.name = name
        self._held: dict[int, Msg] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, msg: Msg) -> Hold:
        """Keep `msg` (the handler's answer: `return held.hold(msg)`)."""
        self._held[id(msg)] = msg
        return Hold()

    def holds(self, msg: Msg) -> bool:
        return id(msg) in self._held

    async def settle(self, msg: Msg, error: BaseException | None = None) -> str:
        """Ack `msg`, or settle it by the error that stopped its work; returns the outcome."""
        self._held.pop(id(msg), None)
        outcome = "ack"
        try:
            if error is None:
                await msg.ack()
            elif isinstance(error, StippleError) and not error.retryable:
                outcome = "term"
                await msg.term()
            else:
                outcome = "nak"
                await msg.nak(delay=backoff(msg.metadata.num_delivered if msg.reply else 1))
        except Exception as exc:  # JetStream redelivers it, or it was settled already
            log.warning("held_message_not_settled", holder=self.name, outcome=outcome, error=repr(exc))
        return outcome

    async def redeliver(self, msg: Msg, delay: float) -> None:
        """Give `msg` back, to be delivered again after `delay` seconds (a timer, not a failure)."""
        self._held.pop(id(msg), None)
        try:
            await msg.nak(delay=delay)
        except Exception as exc:
            log.warning("held_message_not_settled", holder=self.name, outcome="redeliver", error=repr(exc))

    def forget(self, msg: Msg) -> None:
        """Stop keeping `msg` alive without settling it (JetStream redelivers it)."""
        self._held.pop(id(msg), None)

    async def keep_alive(self, stop: asyncio.Event) -> None:
        """Extend every held message's ack deadline every `keepalive_s` until `stop`."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.keepalive_s)
            for msg in list(self._held.values()):
                try:
                    await msg.in_progress()
                except Exception as exc:  # the connection is away: JetStream redelivers it later
                    log.warning("in_progress_failed", holder=self.name, error=repr(exc))


async def supervise(
    run: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    *,
    name: str,
    metrics: Metrics | None = None,
    max_failures: int = 5,
    window_s: float = 60.0,
) -> None:
    """Run a consumer loop (`run`) until `stop`: the one supervision policy. A loop that
    fails (NATS away at start, a lost connection, a bug) is logged with its traceback and
    started again after a back-off; `max_failures` failures within `window_s` end the
    service instead (raise), so that its supervisor (Kubernetes) starts it afresh."""
    failures: deque[float] = deque()
    while not stop.is_set():
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            now = time.monotonic()
            failures.append(now)
            while failures and now - failures[0] > window_s:
                failures.popleft()
            log.exception("consumer_failed", consumer=name, failures=len(failures))
            if metrics is not None:
                metrics.consumer_restarts.labels(name).inc()
            if len(failures) >= max_failures:
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff(len(failures), base=1.0, cap=15.0))


Handler = Callable[[Msg], Awaitable[Redeliver | Hold | None]]
OnRejected = Callable[[Rejected, Msg], Awaitable[None]]


def backoff(attempt: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    factor: int = 2 ** max(attempt - 1, 0)  # int ** int is typed Any (a negative power is a float)
    return min(cap, base * factor)


async def consume(
    js: JetStreamContext,
    *,
    stream: str,
    config: ConsumerConfig,
    handler: Handler,
    stop: asyncio.Event,
    metrics: Metrics | None = None,
    tracer: trace.Tracer | None = None,
    batch: int = 16,
    fetch_timeout: float = 1.0,
    on_rejected: OnRejected | None = None,
    create: bool = True,
    heartbeat_s: float | None = SERVICE_HEARTBEAT_S,
    poll_lag: bool = True,
) -> None:
    """Run `handler` on every message of a durable pull consumer until `stop` is set.

    The one place where an outcome becomes an acknowledgement:
    - returns None -> ack; returns Redeliver(d) -> nak(delay=d); returns Hold() -> nothing
      (the handler acks later)
    - Rejected (a payload its subject does not allow, a sender without the right) -> term,
      logged with the sender, counted by reason, and passed to `on_rejected`
    - undecodable message -> term (a poison message is never retried)
    - StippleError: retryable -> nak with back-off, else term
    - any other exception -> logged with its traceback once, nak with back-off
      (bounded by the consumer's max_deliver)

    With `metrics`, the consumer's lag (num_pending, num_ack_pending) is read every few
    seconds into ``<prefix>_consumer_*_messages`` while the loop runs; without `poll_lag`
    (a node: thousands of them would each ask the server every few seconds), they are read
    off the deliveries instead (`_lag_of_delivery`). Without `create`
    (a node: the gatekeeper makes its consumers), the consumer is only bound to, and made
    here only when it is missing and the server allows it (one without authentication).
    It waits on a standing pull (`PullFeed`), with an idle heartbeat every `heartbeat_s`
    (None: none, for the thousands of nodes' consumers). A pull request the server refuses
    (`PullRefused`: a limit of the consumer's) ends the loop with that error, for
    `supervise` to start it again after a back-off, or to end the service.
    """
    durable = config.durable_name
    assert durable, "consume() needs a durable consumer"
    if create:
        await js.add_consumer(stream, config)
    else:
        await ensure_consumer(js, stream, config)
    tracer = tracer or _bus_tracer
    outside = structlog.contextvars.get_contextvars()
    lag: asyncio.Task[None] | None = None
    if metrics is not None and poll_lag:
        lag = asyncio.create_task(metrics.watch_consumer(js, stream, durable, stop))
    lag_off_deliveries = metrics if not poll_lag else None  # the gauges set from each delivery instead
    if config.max_ack_pending is not None and config.max_ack_pending > 0:  # a server may refuse a larger ask
        batch = min(batch, config.max_ack_pending)
    feed = PullFeed(js._nc, api_prefix=js._prefix, stream=stream, durable=durable, batch=batch, heartbeat_s=heartbeat_s)
    try:
        await feed.start()
        while not stop.is_set():
            try:
                msg = await feed.next(timeout=fetch_timeout)
            except (LeaderAway, ConsumerGone) as exc:
                # nobody answers for the consumer: a cluster electing its leader (a server
                # lost; wait for it here instead of counting a failure towards the service's
                # end), or no such consumer any more (deleted: made again)
                if isinstance(exc, LeaderAway) and await _consumer_exists(js, stream, durable):
                    weather.away()
                    log.warning("consumer_unavailable", stream=stream, durable=durable)
                    await asyncio.sleep(UNAVAILABLE_PAUSE_S)
                else:
                    log.warning("consumer_missing_recreating", stream=stream, durable=durable)
                    await _make_again(js, stream, config, create=create)
                await feed.top_up()
                continue
            if msg is None:
                continue
            weather.fair()
            delivery_lag = lag_off_deliveries if msg.reply else None
            if delivery_lag is not None:
                _lag_of_delivery(delivery_lag, stream, durable, msg, handling=True)
            try:
                await _handle_one(msg, handler, stream, metrics, tracer, on_rejected)
            finally:  # what a message bound (task_id, trace_id, ...) is not left on the lines after it
                structlog.contextvars.clear_contextvars()
                structlog.contextvars.bind_contextvars(**outside)
                if delivery_lag is not None:
                    _lag_of_delivery(delivery_lag, stream, durable, msg, handling=False)
            await feed.top_up()
    finally:
        if lag is not None:
            lag.cancel()
            await asyncio.gather(lag, return_exceptions=True)
        for left in await feed.close():  # received, not handled: back to the consumer at once
            with contextlib.suppress(Exception):
                await left.nak()


def _lag_of_delivery(metrics: Metrics, stream: str, durable: str, msg: Msg, *, handling: bool) -> None:
    """The lag gauges of a consumer that does not poll its info, read off a delivery: the
    messages still pending behind it (its metadata says), and 1 unacknowledged while its
    handler runs (such a consumer's handlers settle each message before the next: a node's)."""
    if handling:
        metrics.consumer_pending.labels(stream, durable).set(msg.metadata.num_pending or 0)
    metrics.consumer_ack_pending.labels(stream, durable).set(1 if handling else 0)


async def _consumer_exists(js: JetStreamContext, stream: str, durable: str) -> bool:
    """Whether the consumer exists; True while the bus cannot say (an election)."""
    try:
        await js.consumer_info(stream, durable, timeout=2.0)
    except NotFoundError:
        return False
    except BUS_AWAY_OR_SLOW:
        return True
    return True


async def _make_again(js: JetStreamContext, stream: str, config: ConsumerConfig, *, create: bool) -> None:
    """Make a consumer that went missing again: a service's own at once; a node's (the
    gatekeeper makes those) after a pause, and only where the server lets it."""
    if create:
        for attempt in range(REMAKE_ATTEMPTS):
            try:
                await js.add_consumer(stream, config)
                return
            except ServerError:  # 10012: the server still removes the deleted consumer's store
                if attempt == REMAKE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(REMAKE_PAUSE_S)
    else:
        await asyncio.sleep(1.0)
        await ensure_consumer(js, stream, config)


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    """Bind to a durable consumer someone else made; make it only when it is missing."""
    try:
        await js.consumer_info(stream, config.durable_name or "", timeout=2.0)
    except NotFoundError:
        await js.add_consumer(stream, config, timeout=2.0)


async def _patient_handler(handler: Handler, msg: Msg) -> Redeliver | Hold | None:
    """Run `handler` on `msg`; while the bus is away (a `BUS_AWAY` error from a call the
    handler made), wait and run it again, keeping the message alive, for `BUS_PATIENCE_S`:
    a delivery spent on an election is not a failure of the message (a node's assignment
    has three), and a handler is idempotent (a redelivery runs it again anyway). The
    handler's own publishes wait in place first (`publish`), so one that got far does not
    start over. Past the patience the error is the handler's, naked with back-off."""
    patience = _patience.set(time.monotonic() + BUS_PATIENCE_S)
    handled = _handled.set(msg)
    try:
        return await patiently(lambda: handler(msg), whole_handler=True)
    finally:
        _patience.reset(patience)
        _handled.reset(handled)


async def _handle_one(
    msg: Msg,
    handler: Handler,
    stream: str,
    metrics: Metrics | None,
    tracer: trace.Tracer,
    on_rejected: OnRejected | None = None,
) -> None:
    started = time.perf_counter()
    delivered = msg.metadata.num_delivered if msg.reply else 1
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(subject=msg.subject, delivered=delivered)
    outcome = "ack"
    tokens = subjects.unpartitioned(msg.subject).split(".")  # (a VALIDATION copy: as its TASKS subject)
    with tracing.handling(
        f"handle {stream} {tokens[2] if len(tokens) > 2 else tokens[-1]}",
        msg.headers,
        tracer,
        lambda: {"messaging.system": "nats", "messaging.destination.name": msg.subject, "stipple.delivered": delivered},
    ):
        if tokens[0] == "tasks" and len(tokens) > 2:  # tasks.<id>.<event>[.<node>]
            tracing.bind_task(tokens[1], tokens[3] if len(tokens) > 3 else "")
        elif tokens[0] == "work" and len(tokens) > 2:  # work.<node>.<task|control>
            tracing.bind_task(node_id=tokens[1])
        else:
            tracing.bind_task()
        try:
            result = await _patient_handler(handler, msg)
            if isinstance(result, Redeliver):  # a timer the handler set, not a failure
                outcome = "redeliver"
                await msg.nak(delay=result.delay)
            elif isinstance(result, Hold):
                outcome = "hold"
            else:
                await msg.ack()
        except Rejected as exc:
            outcome = "term"
            log.warning("message_rejected", reason=exc.reason, sender=exc.sender, error=exc.message)
            await msg.term()
            if metrics is not None:
                metrics.rejected.labels(stream, exc.reason).inc()
            if on_rejected is not None:
                await on_rejected(exc, msg)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # nested past the limit too
            outcome = "term"
            log.error("poison_message", error=str(exc))
            await msg.term()
        except StippleError as exc:
            if exc.retryable:
                outcome = "nak"
                log.warning("handler_retry", code=exc.code, error=exc.message)
                await msg.nak(delay=backoff(delivered))
            else:
                outcome = "term"
                log.error("handler_gave_up", code=exc.code, error=exc.message)
                await msg.term()
        except Exception:
            outcome = "nak"
            log.exception("handler_failed")
            await msg.nak(delay=backoff(delivered))
    if metrics is not None:
        metrics.messages.labels(stream, outcome).inc()
        metrics.handle_seconds.labels(stream).observe(time.perf_counter() - started)
