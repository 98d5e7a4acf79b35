"""Rate limits shared by every gateway replica: token buckets held in a NATS KV bucket.

Each API key, and each client IP calling without one, has one token bucket (auth.py:
`rate_per_minute`, `burst`) for the whole deployment, not one per gateway: the bucket's
state (tokens, and the wall-clock time they were counted at) is one entry of the KV
bucket `subjects.LIMITS_BUCKET` (``STIPPLE_LIMITS_BUCKET``), replicated as the streams
(``STIPPLE_STREAM_REPLICAS``).

Why leases, and not a compare-and-set per request. A CAS token bucket per request is exact,
but every request then pays a KV read and a KV write (two round trips to the stream's
leader, the write replicated on R3), and every gateway serving a busy key fights over one
revision: under load most writes lose their race and go round again. Instead a gateway
*leases* a few tokens at a time: one read and one conditional write (``update`` with the
revision it read, ``create`` for a new key) take up to `lease_size` tokens out of the shared
bucket, and the next requests spend them from memory with no I/O. The lease is small (1/20
of the burst, at most `LEASE_MAX`; 1 token for a burst under 40, which is then exact), so
what it costs in precision is bounded: across N gateways a client can get at most
N x (lease - 1) requests more than its burst at once, never more than its rate over time.
A gateway writes back what it read when its read was the latest (its cached revision), so a
key served by one gateway costs one round trip per lease. Leased tokens not spent within
`LEASE_S` lapse (the limit is then a little stricter, never looser). A refusal costs one
KV read, and the gateway remembers when the shared bucket has its next token: until then it
refuses from memory (no other gateway can make the token come sooner), so a flood of
refused requests does not become a flood of KV reads. Both the KV bucket and these leases
are sized for one entry per caller: entries expire `STATE_TTL_S` after their last write (a
bucket left alone that long has refilled, unless its burst takes longer than that to refill).

When the KV bucket cannot be reached (NATS or JetStream away, the bucket gone, no answer
within `KV_TIMEOUT_S`), the gateway fails open to its own bucket (the one it would use
alone: every admission is counted there too, so it carries on from what this gateway saw),
logs ``shared_limits_unavailable`` once, counts each such request in
``stipple_gateway_limit_fallback_total{reason="unavailable"}``, and tries the KV bucket
again after `RETRY_S` (making it again if it was deleted). N gateways then allow up to N
times the rate, as before this module existed. A lease that loses its race `CAS_TRIES`
times in a row (a key hammered through many gateways at once) is decided the same way
(``reason="contention"``).

The clocks: the state's time is the wall clock of the gateway that wrote it, so gateways'
clocks should agree (NTP); one that runs behind refills nothing until it catches up, one
that runs ahead refills early by its lead.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Counter

from stipple_common import bus

from .auth import MAX_TRACKED_CLIENTS, TokenBucket

__all__ = ["LEASE_MAX", "LimitMetrics", "SharedLimits", "client_limit_name", "key_limit_name", "lease_size"]

log = structlog.get_logger("stipple.gateway")

LEASE_MAX = 50  # tokens one lease takes at most
LEASE_SHARE = 20  # ... and at most this fraction of the burst (1/20)
LEASE_S = 2.0  # leased tokens not spent within this lapse
KV_TIMEOUT_S = 1.0  # one KV read or write; past it the shared bucket counts as unavailable
RETRY_S = 5.0  # after a failure, this gateway's own buckets decide for this long
CAS_TRIES = 4  # lost races in a row before a request is decided by this gateway's bucket
STATE_TTL_S = 24 * 3600.0  # a bucket's entry expires this long after its last write (a full bucket again)
_READABLE = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")


def lease_size(burst: float) -> int:
    """How many tokens one lease takes: 1/20 of the burst, 1 to LEASE_MAX."""
    return max(1, min(LEASE_MAX, int(burst // LEASE_SHARE)))


def key_limit_name(key_id: str) -> str:
    """The KV key of an API key's bucket: ``key.<id>`` (hashed when the id is no valid KV key)."""
    if _READABLE.match(key_id):
        return f"key.{key_id}"
    return "keyh." + hashlib.sha256(key_id.encode()).hexdigest()[:32]


