"""Who is admitted as a node: the chain's word (the `stakes` bucket the chain-indexer keeps
from NodeStaking's events) and the sentinel's bans, never what a node says.

`admit` is pure: a key is a node when it holds at least the minimum stake, has not asked
to unstake and is not banned; otherwise it is an applicant, with the reason. `Registry`
keeps the two buckets in memory (watched), so a connection is decided without I/O.
"""

from __future__ import annotations

import asyncio
import time
from typing import TypedDict

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from stipple_common import bus, records, subjects
from stipple_common.messages import JoinStatus
from stipple_common.records import Ban, IndexedStake

log = structlog.get_logger("stipple.gatekeeper.admission")


class _Common(TypedDict):
    """The fields every `admit` answer carries."""

    node_id: str
    stake: int
    min_stake: int
    owner: str


def admit(node_id: str, stake: IndexedStake | None, min_stake: int, ban: Ban | None, now: float) -> JoinStatus:
    """How `node_id` is admitted now, and why."""
    held = stake.stake if stake else 0
    common: _Common = {
        "node_id": node_id,
        "stake": held,
        "min_stake": min_stake,
        "owner": (stake.owner if stake else ""),
    }
    if ban is not None and ban.until > now:
        detail = f"banned until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(ban.until))}: {ban.detail}"
        return JoinStatus(level="applicant", reason="banned", detail=detail, banned_until=ban.until, **common)
    if stake is not None and stake.leaving:
        detail = "the stake is leaving (requestUnstake): a leaving node takes no tasks"
        return JoinStatus(level="applicant", reason="leaving", detail=detail, **common)
    if min_stake > 0 and held < min_stake:
        reason = "no_stake" if held == 0 else "below_minimum"
        detail = f"the address {node_id} stakes {held}; the network's minimum is {min_stake}"
        return JoinStatus(level="applicant", reason=reason, detail=detail, **common)
    return JoinStatus(level="node", reason="ok", **common)


class Registry:
    """The `stakes` and `bans` buckets (and the minimum stake from the chain-indexer's
    deployment record), folded into memory and kept current by KV watches."""

    def __init__(self, min_stake: int) -> None:
        self.default_min_stake = min_stake
        self.chain_min_stake: int | None = None
        self.stakes: dict[str, IndexedStake] = {}
        self.bans: dict[str, Ban] = {}
        self.changed: asyncio.Queue[str] = asyncio.Queue()  # node ids whose record changed (the enforcer reads)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def min_stake(self) -> int:
        return self.chain_min_stake if self.chain_min_stake is not None else self.default_min_stake

    def status(self, node_id: str, now: float | None = None) -> JoinStatus:
        now = time.time() if now is None else now
        return admit(node_id, self.stakes.get(node_id), self.min_stake, self.bans.get(node_id), now)

    async def follow(self, js: JetStreamContext, replicas: int, wait_s: float = 10.0) -> None:
        """Watch the buckets (created if missing); returns once their current values are in."""
        buckets = {}
        for name in (subjects.STAKES_BUCKET, subjects.BANS_BUCKET, subjects.CHAIN_BUCKET):
            buckets[name] = await bus.key_value(js, KeyValueConfig(bucket=name, history=1, replicas=replicas))
        ready = [asyncio.Event() for _ in buckets]
        for (name, kv), event in zip(buckets.items(), ready, strict=True):
            self._tasks.append(asyncio.create_task(self._watch(name, kv, event)))
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), wait_s)
        except TimeoutError:
            log.warning("registry_backlog_not_folded", waited_s=wait_s)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch(self, name: str, kv: KeyValue, ready: asyncio.Event) -> None:
        watcher = await kv.watchall()
        async for entry in watcher:
            if entry is None:  # the current values are all in
                ready.set()
                continue
            try:
                self._apply(name, entry.key, entry.value, entry.operation)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                log.warning("bad_registry_entry", bucket=name, key=entry.key, error=str(exc))

    def _apply(self, bucket: str, key: str, value: bytes | None, operation: str | None) -> None:
        deleted = operation in ("DEL", "PURGE") or not value
        if bucket == subjects.CHAIN_BUCKET:
            if key == records.DEPLOYMENT_KEY and not deleted:
                self.chain_min_stake = records.deployment_decoder.decode(value or b"{}").min_stake
            return
        node_id = key.lower()
        if bucket == subjects.STAKES_BUCKET:
            if deleted:
                self.stakes.pop(node_id, None)
            else:
                self.stakes[node_id] = records.indexed_stake_decoder.decode(value or b"{}")
        elif deleted:
            self.bans.pop(node_id, None)
        else:
            self.bans[node_id] = records.ban_decoder.decode(value or b"{}")
        self.changed.put_nowait(node_id)
