"""Webhooks: when a task with a ``webhook_url`` ends, POST its view there, signed for the
app that submitted it.

Delivery runs on one durable JetStream consumer (``gateway-webhooks``) on the outcome
subjects, shared by every gateway, so each outcome is delivered by one of them and
survives restarts. A failed POST (no answer within the timeout, not 2xx, a host name that
does not resolve) is retried through the consumer with exponential back-off
(`bus.Redeliver`) until ``webhook_max_attempts`` deliveries, then logged and dropped. A
POST the gateway refuses to send (below) is logged (``webhook_refused``) and dropped at
once: asking again would get the same answer. Delivery is at least once: receivers should
treat a second POST with the same ``webhook-id`` as a repeat.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com/, "symmetric"
scheme v1), so any of its libraries verifies them: ``webhook-id`` (``msg_<task id>_<event>``,
the same on every attempt), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, keyed with the
app's secret ``whsec_<base64>``. The timestamp is signed, so a receiver that refuses
timestamps more than `TOLERANCE_S` away from its clock refuses replays of old deliveries
(and keeps the ids it saw within that window to refuse the rest). ``X-Stipple-Task``,
``X-Stipple-Event`` and ``X-Stipple-Delivery`` (the attempt, from 1) are sent too, unsigned.

Per-app secrets: each app (API key id; with API keys off, the one anonymous app ``""``)
has its own secret, derived, not stored (`app_secret`), and learns it from ``GET
/v1/webhook-secret`` with its API key. One app's secret verifies nothing sent to another,
so an app cannot forge another's webhooks.

Send-time checks: the URL was checked when the task was submitted (`check_webhook_url`,
literal addresses only: a name may resolve anywhere, and to something else later). Each
attempt resolves the host (`Webhooks.resolve`, injectable), refuses it when any address it
resolves to is loopback, private, link-local, multicast, reserved, unspecified or otherwise
not global (IPv4 inside IPv6 included) unless ``webhook_allow_private``, and connects to
the vetted address itself (the URL's host is replaced by it; ``Host`` and TLS's SNI and
certificate check keep the name), so a second resolution cannot answer differently
(DNS rebinding). No proxy from the environment is used, no connection is reused (a TLS
connection verified for one name must not carry a request for another), and redirects are
not followed (a 3xx is a failure, retried).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from stipple_common import bus, subjects, tracing
from stipple_common.errors import InvalidInput
from stipple_common.metrics import Metrics
from stipple_common.settings import InvalidSettings, env_name
from stipple_common.sources import address_problem

from .metrics import GatewayMetrics
from .views import TaskView

log = structlog.get_logger("stipple.gateway")

WEBHOOK_DURABLE = subjects.WEBHOOKS_DURABLE
MAX_URL_CHARS = 2000
SECRET_PREFIX = "whsec_"
TOLERANCE_S = 300  # how far a webhook-timestamp may be from the receiver's clock (Standard Webhooks' default)
MIN_MASTER_SECRET_CHARS = 16
DERIVATION_SALT = b"stipple-gateway webhooks"
DERIVATION_INFO = b"stipple webhook secret v1\x00"  # then the API key id

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


# --------------------------------------------------------------------------- secrets and signatures


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF (RFC 5869) with SHA-256: extract, then expand to `length` bytes."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


def app_secret(master: str, key_id: str) -> str:
    """The webhook secret (``whsec_`` + base64 of 32 bytes) of the app with API key `key_id`
    ("" with API keys off), derived from the gateway's ``STIPPLE_WEBHOOK_SECRET``.

    Why derive: nothing new is stored, and every gateway of the network computes the same
    secret for the same app. Why it is safe: HKDF-SHA256 is a pseudo-random function of the
    master secret, so an app that knows its own secret (and every key id) learns nothing of
    the master or of another id's secret: forging another app's webhook means breaking
    HMAC-SHA256. It holds while the master secret cannot be guessed: make it random (say
    ``openssl rand -hex 32``); a short or guessable one could be searched offline from one
    app's secret, so one shorter than 16 characters is refused.

    Rotation: one app's secret follows its key id, so give the app a new API key entry with
    a new id (and drop the old one). All secrets at once: set ``STIPPLE_WEBHOOK_SECRET`` to a
    new value and the old one in ``STIPPLE_WEBHOOK_SECRET_PREVIOUS``; every delivery then
    carries two signatures (Standard Webhooks' space-separated list), one verifying with the
    app's new secret and one with its old, until the apps have fetched their new secrets
    and the previous value is removed."""
    key = hkdf_sha256(master.encode(), salt=DERIVATION_SALT, info=DERIVATION_INFO + key_id.encode())
    return SECRET_PREFIX + base64.b64encode(key).decode()


def check_master_secret(master: str, name: str = "webhook_secret") -> None:
    """InvalidSettings (naming the variable, never showing the value) when `master` is too short."""
    if 0 < len(master) < MIN_MASTER_SECRET_CHARS:
        raise InvalidSettings(
            f"{env_name(name)}: is {len(master)} characters; at least {MIN_MASTER_SECRET_CHARS} "
            "(a random value: every app's webhook secret is derived from it)"
        )


class WebhookVerificationError(Exception):
    """A webhook whose headers are missing, whose timestamp is out of tolerance, or whose
    signature does not match."""


def secret_bytes(secret: str) -> bytes:
    """The key a ``whsec_<base64>`` secret stands for."""
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``webhook-signature`` entry: ``v1,`` and the base64 HMAC-SHA256 of
    ``{msg_id}.{timestamp}.{body}`` keyed with `secret`."""
    mac = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None, tolerance_s: float = TOLERANCE_S
) -> None:
    """What a receiver does (the gateway itself does not need it): WebhookVerificationError
    unless `headers` carry a signature of `body` by `secret` with a timestamp within
    `tolerance_s` of `now` (the clock by default), in either direction."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lower.get(h, "") for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not stamp.isascii() or not stamp.isdigit():
        raise WebhookVerificationError(f"webhook-timestamp is not Unix seconds: {stamp[:40]!r}")
    now = time.time() if now is None else now
    if abs(now - int(stamp)) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp {stamp} is more than {tolerance_s:g} s from now")
    expected = sign(secret, msg_id, int(stamp), body).encode()
    if not any(hmac.compare_digest(expected, given.encode()) for given in signatures.split(" ")):
        raise WebhookVerificationError("no matching signature")


class WebhookSecret(msgspec.Struct, kw_only=True):
    """The answer of ``GET /v1/webhook-secret``: the calling app's webhook signing secret."""

    key_id: Annotated[
        str, msgspec.Meta(description='The API key id the secret belongs to ("" with API keys off: the one app).')
    ]
    secret: Annotated[
        str,
        msgspec.Meta(
            description="Standard Webhooks secret, `whsec_` and base64: verify the webhook-signature header with it."
        ),
    ]
    scheme: Annotated[str, msgspec.Meta(description="https://www.standardwebhooks.com/ signature version.")] = "v1"
    tolerance_s: Annotated[
        int, msgspec.Meta(description="Refuse a webhook-timestamp further than this from your clock (replays).")
    ] = TOLERANCE_S


