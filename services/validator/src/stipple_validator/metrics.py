"""The validator's Prometheus metrics (docs/metrics.md lists them; the dashboards and alerts
read them by these names).

`ValidatorMetrics` is everything one validator process exports beside the consumer loop's
(stipple_common.metrics): its decisions, and what its blob checker (`BlobCheckMetrics`)
and its sentinel (`SentinelMetrics`) count. The checker's and the sentinel's can be made on
their own, for a component built alone (a test of the checker). Labelled series that
alerts read with ``increase()`` exist at 0 from the start.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stipple_common.messages import SLASHABLE, Verdict

from .blobcheck import BlobOutcome
from .sentinel import REASONS

VALIDATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)
TASK_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class BlobCheckMetrics:
    """What the blob checker counts (blobcheck.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(
            "stipple_validator_blob_checks_total",
            "Stored images the validator read back and checked against a reveal, by outcome",
            ["outcome"],
            registry=registry,
        )
        for outcome in get_args(BlobOutcome):  # every series at 0 from the start
            self.checks.labels(outcome)


class SentinelMetrics:
    """What the sentinel counts (sentinel.py): strikes and bans, by reason."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.strikes = Counter(
            "stipple_validator_strikes_total",
            "Messages a node had no business sending (refused by the subject check or the fold), by reason",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:
            self.strikes.labels(reason)
        self.bans = Counter(
            "stipple_validator_bans_total",
            "Nodes banned for repeated strikes, by the reason of the last strike",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:
            self.bans.labels(reason)


class ValidatorMetrics:
    """The validator's metrics in `registry`: its decisions, the paused nodes (the gauge reads
    the prober: `Validator` sets its function), the blob checker's and the sentinel's."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.blob_checks = BlobCheckMetrics(registry)
        self.outcomes = Counter(
            "stipple_validator_outcomes_total",
            "Tasks decided, by outcome and reason",
            ["outcome", "reason"],
            registry=registry,
        )
        self.verdicts = Counter("stipple_validator_verdicts_total", "Per-node verdicts", ["verdict"], registry=registry)
        for verdict in get_args(Verdict):  # every verdict's series exists at 0 from the start
            self.verdicts.labels(verdict)
        self.slashes = Counter(
            "stipple_validator_slashes_total",
            "Per-node verdicts that cost the node its stake (mismatch, bad_commitment, bad_result); the chain-indexer "
            "slashes",
            ["verdict"],
            registry=registry,
        )
        for verdict in SLASHABLE:  # at 0 from the start, so increase() sees the first slash
            self.slashes.labels(verdict)
        self.validation_seconds = Histogram(
            "stipple_validator_validation_seconds",
            "From the reveal opening to the decision (tasks decided after a reveal)",
            registry=registry,
            buckets=VALIDATION_BUCKETS,
        )
        self.task_seconds = Histogram(
            "stipple_validator_task_seconds",
            "From the submission to the decision, by outcome",
            ["outcome"],
            registry=registry,
            buckets=TASK_BUCKETS,
        )
        self.qos_unchanged = Counter(
            "stipple_validator_qos_unchanged_total",
            "Scored samples that left a node's QoS summary as it was (no nodes.<id>.qos published)",
            registry=registry,
        )
        self.qos_conflicts = Counter(
            "stipple_validator_qos_conflicts_total",
            "QoS window writes another validator's write beat (each costs a read and a second write)",
            registry=registry,
        )
        self.partitions = Gauge(
            "stipple_validator_partitions",
            "The partitions the task events are split into (STIPPLE_PARTITIONS; 1: not partitioned)",
            registry=registry,
        )
        self.partitions_held = Gauge(
            "stipple_validator_partitions_held",
            "Partitions of the task events this replica consumes (STIPPLE_PARTITIONS > 1; 0 otherwise)",
            registry=registry,
        )
        self.copy_restarts = Counter(
            "stipple_validator_copy_restarts_total",
            "Times the server's copy of TASKS into VALIDATION stalled and its leader was stepped down to restart it",
            registry=registry,
        )
        self.paused_nodes = Gauge(
            "stipple_validator_paused_nodes",
            "Nodes paused for timeouts, waiting to pass a probe",
            registry=registry,
        )
        self.timers = Gauge(
            "stipple_validator_timers",
            "Open tasks' deadlines this replica holds (one held message each)",
            registry=registry,
        )
        self.sentinel = SentinelMetrics(registry)
