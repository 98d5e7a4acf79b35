"""The gatekeeper's Prometheus metrics (docs/metrics.md lists them; the dashboards and alerts
read them by these names), one holder per component, since each runs only where it is
configured: the auth callout's (`CalloutMetrics`), the blob intake's (`IntakeMetrics`) and
the enforcer's (`EnforcerMetrics`). A component's families are in the registry only where
it runs. Labelled series that alerts read with ``increase()`` exist at 0 from the start.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

CALLOUT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class CalloutMetrics:
    """What the auth callout counts (callout.py): admissions, refusals, time to decide."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.admissions = Counter(
            "stipple_gatekeeper_admissions_total",
            "Connections admitted, by level (node, applicant) and reason (ok, no_stake, below_minimum, leaving, "
            "banned)",
            ["level", "reason"],
            registry=registry,
        )
        self.refusals = Counter(
            "stipple_gatekeeper_refusals_total",
            "Connections refused, by reason (bad_signature, token_mismatch, bad_request, consumers, internal)",
            ["reason"],
            registry=registry,
        )
        for reason in ("bad_signature", "token_mismatch", "bad_request", "consumers", "internal"):
            self.refusals.labels(reason)
        self.seconds = Histogram(
            "stipple_gatekeeper_callout_seconds",
            "Time to decide one connection",
            registry=registry,
            buckets=CALLOUT_BUCKETS,
        )


class IntakeMetrics:
    """What the blob intake counts (intake.py): uploads by outcome, bytes stored."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.results = Counter(
            "stipple_gatekeeper_uploads_total",
            "Uploads finished or refused, by outcome (stored, repeated, bad_key, not_assigned, too_large, exists, "
            "too_many, bad_part, busy, store_unavailable)",
            ["outcome"],
            registry=registry,
        )
        for outcome in (
            "stored",
            "repeated",
            "bad_key",
            "not_assigned",
            "too_large",
            "exists",
            "too_many",
            "bad_part",
            "busy",
        ):
            self.results.labels(outcome)
        self.stored_bytes = Counter(
            "stipple_gatekeeper_upload_bytes_total", "Bytes stored for nodes", registry=registry
        )


class EnforcerMetrics:
    """What the enforcer counts (enforcer.py): node connections it closed, by reason."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.kicks = Counter(
            "stipple_gatekeeper_kicks_total",
            "Node connections closed, by the reason the node lost its right (banned, leaving, below_minimum, no_stake)",
            ["reason"],
            registry=registry,
        )
        for reason in ("banned", "leaving", "below_minimum", "no_stake"):
            self.kicks.labels(reason)
