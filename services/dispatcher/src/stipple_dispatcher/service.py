"""Dispatcher wiring: a queue of submitted tasks, handed to nodes as they free up.

One durable consumer on ``tasks.*.{submitted,cancelled,committed,errored,succeeded,aborted}``:

- submitted: a task no registered node has ever served is aborted at once (`unservable`).
  Otherwise it joins the queue, ordered by fee per estimated GPU-second (then by age),
  and its message is held (not acked) until the task is assigned, so a dispatcher that
  dies loses nothing: JetStream redelivers the held messages to the next one.
- The queue is pumped after every event and every half second: each task, best first,
  gets `replication` eligible free nodes of distinct operators (selection.py), then
  ``tasks.<id>.assigned`` and one Assignment per node on ``work.<node_id>.task``. A
  redelivered submission that was already assigned gets the same assignments again
  (message ids deduplicate them). A task that waits longer than `dispatch_timeout_s`
  is aborted with `no_nodes`: no task hangs.
- committed / errored / an outcome free the node's slot; cancelled also sends CancelWork
  to the task's nodes (a queued task is simply dropped).
- Pre-fetch: when tasks keep asking (`prefetch_demand` within `prefetch_window_s`) for a
  downloadable model (a URL or a hub repo id) that fewer than `replication` live nodes
  hold, other live nodes get a PrefetchRequest on their control subject; they download
  it into their store and announce it, and the locality boost then favours them.
- A node that has not `started` its assignment within `accept_timeout_s` is replaced by
  another eligible node of another operator (``tasks.<id>.reassigned``, up to
  `max_reassignments` per task); the replaced node gets a CancelWork and, in the
  outcome, a `timeout` verdict. These timers live in memory: after a restart, a silent
  node is caught by the validator's commit deadline instead.

Apps see a queued task's position and ETA through the gateway, which asks here by
request-reply on ``dispatch.queue`` (answered from memory).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec
import numpy as np
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram

from stipple_common import __version__, bus, records, subjects, tracing
from stipple_common.errors import Rejected
from stipple_common.logs import setup_logging
from stipple_common.messages import (
    OUTCOME_EVENTS,
    Assignment,
    CancelWork,
    NodeBanned,
    NodeErrored,
    NodeHeartbeat,
    NodeJoined,
    NodeQos,
    NodeQuit,
    PrefetchRequest,
    QueueStatus,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskReassigned,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
    decode_node_event,
    decode_task_event,
)
from stipple_common.metrics import Metrics
from stipple_common.service import ServiceContext, open_service
from stipple_common.settings import CommonSettings, InvalidSettings
from stipple_common.taskspec import TaskSpec

from .metrics import DispatcherCollector
from .selection import NodeIndex, NotEnoughNodes, Requirements, task_models

log = structlog.get_logger("stipple.dispatcher")


class DispatcherSettings(CommonSettings, frozen=True, kw_only=True):
    task_timeout_s: float = 120.0  # from assignment to every node's commitment
    dispatch_timeout_s: float = 30.0  # how long a task may wait in the queue for free nodes
    node_slots: int = 1  # tasks in flight per node
    min_stake: int = 0  # smallest stake a node needs (the chain-indexer's `stakes` bucket says what each holds)
    model_memory_gb: str = ""  # name=GB[,...]: the (V)RAM a model's tasks need on a node
    seconds_per_step: float = 0.05  # GPU seconds per step at 512x512, for queue order and ETA
    accept_timeout_s: float = 10.0  # from assignment to the node's `started`; later, it is replaced
    max_reassignments: int = 2  # per task
    prefetch_demand: int = 2  # tasks within prefetch_window_s that make a model worth pre-fetching
    prefetch_window_s: float = 600.0
    prefetch_cooldown_s: float = 300.0  # between two pre-fetch rounds for one model


def parse_memory(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, gb = item.partition("=")
        try:
            out[name] = int(float(gb) * 1024**3)
        except ValueError:
            raise InvalidSettings(f"STIPPLE_MODEL_MEMORY_GB={spec!r}: expected name=GB[,...], got {item!r}") from None
    return out


def estimate_seconds(spec: TaskSpec, seconds_per_step: float) -> float:
    """GPU seconds a task is expected to take on one node (scales with steps and pixels)."""
    config = spec.task_config
    steps = config.steps + (spec.refiner.steps if spec.refiner else 0)
    return seconds_per_step * steps * config.num_images * (config.image_width * config.image_height) / 512**2


@dataclass(order=True)
class Queued:
    sort_key: tuple[float, float] = field(init=False, repr=False)
    event: TaskSubmitted = field(compare=False)
    msg: Msg | None = field(compare=False)
    estimate_s: float = field(compare=False)

    def __post_init__(self) -> None:
        priority = self.event.fee / max(self.estimate_s, 1e-6)
        self.sort_key = (-priority, self.event.submitted_at)


class Dispatcher:
    def __init__(
        self,
        js: JetStreamContext,
        index: NodeIndex,
        settings: DispatcherSettings,
        metrics: Metrics,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.js = js
        self.index = index
        self.settings = settings
        self.rng = rng or np.random.default_rng()
        self.memory = parse_memory(settings.model_memory_gb)
        self.queue: dict[str, Queued] = {}
        self.inflight: dict[str, set[str]] = {}  # task -> nodes still holding a slot for it
        self.accepting: dict[tuple[str, str], float] = {}  # (task, node) -> when it was assigned
        self.running: dict[str, TaskSubmitted] = {}  # assigned tasks, for replacements
        self.members: dict[str, list[str]] = {}  # task -> every node it ever had (replaced ones too)
        self.demand: dict[str, deque[float]] = {}  # model ref -> when tasks asked for it
        self.prefetched: dict[str, float] = {}  # model ref -> last pre-fetch round
        # task -> its trace context (traceparent), for what the pump and the timers do later
        self.traces: dict[str, dict[str, str]] = {}
        self.lock = asyncio.Lock()
        # queued tasks' `submitted` messages, unacknowledged until the task is assigned (a
        # dispatcher that dies loses nothing), kept alive well within the consumer's 10 s ack wait
        self.held = bus.HeldMessages(keepalive_s=3.0, name="dispatcher-queue")
        self.dispatched = Counter(
            "stipple_dispatcher_tasks_total",
            "Tasks handled, by result (assigned, reassigned, prefetch, no_nodes, unservable, cancelled)",
            ["result"],
            registry=metrics.registry,
        )
        self.queue_depth = Gauge(
            "stipple_dispatcher_queue_depth", "Tasks waiting for free nodes", registry=metrics.registry
        )
        self.decision_seconds = Histogram(
            "stipple_dispatcher_decision_seconds",
            "Time to pick the nodes of one task",
            registry=metrics.registry,
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2),
        )
        self.wait_seconds = Histogram(
            "stipple_dispatcher_queue_wait_seconds",
            "Submission to assignment",
            registry=metrics.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60),
        )
        metrics.registry.register(DispatcherCollector(self))  # nodes by state, QoS, tasks held

    # ------------------------------------------------------------------ events

    async def handle(self, msg: Msg) -> bus.Redeliver | bus.Hold | None:
        event = decode_task_event(msg.subject, msg.data)
        tracing.bind_task(event.task_id)
        async with self.lock:
            if isinstance(event, TaskSubmitted):
                result = await self.submitted(event, msg)
            else:
                result = None
                if isinstance(event, TaskCancelled):
                    await self.cancel(event.task_id)
                if isinstance(event, (TaskStarted, TaskCommitted, NodeErrored)):
                    self.accepting.pop((event.task_id, event.node_id), None)
                if isinstance(event, (TaskCommitted, NodeErrored)):
                    self.release(event.task_id, [event.node_id])
                elif isinstance(event, (TaskSucceeded, TaskAborted, TaskCancelled)):
                    self.release(event.task_id, None)
                    self.forget(event.task_id)
            await self.pump()
        return result

    async def submitted(self, event: TaskSubmitted, msg: Msg) -> bus.Hold | None:
        if event.task_id in self.queue:  # redelivered while still queued: keep the newest message
            queued = self.queue[event.task_id]
            if queued.msg is not None and queued.msg is not msg:
                self.held.forget(queued.msg)
            queued.msg = msg
            return self.held.hold(msg)
        if event.task_id in self.running:  # a second `submitted` for a task this process assigned
            assigned = await self.previous_assignment(event.task_id)
            if assigned is not None:
                await self.send_work(event, assigned)  # the same work again; message ids deduplicate it
            return None
        if msg.metadata.num_delivered > 1:  # a redelivery: an earlier dispatcher may have acted on it
            assigned = await self.previous_assignment(event.task_id)
            if assigned is not None:  # hand out the same work again
                await self.send_work(event, assigned)
                return None
            if await self.ended(event.task_id):
                return None  # cancelled (or aborted) before it was dispatched
        if self.index.registered_serving(event.spec.model_name) == 0 and self.index.size:
            await self.abort(event.task_id, "unservable", f"no registered node serves {event.spec.model_name!r}")
            self.dispatched.labels("unservable").inc()
            return None
        self.queue[event.task_id] = Queued(
            event=event, msg=msg, estimate_s=estimate_seconds(event.spec, self.settings.seconds_per_step)
        )
        self.traces[event.task_id] = tracing.carrier()  # the assignment continues this trace
        await self.maybe_prefetch(event.spec)
        return self.held.hold(msg)

    async def maybe_prefetch(self, spec: TaskSpec) -> None:
        """Ask live nodes to fetch a wanted model that too few of them hold."""
        now = time.time()
        settings = self.settings
        if len(self.demand) > 10_000:  # forget models nobody asked for lately
            self.demand = {
                ref: seen for ref, seen in self.demand.items() if now - seen[-1] <= settings.prefetch_window_s
            }
        for ref, kind in task_models(spec).items():
            if "/" not in ref:
                continue  # a bare name is a model an operator configures, not something to download
            seen = self.demand.setdefault(ref, deque())
            seen.append(now)
            while now - seen[0] > settings.prefetch_window_s:
                seen.popleft()
            if (
                len(seen) < settings.prefetch_demand
                or now - self.prefetched.get(ref, 0.0) < settings.prefetch_cooldown_s
            ):
                continue
            holders = self.index.holders(ref, now, settings.node_ttl_s)
            missing = settings.replication - len(holders)
            candidates = np.setdiff1d(self.index.live_rows(now, settings.node_ttl_s), holders)
            if missing <= 0 or not len(candidates):
                continue
            self.prefetched[ref] = now
            chosen = [self.index.ids[row] for row in self.rng.choice(candidates, min(missing, len(candidates)), False)]
            request = PrefetchRequest(ref=ref, kind=kind)
            round_id = int(now // settings.prefetch_cooldown_s)
            for node_id in chosen:
                await bus.publish_control(self.js, node_id, request, round_id=round_id)
            self.dispatched.labels("prefetch").inc(len(chosen))
            log.info("prefetch_requested", ref=ref, nodes=chosen, holders=len(holders))

    async def cancel(self, task_id: str) -> None:
        queued = self.queue.pop(task_id, None)
        if queued is not None:
            await self._ack(queued)
        nodes = self.members.get(task_id)
        if nodes is None and queued is None:  # not assigned by this process: ask the stream
            assigned = await self.previous_assignment(task_id)
            nodes = assigned.nodes if assigned else []
        for node_id in nodes or []:
            cancel = CancelWork(task_id=task_id)
            await bus.publish_control(self.js, node_id, cancel)
        self.dispatched.labels("cancelled").inc()
        log.info("task_cancelled", nodes=nodes or [], was_queued=queued is not None)

    def forget(self, task_id: str) -> None:
        self.running.pop(task_id, None)
        self.traces.pop(task_id, None)
        for node in self.members.pop(task_id, []):
            self.accepting.pop((task_id, node), None)

    async def replace_silent_nodes(self) -> None:
        """Replace each node that has not started its assignment in time."""
        now = time.time()
        overdue = [key for key, at in self.accepting.items() if now - at > self.settings.accept_timeout_s]
        for task_id, node in overdue:
            self.accepting.pop((task_id, node), None)
            event = self.running.get(task_id)
            members = self.members.get(task_id, [])
            if event is None or len(members) - self.settings.replication >= self.settings.max_reassignments:
                continue  # the validator's commit deadline takes it from here
            with tracing.task_span("dispatch.replace", task_id=task_id, node_id=node, parent=self.traces.get(task_id)):
                await self._replace(task_id, node, event, members, now)

    async def _replace(self, task_id: str, node: str, event: TaskSubmitted, members: list[str], now: float) -> None:
        """Replace `node` in `task_id` by a node of another operator (in the task's trace)."""
        try:
            (by,) = self.index.pick(
                event.spec,
                1,
                self.rng,
                now=now,
                ttl_s=self.settings.node_ttl_s,
                req=self.requirements(event.spec),
                exclude=members,  # the replaced node and its operator too
            )
        except NotEnoughNodes as exc:
            log.warning("no_replacement", task_id=task_id, node_id=node, detail=exc.message)
            return
        deadline = now + self.settings.task_timeout_s
        reassigned = TaskReassigned(task_id=task_id, replaced=node, by=by, deadline=deadline)
        await bus.publish_event(self.js, reassigned)
        members.append(by)
        self.release(task_id, [node])
        self.index.assigned([by])
        self.inflight.setdefault(task_id, set()).add(by)
        self.accepting[(task_id, by)] = now
        work = Assignment(task_id=task_id, spec=event.spec, deadline=deadline)
        await bus.publish_work(self.js, by, work)
        await bus.publish_control(self.js, node, CancelWork(task_id=task_id))
        self.dispatched.labels("reassigned").inc()
        log.warning("node_replaced", task_id=task_id, replaced=node, by=by)

    def release(self, task_id: str, nodes: list[str] | None) -> None:
        holding = self.inflight.get(task_id)
        if not holding:
            return
        freed = holding if nodes is None else holding & set(nodes)
        self.index.assigned(freed, -1)
        holding -= freed
        if not holding:
            del self.inflight[task_id]

    # ------------------------------------------------------------------ the queue

    def requirements(self, spec: TaskSpec) -> Requirements:
        return Requirements(
            min_stake=self.settings.min_stake,
            memory_bytes=self.memory.get(spec.model_name, 0),
            slots=self.settings.node_slots,
            version=__version__,
        )

    async def pump(self) -> None:
        """Assign queued tasks, best first, while nodes are free."""
        now = time.time()
        blocked: set[str] = set()  # models with no free nodes in this pass
        for queued in sorted(self.queue.values()):
            event = queued.event
            model = event.spec.model_name
            waited = now - event.submitted_at
            if model in blocked and waited < self.settings.dispatch_timeout_s:
                continue
            started = time.perf_counter()
            try:
                nodes = self.index.pick(
                    event.spec,
                    self.settings.replication,
                    self.rng,
                    now=now,
                    ttl_s=self.settings.node_ttl_s,
                    req=self.requirements(event.spec),
                )
            except NotEnoughNodes as exc:
                blocked.add(model)
                if waited >= self.settings.dispatch_timeout_s:
                    del self.queue[event.task_id]
                    with tracing.task_span(
                        "dispatch.abort", task_id=event.task_id, parent=self.traces.get(event.task_id)
                    ):
                        await self.abort(event.task_id, "no_nodes", exc.message)
                        await self._ack(queued)
                    self.dispatched.labels("no_nodes").inc()
                continue
            finally:
                self.decision_seconds.observe(time.perf_counter() - started)
            with tracing.task_span(
                "dispatch.assign", task_id=event.task_id, parent=self.traces.get(event.task_id), queue_wait_s=waited
            ):
                await self._assign(queued, nodes, now)
        self.queue_depth.set(len(self.queue))

    async def _assign(self, queued: Queued, nodes: list[str], now: float) -> None:
        """Publish the assignment and the nodes' work (in the task's trace: see `traces`)."""
        event = queued.event
        assigned = TaskAssigned(task_id=event.task_id, nodes=nodes, deadline=time.time() + self.settings.task_timeout_s)
        await bus.publish_event(self.js, assigned)
        del self.queue[event.task_id]
        self.index.assigned(nodes)
        self.inflight[event.task_id] = set(nodes)
        self.running[event.task_id] = event
        self.members[event.task_id] = list(nodes)
        for node in nodes:
            self.accepting[(event.task_id, node)] = now
        await self.send_work(event, assigned)
        await self._ack(queued)
        self.dispatched.labels("assigned").inc()
        self.wait_seconds.observe(max(0.0, time.time() - event.submitted_at))
        log.info("task_assigned", task_id=event.task_id, nodes=nodes)

    async def _ack(self, queued: Queued) -> None:
        """The queued task is done with (assigned, aborted, cancelled): its `submitted`
        message is acknowledged (a failed ack: the redelivery finds the task assigned or ended)."""
        if queued.msg is not None:
            await self.held.settle(queued.msg)

    async def keep_alive(self, stop: asyncio.Event, every_s: float = 0.5) -> None:
        """Pump on a clock (nodes free up, time out, join); the held `submitted` messages
        are kept alive by `self.held` meanwhile."""
        touching = asyncio.create_task(self.held.keep_alive(stop))
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), every_s)
                except TimeoutError:
                    pass
                async with self.lock:
                    await self.replace_silent_nodes()
                    await self.pump()
        finally:
            touching.cancel()
            await asyncio.gather(touching, return_exceptions=True)

    def status(self, task_id: str) -> QueueStatus:
        """Where a task stands in the queue: position among the tasks that compete for
        the same nodes (same base model), and an ETA from the estimates ahead of it."""
        queued = self.queue.get(task_id)
        if queued is None:
            return QueueStatus(task_id=task_id, queued=False)
        model = queued.event.spec.model_name
        ahead = [q for q in sorted(self.queue.values()) if q.event.spec.model_name == model]
        position = next(i for i, q in enumerate(ahead) if q.event.task_id == task_id)
        now = time.time()
        ttl = self.settings.node_ttl_s
        live = self.index.serves.get(model)
        n = self.index.size
        serving = 0
        if live is not None:
            serving = int((live[:n] & ~self.index.quit[:n] & (now - self.index.last_seen[:n] <= ttl)).sum())
        lanes = max(1, serving // self.settings.replication)
        wait = sum(q.estimate_s for q in ahead[:position]) / lanes
        return QueueStatus(
            task_id=task_id,
            queued=True,
            position=position,
            queue_length=len(self.queue),
            eta_s=round(wait + queued.estimate_s, 3),
        )

    # ------------------------------------------------------------------ helpers

    async def previous_assignment(self, task_id: str) -> TaskAssigned | None:
        try:
            raw = await self.js.get_last_msg(subjects.TASKS_STREAM, subjects.task_subject(task_id, "assigned"))
        except NotFoundError:
            return None
        event = decode_task_event(raw.subject, raw.data)
        return event if isinstance(event, TaskAssigned) else None

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

    async def abort(self, task_id: str, reason: str, detail: str) -> None:
        aborted = TaskAborted(task_id=task_id, reason=reason, detail=detail)
        await bus.publish_event(self.js, aborted)
        log.warning("task_aborted", reason=reason, detail=detail)


async def follow_nodes(js: JetStreamContext, index: NodeIndex, catch_up_s: float = 10.0) -> object:
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


async def follow_stakes(ctx: ServiceContext, index: NodeIndex, settings: DispatcherSettings) -> asyncio.Task[None]:
    """Fold the chain-indexer's `stakes` bucket into `index` (what is there now, then changes)."""
    kv = await ctx.js.create_key_value(
        KeyValueConfig(bucket=subjects.STAKES_BUCKET, history=1, replicas=settings.stream_replicas)
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


async def run(settings: DispatcherSettings) -> None:
    setup_logging("dispatcher", level=settings.log_level, fmt=settings.log_format)
    async with open_service("dispatcher", settings) as ctx:
        await serve(ctx, settings)


async def serve(ctx: ServiceContext, settings: DispatcherSettings) -> None:
    if not 0 <= settings.max_reassignments <= subjects.MAX_MSGS_PER_TASK_SUBJECT:
        raise InvalidSettings(
            f"STIPPLE_MAX_REASSIGNMENTS={settings.max_reassignments}: from 0 to {subjects.MAX_MSGS_PER_TASK_SUBJECT} "
            "(the messages a task subject holds)"
        )
    index = NodeIndex()
    stakes_watch = await follow_stakes(ctx, index, settings)
    nodes_sub = await follow_nodes(ctx.js, index)
    dispatcher = Dispatcher(ctx.js, index, settings, ctx.metrics)

    async def on_status(msg: Msg) -> None:
        task_id = msg.data.decode(errors="replace")
        await msg.respond(msgspec.json.encode(dispatcher.status(task_id)))

    status_sub = await ctx.nc.subscribe(subjects.QUEUE_STATUS, queue="dispatcher", cb=on_status)
    clock = asyncio.create_task(dispatcher.keep_alive(ctx.stop))
    log.info("dispatcher_started", replication=settings.replication, nodes=index.size)
    try:
        await ctx.consume(subjects.TASKS_STREAM, subjects.dispatcher_consumer(), dispatcher.handle, batch=64)
    finally:
        await clock
        await status_sub.unsubscribe()
        await nodes_sub.unsubscribe()  # type: ignore[attr-defined]
        stakes_watch.cancel()
