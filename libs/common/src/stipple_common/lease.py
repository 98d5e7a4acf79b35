"""A lease in NATS KV: which replica of a stateful service is the active one.

The dispatcher (its queue and node index), the validator (its fold of each task's events)
and the chain-indexer (its cursor) keep state in memory that one process must own: two
consumers sharing one durable would each see part of a task's events. So these services
run active/standby: every replica opens its service, and only the holder of the lease
consumes; the others wait for it (docs/architecture.md, "Replicas and leases").

The lease is one key per service name in the ``leases`` bucket (history 1). Its value is
the holder (the instance name: the pod's host name by default) and when it expires (wall
clock); nothing else. Every write is a compare-and-set on the key's revision:

- acquire: ``create`` when there is no key (or only a tombstone after a release);
  ``update(last=revision)`` when the record has expired, or when its holder is this same
  instance name (a process restarted under the same name takes its own lease back at
  once, without waiting out the ttl: its previous life is gone);
- renew: every ttl/3, ``update(last=revision)`` with a new expiry;
- lost: a renewal whose CAS fails (another instance took the key), or no renewal that
  succeeded before the local expiry (the KV unavailable, an election: `bus.BUS_AWAY`
  errors are retried until then). The holder then stops serving.

The revision of the holder's last write is a fencing token (`Lease.revision`): it only
grows, and a write it guards by ``last=revision`` fails once another instance has taken
the key.

Clocks: expiry is compared on wall clocks (``time.time()``) of different hosts, so they
must agree (NTP keeps them within milliseconds). A taker waits `skew_s` (ttl/10 by
default: 1 s of a 10 s lease) past the recorded expiry before it takes an expired lease,
and a holder gives up at its own expiry measured on its monotonic clock from the moment
it sent its last successful renewal, which is never later than the recorded expiry. So
two holders cannot overlap unless the clocks disagree by more than `skew_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from . import bus
from .errors import StippleError
from .subjects import LEASES_BUCKET

log = structlog.get_logger("stipple.lease")

DEFAULT_TTL_S = 10.0

# a KV call that did not get an answer: retried until the lease's own expiry
UNAVAILABLE: tuple[type[Exception], ...] = (*bus.BUS_AWAY_OR_SLOW, nats.errors.ConnectionReconnectingError)


class LeaseLost(StippleError):
    """This instance no longer holds its service's lease: it must stop serving (and its
    process exit non-zero, so that it comes back as a standby)."""

    code = "lease_lost"


class LeaseRecord(msgspec.Struct, frozen=True):
    holder: str  # the instance name
    expires_at: float  # wall clock (time.time())


_decoder = msgspec.json.Decoder(LeaseRecord)


async def open_leases(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The ``leases`` bucket (created when missing; history 1)."""
    return await bus.key_value(js, KeyValueConfig(bucket=LEASES_BUCKET, history=1, replicas=replicas))


