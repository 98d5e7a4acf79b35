"""The latest step progress per (task, node), for ``GET /v1/tasks/{id}``.

Nodes publish `Progress` on core NATS ``progress.<task_id>.<node_id>`` (lossy by design).
Every gateway keeps the last one per node in memory, bounded: a finished task (its
outcome seen on ``tasks.*.<outcome>``) is dropped, and beyond `max_tasks` tasks the least
recently updated goes first. A gateway that starts late simply knows no progress for the
steps it missed.

Any node may publish on its own progress subject for any task id (permissions cannot
name its tasks), so progress is kept only from a node the task is assigned to, as the
``assigned`` and ``reassigned`` events this gateway saw say: made-up task ids and
strangers take no room, and cannot push real tasks' progress out.

It also estimates when each node's last step comes (`etas`): from the node's step rate
as this gateway saw its progress arrive (steps since its first message here, over the
time between), so a gateway that starts late still estimates after two messages. It is
the node's own account of its pace, shown as such, like the steps themselves.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from nats.aio.client import Client as NATS

from stipple_common import subjects
from stipple_common.errors import Rejected
from stipple_common.messages import (
    OUTCOME_EVENTS,
    Progress,
    TaskAssigned,
    TaskExtended,
    TaskReassigned,
    decode_progress,
    decode_task_event,
)

log = structlog.get_logger("stipple.gateway")

MAX_NODES_PER_TASK = 16  # a task has `replication` nodes, more when escalated; this only bounds a misbehaving publisher


@dataclass
class _Seen:
    """A node's latest progress in a task, and when this gateway saw its first and latest."""

    progress: Progress
    first_step: int
    first_at: float
    last_at: float


class ProgressBoard:
    def __init__(self, max_tasks: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_tasks = max(1, max_tasks)
        self.clock = clock
        self._tasks: OrderedDict[str, dict[str, _Seen]] = OrderedDict()
        self._finished: OrderedDict[str, None] = OrderedDict()  # late progress of these is ignored
        self._assigned: OrderedDict[str, set[str]] = OrderedDict()  # task -> the nodes it was given to
        self.refused = 0  # progress from a node not assigned to the task (or for an unknown task)

    def __len__(self) -> int:
        return len(self._tasks)

    def assign(self, task_id: str, nodes: Iterable[str]) -> None:
        """The task was given to `nodes` (its ``assigned`` event, or a ``reassigned`` one)."""
        if task_id in self._finished:
            return
        self._assigned.setdefault(task_id, set()).update(nodes)
        self._assigned.move_to_end(task_id)
        while len(self._assigned) > self.max_tasks:
            self._assigned.popitem(last=False)

    def update(self, progress: Progress) -> None:
        if progress.task_id in self._finished:
            return
        if progress.node_id not in self._assigned.get(progress.task_id, ()):
            self.refused += 1
            return
        nodes = self._tasks.get(progress.task_id)
        if nodes is None:
            nodes = self._tasks[progress.task_id] = {}
            while len(self._tasks) > self.max_tasks:
                self._tasks.popitem(last=False)
        else:
            self._tasks.move_to_end(progress.task_id)
        now = self.clock()
        seen = nodes.get(progress.node_id)
        if seen is not None:
            seen.progress, seen.last_at = progress, now
        elif len(nodes) < MAX_NODES_PER_TASK:
            nodes[progress.node_id] = _Seen(progress, progress.step, now, now)

    def finish(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)
        self._assigned.pop(task_id, None)
        self._finished[task_id] = None
        self._finished.move_to_end(task_id)
        while len(self._finished) > self.max_tasks:
            self._finished.popitem(last=False)

    def of(self, task_id: str, nodes: Iterable[str]) -> dict[str, Progress]:
        """node id -> its latest progress in this task, for the task's `nodes` only (any
        node may publish progress on its own subject for any task: only an assigned
        node's is shown)."""
        assigned = set(nodes)
        return {node: seen.progress for node, seen in self._tasks.get(task_id, {}).items() if node in assigned}

    def etas(self, task_id: str, nodes: Iterable[str]) -> dict[str, float]:
        """node id -> estimated seconds until its last step, for the task's `nodes` whose
        rate is known (two progress messages with steps between them, seen here)."""
        assigned, now, out = set(nodes), self.clock(), {}
        for node, seen in self._tasks.get(task_id, {}).items():
            done, took = seen.progress.step - seen.first_step, seen.last_at - seen.first_at
            if node not in assigned or done <= 0 or took <= 0:
                continue
            left = max(0, seen.progress.total - seen.progress.step) * took / done
            out[node] = round(max(0.0, left - (now - seen.last_at)), 3)
        return out

    def furthest(self, task_id: str) -> Progress | None:
        """The progress of the assigned node furthest along in the task (None before its
        first step, and once it finished): what a one-job API such as A1111's shows."""
        nodes = self._tasks.get(task_id)
        if not nodes:
            return None
        return max((seen.progress for seen in nodes.values()), key=lambda p: p.step / p.total if p.total > 0 else 0.0)

    async def follow(self, nc: NATS) -> list[Any]:
        """Subscribe to every task's progress, assignments and outcome; returns the subscriptions."""

        async def on_assignment(msg: Any) -> None:
            try:
                event = decode_task_event(msg.subject, msg.data)
            except Rejected as exc:
                log.debug("assignment_rejected", reason=exc.reason, error=exc.message)
                return
            if isinstance(event, TaskAssigned):
                self.assign(event.task_id, event.nodes)
            elif isinstance(event, TaskReassigned):
                self.assign(event.task_id, [event.by])
            elif isinstance(event, TaskExtended):
                self.assign(event.task_id, event.nodes)

        async def on_progress(msg: Any) -> None:
            try:
                self.update(decode_progress(msg.subject, msg.data))
            except Rejected as exc:
                log.debug("progress_rejected", reason=exc.reason, sender=exc.sender, error=exc.message)

        async def on_outcome(msg: Any) -> None:
            self.finish(subjects.subject_token(msg.subject, 1))

        subs = [
            await nc.subscribe(subjects.all_tasks("assigned"), cb=on_assignment),
            await nc.subscribe(subjects.all_tasks("reassigned"), cb=on_assignment),
            await nc.subscribe(subjects.all_tasks("extended"), cb=on_assignment),
            await nc.subscribe(subjects.ALL_PROGRESS, cb=on_progress),
        ]
        for event in OUTCOME_EVENTS:
            subs.append(await nc.subscribe(subjects.all_tasks(event), cb=on_outcome))
        return subs