def client_limit_name(client: str) -> str:
    """The KV key of a client IP's bucket: ``ip.<SHA-256 of the address>`` (the bucket holds no addresses)."""
    return "ip." + hashlib.sha256(client.encode()).hexdigest()[:32]


class BucketState(msgspec.Struct, frozen=True):
    """A shared bucket's entry: `tokens` as of `at` (epoch seconds, the writer's clock)."""

    tokens: float
    at: float


_state_decoder = msgspec.json.Decoder(BucketState)


@dataclass
class _Lease:
    """What this gateway holds of one shared bucket."""

    tokens: int = 0  # leased, not spent yet
    expires: float = 0.0  # monotonic: when unspent leased tokens lapse
    empty_until: float = 0.0  # monotonic: the shared bucket has no token before then
    state: BucketState | None = None  # the entry as this gateway last read or wrote it
    revision: int = 0  # its KV revision (0: no entry)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one lease at a time per bucket


class LimitMetrics:
    """The shared limits' collectors (docs/metrics.md), registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.leases = Counter(
            "stipple_gateway_limit_leases_total",
            "Leases of tokens from the shared rate-limit buckets (NATS KV), by result: leased, empty (refused), "
            "conflict (another gateway wrote first: read again)",
            ["result"],
            registry=registry,
        )
        self.fallback = Counter(
            "stipple_gateway_limit_fallback_total",
            "Requests whose rate limit this gateway decided alone, by reason: unavailable (the KV bucket), "
            "contention (lost races)",
            ["reason"],
            registry=registry,
        )


class SharedLimits:
    """The shared token buckets (see the module docstring). `take` is the whole interface;
    `open` makes or binds the KV bucket (also done lazily)."""

    def __init__(
        self,
        nc: NATS,
        *,
        bucket: str,
        replicas: int = 1,
        metrics: LimitMetrics | None = None,
        max_tracked: int = MAX_TRACKED_CLIENTS,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=KV_TIMEOUT_S)
        self.bucket = bucket
        self.replicas = replicas
        self.metrics = metrics
        self.max_tracked = max_tracked
        self.wall = wall
        self.monotonic = monotonic
        self.leases: OrderedDict[str, _Lease] = OrderedDict()
        self._kv: KeyValue | None = None
        self._retry_at = 0.0  # monotonic: no KV operation before then (after a failure)
        self._down = False  # logged as unavailable, not yet as restored

    async def open(self) -> bool:
        """Make the KV bucket, or bind the one there (made with another configuration);
        False, logged, when NATS KV cannot be reached: requests are then decided by each
        gateway's own buckets until it can."""
        try:
            config = KeyValueConfig(
                bucket=self.bucket,
                description="gateway rate limits: API key or client IP -> token bucket (stipple_gateway.limits)",
                history=1,
                ttl=STATE_TTL_S,
                storage=StorageType.MEMORY,  # lost with every server: the buckets are full again, no more
                replicas=self.replicas,
            )
            self._kv = await bus.key_value(self.js, config)
        except (nats.errors.Error, TimeoutError) as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: BaseException) -> None:
        self._kv = None
        self._retry_at = self.monotonic() + RETRY_S
        if not self._down:
            self._down = True
            log.warning(
                "shared_limits_unavailable",
                bucket=self.bucket,
                error=repr(exc),
                retry_s=RETRY_S,
                detail="rate limits are this gateway's own until the KV bucket answers",
            )

    def _fallback(self, reason: str, local: TokenBucket) -> float:
        if self.metrics is not None:
            self.metrics.fallback.labels(reason).inc()
        return local.take(self.monotonic())

    def _lease(self, name: str) -> _Lease:
        lease = self.leases.get(name)
        if lease is None:
            lease = self.leases[name] = _Lease()
            while len(self.leases) > self.max_tracked:
                self.leases.popitem(last=False)
        else:
            self.leases.move_to_end(name)
        return lease

    @staticmethod
    def _spend(lease: _Lease, local: TokenBucket, now: float) -> bool:
        if lease.tokens > 0 and now < lease.expires:
            lease.tokens -= 1
            local.take(now)  # counted here too: what this gateway goes on from if the KV bucket goes
            return True
        return False

    async def take_for_key(self, key_id: str, local: TokenBucket) -> float:
        """`take` from API key `key_id`'s bucket."""
        return await self.take(key_limit_name(key_id), local)

    async def take_for_client(self, client: str, local: TokenBucket) -> float:
        """`take` from client IP `client`'s bucket (callers without an API key)."""
        return await self.take(client_limit_name(client), local)

    async def take(self, name: str, local: TokenBucket) -> float:
        """Take one token from the shared bucket `name` (rate and burst: `local`'s, the
        bucket this gateway falls back to): 0 when taken, else the seconds until one is there."""
        lease = self._lease(name)
        now = self.monotonic()
        if self._spend(lease, local, now):
            return 0.0
        if now < lease.empty_until:
            return lease.empty_until - now
        if not self.nc.is_connected:  # reconnecting: nothing would answer before the timeout
            self._failed(nats.errors.ConnectionClosedError())
            return self._fallback("unavailable", local)
        if self._kv is None and (now < self._retry_at or not await self.open()):
            return self._fallback("unavailable", local)
        async with lease.lock:
            now = self.monotonic()  # a request ahead of this one may have leased meanwhile
            if self._spend(lease, local, now):
                return 0.0
            if now < lease.empty_until:
                return lease.empty_until - now
            kv = self._kv
            if kv is None:
                return self._fallback("unavailable", local)
            try:
                wait = await self._refill(kv, name, lease, local)
            except (nats.errors.Error, TimeoutError) as exc:  # nats.js.errors are nats.errors too
                self._failed(exc)
                return self._fallback("unavailable", local)
        if self._down:
            self._down = False
            log.info("shared_limits_restored", bucket=self.bucket)
        if wait is None:
            return self._fallback("contention", local)
        return wait

    async def _refill(self, kv: KeyValue, name: str, lease: _Lease, local: TokenBucket) -> float | None:
        """Lease tokens from the shared bucket by compare-and-set: 0.0 when leased (one of
        them spent now), the seconds until a token when it is empty, None after CAS_TRIES
        lost races."""
        rate, burst = local.per_second, local.capacity
        for attempt in range(CAS_TRIES):
            if attempt or lease.state is None:  # read; the first try trusts this gateway's last write
                try:
                    entry = await kv.get(name)
                except nats.js.errors.KeyNotFoundError:
                    lease.state, lease.revision = None, 0
                else:
                    try:
                        lease.state = _state_decoder.decode(entry.value or b"")
                    except msgspec.DecodeError:  # not ours: overwritten
                        lease.state = None
                    lease.revision = entry.revision or 0
            wall = self.wall()
            state = lease.state
            tokens = burst if state is None else min(burst, state.tokens + max(0.0, wall - state.at) * rate)
            if tokens < 1:
                wait = (1 - tokens) / rate
                lease.empty_until = self.monotonic() + wait
                if self.metrics is not None:
                    self.metrics.leases.labels("empty").inc()
                return wait
            taken = min(lease_size(burst), math.floor(tokens))
            new = BucketState(tokens=tokens - taken, at=wall)
            data = msgspec.json.encode(new)
            try:
                if lease.revision:
                    revision = await kv.update(name, data, last=lease.revision)
                else:
                    revision = await kv.create(name, data)
            except nats.js.errors.KeyWrongLastSequenceError:
                if self.metrics is not None:
                    self.metrics.leases.labels("conflict").inc()
                continue
            if self.metrics is not None:
                self.metrics.leases.labels("leased").inc()
            now = self.monotonic()
            lease.state, lease.revision = new, revision
            lease.tokens, lease.expires = taken - 1, now + LEASE_S
            local.take(now)
            return 0.0
        lease.state = None
        return None
