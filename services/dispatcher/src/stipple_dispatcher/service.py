"""Dispatcher wiring: the I/O around the queue's decisions (queue.py decides, this module
publishes).

One durable consumer on ``tasks.*.{submitted,cancelled,started,committed,errored,succeeded,aborted}``.
Each message is decoded and handed, under one lock, to the `TaskQueue` (queue.py), which
returns what to do; `Dispatcher` does it: task events with `bus.publish_event`, node work
with `bus.publish_work`, cancellations and pre-fetches with `bus.publish_control`, and
the queued tasks' `submitted` messages through `bus.HeldMessages`.

- submitted: a queued task's message is held (not acked) until the task is assigned (or
  aborted, or cancelled), so a dispatcher that dies loses nothing: JetStream redelivers
  the held messages to the next one. A redelivered submission is checked against the
  stream here (the queue knows only this process): one already assigned gets the same
  assignments again (message ids deduplicate them); one that ended is dropped. What the
  queue decides for a new task (unservable, queued, pre-fetches) is in queue.py.
- The queue is pumped after every event that adds a task or frees a slot (a `started`
  frees none) and every half second (`keep_alive`), when
  silent nodes (not started in time) and lost ones (started, then no longer live before
  they committed) are replaced too; a cancelled task's nodes get CancelWork (for a task
  this process did not assign, the nodes its `assigned` event names).
- These timers live in memory: after a restart, a silent or lost node is caught by the
  validator's commit deadline instead.

Apps see a queued task's position and ETA through the gateway, which asks here by
request-reply on ``dispatch.queue`` (answered from memory; the ETAs come from each node's
speed as timed here: from its assignment to its `committed` as the stream stored it,
queue.py and speed.py). The node index (selection.py)
folds the NODES stream and the chain-indexer's `stakes` bucket (`follow_nodes`,
`follow_stakes`); the metrics are declared in metrics.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterable

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from stipple_common import __version__, bus, records, subjects, tracing
from stipple_common.errors import Rejected
from stipple_common.logs import setup_logging
from stipple_common.messages import (
    OUTCOME_EVENTS,
    Assignment,
    NodeBanned,
    NodeHeartbeat,
    NodeJoined,
    NodeQos,
    NodeQuit,
    QueueStatus,
    TaskAssigned,
    TaskEscalated,
    TaskEvent,
    TaskExtended,
    TaskSubmitted,
    decode_node_event,
    decode_task_event,
)
from stipple_common.service import ServiceContext, open_service, serve_as_leader
from stipple_common.settings import InvalidSettings
from stipple_common.vrf import VrfKey

from .metrics import DispatcherMetrics
from .queue import Abort, Assign, Cancel, Decision, Extend, NoReplacement, Prefetch, Replace, TaskQueue, Wait
from .selection import NodeIndex
from .settings import DispatcherSettings, sampling_key

__all__ = [
    "BeatGate",
    "Dispatcher",
    "DispatcherSettings",
    "follow_heartbeats",
    "follow_nodes",
    "follow_stakes",
    "run",
    "serve",
]

log = structlog.get_logger("stipple.dispatcher")


def stored_at(msg: Msg) -> float:
    """When the TASKS stream stored `msg` (the server's clock: a node cannot date its own
    events), never later than this process's now; now for a message without JetStream
    metadata. The ETAs' speed model is timed by it (queue.py `_timed`)."""
    now = time.time()
    try:
        return min(now, msg.metadata.timestamp.timestamp())
    except (nats.errors.NotJSMessageError, AttributeError, IndexError, ValueError):
        return now


