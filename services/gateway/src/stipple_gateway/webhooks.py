"""Webhooks: when a task with a ``webhook_url`` ends, POST its view there, signed.

Delivery runs on one durable JetStream consumer (``gateway-webhooks``) on the outcome
subjects, shared by every gateway, so each outcome is delivered by one of them and
survives restarts. A failed POST (no answer within the timeout, or not 2xx) is retried
through the consumer with exponential back-off (`bus.Redeliver`) until
``webhook_max_attempts`` deliveries, then logged and dropped. Delivery is at least once:
receivers should treat a second POST for the same ``X-Stipple-Task`` as a repeat.

Headers: ``X-Stipple-Signature: sha256=<hex HMAC-SHA256 of the raw body with
STIPPLE_WEBHOOK_SECRET>``, ``X-Stipple-Task``, ``X-Stipple-Event`` (succeeded, aborted,
cancelled), ``X-Stipple-Delivery`` (the attempt, from 1).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any
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

from .metrics import GatewayMetrics
from .views import TaskView

log = structlog.get_logger("stipple.gateway")

WEBHOOK_DURABLE = subjects.WEBHOOKS_DURABLE
MAX_URL_CHARS = 2000
SIGNATURE_HEADER = "X-Stipple-Signature"


def sign(secret: str, body: bytes) -> str:
    """The ``X-Stipple-Signature`` value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
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


def is_private_host(host: str) -> bool:
    """A host that names this machine or a private network by its literal address (or
    ``localhost``). Names that resolve to such addresses are not caught here."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _literal_address(host)
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global


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
    except ValueError as exc:
        raise InvalidInput(field, value, f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(field, value, "expected an http or https URL")
    if not parts.hostname:
        raise InvalidInput(field, value, "the URL has no host")
    if not allow_private and is_private_host(parts.hostname):
        raise InvalidInput(
            field,
            value,
            "points to a loopback, private or link-local address; "
            "a gateway with STIPPLE_WEBHOOK_ALLOW_PRIVATE=true allows it",
        )
    return value


class Webhooks:
    """The delivery worker. `load` gives the task view by id (None if there is no such task);
    the task service builds it and runs it as one of its background workers."""

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
    ) -> None:
        self.js, self.load, self.secret = js, load, secret
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.http: httpx.AsyncClient | None = None
        if gateway_metrics.webhooks is None:
            raise ValueError("webhooks need GatewayMetrics(..., webhooks=True)")
        self.results = gateway_metrics.webhooks  # stipple_gateway_webhooks_total{result}

    def consumer_config(self) -> ConsumerConfig:
        return subjects.webhooks_consumer(timeout_s=self.timeout_s, max_attempts=self.max_attempts)

    async def handle(self, msg: Msg) -> bus.Redeliver | None:
        task_id = subjects.subject_token(msg.subject, 1)
        view = await self.load(task_id)
        if view is None or not view.webhook_url:
            return None
        assert self.http is not None, "run() opens the HTTP client"
        attempt = msg.metadata.num_delivered
        body = msgspec.json.encode(view)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body),
            "X-Stipple-Task": task_id,
            "X-Stipple-Event": view.status,
            "X-Stipple-Delivery": str(attempt),
        }
        tracing.inject(headers)  # the receiver can continue the task's trace
        try:
            response = await self.http.post(view.webhook_url, content=body, headers=headers)
            failure = "" if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            failure = f"{type(exc).__name__}: {exc}".rstrip(": ")
        where = {"task_id": task_id, "url": view.webhook_url, "attempt": attempt}
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

    async def run(self, stop: asyncio.Event, *, concurrency: int, metrics: Metrics | None = None) -> None:
        """`concurrency` workers on the shared consumer, one message at a time each (a slow
        receiver holds up one worker, not a batch), until `stop` is set."""
        async with httpx.AsyncClient(
            timeout=self.timeout_s, follow_redirects=False, headers={"User-Agent": "stipple-gateway"}
        ) as self.http:
            await asyncio.gather(*(self._worker(stop, metrics) for _ in range(max(1, concurrency))))

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
