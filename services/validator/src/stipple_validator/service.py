"""Validator wiring: one durable consumer on every task event (``tasks.>``, or its
partition of them), in order.

The validator folds each task in memory as its events arrive (an LRU; a task it does not
hold, after a restart or an eviction, is rebuilt from the TASKS stream). The consumer
delivers every task event in stream order, so the fold of a task at a message holds
every event stored before it: a decision because everything is in needs no re-read.
A decision at a deadline does re-read the task from the stream, since the events it
lacks may be waiting behind the timer in the consumer. Then:

1. commit stage: when every node has committed (or errored), or the `assigned` event's
   deadline passes, it opens the reveal (`tasks.<id>.reveal`) for the nodes that
   committed and sends each a RevealRequest on its control subject; with too few
   commitments for a majority it decides at once.
2. reveal stage: when every committed node has revealed (or errored), or the reveal
   deadline passes, it reads back the stored images of every well-formed reveal and
   recomputes their SHA-256, size and pHash (blobcheck.py), then decides (decide.py)
   and publishes the outcome.
3. an outcome event (its own, or the gateway's `cancelled`) updates the QoS window of
   every node in the task (qos.py: KV bucket `qos`, idempotent per task) and publishes
   ``nodes.<id>.qos`` for the dispatcher. A node that this pauses gets a check to pass
   before it is dispatched again (probes.py).

Everything a node sends is believed only as far as its subject allows (decode_task_event);
a refused message, or an event for a task that does not exist or that the sender is not
assigned to, is a strike for the sentinel (sentinel.py), which bans a node that keeps
sending them.

Deadlines are timers on the event that set them (`assigned`, `extended`, `reveal`,
`escalated`): the validator holds that message unacknowledged (kept alive with
``+WPI``) and, at its deadline, takes the task as far as it can with whatever is in
(`Validator.timers`, at most one per task: a later deadline replaces an earlier one). A task
that ends first acks its held message; nothing comes back. Until stop 25 the message was
nak'ed with the delay instead, and came back from the server after the task had usually
ended: two redeliveries, two naks and two advisories per task, for nothing. The held
message is still the durable record of the timer: a validator that stops gives each back
with its remaining delay (a nak), one that is killed leaves it to come back after the
consumer's ack wait, and a partition given away gives its tasks' timers back within the
sweep's quiet time (`give_back_timers`), so the next holder folds and sweeps them. Two validators sharing
the consumer would each see part of a task's events and leave the decision to the
deadlines, so either one runs at a time (active/standby: STIPPLE_LEASE_S), or the task
events are partitioned by task id (STIPPLE_PARTITIONS > 1: the server copies TASKS into
VALIDATION, one consumer per partition) and every replica consumes the partitions whose
leases it holds (`serve_partitions`; docs/architecture.md, "Partitioned validator").
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamInfo
from nats.js.errors import BadRequestError, NotFoundError

from stipple_common import bus, checkpoints, subjects, tracing
from stipple_common.aggregate import InvalidTransition, Task, apply, replay
from stipple_common.blobstore import BlobStore
from stipple_common.blobstore.intake import MAX_BLOB_BYTES
from stipple_common.blobstore.jetstream import JetStreamBlobStore
from stipple_common.errors import JS_STREAM_CONFIG_MISMATCH, Rejected
from stipple_common.lease import DEFAULT_TTL_S, PartitionLeases, open_leases
from stipple_common.logs import setup_logging
from stipple_common.messages import (
    OUTCOME_EVENTS,
    SLASHABLE,
    RevealRequest,
    TaskAborted,
    TaskEscalated,
    TaskEvent,
    TaskRevealOpened,
    TaskSubmitted,
    TaskSucceeded,
    decode_task_event,
)
from stipple_common.nodes import NodeDirectory
from stipple_common.service import ServiceContext, open_service, serve_as_leader
from stipple_common.settings import CommonSettings, InvalidSettings

from .blobcheck import BlobChecker
from .copywatch import watch_copy
from .decide import candidates, decide, more_nodes, screen_all
from .metrics import ValidatorMetrics
from .probes import Prober
from .qos import PAUSE_TIMEOUTS, QosWindows, Sample, summary, unchanged
from .sentinel import Sentinel

log = structlog.get_logger("stipple.validator")

GIVEN_BACK_PER_S = 200  # timers of a partition given away, back to the next holder per second at most
TIMER_KEEPALIVE_S = 10.0  # a held timer message is kept alive this often (the consumer's ack wait: 30 s)

NO_SAMPLE = ("undecided", "cancelled")  # verdicts that say nothing about the node


class ValidatorSettings(CommonSettings, frozen=True, kw_only=True):
    phash_threshold: int = 6  # max Hamming distance (of 64 bits) for two images to count as the same
    deadline_grace_s: float = 0.5
    reveal_timeout_s: float = 10.0  # from the reveal opening to every committed node's reveal
    fold_cache: int = 100_000  # unfinished tasks kept folded in memory
    probe_every_s: float = 5.0  # how often a paused, live node is sent the check (probes.py)
    probe_timeout_s: float = 60.0  # how long a node has to answer it
    sentinel_strikes: int = 10  # refused messages from one node within sentinel_window_s that ban it (sentinel.py)
    sentinel_window_s: float = 60.0
    ban_s: float = 3600.0  # how long a first ban lasts
    ban_memory_s: float = 7 * 24 * 3600.0  # a ban begun within this of the last one's end lasts twice as long
    max_ban_s: float = 30 * 24 * 3600.0  # the longest a repeated ban grows
    max_blob_bytes: int = MAX_BLOB_BYTES  # a stored image larger than this is a bad result, and is not read
    blob_check_concurrency: int = 8  # stored images read and checked at a time, per decision
    # per checkpoint fraction (1/4, 1/2, 3/4), the largest relative L2 distance between the latent
    # summaries of two determinism classes that agrees; "": pHash alone. Twice the largest honest
    # distance measured (float16 against float32, threads, attention: bench/RESULTS.md, "Across
    # classes: latent summaries"); the nearest cheat (10 % fewer steps) is 3.8x over at 1/4
    latent_tolerance: str = "0.0085,0.06,0.06"
    # 1: one active validator (active/standby with STIPPLE_LEASE_S); 2 or more: task events
    # are split by task id into this many partitions (the VALIDATION stream), and every
    # replica is active, holding a fair share of the partitions' leases (lease.PartitionLeases,
    # ttl STIPPLE_LEASE_S or 10 s). Fixed for a network: the stream is made with it
    partitions: Annotated[int, msgspec.Meta(ge=1, le=subjects.MAX_PARTITIONS)] = 1
    max_task_nodes: int = 7  # no majority draws two more nodes while a task has had fewer than this (decide.py)
    escalation_timeout_s: float = 10.0  # from `escalated` to the dispatcher's `extended`; then decide with what is in
    # the reveal deadline moves by the time the bus was away while it was open (bus.weather),
    # plus this for nodes to reconnect and publish, up to max_reveal_extension_s in all
    bus_recovery_s: float = 5.0
    max_reveal_extension_s: float = 120.0
    # an open task quiet this long is checked against the stream and taken as far as its
    # timer would take it (a lost event or timer); 0: never
    sweep_quiet_s: float = 20.0
    sweep_every_s: float = 5.0
    # partitioned: when TASKS holds messages the server has not copied into VALIDATION for
    # this long (its source lost with TASKS's leader), VALIDATION's leader is asked to step
    # down, which restarts the copy at once (copywatch.py); 0: never
    copy_stall_s: float = 5.0


@dataclass
class _Timer:
    """A task's deadline: the message that set it, held until the task ends or it fires."""

    msg: Msg
    event_name: str
    seq: int  # the message's TASKS sequence
    due: float  # wall clock
    handle: asyncio.TimerHandle


