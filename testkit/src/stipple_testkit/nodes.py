"""Nodes as the other services see them: their announcements (`NodeJoined`), made one way.

A node's id is its address in lower case: `dev_node_id(name)` for a node known by a name
in a test (the key `key_for(name)`), `node_id_of(address)` for an account of a chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stipple_common import __version__, bus, subjects
from stipple_common.messages import NodeJoined


def joined(
    node_id: str,
    *,
    address: str | None = None,
    models: Sequence[str] = ("tiny-sd",),
    version: str = __version__,
    started_at: float = 0.0,
    device: str = "cpu",
    memory_bytes: int = 1,
    models_on_disk: Sequence[str] = (),
    models_loaded: Sequence[str] = (),
) -> NodeJoined:
    """The announcement of node `node_id`: a CPU node with 1 byte of memory serving `models`,
    of this code's version, claiming `address` (its own id unless given; a checksummed
    address is the same node)."""
    return NodeJoined(
        node_id=node_id,
        device=device,
        memory_bytes=memory_bytes,
        models=list(models),
        version=version,
        started_at=started_at,
        models_on_disk=list(models_on_disk),
        models_loaded=list(models_loaded),
        address=node_id if address is None else address,
    )


async def publish_joined(js: Any, *events: NodeJoined) -> None:
    """Publish each announcement on its node's own subject (``nodes.<id>.joined``), as the
    node would, with the message id ``<id>:joined``: publishing again is a duplicate."""
    for event in events:
        node = event.node_id
        await bus.publish(js, subjects.node_subject(node, "joined"), event, msg_id=f"{node}:joined")
