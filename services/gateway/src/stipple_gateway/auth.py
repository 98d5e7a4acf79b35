"""API keys and their rate limits.

``STIPPLE_API_KEYS`` is empty (keys off: anyone may call), or a comma-separated list of
``id:secret:rate_per_minute[:burst]``, or ``@/path/to/file`` holding the same entries
one per line (``#`` starts a comment). Apps send ``Authorization: Bearer <secret>``.
Secrets are compared in constant time (SHA-256 digests, every key compared). Each key has
a token bucket of `burst` tokens (default: `rate_per_minute`) refilled at
`rate_per_minute`. With ``STIPPLE_SHARED_LIMITS`` on (the default) the bucket is shared by
every gateway through NATS KV (limits.py: each gateway leases a few tokens at a time), so
N gateways behind a load balancer still give a key its rate once; when the KV bucket cannot
be reached, each gateway falls back to its own bucket (`ApiKey.bucket`), as with the
setting off, and a key then gets up to N times its rate.

Callers without a key (every caller while keys are off, and the public routes always)
are limited per client IP (`ClientLimits`): a token bucket of ``STIPPLE_ANON_BURST``
tokens refilled at ``STIPPLE_ANON_RATE_PER_MINUTE`` (0: no limit), kept for the
``MAX_TRACKED_CLIENTS`` most recent IPs (least recently seen dropped first: a dropped IP
starts again with a full bucket), shared across gateways in the same way. The client IP
is the socket peer; ``X-Forwarded-For`` is believed only when the peer is in
``STIPPLE_TRUSTED_PROXIES`` (CIDRs), and then the client is the rightmost address in it
that is not itself a trusted proxy: a caller can prepend anything to the header, but not
what its own proxy appends.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stipple_common.settings import InvalidSettings, env_name

from .errors import ApiError
from .metrics import GatewayMetrics

if TYPE_CHECKING:
    from .limits import SharedLimits

KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_SECRET_CHARS = 16
MAX_RATE_PER_MINUTE = 1_000_000
SETTING = env_name("api_keys")
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="stipple"'}


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled at `per_second`; one request takes one token."""

    per_second: float
    capacity: float
    tokens: float = field(init=False)
    updated: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self, now: float) -> float:
        """0 if a token was taken, else how many seconds until one is there."""
        if self.updated is not None:
            self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.per_second)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_second


@dataclass
class ApiKey:
    key_id: str
    digest: bytes  # SHA-256 of the secret; the secret itself is not kept
    rate_per_minute: int
    burst: int
    bucket: TokenBucket = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(per_second=self.rate_per_minute / 60.0, capacity=float(self.burst))


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _bad(where: str, why: str) -> InvalidSettings:
    return InvalidSettings(f"{SETTING}: {where}: {why}; expected id:secret:rate_per_minute[:burst][,...] or @file")


def _parse_entry(entry: str, where: str) -> tuple[str, str, int, int]:
    parts = entry.split(":")
    if len(parts) not in (3, 4):
        shown = parts[0] if KEY_ID.match(parts[0]) else "?"
        raise _bad(f"{where} (key id {shown!r})", f"has {len(parts)} ':'-separated parts, not 3 or 4")
    key_id, secret, rate, *burst = (p.strip() for p in parts)
    if not KEY_ID.match(key_id):
        raise _bad(where, f"key id {key_id!r} must be 1-64 letters, digits, '_', '.', '-'")
    where = f"{where} (key id {key_id!r})"
    if len(secret) < MIN_SECRET_CHARS or any(c.isspace() for c in secret):
        raise _bad(where, f"the secret must be at least {MIN_SECRET_CHARS} characters without spaces")
    numbers = []
    for name, text in (("rate_per_minute", rate), *(("burst", b) for b in burst)):
        if not text.isdigit() or not 1 <= int(text) <= MAX_RATE_PER_MINUTE:
            shown = f" (got {text})" if text.isdigit() else ""  # else it may be a piece of a secret with ':'
            raise _bad(where, f"{name} must be an integer from 1 to {MAX_RATE_PER_MINUTE}{shown}")
        numbers.append(int(text))
    return key_id, secret, numbers[0], numbers[1] if len(numbers) > 1 else numbers[0]


def parse_api_keys(value: str) -> list[ApiKey]:
    """The keys `value` describes (see the module docstring); [] when it is empty.
    Raises InvalidSettings naming the entry, never echoing a secret."""
    value = value.strip()
    if not value:
        return []
    source = "entry"
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidSettings(f"{SETTING}: cannot read key file {str(path)!r}: {exc.strerror}") from None
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        entries = [e.strip() for line in lines for e in line.split(",") if e.strip()]
        source = f"{path} entry"
        if not entries:
            raise InvalidSettings(f"{SETTING}: key file {str(path)!r} holds no keys")
    else:
        entries = [e.strip() for e in value.split(",")]
    keys: list[ApiKey] = []
    ids: set[str] = set()
    digests: set[bytes] = set()
    for number, entry in enumerate(entries, 1):
        where = f"{source} {number}"
        if not entry:
            raise _bad(where, "is empty")
        key_id, secret, rate, burst = _parse_entry(entry, where)
        digest = _digest(secret)
        if key_id in ids:
            raise _bad(f"{where} (key id {key_id!r})", "the key id is used twice")
        if digest in digests:
            raise _bad(f"{where} (key id {key_id!r})", "the secret is the same as another key's")
        ids.add(key_id)
        digests.add(digest)
        keys.append(ApiKey(key_id=key_id, digest=digest, rate_per_minute=rate, burst=burst))
    return keys