@dataclass(frozen=True)
class _Folded:
    task: Task
    seq: int  # the last stream sequence folded in
    at: float = 0.0  # when (time.monotonic()) the fold last changed or was checked against the stream


class Validator:
    def __init__(
        self,
        js: JetStreamContext,
        directory: NodeDirectory,
        windows: QosWindows,
        prober: Prober,
        settings: ValidatorSettings,
        metrics: ValidatorMetrics,
        blobs: BlobStore,
        sentinel: Sentinel | None = None,
    ) -> None:
        self.js = js
        self.sentinel = sentinel
        self.directory = directory
        self.windows = windows
        self.prober = prober
        self.settings = settings
        self.tasks: OrderedDict[str, _Folded] = OrderedDict()  # the in-memory fold (LRU)
        self.requested: set[str] = set()  # tasks whose reveal requests this process sent
        # tasks that ended here, with their outcome's stream sequence: an event of a task that
        # ended (a deadline another replica gave back, a redelivery) needs no re-read
        self.ended: OrderedDict[str, int] = OrderedDict()
        self.share = 1.0  # the part of all task events this replica sees: its partitions / all of them
        self.timers: dict[str, _Timer] = {}  # task id -> its deadline (the held message that set it)
        self.held = bus.HeldMessages(keepalive_s=TIMER_KEEPALIVE_S, name="validator-timers")
        self._firing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one message or timer at a time: timers fire outside the consumer
        self.checker = BlobChecker(
            blobs,
            max_blob_bytes=settings.max_blob_bytes,
            concurrency=settings.blob_check_concurrency,
            metrics=metrics.blob_checks,
        )
        self.metrics = metrics
        self.tolerance = latent_tolerance(settings)
        metrics.paused_nodes.set_function(lambda: len(prober.paused))
        metrics.timers.set_function(lambda: len(self.timers))

    async def handle(self, msg: Msg) -> bus.Hold | None:
        if subjects.partition_of(msg.subject) < 0:
            seq = msg.metadata.sequence.stream
        else:  # a VALIDATION copy (partitioned): judged as the TASKS message it is
            seq = subjects.source_sequence(msg.headers)
            if not seq:  # only the server writes VALIDATION, and always with the header
                log.error("partition_message_without_source", subject=msg.subject)
                return None
            msg.subject = subjects.unpartitioned(msg.subject)
        task_id = subjects.subject_token(msg.subject, 1)
        event_name = subjects.subject_token(msg.subject, 2)
        tracing.bind_task(task_id)
        async with self._lock:
            result = await self.judge(task_id, event_name, msg, seq)
            return await self._arm(task_id, event_name, msg, seq, result)

    async def judge(self, task_id: str, event_name: str, msg: Msg, seq: int) -> bus.Redeliver | None:
        """Fold `msg` into its task and take the task as far as it goes now; a Redeliver
        says when to look at it again (its deadline)."""
        task = await self.fold(task_id, msg, seq)
        if task is None:
            return None
        if task.finished:
            if event_name in OUTCOME_EVENTS:
                await self.update_qos(task)
                self.tasks.pop(task_id, None)
                self.requested.discard(task_id)
                self._ended(task_id, seq)
                await self._disarm(task_id)
            return None
        if not task.nodes:
            return None
        return await self.advance(task_id, task, event_name)

    # ------------------------------------------------------------------ deadlines

    async def _arm(
        self, task_id: str, event_name: str, msg: Msg, seq: int, result: bus.Redeliver | None
    ) -> bus.Hold | None:
        """A Redeliver becomes the task's timer, holding `msg`. It replaces the task's
        earlier timer, if any, whose message is acked: judged at its own deadline, it would
        have found the later stage and been acked then."""
        if result is None:
            return None
        earlier = self.timers.pop(task_id, None)
        if earlier is not None:
            earlier.handle.cancel()
            if earlier.seq == seq:  # the same message again (redelivered): acking the old delivery would ack it
                self.held.forget(earlier.msg)
            else:
                await self.held.settle(earlier.msg)
        delay = max(result.delay, 0.0)
        handle = asyncio.get_running_loop().call_later(delay, self._fire_soon, task_id)
        self.timers[task_id] = _Timer(msg, event_name, seq, time.time() + delay, handle)
        return self.held.hold(msg)

    async def _disarm(self, task_id: str) -> None:
        """The task ended: its timer's message is done with."""
        timer = self.timers.pop(task_id, None)
        if timer is not None:
            timer.handle.cancel()
            await self.held.settle(timer.msg)

    def _fire_soon(self, task_id: str) -> None:
        firing = asyncio.create_task(self.fire(task_id), name=f"timer-{task_id}")
        self._firing.add(firing)
        firing.add_done_callback(self._firing.discard)

    async def fire(self, task_id: str) -> None:
        """A deadline: judge the task again by the message that set it, as its redelivery
        would have been judged; then ack that message, or hold it for the next deadline."""
        async with self._lock:
            timer = self.timers.pop(task_id, None)
            if timer is None:
                return  # ended or given back meanwhile
            with tracing.task_span("validator.deadline", task_id=task_id, event=timer.event_name):
                try:
                    result = await self.judge(task_id, timer.event_name, timer.msg, timer.seq)
                    held = await self._arm(task_id, timer.event_name, timer.msg, timer.seq, result)
                except Exception as exc:  # given back to JetStream, which delivers it again (bus.consume's table)
                    log.exception("deadline_failed", event=timer.event_name)
                    await self.held.settle(timer.msg, exc)
                    return
            if held is None:
                await self.held.settle(timer.msg)

    async def give_back_timers(self, partition: int | None = None) -> int:
        """Hand the held messages of the tasks' timers (of `partition`, or all) back to
        JetStream: what a replica does when it stops or gives a partition away. Returns how
        many.

        Unpartitioned, each comes again at its deadline (a nak with the time left): the next
        validator reads TASKS itself and misses none of the tasks' later events. Partitioned,
        they come again within `sweep_quiet_s` (spread evenly over it, or at their deadline
        if sooner; at most GIVEN_BACK_PER_S a second, each costing the next holder a read of
        the task), so that the next holder folds every open task it took over within that
        and its sweep covers them: the server's copy into VALIDATION is not trusted to carry
        every later event (measured: a task whose commitments never reached the next holder
        waited for its timer, 120 s, though its nodes had committed in 6)."""
        async with self._lock:
            count = self.settings.partitions
            mine = [t for t in self.timers if partition is None or subjects.partition_for(t, count) == partition]
            spread = None  # unpartitioned: each at its deadline
            if count > 1 and self.settings.sweep_quiet_s > 0:  # and no faster than the next holder rebuilds them
                spread = max(self.settings.sweep_quiet_s, len(mine) / GIVEN_BACK_PER_S)
            now = time.time()
            for i, task_id in enumerate(mine):
                timer = self.timers.pop(task_id)
                timer.handle.cancel()
                delay = timer.due - now
                if spread is not None:
                    delay = min(delay, spread * i / len(mine))
                await self.held.redeliver(timer.msg, max(delay, 0.0))
            return len(mine)

    async def advance(self, task_id: str, task: Task, event_name: str) -> bus.Redeliver | None:
        """Take an open task (with nodes) as far as `event_name` lets it go now: open the
        reveal, decide, escalate, or say when to look again (a timer)."""
        now = time.time()
        if task.status == "escalating":
            return await self.escalating(task, event_name, now)
        if task.status == "revealing":
            if event_name == "reveal" and task_id not in self.requested:  # after a restart: ask again
                await self.request_reveals(task)
            if task.reveals_in:  # the fold holds every event so far: nothing can be missing
                return await self.publish_outcome(task)
            due = self.reveal_due(task, now)
            if event_name == "reveal" and now >= due:  # events may still be queued
                return await self.publish_outcome(await self.verified(task_id))
            if event_name == "reveal":
                return bus.Redeliver(delay=due - now + self.settings.deadline_grace_s)
            return None
        assigning = event_name in ("assigned", "extended")  # an event whose deadline is the commitments'
        if task.commitments_in or (assigning and now >= (task.deadline or 0)):
            if not task.commitments_in:  # the deadline: commitments may still be queued behind it
                task = await self.verified(task_id)
                if task is None or task.finished or task.status in ("revealing", "escalating"):
                    return None
            committed = task.committed_nodes()
            revealed = sum(1 for run in task.nodes.values() if run.status == "revealed")  # in earlier rounds
            if not committed or (len(committed) + revealed) * 2 <= len(task.active):  # too few for a majority
                return await self.publish_outcome(task)
            opened = TaskRevealOpened(
                task_id=task_id, nodes=committed, deadline=now + self.settings.reveal_timeout_s, round=task.round
            )
            with tracing.task_span("validator.open_reveal", task_id=task_id, committed=len(committed)):
                await bus.publish_event(self.js, opened)
                await self.request_reveals(apply(task, opened))  # at once: not after reading our own event back
        elif assigning:
            return bus.Redeliver(delay=(task.deadline or 0) - now + self.settings.deadline_grace_s)
        return None

    async def sweep(self, stop: asyncio.Event) -> None:
        """Every `sweep_every_s`, `sweep_once` (until `stop`); `sweep_quiet_s` 0 turns it off."""
        if self.settings.sweep_quiet_s <= 0:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.sweep_every_s)
            if stop.is_set():
                return
            try:
                await self.sweep_once()
            except Exception:  # the bus away (an election): the next sweep tries again
                log.exception("sweep_failed")

    async def sweep_once(self) -> int:
        """Check every open task that has been quiet for `sweep_quiet_s` (no event folded,
        not checked) against the stream, and take it as far as its timer would: a task whose
        events or timer the consumer lost (a message dropped while the cluster elected a
        leader) still opens its reveal and ends at its deadline. Costs one stream read per
        quiet task per `sweep_quiet_s`. Returns how many were checked."""
        quiet_since = time.monotonic() - self.settings.sweep_quiet_s
        checked = 0
        for task_id, folded in list(self.tasks.items()):
            if folded.task.finished or not folded.task.nodes or folded.at > quiet_since:
                continue  # (a task without nodes waits in the dispatcher's queue: its clock's)
            checked += 1
            async with self._lock:  # (as a message or a timer would: one at a time)
                task = await self.verified(task_id)  # refreshes the fold's time too
                if task is None:
                    self.tasks.pop(task_id, None)  # nothing stored (purged): nothing to decide
                    continue
                if task.finished or not task.nodes:
                    continue
                timer = {"revealing": "reveal", "escalating": "escalated"}.get(task.status, "assigned")
                await self.advance(task_id, task, timer)
        if checked:
            log.info("sweep_checked", tasks=checked)
        return checked

    def reveal_due(self, task: Task, now: float) -> float:
        """When the reveal stage is decided: its deadline, moved by the time this process
        found the bus away since the reveal opened (`bus.weather`: its own calls and the
        probe of the streams a reveal needs) and `bus_recovery_s` more, at most
        `max_reveal_extension_s` later. An election inside the window would otherwise turn
        honest nodes' reveals, stored late or not at all, into `withheld`, which is slashed."""
        deadline = task.reveal_deadline or 0.0
        away = bus.weather.away_seconds(deadline - self.settings.reveal_timeout_s, now)
        if away <= 0:
            return deadline
        return deadline + min(away + self.settings.bus_recovery_s, self.settings.max_reveal_extension_s)

    async def escalating(self, task: Task, event_name: str, now: float) -> bus.Redeliver | None:
        """The task waits for the dispatcher's `extended`: one without nodes (none could be
        drawn) decides with what is in, and so does the `escalated` event's deadline."""
        due = task.escalation_deadline or 0.0
        if event_name == "extended" or (event_name == "escalated" and now >= due):
            if event_name == "escalated":  # the `extended` may be queued behind the timer
                verified = await self.verified(task.task_id)
                if verified is None or verified.status != "escalating":
                    return None
                task = verified
            return await self.publish_outcome(task, final=True)
        if event_name == "escalated":
            return bus.Redeliver(delay=due - now + self.settings.deadline_grace_s)
        return None

    async def fold(self, task_id: str, msg: Msg, seq: int) -> Task | None:
        """The task after this message (`seq`: its TASKS sequence), from the in-memory fold.
        The consumer delivers every task event in stream order, so each first delivery
        extends the fold; a redelivery (a deadline timer, a retry) is already in it. A task
        not in memory (a restart, an eviction, a partition taken over) is rebuilt from the
        stream."""
        if seq <= self.ended.get(task_id, 0):
            return None  # a timer (or a retry) of a task that ended: its outcome is folded
        cached = self.tasks.get(task_id)
        if cached is not None and seq <= cached.seq:
            self.tasks.move_to_end(task_id)
            return cached.task
        event = decode_task_event(msg.subject, msg.data)
        sender = getattr(event, "node_id", "")
        if cached is None and not isinstance(event, TaskSubmitted):
            if sender and not await self._exists(task_id):  # junk: no read of the stream for it
                await self._strike(sender, "unknown_task", f"an event for task {task_id!r}, which does not exist")
                return None
            task = await self.verified(task_id)
            if sender and task is not None and sender not in task.nodes:
                await self._strike(sender, "not_assigned", f"an event for task {task_id}, not assigned to it")
            return task
        try:
            task = apply(cached.task if cached else None, event)
        except InvalidTransition as why:
            if cached is None:
                log.warning("event_rejected", event_type=type(event).__name__, why=why.message)
                return None
            # The fold may be behind the stream rather than the event wrong: a message given
            # back (its handler failed while the cluster elected a leader) comes again after
            # later ones, which then do not fit. The stream, folded in order, judges (and
            # logs what it sets aside); a node's bogus event costs one read, and a node has
            # few events per task (MAX_MSGS_PER_TASK_SUBJECT).
            verified = await self.verified(task_id)
            task = verified if verified is not None else cached.task
            if sender and sender not in task.nodes:
                await self._strike(sender, "not_assigned", why.message)
            return task
        self._remember(task_id, task, seq)
        return task

    async def _exists(self, task_id: str) -> bool:
        try:
            await self.js.get_last_msg(subjects.TASKS_STREAM, subjects.task_subject(task_id, "submitted"))
        except NotFoundError:
            return False
        return True

    async def _strike(self, node_id: str, reason: str, detail: str) -> None:
        if self.sentinel is not None:  # (seen here only for the partitions held: `share`)
            await self.sentinel.strike(node_id, reason, detail, share=self.share)

    async def on_rejected(self, exc: Rejected, msg: Msg) -> None:
        """A message the subject check refused (bus.consume): a strike against its sender."""
        await self._strike(exc.sender, exc.reason, exc.message)

    async def verified(self, task_id: str) -> Task | None:
        """The task folded from the stream itself: before a decision, and to rebuild."""
        msgs = await bus.read_messages(self.js, subjects.TASKS_STREAM, subjects.task_events(task_id))
        task, rejected = replay(_decoded(msgs))
        for event, why in rejected:
            log.warning("event_rejected", event_type=type(event).__name__, why=why.message)
        if task is not None and msgs:
            self._remember(task_id, task, msgs[-1].metadata.sequence.stream)
        return task

    def forget_partition(self, partition: int) -> int:
        """Drop the folds of the tasks of `partition` (given to another replica, which
        goes on with them: a fold kept here would miss its events). Returns how many."""
        count = self.settings.partitions
        gone = [task_id for task_id in self.tasks if subjects.partition_for(task_id, count) == partition]
        for task_id in gone:
            del self.tasks[task_id]
        self.requested = {t for t in self.requested if subjects.partition_for(t, count) != partition}
        return len(gone)

    def _ended(self, task_id: str, seq: int) -> None:
        self.ended[task_id] = seq
        self.ended.move_to_end(task_id)
        while len(self.ended) > self.settings.fold_cache:
            self.ended.popitem(last=False)

    def _remember(self, task_id: str, task: Task, seq: int) -> None:
        self.tasks[task_id] = _Folded(task, seq, time.monotonic())
        self.tasks.move_to_end(task_id)
        while len(self.tasks) > self.settings.fold_cache:
            self.tasks.popitem(last=False)

    async def request_reveals(self, task: Task) -> None:
        assert task.reveal_deadline is not None
        self.requested.add(task.task_id)
        request = RevealRequest(task_id=task.task_id, deadline=task.reveal_deadline)
        await asyncio.gather(*(bus.publish_control(self.js, node, request) for node in task.committed_nodes()))

    async def publish_outcome(self, task: Task | None, *, final: bool = False) -> bus.Redeliver | None:
        """Decide and publish the outcome; or, when no majority stands and the task may have
        more nodes (decide.more_nodes), escalate instead, unless this decision is `final`."""
        if task is None or task.finished or (task.status == "escalating" and not final):
            return None  # an escalated task is decided by its new nodes, or at the escalation's deadline
        addresses = {node: node for node in task.nodes}  # a node's id is its address (identity.py)
        classes = {node: entry.joined.determinism for node in task.nodes if (entry := self.directory.entries.get(node))}
        screens = screen_all(task, addresses, classes)
        results = candidates(screens)
        with tracing.task_span("validator.check_blobs", task_id=task.task_id, nodes=len(results)):
            checked = await self.checker.check(task, results)
        with tracing.task_span("validator.decide", task_id=task.task_id) as span:
            away = 0.0
            if task.reveal_deadline is not None:
                away = bus.weather.away_seconds(task.reveal_deadline - self.settings.reveal_timeout_s)
            outcome = decide(
                task,
                self.settings.phash_threshold,
                addresses,
                checked,
                classes,
                self.tolerance,
                bus_away_s=away,
                screens=screens,
            )
            more = 0 if final else more_nodes(task, outcome, self.settings.max_task_nodes)
            if more:
                span.set_attributes({"stipple.outcome": "escalated", "stipple.reason": outcome.reason})
                await self.escalate(task, more, outcome)
                return None
            kind = "aborted" if isinstance(outcome, TaskAborted) else "succeeded"
            span.set_attributes({"stipple.outcome": kind, "stipple.reason": outcome.reason})
            await bus.publish_event(self.js, outcome)
        self.metrics.outcomes.labels(kind, outcome.reason).inc()
        for verdict in outcome.verdicts.values():
            self.metrics.verdicts.labels(verdict).inc()
            if verdict in SLASHABLE:
                self.metrics.slashes.labels(verdict).inc()
        now = time.time()
        self.metrics.task_seconds.labels(kind).observe(max(0.0, now - task.submitted_at))
        if task.reveal_deadline is not None:
            opened = task.reveal_deadline - self.settings.reveal_timeout_s
            self.metrics.validation_seconds.observe(max(0.0, now - opened))
        for node_id, why in outcome.verdict_details.items():
            log.warning("result_rejected", node_id=node_id, verdict=outcome.verdicts[node_id], why=why)
        log.info("task_decided", outcome=kind, reason=outcome.reason, verdicts=outcome.verdicts)
        return None

    async def escalate(self, task: Task, more: int, undecided: TaskSucceeded | TaskAborted) -> None:
        """Ask the dispatcher for `more` nodes, of operators the task has not had."""
        detail = undecided.detail if isinstance(undecided, TaskAborted) else ""
        escalated = TaskEscalated(
            task_id=task.task_id,
            round=task.round + 1,
            more=more,
            exclude=list(task.nodes),
            deadline=time.time() + self.settings.escalation_timeout_s,
            detail=detail,
        )
        await bus.publish_event(self.js, escalated)
        self.metrics.outcomes.labels("escalated", undecided.reason).inc()
        log.warning("task_escalated", round=escalated.round, more=more, detail=detail)

    async def update_qos(self, task: Task) -> None:
        """Add this task's score to each node's window (once per task, even on redelivery);
        the nodes' windows are separate keys, updated at the same time."""
        await asyncio.gather(
            *(
                self._score(task.task_id, node_id, verdict, task.qos.get(node_id, 0))
                for node_id, verdict in task.verdicts.items()
                if verdict not in NO_SAMPLE
            )
        )

    async def _score(self, task_id: str, node_id: str, verdict: str, score: int) -> None:
        with tracing.task_span("validator.qos", task_id=task_id, node_id=node_id, verdict=verdict, score=score):
            await self._score_node(task_id, node_id, verdict, score)

    async def _score_node(self, task_id: str, node_id: str, verdict: str, score: int) -> None:
        added = await self.windows.add(node_id, Sample(task_id=task_id, score=score, verdict=verdict))
        if added is None:
            return  # already counted
        event = summary(node_id, added.window, task_id)
        if unchanged(added.before, event):
            # a full window of equal scores (a steady node): what `nodes.<id>.qos` holds
            # is still true, so the message and its three deliveries are saved
            self.metrics.qos_unchanged.inc()
        else:
            await bus.publish_event(self.js, event)
        paused = event.recent_timeouts >= PAUSE_TIMEOUTS
        self.prober.pause_changed(node_id, paused)
        if paused:
            log.warning("node_paused", node_id=node_id, recent_timeouts=event.recent_timeouts)