class Dispatcher:
    """Carries out what `tasks` decides; every change to it happens under `lock`."""

    def __init__(self, js: JetStreamContext, tasks: TaskQueue[Msg], metrics: DispatcherMetrics) -> None:
        self.js = js
        self.tasks = tasks
        self.metrics = metrics
        self.lock = asyncio.Lock()
        # queued tasks' `submitted` messages, unacknowledged until the task is assigned (a
        # dispatcher that dies loses nothing), kept alive well within the consumer's 10 s ack wait
        self.held = bus.HeldMessages(keepalive_s=3.0, name="dispatcher-queue")

    # ------------------------------------------------------------------ events

    async def handle(self, msg: Msg) -> bus.Redeliver | bus.Hold | None:
        event = decode_task_event(msg.subject, msg.data)
        tracing.bind_task(event.task_id)
        result: bus.Redeliver | bus.Hold | None
        async with self.lock:
            if isinstance(event, TaskSubmitted):
                result = await self.submitted(event, msg)
            elif isinstance(event, TaskEscalated):
                result = await self.escalated(event)
            else:
                result = None
                freed = self.tasks.slots_freed
                await self.carry_out(self.tasks.apply(event, at=stored_at(msg)))
                if self.tasks.slots_freed == freed:
                    return result  # (`started`, or an outcome after every commitment): no node freed up
            await self.pump()
        return result

    async def submitted(self, event: TaskSubmitted, msg: Msg) -> bus.Hold | None:
        task_id = event.task_id
        if task_id in self.tasks.queued:  # redelivered while still queued: keep the newest message
            previous = self.tasks.resubmitted(task_id, msg)
            if previous is not None and previous is not msg:
                self.held.forget(previous)
            return self.held.hold(msg)
        if task_id in self.tasks.running:  # a second `submitted` for a task this process assigned
            assigned = await self.previous_assignment(task_id)
            if assigned is not None:
                await self.send_work(event, assigned)  # the same work again; message ids deduplicate it
            return None
        if msg.metadata.num_delivered > 1:  # a redelivery: an earlier dispatcher may have acted on it
            assigned = await self.previous_assignment(task_id)
            if assigned is not None:  # hand out the same work again
                await self.send_work(event, assigned)
                return None
            if await self.ended(task_id):
                return None  # cancelled (or aborted) before it was dispatched
        await self.carry_out(self.tasks.submit(event, msg, tracing.carrier(), time.time()))
        return self.held.hold(msg) if task_id in self.tasks.queued else None

    async def escalated(self, event: TaskEscalated) -> bus.Redeliver | None:
        """Draw more nodes for a task the validator could not decide; asked again every
        second while too few are free, until a second before the escalation's deadline.
        Once per round: a redelivery finds the round's `extended` in the stream."""
        previous = await self.last_event(event.task_id, "extended")
        if isinstance(previous, TaskExtended) and previous.round >= event.round:
            return None
        running = self.tasks.running.get(event.task_id)
        submitted = running.event if running else await self.last_event(event.task_id, "submitted")
        if not isinstance(submitted, TaskSubmitted):
            return None
        now = time.time()
        decision = self.tasks.extend(event, submitted.spec, now, give_up=now >= event.deadline - 1.0)
        if decision is None:
            return bus.Redeliver(delay=1.0)
        await self._extend(decision)
        return None

    async def pump(self) -> None:
        """Assign queued tasks, best first, while nodes are free."""
        for decision in self.tasks.pump(time.time()):
            await self.carry_out_one(decision)
        self.metrics.queue_depth.set(len(self.tasks.queued))

    async def keep_alive(self, stop: asyncio.Event, every_s: float = 0.5) -> None:
        """Pump on a clock (nodes free up, time out, join) and replace silent nodes; the held
        `submitted` messages are kept alive by `self.held` meanwhile."""
        touching = asyncio.create_task(self.held.keep_alive(stop))
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), every_s)
                except TimeoutError:
                    pass
                try:
                    async with self.lock:
                        for decision in self.tasks.replace_overdue(time.time()):
                            await self.carry_out_one(decision)
                        await self.pump()
                except Exception:  # a publish failed: each decision undid itself; the next tick tries again
                    log.exception("clock_tick_failed")
        finally:
            touching.cancel()
            await asyncio.gather(touching, return_exceptions=True)

    def status(self, task_id: str) -> QueueStatus:
        return self.tasks.status(task_id, time.time())

    # ------------------------------------------------------------------ carrying out decisions

    async def carry_out(self, decisions: Iterable[Decision[Msg]]) -> None:
        for decision in decisions:
            await self.carry_out_one(decision)

    async def carry_out_one(self, decision: Decision[Msg]) -> None:
        if isinstance(decision, Assign):
            await self._assign(decision)
        elif isinstance(decision, Wait):
            self.metrics.decision_seconds.observe(decision.decision_s)
        elif isinstance(decision, Abort):
            await self._abort(decision)
        elif isinstance(decision, Replace):
            await self._replace(decision)
        elif isinstance(decision, NoReplacement):
            with tracing.task_span(
                "dispatch.replace", task_id=decision.task_id, node_id=decision.node_id, parent=decision.trace
            ):
                log.warning(
                    "no_replacement",
                    task_id=decision.task_id,
                    node_id=decision.node_id,
                    reason=decision.reason,
                    detail=decision.detail,
                )
        elif isinstance(decision, Extend):
            await self._extend(decision)
        elif isinstance(decision, Cancel):
            await self._cancel(decision)
        else:
            await self._prefetch(decision)

    async def _assign(self, decision: Assign[Msg]) -> None:
        """Publish the assignment and the nodes' work, in the task's trace (the pump runs
        in another task's handler, or on the clock)."""
        assigned = decision.assigned
        self.metrics.decision_seconds.observe(decision.decision_s)
        with tracing.task_span(
            "dispatch.assign", task_id=assigned.task_id, parent=decision.trace, queue_wait_s=decision.waited_s
        ):
            try:
                await bus.publish_event(self.js, assigned)
            except BaseException:
                self.tasks.undo(decision)  # queued again: a later pump tries again
                raise
            await asyncio.gather(*(bus.publish_work(self.js, node, decision.work) for node in assigned.nodes))
            await self._settle(decision.held)
            self.metrics.tasks_total.labels("assigned").inc()
            if len(assigned.nodes) > 1:
                self.metrics.tasks_total.labels("sampled").inc()
            self.metrics.wait_seconds.observe(max(0.0, time.time() - decision.submitted_at))
            log.info("task_assigned", task_id=assigned.task_id, nodes=assigned.nodes)

    async def _abort(self, decision: Abort[Msg]) -> None:
        """Publish the abort, in the task's trace when decided outside its own handler."""
        aborted = decision.aborted
        if decision.decision_s is not None:
            self.metrics.decision_seconds.observe(decision.decision_s)
        span = (
            contextlib.nullcontext()
            if decision.trace is None
            else tracing.task_span("dispatch.abort", task_id=aborted.task_id, parent=decision.trace)
        )
        with span:
            try:
                await bus.publish_event(self.js, aborted)
            except Exception as exc:
                # not published (the stream electing a leader, say): the task's `submitted`
                # comes back, is queued again, and a later pump decides it again. Kept as it
                # was, the held message would be kept alive forever and the task never end.
                if decision.held is not None:
                    await self.held.settle(decision.held, exc)
                raise
            log.warning("task_aborted", reason=aborted.reason, detail=aborted.detail)
            await self._settle(decision.held)
        self.metrics.tasks_total.labels(aborted.reason).inc()

    async def _replace(self, decision: Replace) -> None:
        """Replace a silent or lost node by a node of another operator (in the task's
        trace); counted as `reassigned` (not accepted in time) or `node_lost`. Not when the
        stream shows the node answered already (its `committed` or `errored` has not reached
        this consumer yet): the task would refuse the replacement."""
        reassigned = decision.reassigned
        with tracing.task_span(
            "dispatch.replace", task_id=reassigned.task_id, node_id=reassigned.replaced, parent=decision.trace
        ):
            if await self.answered(reassigned.task_id, reassigned.replaced):
                self.tasks.undo(decision)  # its answer, on its way here, frees its slot
                log.info("replacement_dropped", task_id=reassigned.task_id, node_id=reassigned.replaced)
                return
            try:
                await bus.publish_event(self.js, reassigned)
            except BaseException:
                self.tasks.undo(decision)  # the replaced node keeps its place (its timer is gone)
                raise
            await bus.publish_work(self.js, reassigned.by, decision.work)
            await bus.publish_control(self.js, reassigned.replaced, decision.cancel)
            self.metrics.tasks_total.labels("node_lost" if reassigned.reason == "node_lost" else "reassigned").inc()
            log.warning(
                "node_replaced",
                task_id=reassigned.task_id,
                replaced=reassigned.replaced,
                by=reassigned.by,
                reason=reassigned.reason,
            )

    async def _extend(self, decision: Extend) -> None:
        """Publish the escalated task's new nodes, then their work (in the task's trace)."""
        extended = decision.extended
        with tracing.task_span("dispatch.extend", task_id=extended.task_id, parent=decision.trace):
            try:
                await bus.publish_event(self.js, extended)
            except BaseException:
                self.tasks.undo(decision)
                raise
            await asyncio.gather(*(bus.publish_work(self.js, node, decision.work) for node in extended.nodes))
        if extended.nodes:
            self.metrics.tasks_total.labels("extended").inc(len(extended.nodes))
            log.warning("task_extended", task_id=extended.task_id, round=extended.round, nodes=extended.nodes)
        else:
            self.metrics.tasks_total.labels("not_extended").inc()
            log.warning("task_not_extended", task_id=extended.task_id, round=extended.round, detail=extended.detail)

    async def _cancel(self, decision: Cancel[Msg]) -> None:
        await self._settle(decision.held)
        nodes = decision.nodes
        if nodes is None:  # not assigned by this process: ask the stream
            assigned = await self.previous_assignment(decision.cancel.task_id)
            nodes = assigned.nodes if assigned else []
        for node_id in nodes:
            await bus.publish_control(self.js, node_id, decision.cancel)
        self.metrics.tasks_total.labels("cancelled").inc()
        log.info("task_cancelled", nodes=nodes, was_queued=decision.was_queued)

    async def _prefetch(self, decision: Prefetch) -> None:
        for node_id in decision.nodes:
            await bus.publish_control(self.js, node_id, decision.request, round_id=decision.round_id)
        self.metrics.tasks_total.labels("prefetch").inc(len(decision.nodes))
        log.info("prefetch_requested", ref=decision.request.ref, nodes=decision.nodes, holders=decision.holders)

    async def _settle(self, held: Msg | None) -> None:
        """A queued task is done with (assigned, aborted, cancelled): its `submitted`
        message is acknowledged (a failed ack: the redelivery finds the task assigned or ended)."""
        if held is not None:
            await self.held.settle(held)

    # ------------------------------------------------------------------ the stream

    async def previous_assignment(self, task_id: str) -> TaskAssigned | None:
        event = await self.last_event(task_id, "assigned")
        return event if isinstance(event, TaskAssigned) else None

    async def last_event(self, task_id: str, name: str) -> TaskEvent | None:
        """The task's last control-plane event `name` in the stream, if any."""
        try:
            raw = await self.js.get_last_msg(subjects.TASKS_STREAM, subjects.task_subject(task_id, name))
        except NotFoundError:
            return None
        if raw.subject is None or raw.data is None:  # a stored message always has both
            return None
        return decode_task_event(raw.subject, raw.data)

    async def answered(self, task_id: str, node_id: str) -> bool:
        """Whether the stream holds the node's `committed` or `errored` for the task (a
        failed read says no: the replacement goes ahead, as it would without this check)."""
        for name in ("committed", "errored"):
            try:
                await self.js.get_last_msg(subjects.TASKS_STREAM, subjects.task_subject(task_id, name, node_id))
            except NotFoundError:
                continue
            except Exception as exc:
                log.warning("answer_not_checked", task_id=task_id, node_id=node_id, error=repr(exc))
                return False
            return True
        return False

    async def ended(self, task_id: str) -> bool:
        for name in OUTCOME_EVENTS:
            try:
                await self.js.get_last_msg(subjects.TASKS_STREAM, subjects.task_subject(task_id, name))
            except NotFoundError:
                continue
            return True
        return False

    async def send_work(self, event: TaskSubmitted, assigned: TaskAssigned) -> None:
        work = Assignment(task_id=event.task_id, spec=event.spec, deadline=assigned.deadline)
        await asyncio.gather(*(bus.publish_work(self.js, node, work) for node in assigned.nodes))


