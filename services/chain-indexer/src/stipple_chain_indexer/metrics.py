"""The chain-indexer's Prometheus metrics (docs/metrics.md lists them; the dashboards and
alerts read them by these names), one holder per component: the follower's
(`FollowerMetrics`), the settler's (`SettlerMetrics`) and the relay's (`RelayMetrics`), each
built on the process's registry where its component is built (a test builds a follower
alone). Labelled series that alerts read with ``increase()`` exist at 0 from the start.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stipple_common.messages import SLASHABLE

from .relay import KINDS

SETTLEMENT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class FollowerMetrics:
    """What the chain follower counts (follower.py): events published, reorgs, how far it is."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "stipple_chain_indexer_events_total", "Contract events published", ["contract", "event"], registry=registry
        )
        self.reorgs = Counter("stipple_chain_indexer_reorgs_total", "Reorgs survived", registry=registry)
        self.lag = Gauge(
            "stipple_chain_indexer_lag_blocks", "Chain head minus the last indexed block", registry=registry
        )
        self.head = Gauge("stipple_chain_indexer_head_block", "The chain head seen last", registry=registry)
        self.indexed = Gauge(
            "stipple_chain_indexer_indexed_block", "The last block whose events are published", registry=registry
        )
        self.last_step = Gauge(
            "stipple_chain_indexer_last_step_timestamp_seconds",
            "When the follower last read the chain successfully (Unix time)",
            registry=registry,
        )
        self.step_errors = Counter(
            "stipple_chain_indexer_step_errors_total",
            "Failed reads of the chain, by error code",
            ["code"],
            registry=registry,
        )


class SettlerMetrics:
    """What the settler counts (settler.py): transactions, settled tasks, its backlog, slashes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter(
            "stipple_chain_indexer_transactions_total",
            "Settlement transactions mined, by kind (escrow, settle, refund, slash)",
            ["kind"],
            registry=registry,
        )
        self.tasks = Counter(
            "stipple_chain_indexer_settled_tasks_total",
            "Tasks settled, refunded or skipped, by result",
            ["result"],
            registry=registry,
        )
        self.backlog = Gauge(
            "stipple_chain_indexer_settlement_backlog", "Task events waiting for a transaction", registry=registry
        )
        self.latency = Histogram(
            "stipple_chain_indexer_settlement_seconds",
            "From receiving an outcome to its transaction's receipt",
            registry=registry,
            buckets=SETTLEMENT_BUCKETS,
        )
        self.slashes = Counter(
            "stipple_chain_indexer_slashes_total",
            "Nodes slashed on chain, by verdict (mismatch, bad_commitment)",
            ["verdict"],
            registry=registry,
        )
        for verdict in SLASHABLE:  # at 0 from the start, so increase() sees the first slash
            self.slashes.labels(verdict)
        self.slashed_tokens = Counter(
            "stipple_chain_indexer_slashed_tokens_total",
            "Stake slashed, in whole tokens (1e18 units)",
            registry=registry,
        )


class RelayMetrics:
    """What the chain relay counts (relay.py): requests, by kind and outcome."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "stipple_chain_indexer_relay_requests_total",
            "Requests to the chain relay (rpc.chain.<id>), by kind (info, send, faucet, reserve) and outcome "
            "(ok, forbidden, rate_limited, bad_request, reverted, pending, ...)",
            ["kind", "outcome"],
            registry=registry,
        )
        for kind in KINDS.values():  # at 0 from the start, so increase() sees the first one
            for outcome in ("ok", "forbidden", "rate_limited", "bad_request"):
                self.requests.labels(kind, outcome)
        self.requests.labels("send", "reverted")
        self.requests.labels("send", "pending")
        self.requests.labels("reserve", "insufficient_deposit")