def _decoded(msgs: list[Msg]) -> list[TaskEvent]:
    events = []
    for m in msgs:
        try:
            events.append(decode_task_event(m.subject, m.data))
        except Rejected as exc:
            log.warning("event_ignored", reason=exc.reason, sender=exc.sender, error=exc.message)
    return events


async def run(settings: ValidatorSettings) -> None:
    setup_logging("validator", level=settings.log_level, fmt=settings.log_format)
    async with open_service("validator", settings, blobs=True) as ctx:
        if settings.partitions > 1:  # every replica active, on its share of the partitions
            await serve(ctx, settings)
        else:
            await serve_as_leader(ctx, "validator", settings, serve)  # STIPPLE_LEASE_S > 0: active/standby


def latent_tolerance(settings: ValidatorSettings) -> tuple[float, ...] | None:
    """`STIPPLE_LATENT_TOLERANCE`: one non-negative number per checkpoint fraction, or empty."""
    if not settings.latent_tolerance.strip():
        return None
    try:
        values = tuple(float(part) for part in settings.latent_tolerance.split(","))
    except ValueError:
        values = ()
    if len(values) != len(checkpoints.FRACTIONS) or not all(math.isfinite(v) and v >= 0 for v in values):
        raise InvalidSettings(
            f"STIPPLE_LATENT_TOLERANCE={settings.latent_tolerance!r}: expected {len(checkpoints.FRACTIONS)} "
            "non-negative numbers, one per checkpoint (after 1/4, 1/2 and 3/4 of the steps), comma-separated"
        )
    return values


