"""Keeps the server's copy of TASKS into VALIDATION moving (the partitioned validator).

VALIDATION is a stream *source* of TASKS: the server that leads VALIDATION reads TASKS
through an internal consumer on the TASKS leader and stores each message again. When TASKS
loses its leader (a server killed, a rolling restart), that consumer goes with it, and
nats-server 2.15 sets up a new one only after a create request it sent into the election
has waited out its 30 s timeout, then after a backoff of 10 s more per failure, up to 2
minutes (`srcConsumerWaitTime`, `calculateRetryBackoff` in server/stream.go). Meanwhile
nothing reaches the partitioned validator: measured on a three-server cluster, every open
task stalled 30 to 45 s after one SIGKILL of the TASKS leader, and a CI run had a task
wait more than 120 s. The source's own `lag` in STREAM.INFO does not show it (it is
reported by the consumer that is gone: 0).

So every partitioned replica watches the copy (`watch_copy`, `CopyProgress`), and the
holder of partition 0 acts: when TASKS has stored
messages that VALIDATION has not taken in for `stall_s`, it asks VALIDATION's leader to
step down. The new leader sets the source up at once (a fresh source, no backoff), from
the last TASKS sequence it copied, so nothing is skipped and nothing copied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from stipple_common import bus, subjects

log = structlog.get_logger("stipple.validator.copywatch")

# a probe that got no answer (an election), or a stream not made yet: the next one tries again
UNANSWERED: tuple[type[Exception], ...] = (*bus.BUS_AWAY_OR_SLOW, NotFoundError)


@dataclass
class CopyProgress:
    """Whether the copy stalled, from successive (VALIDATION, TASKS) last sequences, each
    pair read in that order: VALIDATION first, so a TASKS message stored between the two
    reads is counted as newer than the copy, and is never taken for a stall once copied.

    Stalled: TASKS grew past what it held when VALIDATION last moved, and VALIDATION has
    not moved for `stall_s` since (or for twice as long after each restart that did not
    help, up to `most_s`). A healthy copy takes milliseconds, and takes every TASKS
    message (all are ``tasks.<id>.<event>...``; the source's filter is ``tasks.*.>``).
    Not seen: messages TASKS stored just before VALIDATION's last move, stuck, with
    nothing stored after them; the server's own retry still takes those."""

    stall_s: float
    most_s: float = 60.0  # the longest wait between restarts that did not help
    validation_seq: int = -1
    tasks_seq: int = 0  # TASKS's last sequence when VALIDATION was last seen moving
    behind_since: float | None = None
    restarts: int = 0  # restarts since VALIDATION last moved

    @property
    def patience_s(self) -> float:
        """`stall_s`, doubled for each restart that has not got the copy moving (TASKS with
        no leader for long: nothing to gain from stepping VALIDATION down every few seconds)."""
        return min(self.stall_s * 2.0**self.restarts, max(self.most_s, self.stall_s))

    def observe(self, validation_seq: int, tasks_seq: int, now: float) -> bool:
        if validation_seq != self.validation_seq:
            self.validation_seq, self.tasks_seq, self.behind_since, self.restarts = validation_seq, tasks_seq, None, 0
            return False
        if tasks_seq <= self.tasks_seq:
            return False  # nothing new to copy
        if self.behind_since is None:
            self.behind_since = now
        return now - self.behind_since >= self.patience_s

    def restarted(self, now: float) -> None:
        """The copy was restarted: its new leader gets the next patience before the next verdict."""
        self.behind_since = now
        self.restarts += 1


async def watch_copy(
    js: JetStreamContext,
    stop: asyncio.Event,
    watching: Callable[[], bool],
    *,
    stall_s: float,
    every_s: float = 1.0,
    on_restart: Callable[[], None] | None = None,
) -> None:
    """Until `stop`: read both streams' last sequences every `every_s`, and step
    VALIDATION's leader down when the copy stalled (`CopyProgress`) and `watching()` (this
    replica holds partition 0: one replica acts). A stream of one replica is left alone:
    its copy has no leader to lose. Errors (the bus away) are skipped: the next probe tries again. `stall_s` 0:
    returns at once (not watched)."""
    if stall_s <= 0:
        return
    progress = CopyProgress(stall_s=stall_s)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            return
        try:  # (read whether this replica acts or not: a replica that takes partition 0 over
            # during a stall, as happens in the elections that cause one, must know when it began)
            copy = await asyncio.wait_for(js.stream_info(subjects.VALIDATION_STREAM), every_s)
            tasks = await asyncio.wait_for(js.stream_info(subjects.TASKS_STREAM), every_s)
        except UNANSWERED:
            continue
        if not (copy.config.num_replicas or 1) > 1:
            return
        now = time.monotonic()
        if not progress.observe(copy.state.last_seq, tasks.state.last_seq, now) or not watching():
            continue
        behind = tasks.state.last_seq - progress.tasks_seq
        try:
            error = await bus.step_down_leader(js, subjects.VALIDATION_STREAM)
        except bus.BUS_AWAY_OR_SLOW as exc:
            error = repr(exc)
        log.warning(
            "validation_copy_stalled",
            stalled_s=round(now - (progress.behind_since or now), 1),
            tasks_behind=behind,
            leader=copy.cluster.leader if copy.cluster else None,
            stepped_down=not error,
            error=error or None,
        )
        progress.restarted(now)
        if on_restart is not None and not error:
            on_restart()
