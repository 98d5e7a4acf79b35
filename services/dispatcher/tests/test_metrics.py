"""The dispatcher's gauges of the network, computed at each scrape: nodes by state (each
node in exactly one), per-node QoS and slots, and the tasks it holds."""

import time

from stipple_common.messages import NodeQos
from stipple_common.metrics import Metrics
from stipple_dispatcher.metrics import NODE_STATES, DispatcherMetrics
from stipple_dispatcher.queue import TaskQueue
from stipple_dispatcher.selection import NodeIndex
from stipple_dispatcher.settings import DispatcherSettings
from stipple_testkit.nodes import joined


def test_nodes_by_state_qos_and_held_tasks():
    now = time.time()
    index = NodeIndex(capacity=2)  # grows while the nodes join
    for node_id in ("idle", "busy", "paused", "banned", "old", "gone", "quit"):
        index.set_stake(node_id, 1000)  # as the chain says
        index.join(joined(node_id, version="0.0.1" if node_id == "old" else ""), seen_at=now)
    index.join(joined("slashed"), seen_at=now)  # live, below the minimum stake (the chain knows no stake)
    index.ban("banned", now + 60)
    index.last_seen[index.row["gone"]] = now - 100  # no heartbeat within the TTL
    index.leave("quit")
    index.assigned(["busy"])
    index.score(NodeQos(node_id="paused", qos=2.5, samples=3, recent_timeouts=2))
    index.score(NodeQos(node_id="idle", qos=9.0, samples=10, recent_timeouts=0))
    index.version_ok[index.row["old"]] = False  # what join() decides against the dispatcher's version
    metrics = Metrics("dispatcher")
    tasks: TaskQueue[object] = TaskQueue(index, DispatcherSettings(node_ttl_s=10, min_stake=100))
    DispatcherMetrics(metrics.registry, tasks)
    tasks.queued["t1"] = object()  # type: ignore[assignment]
    tasks.running["t2"] = object()  # type: ignore[assignment]
    tasks.running["t3"] = object()  # type: ignore[assignment]

    def value(name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    states = {s: value("stipple_dispatcher_nodes", state=s) for s in NODE_STATES}
    assert states == {s: 1 for s in NODE_STATES}
    assert value("stipple_dispatcher_node_qos", node_id="idle") == 9.0
    assert value("stipple_dispatcher_node_qos", node_id="paused") == 2.5
    assert value("stipple_dispatcher_node_qos", node_id="quit") is None  # gone for good: no series
    assert value("stipple_dispatcher_node_inflight_tasks", node_id="busy") == 1
    assert value("stipple_dispatcher_held_tasks", state="queued") == 1
    assert value("stipple_dispatcher_held_tasks", state="running") == 2
