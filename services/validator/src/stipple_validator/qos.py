"""Each node's QoS window: its last 50 scored tasks in the KV bucket `qos` (one key per
node, written with compare-and-set so two writers never lose a sample), and what the
dispatcher reads from it (``nodes.<id>.qos``): the mean score and the timeouts among the
last 3 tasks since the node last passed a check (2 or more pause it).

A passed check (probes.py) adds a `cleared` marker to the window: it carries no score
and ends the run of timeouts that paused the node, so one good task after the check
does not pause it again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from stipple_common import records
from stipple_common.messages import NodeQos
from stipple_common.records import QosSample as Sample  # the window's record (records.py)

QOS_WINDOW = 50  # a node's QoS is the mean of its last 50 scored tasks
PAUSE_WINDOW = 3  # ... and 2 timeouts among its last 3 pause it
PAUSE_TIMEOUTS = 2
CLEARED = "cleared"  # the verdict of a passed check's marker


def recent_timeouts(window: list[Sample]) -> int:
    """Timeouts among the last `PAUSE_WINDOW` tasks after the last passed check."""
    since = window
    for i in range(len(window) - 1, -1, -1):
        if window[i].verdict == CLEARED:
            since = window[i + 1 :]
            break
    return sum(1 for s in since[-PAUSE_WINDOW:] if s.verdict == "timeout")


def summary(node_id: str, window: list[Sample], changed_by: str) -> NodeQos:
    scored = [s for s in window if s.verdict != CLEARED]
    return NodeQos(
        node_id=node_id,
        qos=sum(s.score for s in scored) / len(scored) if scored else 0.0,
        samples=len(scored),
        recent_timeouts=recent_timeouts(window),
        task_id=changed_by,
    )


def unchanged(before: list[Sample], now: NodeQos) -> bool:
    """Whether what the dispatcher reads of a node (its mean, its sample count, its recent
    timeouts) is in `now` as it was with the window `before` the sample: a full window of
    equal scores."""
    old = summary(now.node_id, before, "")
    return (old.qos, old.samples, old.recent_timeouts) == (now.qos, now.samples, now.recent_timeouts)


class Added(NamedTuple):
    window: list[Sample]  # with the sample
    before: list[Sample]  # as it was stored before it


KNOWN_WINDOWS = 100_000  # windows remembered with their revision, so the next add needs no read


class QosWindows:
    """The `qos` bucket: add a sample once per task (a redelivery adds nothing).

    Each window this process wrote is remembered with its revision, so the next sample of
    that node is one compare-and-set, not a read and a write. The compare-and-set keeps
    it exact: when another writer (a validator that held the lease before) changed the
    window since, the write is refused and the window is read again."""

    def __init__(self, kv: KeyValue, on_conflict: Callable[[], None] | None = None) -> None:
        self.kv = kv
        self.known: OrderedDict[str, tuple[list[Sample], int]] = OrderedDict()
        self.on_conflict = on_conflict  # told of each compare-and-set another writer beat (a read and a write more)

    async def add(self, node_id: str, sample: Sample) -> Added | None:
        """The window with `sample` added (and as it was before), or None when it holds
        that task already."""
        cached = self.known.get(node_id)  # a stale one fails the compare-and-set below
        while True:
            window, revision = cached if cached is not None else await self._read(node_id)
            if any(s.task_id == sample.task_id for s in window):  # stored already (a remembered window was)
                return None
            before, window = window, [*window, sample][-QOS_WINDOW:]
            data = records.encode(window)
            try:
                if revision is None:
                    revision = await self.kv.create(node_id, data)
                else:
                    revision = await self.kv.update(node_id, data, last=revision)
            except KeyWrongLastSequenceError:
                if self.on_conflict is not None:
                    self.on_conflict()
                cached = None  # another writer came first: read again
                continue
            self.known[node_id] = (window, revision)
            self.known.move_to_end(node_id)
            while len(self.known) > KNOWN_WINDOWS:
                self.known.popitem(last=False)
            return Added(window, before)

    async def paused(self) -> list[str]:
        """The nodes whose window pauses them now (to rebuild the prober at start)."""
        out = []
        for node_id in await records.keys(self.kv):
            window, _ = await self._read(node_id)
            if recent_timeouts(window) >= PAUSE_TIMEOUTS:
                out.append(node_id)
        return out

    async def _read(self, node_id: str) -> tuple[list[Sample], int | None]:
        try:
            entry = await self.kv.get(node_id)
        except KeyNotFoundError:
            return [], None
        return records.qos_window_decoder.decode(entry.value or b"[]"), entry.revision
