"""The dispatcher's view of the network as gauges, computed at each scrape from the node
index and the queue (so they are never stale and cost nothing between scrapes)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .service import Dispatcher

NODE_STATES = ("idle", "busy", "paused", "banned", "unstaked", "incompatible", "offline", "quit")
"""Every registered node is in exactly one: live nodes are idle (nothing in flight), busy,
paused (the validator saw timeouts; it is probed), banned (the sentinel caught it sending
what it had no business sending), unstaked (its stake is below STIPPLE_MIN_STAKE: never
staked, leaving, or slashed), or incompatible (protocol version); the others are offline
(no heartbeat within the TTL) or quit (said goodbye). Only idle and busy nodes can be
given work."""

TASK_STATES = ("queued", "running")


def node_states(dispatcher: Dispatcher, now: float) -> dict[str, int]:
    index = dispatcher.index
    n = index.size
    quit = index.quit[:n]
    live = ~quit & (now - index.last_seen[:n] <= dispatcher.settings.node_ttl_s)
    ok = live & index.version_ok[:n]
    staked = index.stake[:n] >= dispatcher.settings.min_stake
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

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

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
        tasks = GaugeMetricFamily(
            "stipple_dispatcher_held_tasks", "Tasks this dispatcher holds, by state (queued, running)", labels=["state"]
        )
        if now is not None:
            d = self.dispatcher
            for state, count in node_states(d, now).items():
                nodes.add_metric([state], count)
            index = d.index
            for row, node_id in enumerate(index.ids[: index.size]):
                if not index.quit[row]:
                    qos.add_metric([node_id], float(index.qos[row]))
                    inflight.add_metric([node_id], float(index.inflight[row]))
            tasks.add_metric(["queued"], len(d.queue))
            tasks.add_metric(["running"], len(d.running))
        yield from (nodes, qos, inflight, tasks)
