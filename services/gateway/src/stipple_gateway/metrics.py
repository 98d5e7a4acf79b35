"""The gateway's own Prometheus metrics, declared in one place.

Their names, help texts, labels and buckets are a contract: the dashboards, the alerts
and docs/metrics.md name them (deploy/tools checks them against what the gateway
serves). The metrics every service has (JetStream consumers) are
`stipple_common.metrics.Metrics`; these go into the same registry.

Build one `GatewayMetrics` per process and hand it to the task service
(`TaskService(..., gateway_metrics=...)`), which passes it on to the webhooks worker and
the HTTP layer; a task service given none builds its own from its `Metrics` registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TASK_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class GatewayMetrics:
    """The gateway's collectors, registered in `registry`.

    `webhooks=False` (a gateway without STIPPLE_WEBHOOK_SECRET) leaves out
    ``stipple_gateway_webhooks_total``, so that gateway does not serve it at all."""

    def __init__(self, registry: CollectorRegistry, *, webhooks: bool = True) -> None:
        self.registry = registry
        # webhooks.py: one delivery attempt's result
        self.webhooks: Counter | None = None
        if webhooks:
            self.webhooks = Counter(
                "stipple_gateway_webhooks_total",
                "Webhook POSTs by result: delivered, retry, gave_up, refused (a private address)",
                ["result"],
                registry=registry,
            )
        # app.py: the HTTP layer
        self.requests = Counter(
            "stipple_gateway_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "stipple_gateway_request_seconds",
            "HTTP request time by route",
            ["route"],
            registry=registry,
            buckets=REQUEST_BUCKETS,
        )
        # tasks.py: the task service
        self.submitted = Counter(
            "stipple_gateway_tasks_submitted_total", "Tasks accepted", ["source"], registry=registry
        )
        self.cancelled = Counter("stipple_gateway_tasks_cancelled_total", "Tasks cancelled by apps", registry=registry)
        self.task_seconds = Histogram(
            "stipple_gateway_task_seconds",
            "End to end: submission to outcome of the tasks this gateway accepted, by outcome",
            ["outcome"],
            registry=registry,
            buckets=TASK_BUCKETS,
        )
        # events.py, auth.py: what apps may hold open and how fast anonymous callers may call
        self.sse_streams = Gauge(
            "stipple_gateway_sse_streams", "Events streams (SSE) open on this gateway", registry=registry
        )
        self.refused = Counter(
            "stipple_gateway_refused_total",
            "Requests refused with 429 by a gateway cap, by limit: sse_streams, sse_per_client, anon_rate",
            ["limit"],
            registry=registry,
        )
        self.integrity_failures = Counter(
            "stipple_gateway_image_integrity_failures_total",
            "Accepted images not served: the stored bytes' SHA-256 is not the validated one",
            registry=registry,
        )
