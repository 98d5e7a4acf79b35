"""Dispatcher wiring: a durable consumer on ``tasks.*.submitted`` and ``tasks.*.cancelled``.

For each task: pick nodes, publish ``tasks.<id>.assigned``, then one Assignment per node
on ``work.<node_id>.task``. A cancelled task's nodes get a CancelWork on their control
subject, and a task cancelled before dispatch is never assigned. Idempotent: if the
task already has an assigned event (a redelivery after a crash), the same nodes get
the same assignments again and the message ids deduplicate them. Too few nodes: retry
for `dispatch_timeout_s`, then abort the task with reason no_nodes, so it never hangs.
"""

from __future__ import annotations

import random
import time

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from stipple_common import bus, subjects
from stipple_common.logs import setup_logging
from stipple_common.messages import (
    OUTCOME_EVENTS,
    Assignment,
    CancelWork,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskSubmitted,
    task_event_decoder,
)
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_common.service import ServiceContext, open_service
from stipple_common.settings import CommonSettings

from .selection import NotEnoughNodes, pick

log = structlog.get_logger("stipple.dispatcher")


class DispatcherSettings(CommonSettings, frozen=True, kw_only=True):
    replication: int = 3  # nodes per task
    task_timeout_s: float = 120.0  # from assignment to every node's result
    dispatch_timeout_s: float = 30.0  # how long a task may wait for enough live nodes
    node_ttl_s: float = 10.0  # a node without a heartbeat for this long is not live


class Dispatcher:
    def __init__(
        self,
        js: JetStreamContext,
        directory: NodeDirectory,
        settings: DispatcherSettings,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.js = js
        self.directory = directory
        self.settings = settings
        self.rng = rng or random.SystemRandom()
        self.dispatched = Counter(
            "stipple_dispatcher_tasks_total",
            "Tasks handled, by result (assigned, waiting, no_nodes)",
            ["result"],
            registry=metrics.registry,
        )

    async def previous_assignment(self, task_id: str) -> TaskAssigned | None:
        try:
            raw = await self.js.get_last_msg(subjects.TASKS_STREAM, subjects.task_subject(task_id, "assigned"))
        except NotFoundError:
            return None
        event = task_event_decoder.decode(raw.data)
        return event if isinstance(event, TaskAssigned) else None

    async def ended(self, task_id: str) -> bool:
        for name in OUTCOME_EVENTS:
            try:
                await self.js.get_last_msg(subjects.TASKS_STREAM, subjects.task_subject(task_id, name))
            except NotFoundError:
                continue
            return True
        return False

    async def cancel(self, task_id: str) -> None:
        assigned = await self.previous_assignment(task_id)
        for node_id in assigned.nodes if assigned else []:
            await bus.publish(
                self.js,
                subjects.control_subject(node_id),
                CancelWork(task_id=task_id),
                msg_id=f"{task_id}:{node_id}:cancel",
            )
        self.dispatched.labels("cancelled").inc()
        log.info("task_cancelled", nodes=assigned.nodes if assigned else [])

    async def handle(self, msg: Msg) -> bus.Redeliver | None:
        event = task_event_decoder.decode(msg.data)
        if isinstance(event, TaskCancelled):
            structlog.contextvars.bind_contextvars(task_id=event.task_id)
            await self.cancel(event.task_id)
            return None
        if not isinstance(event, TaskSubmitted):
            return None
        structlog.contextvars.bind_contextvars(task_id=event.task_id)
        assigned = await self.previous_assignment(event.task_id)
        if assigned is None and await self.ended(event.task_id):
            return None  # cancelled (or aborted) before it was dispatched
        if assigned is None:
            try:
                nodes = pick(self.directory.live(), event.spec, self.settings.replication, self.rng)
            except NotEnoughNodes as exc:
                waited = time.time() - event.submitted_at
                if waited < self.settings.dispatch_timeout_s:
                    self.dispatched.labels("waiting").inc()
                    return bus.Redeliver(delay=1.0)
                self.dispatched.labels("no_nodes").inc()
                aborted = TaskAborted(task_id=event.task_id, reason="no_nodes", detail=exc.message)
                await bus.publish(
                    self.js, subjects.task_subject(event.task_id, "aborted"), aborted, msg_id=f"{event.task_id}:outcome"
                )
                log.warning("task_aborted_no_nodes", detail=exc.message)
                return None
            assigned = TaskAssigned(
                task_id=event.task_id, nodes=nodes, deadline=time.time() + self.settings.task_timeout_s
            )
            await bus.publish(
                self.js,
                subjects.task_subject(event.task_id, "assigned"),
                assigned,
                msg_id=f"{event.task_id}:assigned",
            )
        work = Assignment(task_id=event.task_id, spec=event.spec, deadline=assigned.deadline)
        for node_id in assigned.nodes:
            await bus.publish(self.js, subjects.work_subject(node_id), work, msg_id=f"{event.task_id}:{node_id}:work")
        self.dispatched.labels("assigned").inc()
        log.info("task_assigned", nodes=assigned.nodes)
        return None


def consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.DISPATCHER_DURABLE,
        filter_subjects=[subjects.all_tasks("submitted"), subjects.all_tasks("cancelled")],
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=200,
        max_ack_pending=20_000,
    )


async def run(settings: DispatcherSettings) -> None:
    setup_logging("dispatcher", level=settings.log_level, fmt=settings.log_format)
    async with open_service("dispatcher", settings) as ctx:
        await serve(ctx, settings)


async def serve(ctx: ServiceContext, settings: DispatcherSettings) -> None:
    directory = NodeDirectory(ttl_s=settings.node_ttl_s)
    sub = await directory.follow(ctx.js)
    dispatcher = Dispatcher(ctx.js, directory, settings, ctx.metrics)
    log.info("dispatcher_started", replication=settings.replication)
    try:
        await ctx.consume(subjects.TASKS_STREAM, consumer_config(), dispatcher.handle)
    finally:
        await sub.unsubscribe()  # type: ignore[attr-defined]
