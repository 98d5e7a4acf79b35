"""Validator wiring: one durable consumer on assigned/revealed/errored task events.

Each message makes the validator fold the task from the TASKS stream (stateless, so a
restart loses nothing). When every node has answered, it decides at once. The task's
deadline is kept without a timer: the `assigned` event is nak'ed with a delay until the
deadline, and its redelivery decides with whatever is in (missing nodes = timeout).
"""

from __future__ import annotations

import time

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import Counter

from stipple_common import bus, subjects
from stipple_common.aggregate import replay
from stipple_common.logs import setup_logging
from stipple_common.messages import TaskAborted, task_event_decoder
from stipple_common.metrics import Metrics
from stipple_common.service import ServiceContext, open_service
from stipple_common.settings import CommonSettings

from .decide import decide

log = structlog.get_logger("stipple.validator")


class ValidatorSettings(CommonSettings, frozen=True, kw_only=True):
    phash_threshold: int = 6  # max Hamming distance (of 64 bits) for two images to count as the same
    deadline_grace_s: float = 0.5


class Validator:
    def __init__(self, js: JetStreamContext, settings: ValidatorSettings, metrics: Metrics) -> None:
        self.js = js
        self.settings = settings
        self.outcomes = Counter(
            "stipple_validator_outcomes_total",
            "Tasks decided, by outcome and reason",
            ["outcome", "reason"],
            registry=metrics.registry,
        )
        self.verdicts = Counter(
            "stipple_validator_verdicts_total", "Per-node verdicts", ["verdict"], registry=metrics.registry
        )

    async def handle(self, msg: Msg) -> bus.Redeliver | None:
        task_id = subjects.subject_token(msg.subject, 1)
        event_name = subjects.subject_token(msg.subject, 2)
        structlog.contextvars.bind_contextvars(task_id=task_id)
        events = await bus.read_subject(
            self.js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder
        )
        task, rejected = replay(events)
        for event, why in rejected:
            log.warning("event_rejected", event=type(event).__name__, why=why.message)
        if task is None or task.finished or not task.nodes:
            return None
        if not task.results_in:
            if event_name != "assigned":
                return None  # the assigned event is the deadline timer
            remaining = (task.deadline or 0) - time.time()
            if remaining > 0:
                return bus.Redeliver(delay=remaining + self.settings.deadline_grace_s)
        outcome = decide(task, self.settings.phash_threshold)
        subject = subjects.task_subject(task_id, "aborted" if isinstance(outcome, TaskAborted) else "succeeded")
        await bus.publish(self.js, subject, outcome, msg_id=f"{task_id}:outcome")
        kind = "aborted" if isinstance(outcome, TaskAborted) else "succeeded"
        self.outcomes.labels(kind, outcome.reason).inc()
        for verdict in outcome.verdicts.values():
            self.verdicts.labels(verdict).inc()
        log.info("task_decided", outcome=kind, reason=outcome.reason, verdicts=outcome.verdicts)
        return None


def consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.VALIDATOR_DURABLE,
        filter_subjects=[subjects.all_tasks(e) for e in ("assigned", "revealed", "errored")],
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=50,
        max_ack_pending=20_000,
    )


async def run(settings: ValidatorSettings) -> None:
    setup_logging("validator", level=settings.log_level, fmt=settings.log_format)
    async with open_service("validator", settings) as ctx:
        await serve(ctx, settings)


async def serve(ctx: ServiceContext, settings: ValidatorSettings) -> None:
    validator = Validator(ctx.js, settings, ctx.metrics)
    log.info("validator_started", threshold=settings.phash_threshold)
    await ctx.consume(subjects.TASKS_STREAM, consumer_config(), validator.handle)