def check_settings(settings: ValidatorSettings) -> None:
    """Each escalation round adds a `reveal` message to the task's subject, which holds
    MAX_MSGS_PER_TASK_SUBJECT: `max_task_nodes` must leave room for every round's. The
    latent tolerance must parse."""
    latent_tolerance(settings)
    rounds = max(0, settings.max_task_nodes - settings.replication) // 2
    if settings.max_task_nodes < settings.replication or rounds + 1 > subjects.MAX_MSGS_PER_TASK_SUBJECT:
        most = settings.replication + 2 * (subjects.MAX_MSGS_PER_TASK_SUBJECT - 1)
        raise InvalidSettings(
            f"STIPPLE_MAX_TASK_NODES={settings.max_task_nodes}: from STIPPLE_REPLICATION ({settings.replication}) "
            f"to {most} (each escalation round of two nodes is one more message on the task's reveal subject)"
        )


async def serve(ctx: ServiceContext, settings: ValidatorSettings) -> None:
    check_settings(settings)
    bans = await bus.key_value(
        ctx.js, KeyValueConfig(bucket=subjects.BANS_BUCKET, history=1, replicas=settings.stream_replicas)
    )
    metrics = ValidatorMetrics(ctx.metrics.registry)
    sentinel = Sentinel(
        ctx.js,
        bans,
        metrics.sentinel,
        strikes=settings.sentinel_strikes,
        window_s=settings.sentinel_window_s,
        ban_s=settings.ban_s,
        memory_s=settings.ban_memory_s,
        max_ban_s=settings.max_ban_s,
    )

    async def node_event_rejected(exc: Rejected) -> None:  # what a node said of itself, not believed
        ctx.metrics.rejected.labels(subjects.NODES_STREAM, exc.reason).inc()
        await sentinel.strike(exc.sender, exc.reason, exc.message)

    directory = NodeDirectory(ttl_s=settings.node_ttl_s)
    sub = await directory.follow(ctx.js, on_rejected=node_event_rejected)
    qos = await bus.key_value(
        ctx.js, KeyValueConfig(bucket=subjects.QOS_BUCKET, history=1, replicas=settings.stream_replicas)
    )
    windows = QosWindows(qos, on_conflict=metrics.qos_conflicts.inc)
    prober = Prober(ctx.js, directory, windows, every_s=settings.probe_every_s, timeout_s=settings.probe_timeout_s)
    await prober.rebuild()
    assert ctx.blobs is not None, "the validator reads the stored images: open_service(..., blobs=True)"
    validator = Validator(ctx.js, directory, windows, prober, settings, metrics, ctx.blobs, sentinel)
    metrics.partitions.set(settings.partitions)
    log.info("validator_started", threshold=settings.phash_threshold)
    probing = asyncio.create_task(prober.run(ctx.nc, ctx.stop))
    # the streams a reveal needs stored: the request (WORK), the reveal (TASKS), the images
    watched = [subjects.TASKS_STREAM, subjects.WORK_STREAM]
    if isinstance(ctx.blobs, JetStreamBlobStore):
        watched.append(f"OBJ_{ctx.blobs.bucket}")
    watching = asyncio.create_task(bus.watch_bus(ctx.js, watched, ctx.stop))
    sweeping = asyncio.create_task(validator.sweep(ctx.stop))
    keeping_alive = asyncio.create_task(validator.held.keep_alive(ctx.stop))  # the timers' held messages
    try:
        if settings.partitions > 1:
            await serve_partitions(ctx, settings, validator)
        else:
            consumer = subjects.validator_consumer()
            await ctx.consume(subjects.TASKS_STREAM, consumer, validator.handle, on_rejected=validator.on_rejected)
    finally:
        ctx.stop.set()
        try:
            given = await asyncio.wait_for(validator.give_back_timers(), 10.0)
            log.info("timers_given_back", timers=given)
        except Exception as exc:  # the bus gone: each held deadline comes back after the ack wait instead
            log.warning("timers_not_given_back", timers=len(validator.timers), error=repr(exc))
        await probing
        await watching
        await sweeping
        await keeping_alive
        await sub.unsubscribe()  # type: ignore[attr-defined]