# --------------------------------------------------------------------------- addresses


def _literal_address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefx." for c in host.lower()):
        try:  # 2130706433, 0x7f.1, 127.1: forms resolvers read as IPv4 addresses
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def refusal(address: Address) -> str:
    """Why the gateway does not POST to `address` ("" when it may): the kind of address, as
    the model-source policy judges it (IPv4 inside IPv6 judged as the IPv4 address)."""
    return address_problem(address) or ""


def is_private_host(host: str) -> bool:
    """A host that names this machine or a non-global network by its literal address (or
    ``localhost``). Names that resolve to such addresses are caught at send time."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _literal_address(host)
    return address is not None and bool(refusal(address))


def check_webhook_url(value: Any, *, allow_private: bool, enabled: bool) -> str:
    """The URL if it is one the gateway may POST to; InvalidInput naming ``webhook_url`` otherwise."""
    field = "webhook_url"
    if not isinstance(value, str):
        raise InvalidInput(field, value, "expected a string: an http or https URL")
    if not value:
        return ""
    if not enabled:
        raise InvalidInput(field, value, "webhooks are off on this gateway (it has no STIPPLE_WEBHOOK_SECRET)")
    if len(value) > MAX_URL_CHARS:
        raise InvalidInput(field, value, f"is {len(value)} characters; at most {MAX_URL_CHARS}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(field, value, "contains spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
        httpx.URL(value)  # what delivery parses: refuse now what it could not send
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidInput(field, value, f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(field, value, "expected an http or https URL")
    if not parts.hostname:
        raise InvalidInput(field, value, "the URL has no host")
    if not allow_private and is_private_host(parts.hostname):
        address = _literal_address(parts.hostname.rstrip("."))
        kind = refusal(address) if address is not None else "loopback"
        raise InvalidInput(
            field,
            value,
            f"points to a {kind} address (not a public one); a gateway with STIPPLE_WEBHOOK_ALLOW_PRIVATE=true "
            "allows it",
        )
    return value


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system's resolver, as a connection would use)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Refused(Exception):
    """A webhook URL the gateway will not POST to, now or later."""


@dataclass
class Target:
    """Where one attempt goes: the URL with its host replaced by the vetted address."""

    url: httpx.URL
    host: str  # the name: TLS's SNI and the name its certificate must have
    host_header: str  # the name and the URL's port, if it names one
    address: str


# --------------------------------------------------------------------------- delivery


class Webhooks:
    """The delivery worker. `load` gives the task view by id (None if there is no such task);
    the task service builds it and runs it as one of its background workers. `secret` is the
    master secret (``STIPPLE_WEBHOOK_SECRET``), `previous_secret` the one it replaces while
    apps move to the new one. `resolve`, `clock` and `tls` are replaceable (tests)."""

    def __init__(
        self,
        js: JetStreamContext,
        load: Callable[[str], Awaitable[TaskView | None]],
        *,
        secret: str,
        timeout_s: float,
        max_attempts: int,
        backoff_s: float,
        backoff_max_s: float,
        gateway_metrics: GatewayMetrics,
        previous_secret: str = "",
        allow_private: bool = False,
        resolve: Resolver = resolve_host,
        clock: Callable[[], float] = time.time,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        check_master_secret(secret)
        check_master_secret(previous_secret, "webhook_secret_previous")
        self.js, self.load = js, load
        self.masters = [m for m in (secret, previous_secret) if m]
        self.allow_private, self.resolve, self.clock = allow_private, resolve, clock
        self.tls = tls  # the CAs receivers' certificates are checked against (None: httpx's, from certifi)
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.http: httpx.AsyncClient | None = None
        if gateway_metrics.webhooks is None:
            raise ValueError("webhooks need GatewayMetrics(..., webhooks=True)")
        self.results = gateway_metrics.webhooks  # stipple_gateway_webhooks_total{result}

    def secret_for(self, key_id: str) -> WebhookSecret:
        """The webhook secret of the app with API key `key_id` ("" with keys off)."""
        return WebhookSecret(key_id=key_id, secret=app_secret(self.masters[0], key_id))

    def signature(self, key_id: str, msg_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` value: one signature per master secret in force."""
        return " ".join(sign(app_secret(master, key_id), msg_id, timestamp, body) for master in self.masters)

    def consumer_config(self) -> ConsumerConfig:
        return subjects.webhooks_consumer(timeout_s=self.timeout_s, max_attempts=self.max_attempts)

    async def target(self, url: str) -> Target:
        """Resolve the URL's host now and vet every address: Refused when one is not
        public (unless private ones are allowed); OSError / TimeoutError when it does not
        resolve (worth another try)."""
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        literal = _literal_address(host)
        if literal is not None:
            found = [literal]
        else:
            names = await asyncio.wait_for(self.resolve(host, port), self.timeout_s)
            found = [ipaddress.ip_address(name) for name in names]
            if not found:
                raise OSError(f"{host} resolves to no address")
        if not self.allow_private:
            for each in found:
                if why := refusal(each):
                    raise Refused(f"{host} resolves to {each}, a {why} address")
        address = str(found[0])
        host_header = f"[{host}]" if ":" in host else host
        if parsed.port is not None:
            host_header += f":{parsed.port}"
        return Target(url=parsed.copy_with(host=address), host=host, host_header=host_header, address=address)

    async def handle(self, msg: Msg) -> bus.Redeliver | None:
        task_id = subjects.subject_token(msg.subject, 1)
        view = await self.load(task_id)
        if view is None or not view.webhook_url:
            return None
        assert self.http is not None, "run() opens the HTTP client"
        attempt = msg.metadata.num_delivered
        where = {"task_id": task_id, "url": view.webhook_url, "attempt": attempt, "owner": view.owner}
        try:
            target = await self.target(view.webhook_url)
        except Refused as exc:
            self.results.labels("refused").inc()
            log.error("webhook_refused", reason=str(exc), **where)
            return None
        except (OSError, TimeoutError, UnicodeError, ValueError, httpx.InvalidURL) as exc:
            failure = f"cannot resolve the host: {type(exc).__name__}: {exc}".rstrip(": ")
        else:
            failure = await self.post(target, view, task_id, attempt)
        if not failure:
            self.results.labels("delivered").inc()
            log.info("webhook_delivered", **where)
            return None
        if attempt >= self.max_attempts:
            self.results.labels("gave_up").inc()
            log.error("webhook_gave_up", error=failure, max_attempts=self.max_attempts, **where)
            return None
        delay = bus.backoff(attempt, base=self.backoff_s, cap=self.backoff_max_s)
        self.results.labels("retry").inc()
        log.warning("webhook_failed_will_retry", error=failure, retry_in_s=delay, **where)
        return bus.Redeliver(delay)

    async def post(self, target: Target, view: TaskView, task_id: str, attempt: int) -> str:
        """One signed POST to the vetted address: "" when answered 2xx, else what went wrong."""
        assert self.http is not None
        body = msgspec.json.encode(view)
        msg_id, timestamp = f"msg_{task_id}_{view.status}", int(self.clock())
        headers = {
            "Host": target.host_header,
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(view.owner, msg_id, timestamp, body),
            "X-Stipple-Task": task_id,
            "X-Stipple-Event": view.status,
            "X-Stipple-Delivery": str(attempt),
        }
        tracing.inject(headers)  # the receiver can continue the task's trace
        extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
        try:
            response = await self.http.post(target.url, content=body, headers=headers, extensions=extensions)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"{type(exc).__name__}: {exc}".rstrip(": ")
        return "" if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"

    async def run(self, stop: asyncio.Event, *, concurrency: int, metrics: Metrics | None = None) -> None:
        """`concurrency` workers on the shared consumer, one message at a time each (a slow
        receiver holds up one worker, not a batch), until `stop` is set."""
        async with self.client() as self.http:
            await asyncio.gather(*(self._worker(stop, metrics) for _ in range(max(1, concurrency))))

    def client(self) -> httpx.AsyncClient:
        """The HTTP client deliveries use: it connects where `target` says and nowhere else."""
        return httpx.AsyncClient(
            timeout=self.timeout_s,
            follow_redirects=False,
            trust_env=False,  # no proxy: the connection goes to the vetted address
            limits=httpx.Limits(max_keepalive_connections=0),  # a connection carries one request (one name)
            headers={"User-Agent": "stipple-gateway"},
            verify=self.tls if self.tls is not None else True,
        )

    async def _worker(self, stop: asyncio.Event, metrics: Metrics | None) -> None:
        """One consumer loop under the one supervision policy (`bus.supervise`): started
        again after a failure; repeated failures end it, and with it the gateway."""

        async def run() -> None:
            await bus.consume(
                self.js,
                stream=subjects.TASKS_STREAM,
                config=self.consumer_config(),
                handler=self.handle,
                stop=stop,
                metrics=metrics,
                batch=1,
            )

        await bus.supervise(run, stop, name="gateway-webhooks", metrics=metrics)