async def follow_nodes(
    js: JetStreamContext, index: NodeIndex, catch_up_s: float = 10.0
) -> JetStreamContext.PushSubscription:
    """Fold the NODES stream into `index` (from its start, then live)."""
    caught_up = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        try:
            event = decode_node_event(msg.subject, msg.data)
        except Rejected as exc:
            log.warning("node_event_rejected", reason=exc.reason, sender=exc.sender, error=exc.message)
        else:
            seen = msg.metadata.timestamp.timestamp()
            if isinstance(event, NodeJoined):
                index.join(event, seen, __version__)
            elif isinstance(event, NodeHeartbeat):
                index.heartbeat(event.node_id, seen, event.models_loaded)
            elif isinstance(event, NodeQuit):
                index.leave(event.node_id)
            elif isinstance(event, NodeQos):
                index.score(event)
            elif isinstance(event, NodeBanned):
                index.ban(event.node_id, event.until)
        if msg.metadata.num_pending == 0:
            caught_up.set()

    info = await js.stream_info(subjects.NODES_STREAM)
    if info.state.messages == 0:
        caught_up.set()
    sub = await js.subscribe(
        "nodes.>",
        stream=subjects.NODES_STREAM,
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
    )
    try:
        await asyncio.wait_for(caught_up.wait(), catch_up_s)
    except TimeoutError:
        log.warning("nodes_backlog_not_folded", waited_s=catch_up_s)
    return sub


