"""Prometheus metrics: one registry per process, served on the port named `metrics`.

Names follow ``stipple_<service>_<what>_<unit>``. The consumer loop counts every
message it handles by outcome, so each service gets those for free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


@dataclass
class Metrics:
    """The registry of one service process, plus the metrics every service has."""

    service: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        prefix = f"stipple_{self.service.replace('-', '_')}"
        self.prefix = prefix
        self.messages = Counter(
            f"{prefix}_messages_total",
            "JetStream messages handled, by stream and outcome (ack, nak, term)",
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

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics in a thread; returns the bound port (port -1: any free port)."""
        server, _thread = start_http_server(max(port, 0), addr=host, registry=self.registry)
        return int(server.server_port)
