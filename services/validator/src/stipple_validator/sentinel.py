"""The sentinel: a node that keeps sending what it has no business sending is banned.

NATS has no per-client rate limit, and a node may publish on its own subjects for any task
id (permissions cannot name the tasks it is assigned to). What it sends is checked where
it is read: an event whose payload disagrees with its subject is `Rejected`, an event
for a task that does not exist or that the node is not assigned to is refused by the
fold. Each of these is a *strike* against the node named by the subject. An honest node
never earns one: it speaks only of tasks it was given, on its own subjects (a late answer
to a task it was replaced in, or one decided without it, is not a strike).

`strikes` strikes within `window_s` ban the node for `ban_s`: a `Ban` in the `bans` KV
bucket (the gatekeeper refuses it at connect and closes its connections) and a
``nodes.<id>.banned`` event (the dispatcher stops picking it). A ban ends by itself.

A ban that begins within `memory_s` of the end of the node's last one lasts twice as long
as that one, up to `max_ban_s`: a node that floods again as soon as it may (each flood
stores what it sent, at full speed, until the ban lands) gets one burst an hour, then one
in two hours, four, ... rather than 24 a day. The count lives in the `Ban` record, so it
holds across validator restarts and replicas.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from stipple_common import bus, records
from stipple_common.identity import is_node_id
from stipple_common.messages import Ban, NodeBanned, ban_decoder

if TYPE_CHECKING:
    from .metrics import SentinelMetrics

log = structlog.get_logger("stipple.validator.sentinel")

REASONS = (
    "bad_subject",
    "undecodable",
    "type_mismatch",
    "task_mismatch",
    "node_mismatch",
    "unknown_task",
    "not_assigned",
)


class Sentinel:
    def __init__(
        self,
        js: JetStreamContext,
        bans: KeyValue,
        metrics: SentinelMetrics,
        *,
        strikes: int,
        window_s: float,
        ban_s: float,
        memory_s: float = 7 * 24 * 3600.0,
        max_ban_s: float = 30 * 24 * 3600.0,
    ) -> None:
        self.js = js
        self.bans = bans
        self.limit = strikes
        self.window_s = window_s
        self.ban_s = ban_s
        self.memory_s = memory_s
        self.max_ban_s = max(ban_s, max_ban_s)
        self.recent: dict[str, deque[float]] = {}
        self.banned_until: dict[str, float] = {}
        self.metrics = metrics

    async def strike(self, node_id: str, reason: str, detail: str, *, share: float = 1.0) -> bool:
        """Count a strike against `node_id`; returns True when it banned the node.

        `share`: the part of the node's messages this replica sees (a partitioned validator
        sees only its partitions' task events). The ban comes after ceil(strikes * share) of
        them here, so that spread over the replicas a node still gets at most about
        `strikes` refused messages in all before some replica bans it."""
        if not is_node_id(node_id):  # a control-plane subject: nobody to blame
            return False
        limit = max(1, math.ceil(self.limit * min(1.0, max(0.0, share))))
        now = time.time()
        self.metrics.strikes.labels(reason).inc()
        window = self.recent.setdefault(node_id, deque())
        window.append(now)
        while window and now - window[0] > self.window_s:
            window.popleft()
        if len(self.recent) > 100_000:  # forget the quiet ones
            self.recent = {node: w for node, w in self.recent.items() if w and now - w[-1] <= self.window_s}
        if len(window) < limit or self.banned_until.get(node_id, 0.0) > now:
            return False
        last = await self._last_ban(node_id)
        if last is not None and last.until > now:  # another replica (or this one before a restart) banned it
            self.banned_until[node_id] = last.until
            window.clear()
            return False
        count = last.count + 1 if last is not None and now - last.until <= self.memory_s else 1
        until = now + min(self.max_ban_s, self.ban_s * 2.0 ** min(count - 1, 64))
        text = f"{len(window)} refused messages within {self.window_s:g} s; the last: {reason}: {detail[:300]}"
        if count > 1:
            text += f" (ban {count} in a row: {until - now:g} s)"
        ban = Ban(reason=reason, detail=text, until=until, at=now, count=count)
        await self.bans.put(node_id, msgspec.json.encode(ban))
        event = NodeBanned(node_id=node_id, reason=reason, detail=text, until=until, at=now)
        await bus.publish_event(self.js, event)
        self.banned_until[node_id] = until
        window.clear()
        self.metrics.bans.labels(reason).inc()
        log.warning("node_banned", node_id=node_id, reason=reason, until=until, count=count, detail=text)
        return True

    async def _last_ban(self, node_id: str) -> Ban | None:
        """The node's last ban, ended or not (None when it has none, or a record this code
        did not write: its count starts again)."""
        try:
            return await records.get(self.bans, node_id, ban_decoder)
        except msgspec.DecodeError:
            return None