MAX_BEAT_BYTES = 256 * 1024
"""A heartbeat is a node id, a time and the models it holds: far below this. Larger is not
decoded (a node with hundreds of models sends a few KiB)."""


class BeatGate:
    """At most one core-NATS heartbeat per node per `interval_s` is decoded.

    NATS permissions let a node publish only on its own ``nodes.<id>.heartbeat``, but as
    often as it likes: without this a node flooding that subject costs the dispatcher a
    decode and a fold for every message. The gate looks only at the subject's node id and
    the clock, before any decoding; a node the index does not hold (not joined, or not yet
    folded: its stored beats still count) is dropped at once, so the table is bounded by
    the nodes that joined. The stored copy of every beat (the NODES stream, whose per-subject
    limit keeps one) is still folded by `follow_nodes`."""

    def __init__(self, index: NodeIndex, interval_s: float, counted: Counter | None = None) -> None:
        self.index = index
        self.interval_s = interval_s
        self.last: dict[str, float] = {}
        self.admitted = 0
        self.dropped = 0
        self.counted = counted  # stipple_dispatcher_heartbeats_total{result}

    def admit(self, subject: str, size: int, now: float) -> bool:
        parts = subject.split(".")
        node_id = parts[1] if len(parts) == 3 else ""
        known = size <= MAX_BEAT_BYTES and node_id in self.index.row
        ok = known and now - self.last.get(node_id, -math.inf) >= self.interval_s
        if ok:
            self.last[node_id] = now
            self.admitted += 1
        else:
            self.dropped += 1
        if self.counted is not None:
            self.counted.labels("decoded" if ok else "dropped").inc()
        return ok


