"""Which nodes exist and which are alive: a projection of the NODES stream.

Nodes publish ``nodes.<id>.joined`` once and ``nodes.<id>.heartbeat`` every few seconds;
the validator publishes ``nodes.<id>.qos`` after each task. The stream keeps the last
message per subject, so replaying it from the start rebuilds the directory. A node is
live while its last heartbeat (stamped by the NATS server, so node clocks do not matter)
is younger than the TTL and it has not quit. Everything is keyed by the node id of the
subject (`messages.decode_node_event`): a node can speak only of itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig

from . import bus
from .errors import Rejected
from .messages import (
    NodeBanned,
    NodeEvent,
    NodeHeartbeat,
    NodeJoined,
    NodeQos,
    NodeQuit,
    decode_node_event,
)
from .records import IndexedStake, indexed_stake_decoder
from .subjects import NODES_STREAM, STAKES_BUCKET

log = structlog.get_logger("stipple.nodes")


@dataclass
class NodeEntry:
    joined: NodeJoined
    last_seen: float
    quit: bool = False
    qos: NodeQos | None = None
    busy: bool = False
    banned_until: float = 0.0


class NodeDirectory:
    """Folds node events; answers "which nodes are live now"."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.entries: dict[str, NodeEntry] = {}
        self._qos: dict[str, NodeQos] = {}
        self._bans: dict[str, float] = {}
        self.stakes: dict[str, IndexedStake] = {}  # node id -> the chain's word (follow_stakes)
        self._changed = asyncio.Event()
        self.caught_up = asyncio.Event()  # set once the stream's backlog has been folded

    def apply(self, event: NodeEvent, seen_at: float) -> None:
        entry = self.entries.get(event.node_id)
        if isinstance(event, NodeQos):
            self._qos[event.node_id] = event  # may come before the announcement in a replay
            if entry is not None:
                entry.qos = event
        elif isinstance(event, NodeBanned):
            self._bans[event.node_id] = event.until
            if entry is not None:
                entry.banned_until = event.until
        elif isinstance(event, NodeJoined):
            if entry is None or seen_at >= entry.last_seen:
                self.entries[event.node_id] = NodeEntry(
                    joined=event,
                    last_seen=seen_at,
                    qos=self._qos.get(event.node_id),
                    banned_until=self._bans.get(event.node_id, 0.0),
                )
        elif entry is None:
            return  # a heartbeat before (or without) an announcement tells us nothing usable
        elif isinstance(event, NodeHeartbeat):
            if seen_at >= entry.last_seen:
                entry.last_seen = seen_at
                entry.quit = False
                entry.busy = event.busy
        elif isinstance(event, NodeQuit):
            entry.quit = True
        self._changed.set()

    def address(self, node_id: str) -> str | None:
        entry = self.entries.get(node_id)
        return entry.joined.address if entry else None

    def operator(self, node_id: str) -> str:
        """Who runs the node: the owner of its stake, as the chain says (the node itself
        when it staked alone, or when the chain knows nothing of it)."""
        stake = self.stakes.get(node_id)
        return (stake.owner if stake and stake.owner else node_id).lower()

    def stake(self, node_id: str) -> int:
        stake = self.stakes.get(node_id)
        return 0 if stake is None or stake.leaving else stake.stake

    def live(self, now: float | None = None) -> list[NodeJoined]:
        """Nodes with a fresh heartbeat that have not quit and are not banned."""
        now = time.time() if now is None else now
        return [
            e.joined
            for e in self.entries.values()
            if not e.quit and now - e.last_seen <= self.ttl_s and e.banned_until <= now
        ]

    async def wait_for(self, count: int, timeout: float) -> list[NodeJoined]:
        """Wait until at least `count` nodes are live (used at start-up)."""
        deadline = time.monotonic() + timeout
        while len(self.live()) < count:
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        return self.live()

    async def follow_stakes(self, js: JetStreamContext, replicas: int = 1) -> asyncio.Task[None]:
        """Keep `stakes` from the chain-indexer's `stakes` bucket (created if missing)."""
        kv = await bus.key_value(js, KeyValueConfig(bucket=STAKES_BUCKET, history=1, replicas=replicas))
        watcher = await kv.watchall()

        async def fold() -> None:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self.stakes.pop(entry.key.lower(), None)
                    continue
                try:
                    self.stakes[entry.key.lower()] = indexed_stake_decoder.decode(entry.value)
                except Exception as exc:  # one bad record must not stop the watch
                    log.warning("bad_stake_entry", key=entry.key, error=str(exc))

        return asyncio.create_task(fold())

    async def follow(
        self,
        js: JetStreamContext,
        catch_up_s: float = 10.0,
        on_rejected: Callable[[Rejected], Awaitable[None]] | None = None,
    ) -> object:
        """Subscribe to the NODES stream from its start (last message per subject) and
        wait (up to `catch_up_s`) until the backlog is folded; returns the subscription.
        Later messages are folded as they arrive."""

        async def on_msg(msg: Msg) -> None:
            try:
                event = decode_node_event(msg.subject, msg.data)
            except Rejected as exc:
                log.warning("node_event_rejected", reason=exc.reason, sender=exc.sender, error=exc.message)
                if on_rejected is not None:
                    await on_rejected(exc)
            else:
                self.apply(event, msg.metadata.timestamp.timestamp())
            if msg.metadata.num_pending == 0:
                self.caught_up.set()

        info = await js.stream_info(NODES_STREAM)
        if info.state.messages == 0:
            self.caught_up.set()
        sub = await js.subscribe(
            "nodes.>",
            stream=NODES_STREAM,
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        try:
            await asyncio.wait_for(self.caught_up.wait(), catch_up_s)
        except TimeoutError:
            log.warning("nodes_backlog_not_folded", waited_s=catch_up_s)
        return sub
