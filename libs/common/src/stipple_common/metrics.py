"""Prometheus metrics: one registry per process, served beside /healthz and /readyz on the
port named `metrics` (health.py).

Names follow ``stipple_<service>_<what>_<unit>`` (the node agent's prefix is
``stipple_node``). The consumer loop counts every message it handles by outcome and
reports its durable consumer's lag, so each service gets those for free. The full list
is docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

log = structlog.get_logger("stipple.metrics")

PREFIXES = {"node-agent": "stipple_node"}
"""Services whose metric prefix is not ``stipple_<name>``."""

CONSUMER_LAG_POLL_S = 5.0
"""How often a consumer loop reads its durable consumer's info for the lag gauges."""


def prefix_of(service: str) -> str:
    return PREFIXES.get(service, f"stipple_{service.replace('-', '_')}")


@dataclass
class Metrics:
    """The registry of one service process, plus the metrics every service has."""

    service: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    lag_poll_s: float = CONSUMER_LAG_POLL_S

    def __post_init__(self) -> None:
        prefix = prefix_of(self.service)
        self.prefix = prefix
        self.messages = Counter(
            f"{prefix}_messages_total",
            "JetStream messages handled, by stream and outcome (ack, nak, term, hold, redeliver)",
            ["stream", "outcome"],
            registry=self.registry,
        )
        self.handle_seconds = Histogram(
            f"{prefix}_handle_seconds",
            "Time to handle one JetStream message",
            ["stream"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.consumer_restarts = Counter(
            f"{prefix}_consumer_restarts_total",
            "Consumer loops that failed and were started again (bus.supervise), by consumer",
            ["consumer"],
            registry=self.registry,
        )
        self.rejected = Counter(
            f"{prefix}_rejected_messages_total",
            "Messages not believed (terminated): a payload its subject does not allow, a sender without the right, "
            "by stream and reason",
            ["stream", "reason"],
            registry=self.registry,
        )
        self.consumer_pending = Gauge(
            f"{prefix}_consumer_pending_messages",
            "Messages of a durable consumer's stream not yet delivered to it (num_pending)",
            ["stream", "consumer"],
            registry=self.registry,
        )
        self.consumer_ack_pending = Gauge(
            f"{prefix}_consumer_ack_pending_messages",
            "Messages delivered to a durable consumer and not acknowledged yet (num_ack_pending)",
            ["stream", "consumer"],
            registry=self.registry,
        )
        self.consumer_redelivered = Gauge(
            f"{prefix}_consumer_redelivered_messages",
            "Messages of a durable consumer delivered more than once and still unacknowledged (num_redelivered)",
            ["stream", "consumer"],
            registry=self.registry,
        )
        self.consumer_info_errors = Counter(
            f"{prefix}_consumer_info_errors_total",
            "Failed reads of a durable consumer's info for the lag gauges",
            ["stream", "consumer"],
            registry=self.registry,
        )
        self._watched: dict[tuple[str, str], int] = {}
        self._registered: list[Collector] = []

    def register(self, collectors: Iterable[Collector]) -> None:
        """Add collectors made without a registry (a node's runner and store are built
        before its service opens). One already in this registry (a runner reused by a
        test) is left as it is; another collector of the same name raises ValueError."""
        for collector in collectors:
            if collector not in self._registered:
                self.registry.register(collector)
                self._registered.append(collector)

    def set_consumer_lag(self, stream: str, consumer: str, info: Any) -> None:
        """The lag gauges from a ``ConsumerInfo``."""
        self.consumer_pending.labels(stream, consumer).set(info.num_pending or 0)
        self.consumer_ack_pending.labels(stream, consumer).set(info.num_ack_pending or 0)
        self.consumer_redelivered.labels(stream, consumer).set(info.num_redelivered or 0)

    async def watch_consumer(self, js: Any, stream: str, consumer: str, stop: asyncio.Event) -> None:
        """Poll a durable consumer's info every `lag_poll_s` until `stop`; one poller per
        consumer however many loops share it (the gateway's webhook workers do)."""
        key = (stream, consumer)
        self._watched[key] = self._watched.get(key, 0) + 1
        if self._watched[key] > 1:
            return
        try:
            while not stop.is_set():
                try:
                    self.set_consumer_lag(stream, consumer, await js.consumer_info(stream, consumer, timeout=2.0))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # lag is best effort: NATS away, consumer recreated
                    self.consumer_info_errors.labels(stream, consumer).inc()
                    log.debug("consumer_info_failed", stream=stream, consumer=consumer, error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.lag_poll_s)
        finally:
            self._watched.pop(key, None)