async def follow_heartbeats(nc: NATS, gate: BeatGate) -> Subscription:
    """Heartbeats also as they are sent, on core NATS: a node publishes each to the NODES
    stream, and while the cluster elects that stream's leader (a server lost) nothing is
    stored and the fold above hears nothing, so every node went stale after the node TTL
    and tasks were aborted for want of nodes that were there all along. Who may publish on
    ``nodes.<id>.heartbeat`` is the same either way (NATS permissions), and the subject
    names the node (`decode_node_event`). `BeatGate` lets through one beat per node per
    `interval_s` (keep it well under the node TTL); the subscription's pending limits drop
    a flood at the client rather than queueing it in memory."""
    index = gate.index

    async def on_beat(msg: Msg) -> None:
        now = time.time()
        if not gate.admit(msg.subject, len(msg.data), time.monotonic()):
            return
        try:
            event = decode_node_event(msg.subject, msg.data)
        except Rejected:
            return  # the stream's copy is judged (and logged) by follow_nodes
        if isinstance(event, NodeHeartbeat):
            index.heartbeat(event.node_id, now, event.models_loaded)

    return await nc.subscribe(
        subjects.node_subject("*", "heartbeat"),
        cb=on_beat,
        pending_msgs_limit=BEAT_PENDING_MSGS,
        pending_bytes_limit=BEAT_PENDING_MSGS * 1024,
    )


BEAT_PENDING_MSGS = 10_000