async def ensure_validation_stream(js: JetStreamContext, settings: ValidatorSettings) -> None:
    """The VALIDATION stream with `settings.partitions` partitions, made when missing. A
    network whose single validator ran before starts the copy after what that validator
    acknowledged (its consumer's ack floor), so no task is judged twice or skipped; a new
    network copies TASKS from its start. A stream made with another partition count is
    refused: the count is fixed for a network (docs/operations.md)."""

    async def step() -> StreamInfo | None:  # (`bus.settling`: replicas that start together make it at once)
        try:
            return await js.stream_info(subjects.VALIDATION_STREAM)
        except NotFoundError:
            pass
        start = None
        with contextlib.suppress(NotFoundError):
            single = await js.consumer_info(subjects.TASKS_STREAM, subjects.VALIDATOR_DURABLE)
            start = single.ack_floor.stream_seq + 1 if single.ack_floor is not None else None
        config = subjects.validation_stream(settings.partitions, replicas=settings.stream_replicas, start_seq=start)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:  # another replica made it meanwhile (with its own start): check it
            if exc.err_code != JS_STREAM_CONFIG_MISMATCH:
                raise
            return await js.stream_info(subjects.VALIDATION_STREAM)
        log.info("validation_stream_made", partitions=settings.partitions, start_seq=start)
        return None

    info = await bus.settling(step, what=f"stream {subjects.VALIDATION_STREAM}")
    if info is None:
        return
    made_with = subjects.partitions_of(info.config)
    if made_with != settings.partitions:
        raise InvalidSettings(
            f"STIPPLE_PARTITIONS={settings.partitions}: the VALIDATION stream was made with {made_with} partitions; "
            "the count is fixed for a network (docs/operations.md, 'Partitioned validator')"
        )