class Lease:
    """The lease of service `name` as instance `instance` sees it (see the module docstring)."""

    def __init__(
        self, kv: KeyValue, name: str, instance: str, *, ttl_s: float = DEFAULT_TTL_S, skew_s: float | None = None
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s={ttl_s!r}: must be above 0")
        if not instance:
            raise ValueError("instance: must not be empty")
        self.kv = kv
        self.name = name
        self.instance = instance
        self.ttl_s = ttl_s
        self.skew_s = ttl_s / 10 if skew_s is None else skew_s
        self.revision = 0  # the fencing token: the revision of this instance's last write; 0 while not held
        self._deadline = 0.0  # monotonic: when this instance's hold ends unless renewed
        self.lost = asyncio.Event()  # set when a held lease is lost

    @property
    def held(self) -> bool:
        return self.revision > 0 and not self.lost.is_set() and time.monotonic() < self._deadline

    def _record(self) -> bytes:
        return msgspec.json.encode(LeaseRecord(holder=self.instance, expires_at=time.time() + self.ttl_s))

    def _took(self, revision: int, sent: float) -> None:
        self.revision = revision
        self._deadline = sent + self.ttl_s
        self.lost.clear()

    async def try_acquire(self) -> float:
        """One attempt: 0.0 when this instance holds the lease now, otherwise how long to
        wait before the current holder's lease may be taken (seconds, above 0). KV errors
        are raised."""
        sent = time.monotonic()
        try:
            entry = await self.kv.get(self.name)
        except (KeyNotFoundError, KeyDeletedError):  # nobody holds it (or its holder released it)
            try:
                revision = await self.kv.create(self.name, self._record())
            except KeyWrongLastSequenceError:  # another instance created it first
                return self.ttl_s / 3
            self._took(revision, sent)
            return 0.0
        try:
            record = _decoder.decode(entry.value or b"")
        except msgspec.DecodeError:  # not ours to read: take it as expired
            record = LeaseRecord(holder="", expires_at=0.0)
        wait = record.expires_at + self.skew_s - time.time()
        if record.holder != self.instance and wait > 0:
            return min(wait, self.ttl_s / 3)
        try:
            assert entry.revision is not None
            revision = await self.kv.update(self.name, self._record(), last=entry.revision)
        except KeyWrongLastSequenceError:  # another instance took it (or its holder renewed) meanwhile
            return self.ttl_s / 3
        self._took(revision, sent)
        if record.holder == self.instance:
            log.info("lease_taken_back", lease=self.name, instance=self.instance, revision=revision)
        return 0.0

    async def acquire(self, stop: asyncio.Event | None = None) -> bool:
        """Wait until this instance holds the lease (True), or `stop` is set first (False).
        A KV that does not answer is tried again (a standby waits anyway)."""
        while stop is None or not stop.is_set():
            try:
                wait = await self.try_acquire()
            except UNAVAILABLE as exc:
                log.warning("lease_kv_unavailable", lease=self.name, error=repr(exc))
                wait = self.ttl_s / 3
            if wait == 0.0:
                log.info("lease_acquired", lease=self.name, instance=self.instance, revision=self.revision)
                return True
            if stop is None:
                await asyncio.sleep(wait)
                continue
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass
        return False

    async def renew(self) -> None:
        """One renewal (CAS on the last revision). Raises `LeaseLost` when another instance
        took the key, or the hold already ended; KV errors are raised."""
        if not self.held:
            raise self._lose("expired")
        sent = time.monotonic()
        try:
            revision = await self.kv.update(self.name, self._record(), last=self.revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError, KeyDeletedError):
            raise self._lose("taken") from None
        self._took(revision, sent)

    async def keep(self) -> None:
        """Renew every ttl/3 while held; returns only by raising `LeaseLost` (or when
        cancelled). A KV that does not answer is tried again until the local expiry."""
        while True:
            pause = self.ttl_s / 3
            try:  # never waits past the hold's end (a reconnecting client would wait its request timeout)
                await asyncio.wait_for(self.renew(), max(0.01, self._deadline - time.monotonic()))
            except UNAVAILABLE as exc:
                log.warning("lease_kv_unavailable", lease=self.name, error=repr(exc))
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise self._lose("kv_unavailable") from None
                pause = min(pause / 3, left)
            await asyncio.sleep(pause)

    async def release(self) -> None:
        """Give the lease up (a graceful stop): the key is deleted if this instance still
        holds it, so a standby takes it at once. Errors are logged, never raised: at worst
        the lease expires."""
        if self.revision == 0:
            return
        revision, self.revision = self.revision, 0
        try:
            await self.kv.delete(self.name, last=revision)
            log.info("lease_released", lease=self.name, instance=self.instance)
        except Exception as exc:  # taken meanwhile, or the KV away: it expires on its own
            log.warning("lease_release_failed", lease=self.name, error=repr(exc))

    def _lose(self, why: str) -> LeaseLost:
        self.lost.set()
        self.revision = 0
        return LeaseLost(f"lease {self.name!r} of instance {self.instance!r} lost: {why}")


Handover = Callable[[int], Awaitable[None]]


class PartitionLeases:
    """Leases on the `partitions` partitions of service `name`, shared among its live
    replicas: each replica holds about as many as the others (docs/architecture.md,
    "Partitioned validator").

    Every replica keeps a member key (``<name>.m.<instance>``, a `Lease` only its own
    instance name takes) and takes partition keys (``<name>.p<k>``, plain `Lease`s) up to
    its fair share, ceil(partitions / live members). Each round (every ttl/3) it renews
    what it holds, reads every key of the service once, and then gives back the partitions
    over its share (a replica joined) or takes free and expired ones up to it (a replica
    left, or died: its keys expire after the ttl). `on_gain(k)` runs after partition `k`
    is taken; `on_lose(k)` runs before a held partition is given back, and when one is
    lost (renewal refused, or not renewed before its expiry), so the caller stops its
    work on `k` before another replica may start it. Ownership is exclusive as a `Lease`
    is, under the same clock assumption."""

    def __init__(
        self,
        kv: KeyValue,
        name: str,
        instance: str,
        partitions: int,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        skew_s: float | None = None,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions={partitions!r}: at least 1")
        self.kv = kv
        self.name = name
        self.instance = instance
        self.ttl_s = ttl_s
        self.member = Lease(kv, f"{name}.m.{instance}", instance, ttl_s=ttl_s, skew_s=skew_s)
        self.leases = [
            Lease(kv, partition_key(name, k), instance, ttl_s=ttl_s, skew_s=skew_s) for k in range(partitions)
        ]
        self.held: set[int] = set()
        self.short = False  # below its share at the last round
        # where this replica starts looking for free partitions: replicas that start together
        # try different ones first, so most first attempts succeed
        self._offset = zlib.crc32(instance.encode()) % partitions

    async def run(self, stop: asyncio.Event, on_gain: Handover, on_lose: Handover) -> None:
        """Hold a fair share until `stop`, then give everything back. The first round only
        says this replica is there, so that replicas started together count each other
        before they take anything (no partition taken, then given back at once)."""
        try:
            with contextlib.suppress(*UNAVAILABLE):
                await self.member.try_acquire()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(1.0, self.ttl_s / 3))
            while not stop.is_set():
                try:
                    await self.round(on_gain, on_lose)
                except UNAVAILABLE as exc:  # the KV away: what is held stays held until its expiry
                    log.warning("partition_leases_kv_unavailable", lease=self.name, error=repr(exc))
                    await self._drop_expired(on_lose)
                # a replica below its share looks again soon: the others give theirs back
                # within their own round, and a partition nobody consumes holds its tasks
                pause = self.ttl_s / 3 if not self.short else min(self.ttl_s / 3, 0.25)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
        finally:
            for k in sorted(self.held):
                await self._give_back(k, on_lose)
            await self.member.release()

    async def round(self, on_gain: Handover, on_lose: Handover) -> None:
        """One round: renew, count the live members, give back or take up to the fair share."""
        if self.member.held:
            try:
                await self.member.renew()
            except LeaseLost:
                await self.member.try_acquire()
        else:
            await self.member.try_acquire()  # its own name: taken back at once
        for k in sorted(self.held):
            try:
                await self.leases[k].renew()
            except LeaseLost as lost:
                log.warning("partition_lost", lease=self.name, partition=k, error=str(lost))
                self.held.discard(k)
                await on_lose(k)
        members, holdings, free = await self._survey()
        count = len(self.leases)
        most, least = -(-count // len(members)), count // len(members)
        keep = most
        self.short = len(self.held) < least  # (until it has its share: `run` looks again sooner)
        if most > least and any(holdings.get(m, 0) < least for m in members if m != self.instance):
            keep = least  # a replica below its share (one that joined) while the rest hold the most
        for k in sorted(self.held, reverse=True)[: max(0, len(self.held) - keep)]:
            await self._give_back(k, on_lose)
        fair = keep  # (not more while a replica is short: what was given back is for it)
        order = [(self._offset + i) % len(self.leases) for i in range(len(self.leases))]
        for k in order:
            if len(self.held) >= fair:
                break
            if k in self.held or k not in free:
                continue
            if await self.leases[k].try_acquire() == 0.0:
                self.held.add(k)
                log.info("partition_taken", lease=self.name, partition=k, instance=self.instance, fair=fair)
                await on_gain(k)

    async def _survey(self) -> tuple[set[str], dict[str, int], set[int]]:
        """(the live members, this one included; how many partitions each holder holds;
        the partitions nobody holds now, or whose holder's lease expired past the skew),
        from one read of the service's keys."""
        now = time.time()
        members = {self.instance}
        holdings: dict[str, int] = {}
        taken: set[int] = set()
        watcher: Any = await self.kv.watch(f"{self.name}.>", ignore_deletes=True)  # (its stop() is untyped)
        try:
            async with asyncio.timeout(self.ttl_s / 3):
                entries = [entry async for entry in _until_current(watcher)]
        finally:
            await watcher.stop()
        for entry in entries:
            try:
                record = _decoder.decode(entry.value or b"")
            except msgspec.DecodeError:
                continue
            if record.expires_at + self.member.skew_s < now:
                continue
            rest = entry.key[len(self.name) + 1 :]
            if rest.startswith("m."):
                members.add(record.holder)
            elif rest.startswith("p") and rest[1:].isdigit():
                taken.add(int(rest[1:]))
                holdings[record.holder] = holdings.get(record.holder, 0) + 1
        return members, holdings, set(range(len(self.leases))) - taken

    async def _give_back(self, k: int, on_lose: Handover) -> None:
        self.held.discard(k)
        await on_lose(k)  # its work stopped first: then another replica may take it
        await self.leases[k].release()
        log.info("partition_given_back", lease=self.name, partition=k, instance=self.instance)

    async def _drop_expired(self, on_lose: Handover) -> None:
        for k in sorted(self.held):
            if not self.leases[k].held:
                log.warning("partition_lost", lease=self.name, partition=k, error="not renewed in time")
                self.held.discard(k)
                await on_lose(k)


async def _until_current(watcher: Any) -> AsyncIterator[Any]:
    """A KV watcher's entries up to the end of what is stored (its None marker)."""
    async for entry in watcher:
        if entry is None:
            return
        yield entry


def partition_key(name: str, partition: int) -> str:
    return f"{name}.p{partition}"