async def follow_stakes(ctx: ServiceContext, index: NodeIndex, settings: DispatcherSettings) -> asyncio.Task[None]:
    """Fold the chain-indexer's `stakes` bucket into `index` (what is there now, then changes)."""
    kv = await bus.key_value(
        ctx.js, KeyValueConfig(bucket=subjects.STAKES_BUCKET, history=1, replicas=settings.stream_replicas)
    )
    watcher = await kv.watchall()
    caught_up = asyncio.Event()

    async def fold() -> None:
        async for entry in watcher:
            if entry is None:  # the initial values are all in
                caught_up.set()
                continue
            if entry.operation in ("DEL", "PURGE"):
                index.set_stake(entry.key.lower(), 0)
                continue
            try:
                stake = records.indexed_stake_decoder.decode(entry.value or b"{}")
            except msgspec.DecodeError as exc:
                log.warning("bad_stake_entry", key=entry.key, error=str(exc))
                continue
            index.set_stake(entry.key.lower(), 0 if stake.leaving else stake.stake, stake.owner)

    task = asyncio.create_task(fold())
    try:
        await asyncio.wait_for(caught_up.wait(), 10.0)
    except TimeoutError:
        log.warning("stakes_backlog_not_folded")
    return task


async def publish_sampling_key(ctx: ServiceContext, key: VrfKey, settings: DispatcherSettings) -> None:
    """Publish the VRF public key the outcomes' sampling proofs are made with, and the rate
    (the `sampling` bucket: what `stipple audit` checks the proofs against). A key already
    there keeps its record: `since` says when it was first used."""
    if not settings.sampling_key:
        log.warning("sampling_key_generated", public_key=key.public.hex(), hint="set STIPPLE_SAMPLING_KEY")
    kv = await bus.key_value(
        ctx.js, KeyValueConfig(bucket=subjects.SAMPLING_BUCKET, history=1, replicas=settings.stream_replicas)
    )
    public = key.public.hex()
    known = await records.get(kv, public, records.sampling_key_decoder)
    if known is None or known.rate != settings.validation_rate:
        since = time.time() if known is None else known.since
        await records.put(
            kv, public, records.SamplingKey(public_key=public, rate=settings.validation_rate, since=since)
        )


async def run(settings: DispatcherSettings) -> None:
    setup_logging("dispatcher", level=settings.log_level, fmt=settings.log_format)
    async with open_service("dispatcher", settings) as ctx:
        await serve_as_leader(ctx, "dispatcher", settings, serve)  # STIPPLE_LEASE_S > 0: active/standby


async def serve(ctx: ServiceContext, settings: DispatcherSettings) -> None:
    if not 0 <= settings.max_reassignments <= subjects.MAX_MSGS_PER_TASK_SUBJECT:
        raise InvalidSettings(
            f"STIPPLE_MAX_REASSIGNMENTS={settings.max_reassignments}: from 0 to {subjects.MAX_MSGS_PER_TASK_SUBJECT} "
            "(the messages a task subject holds)"
        )
    key = sampling_key(settings)
    await publish_sampling_key(ctx, key, settings)
    index = NodeIndex()
    stakes_watch = await follow_stakes(ctx, index, settings)
    nodes_sub = await follow_nodes(ctx.js, index)
    tasks: TaskQueue[Msg] = TaskQueue(index, settings, key=key)
    metrics = DispatcherMetrics(ctx.metrics.registry, tasks)
    dispatcher = Dispatcher(ctx.js, tasks, metrics)
    gate = BeatGate(index, interval_s=min(1.0, settings.node_ttl_s / 4), counted=metrics.heartbeats)
    beats_sub = await follow_heartbeats(ctx.nc, gate)

    async def on_status(msg: Msg) -> None:
        task_id = msg.data.decode(errors="replace")
        await msg.respond(msgspec.json.encode(dispatcher.status(task_id)))

    status_sub = await ctx.nc.subscribe(subjects.QUEUE_STATUS, queue="dispatcher", cb=on_status)
    clock = asyncio.create_task(dispatcher.keep_alive(ctx.stop))
    log.info(
        "dispatcher_started",
        replication=settings.replication,
        validation_rate=settings.validation_rate,
        sampling_key=key.public.hex(),
        nodes=index.size,
    )
    try:
        await ctx.consume(subjects.TASKS_STREAM, subjects.dispatcher_consumer(), dispatcher.handle, batch=64)
    finally:
        await clock
        await status_sub.unsubscribe()
        await nodes_sub.unsubscribe()
        await beats_sub.unsubscribe()
        stakes_watch.cancel()
