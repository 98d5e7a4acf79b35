"""The dispatcher's metrics (docs/metrics.md), all declared here.

`DispatcherMetrics(registry, tasks)` is made once, at start, and handed to the service:
it declares the counter and histograms the service updates as it carries out the queue's
decisions, and registers `DispatcherCollector`, whose gauges of the network (nodes by
state, per-node QoS and slots, the tasks held) are computed at each scrape from the
node index and the queue, so they are never stale and cost nothing between scrapes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .queue import TaskQueue
from .selection import NodeIndex

NODE_STATES = ("idle", "busy", "paused", "banned", "unstaked", "incompatible", "offline", "quit")
"""Every registered node is in exactly one: live nodes are idle (nothing in flight), busy,
paused (the validator saw timeouts; it is probed), banned (the sentinel caught it sending
what it had no business sending), unstaked (its stake is below STIPPLE_MIN_STAKE: never
staked, leaving, or slashed), or incompatible (protocol version); the others are offline
(no heartbeat within the TTL) or quit (said goodbye). Only idle and busy nodes can be
given work."""

TASK_STATES = ("queued", "running")


class DispatcherMetrics:
    """``stipple_dispatcher_tasks_total{result}``, ``stipple_dispatcher_queue_depth``,
    ``stipple_dispatcher_decision_seconds``, ``stipple_dispatcher_queue_wait_seconds``, and
    the scrape-time gauges of `DispatcherCollector` over `tasks` (and its node index)."""

    def __init__(self, registry: CollectorRegistry, tasks: TaskQueue[Any]) -> None:
        self.tasks_total = Counter(
            "stipple_dispatcher_tasks_total",
            "Tasks handled, by result (assigned, sampled, reassigned, node_lost, extended, not_extended, prefetch, "
            "no_nodes, unservable, cancelled)",
            ["result"],
            registry=registry,
        )
        self.heartbeats = Counter(
            "stipple_dispatcher_heartbeats_total",
            "Heartbeats heard on core NATS, by result: decoded, or dropped before decoding (more than one per node "
            "per interval, an unknown node, oversized)",
            ["result"],
            registry=registry,
        )
        self.queue_depth = Gauge("stipple_dispatcher_queue_depth", "Tasks waiting for free nodes", registry=registry)
        self.decision_seconds = Histogram(
            "stipple_dispatcher_decision_seconds",
            "Time to pick the nodes of one task",
            registry=registry,
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2),
        )
        self.wait_seconds = Histogram(
            "stipple_dispatcher_queue_wait_seconds",
            "Submission to assignment",
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60),
        )
        registry.register(DispatcherCollector(tasks))  # nodes by state, QoS, tasks held


def node_states(index: NodeIndex, now: float, ttl_s: float, min_stake: int) -> dict[str, int]:
    """How many registered nodes are in each of NODE_STATES."""
    n = index.size
    quit = index.quit[:n]
    live = index.live(now, ttl_s)
    ok = live & index.version_ok[:n]
    staked = index.stake[:n] >= min_stake
    banned = ok & (index.banned_until[:n] > now)
    paused = ok & staked & ~banned & index.paused[:n]
    unstaked = ok & ~banned & ~staked
    working = ok & staked & ~banned & ~index.paused[:n]
    busy = working & (index.inflight[:n] > 0)
    return {
        "idle": int(np.count_nonzero(working & ~busy)),
        "busy": int(np.count_nonzero(busy)),
        "paused": int(np.count_nonzero(paused)),
        "banned": int(np.count_nonzero(banned)),
        "unstaked": int(np.count_nonzero(unstaked)),
        "incompatible": int(np.count_nonzero(live & ~index.version_ok[:n])),
        "offline": int(np.count_nonzero(~quit & ~live)),
        "quit": int(np.count_nonzero(quit)),
    }


class DispatcherCollector(Collector):
    """``stipple_dispatcher_nodes{state}``, ``stipple_dispatcher_node_qos{node_id}``,
    ``stipple_dispatcher_node_inflight_tasks{node_id}`` and ``stipple_dispatcher_held_tasks{state}``."""

    def __init__(self, tasks: TaskQueue[Any]) -> None:
        self.tasks = tasks

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return self._families(time.time())

    def _families(self, now: float | None = None) -> Iterator[GaugeMetricFamily]:
        nodes = GaugeMetricFamily("stipple_dispatcher_nodes", "Registered nodes by state", labels=["state"])
        qos = GaugeMetricFamily(
            "stipple_dispatcher_node_qos",
            "A node's QoS score (0..10, the validator's mean over its last tasks), nodes that have not quit",
            labels=["node_id"],
        )
        inflight = GaugeMetricFamily(
            "stipple_dispatcher_node_inflight_tasks", "Tasks in flight on a node (slots taken)", labels=["node_id"]
        )
        held = GaugeMetricFamily(
            "stipple_dispatcher_held_tasks", "Tasks this dispatcher holds, by state (queued, running)", labels=["state"]
        )
        if now is not None:
            tasks, index = self.tasks, self.tasks.index
            settings = tasks.settings
            for state, count in node_states(index, now, settings.node_ttl_s, settings.min_stake).items():
                nodes.add_metric([state], count)
            for row, node_id in enumerate(index.ids[: index.size]):
                if not index.quit[row]:
                    qos.add_metric([node_id], float(index.qos[row]))
                    inflight.add_metric([node_id], float(index.inflight[row]))
            held.add_metric(["queued"], len(tasks.queued))
            held.add_metric(["running"], len(tasks.running))
        yield from (nodes, qos, inflight, held)