class KeyRing:
    """Who is calling, and whether they may call now."""

    def __init__(self, keys: list[ApiKey], shared: SharedLimits | None = None) -> None:
        self.keys = keys
        self.shared = shared  # the buckets every gateway shares (None: this gateway's own)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, header: str | None) -> ApiKey:
        """The key whose secret the ``Authorization`` header carries; ApiError 401 otherwise."""
        if not header or not header.strip():
            raise ApiError(
                401,
                "unauthorized",
                "missing Authorization header: send 'Authorization: Bearer <API key secret>'",
                field="Authorization",
                headers=CHALLENGE,
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "unauthorized",
                f"Authorization: expected 'Bearer <API key secret>', got scheme {scheme[:20]!r}"
                + ("" if token else " with no secret"),
                field="Authorization",
                value=scheme[:20],
                headers=CHALLENGE,
            )
        digest = _digest(token)
        found: ApiKey | None = None
        for key in self.keys:  # compare with every key: the time does not depend on which one matches
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise ApiError(
                401, "unauthorized", "Authorization: unknown API key", field="Authorization", headers=CHALLENGE
            )
        return found

    def admit(self, key: ApiKey, now: float) -> None:
        """Take one token from the key's bucket in this gateway; ApiError 429 with Retry-After
        when it is empty."""
        self._verdict(key, key.bucket.take(now))

    async def acquire(self, key: ApiKey, now: float) -> None:
        """`admit`, from the bucket every gateway shares when there is one (limits.py)."""
        if self.shared is None:
            return self.admit(key, now)
        self._verdict(key, await self.shared.take_for_key(key.key_id, key.bucket))

    def _verdict(self, key: ApiKey, wait: float) -> None:
        if wait <= 0:
            return
        retry_after = max(1, math.ceil(wait))
        raise ApiError(
            429,
            "rate_limited",
            f"API key {key.key_id!r} is over its limit of {key.rate_per_minute} requests per minute "
            f"(burst {key.burst}); retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
            extra={"limit": {"key_id": key.key_id, "rate_per_minute": key.rate_per_minute, "burst": key.burst}},
        )


MAX_TRACKED_CLIENTS = 100_000  # client IPs whose buckets are kept (least recently seen dropped first)
TRUSTED_PROXIES = env_name("trusted_proxies")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted_proxies(value: str) -> list[Network]:
    """``STIPPLE_TRUSTED_PROXIES``: comma-separated CIDRs (or single addresses); InvalidSettings
    naming the entry otherwise."""
    networks: list[Network] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise InvalidSettings(
                f"{TRUSTED_PROXIES}: {entry[:60]!r} is not an IP network (expected CIDRs such as 10.0.0.0/8, "
                "separated by commas)"
            ) from None
    return networks


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_ip(peer: str | None, forwarded_for: str | None, trusted: list[Network]) -> str:
    """Who is calling: the socket peer, or, when the peer is a trusted proxy, the rightmost
    address of ``X-Forwarded-For`` that is not a trusted proxy (an entry that is no address
    ends the walk: the last trusted hop is the client then)."""
    client = peer or "unknown"
    address = _ip(client)
    if not trusted or address is None or not forwarded_for:
        return client
    for hop in reversed(forwarded_for.split(",")):
        if not any(address in net for net in trusted):
            break
        found = _ip(hop)
        if found is None:
            break
        address, client = found, str(found)
    return client


class ClientLimits:
    """Token buckets per client IP, for the callers without an API key (see the module
    docstring); `rate_per_minute` 0 turns them off."""

    def __init__(
        self,
        rate_per_minute: int,
        burst: int,
        max_clients: int = MAX_TRACKED_CLIENTS,
        gateway_metrics: GatewayMetrics | None = None,
        shared: SharedLimits | None = None,
    ) -> None:
        if rate_per_minute < 0 or burst < 0:
            raise InvalidSettings(
                f"STIPPLE_ANON_RATE_PER_MINUTE={rate_per_minute}, STIPPLE_ANON_BURST={burst}: must be 0 or more"
            )
        self.rate_per_minute = rate_per_minute
        self.burst = burst or rate_per_minute
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.metrics = gateway_metrics
        self.shared = shared  # the buckets every gateway shares (None: this gateway's own)

    @property
    def enabled(self) -> bool:
        return self.rate_per_minute > 0

    def admit(self, client: str, now: float) -> None:
        """Take one token from `client`'s bucket in this gateway; ApiError 429 with
        Retry-After when it is empty."""
        if self.enabled:
            self._verdict(client, self._bucket(client).take(now))

    async def acquire(self, client: str, now: float) -> None:
        """`admit`, from the bucket every gateway shares when there is one (limits.py)."""
        if not self.enabled or self.shared is None:
            return self.admit(client, now)
        self._verdict(client, await self.shared.take_for_client(client, self._bucket(client)))

    def _bucket(self, client: str) -> TokenBucket:
        bucket = self.buckets.get(client)
        if bucket is None:
            bucket = TokenBucket(per_second=self.rate_per_minute / 60.0, capacity=float(self.burst))
            self.buckets[client] = bucket
            while len(self.buckets) > self.max_clients:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(client)
        return bucket

    def _verdict(self, client: str, wait: float) -> None:
        if wait <= 0:
            return
        retry_after = max(1, math.ceil(wait))
        if self.metrics is not None:
            self.metrics.refused.labels("anon_rate").inc()
        raise ApiError(
            429,
            "rate_limited",
            f"client {client} is over the limit for callers without an API key: STIPPLE_ANON_RATE_PER_MINUTE="
            f"{self.rate_per_minute} requests per minute (STIPPLE_ANON_BURST={self.burst}); retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
            extra={"limit": {"client": client, "rate_per_minute": self.rate_per_minute, "burst": self.burst}},
        )
