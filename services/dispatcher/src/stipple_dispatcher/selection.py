"""Which nodes run a task. Pure functions over the live-node list, no I/O.

For now: uniformly at random among live nodes that serve the model, at most one node
per operator (QoS x stake x locality weighting is a later issue; it replaces `pick`'s
sampling, not its contract).
"""

from __future__ import annotations

import random

from stipple_common.errors import StippleError
from stipple_common.messages import NodeJoined
from stipple_common.taskspec import TaskSpec


class NotEnoughNodes(StippleError):
    code = "no_nodes"
    retryable = True  # nodes come and go; the dispatcher waits, then gives up


def eligible(nodes: list[NodeJoined], spec: TaskSpec) -> list[NodeJoined]:
    return [node for node in nodes if node.serves(spec.model_name)]


def pick(nodes: list[NodeJoined], spec: TaskSpec, count: int, rng: random.Random) -> list[str]:
    """`count` distinct nodes of distinct operators that serve the task's model."""
    candidates = eligible(nodes, spec)
    rng.shuffle(candidates)
    chosen: dict[str, str] = {}  # operator -> node
    for node in candidates:
        chosen.setdefault(node.operator, node.node_id)
        if len(chosen) == count:
            return list(chosen.values())
    operators = len({node.operator for node in candidates})
    raise NotEnoughNodes(
        f"task needs {count} nodes of distinct operators serving model {spec.model_name!r}; "
        f"{len(candidates)} live nodes of {operators} operators serve it"
    )