async def serve_partitions(ctx: ServiceContext, settings: ValidatorSettings, validator: Validator) -> None:
    """Consume the partitions this replica holds the leases of, each with its own
    consumer, until the service stops; a partition given back (or lost) is stopped before
    its lease is released, and its tasks' folds are dropped."""
    await ensure_validation_stream(ctx.js, settings)
    kv = await open_leases(ctx.js, replicas=settings.stream_replicas)
    instance = settings.instance or socket.gethostname()
    leases = PartitionLeases(
        kv, subjects.VALIDATOR_DURABLE, instance, settings.partitions, ttl_s=settings.lease_s or DEFAULT_TTL_S
    )
    running: dict[int, tuple[asyncio.Event, asyncio.Task[None]]] = {}

    def held_changed() -> None:
        validator.metrics.partitions_held.set(len(running))
        validator.share = len(running) / settings.partitions

    async def gain(k: int) -> None:
        stop = asyncio.Event()
        config = subjects.validator_partition_consumer(k)
        consume = ctx.consume(
            subjects.VALIDATION_STREAM, config, validator.handle, on_rejected=validator.on_rejected, stop=stop
        )
        running[k] = (stop, asyncio.create_task(consume, name=f"partition-{k}"))
        held_changed()

    async def lose(k: int) -> None:
        stop, consuming = running.pop(k)
        stop.set()
        try:  # (bus.consume finishes the batch in hand, then returns within its fetch timeout)
            await asyncio.wait_for(consuming, 30.0)
        except Exception as exc:
            log.warning("partition_consumer_stopped_badly", partition=k, error=repr(exc))
        timers = await validator.give_back_timers(k)  # before the lease goes: the next holder gets them
        dropped = validator.forget_partition(k)
        held_changed()
        log.info("partition_stopped", partition=k, folds_dropped=dropped, timers_given_back=timers)

    keeping = asyncio.create_task(leases.run(ctx.stop, gain, lose), name="partition-leases")
    copying = asyncio.create_task(
        watch_copy(
            ctx.js,
            ctx.stop,
            lambda: 0 in running,  # one watcher: the holder of partition 0
            stall_s=settings.copy_stall_s,
            on_restart=validator.metrics.copy_restarts.inc,
        ),
        name="copy-watch",
    )
    try:
        while not keeping.done():
            failed = [
                consuming
                for _, consuming in running.values()
                if consuming.done() and not consuming.cancelled() and consuming.exception() is not None
            ]
            if failed:  # a consumer that failed past its supervision: the service ends (and restarts)
                ctx.stop.set()
                await keeping
                failed[0].result()
            watched = [keeping, *(consuming for _, consuming in running.values())]
            await asyncio.wait(watched, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        keeping.result()
    finally:
        ctx.stop.set()
        if not keeping.done():  # (cancelled: as a SIGKILL, nothing given back)
            keeping.cancel()
        for _, consuming in running.values():
            consuming.cancel()
        copying.cancel()
        await asyncio.gather(
            keeping, copying, *(consuming for _, consuming in running.values()), return_exceptions=True
        )
