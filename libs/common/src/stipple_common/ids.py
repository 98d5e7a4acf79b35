"""Message ids: the deduplication contract of every publish (the ``Nats-Msg-Id`` header).

JetStream drops a message whose id it has seen within the stream's duplicate window, so
an id says which publishes are *the same message*: a retry, a redelivered handler, a
second replica doing the same work. Every id is built here, from the message itself
where it can be, so that two services agree on it by construction:

- a task's outcome events (`succeeded`, `aborted`, `cancelled`) share one id,
  ``<task>:outcome``: whichever is stored first is the outcome, the others are dropped;
- every other task event is one per task (``<task>:<event>``), per node
  (``<task>:<node>:<event>``), per replaced node (``<task>:re:<node>``) or per escalation
  round (``<task>:<event>:<round>`` for `escalated`, `extended` and a later `reveal`);
- work and control messages are one per task and node (and per round or probe);
- a node's announcements are one per content: the same announcement retried is dropped,
  a changed one (a model downloaded) is new.
"""

from __future__ import annotations

import hashlib

from .messages import (
    OUTCOME_EVENTS,
    CancelWork,
    ChainLog,
    ChainReorg,
    ControlMessage,
    NodeBanned,
    NodeEvent,
    NodeHeartbeat,
    NodeJoined,
    NodeProbed,
    NodeQos,
    NodeQuit,
    PrefetchRequest,
    ProbeRequest,
    RevealRequest,
    TaskEscalated,
    TaskEvent,
    TaskExtended,
    TaskReassigned,
    TaskRevealOpened,
    encode,
    event_name,
)


def outcome(task_id: str) -> str:
    """The one id of a task's outcome, whichever event it is."""
    return f"{task_id}:outcome"


def task_event(event: TaskEvent) -> str:
    name = event_name(event)
    if name in OUTCOME_EVENTS:
        return outcome(event.task_id)
    if isinstance(event, TaskReassigned):
        return f"{event.task_id}:re:{event.replaced}"
    if isinstance(event, (TaskEscalated, TaskExtended, TaskRevealOpened)) and event.round:
        return f"{event.task_id}:{name}:{event.round}"
    node_id = getattr(event, "node_id", "")
    if node_id:
        return f"{event.task_id}:{node_id}:{name}"
    return f"{event.task_id}:{name}"


def work(task_id: str, node_id: str) -> str:
    """A node's assignment: one per task and node, however often it is handed out again."""
    return f"{task_id}:{node_id}:work"


def control(message: ControlMessage, node_id: str, *, round_id: int = 0) -> str:
    """A control message to `node_id`. A pre-fetch is one per model, node and `round_id`
    (the dispatcher's cool-down period), so a later round can ask again."""
    if isinstance(message, RevealRequest):
        return f"{message.task_id}:{node_id}:reveal"
    if isinstance(message, CancelWork):
        return f"{message.task_id}:{node_id}:cancel"
    if isinstance(message, ProbeRequest):
        return f"probe:{node_id}:{message.probe_id}"
    assert isinstance(message, PrefetchRequest)
    return f"prefetch:{message.ref}:{node_id}:{round_id}"


def node_event(event: NodeEvent) -> str:
    node = event.node_id
    if isinstance(event, NodeJoined):  # by content: a retry is dropped, a changed announcement is not
        return f"{node}:joined:{hashlib.sha256(encode(event)).hexdigest()[:16]}"
    if isinstance(event, NodeHeartbeat):
        return f"{node}:hb:{event.at}"
    if isinstance(event, NodeQuit):
        return f"{node}:quit:{event.at}"
    if isinstance(event, NodeProbed):
        return f"{node}:probe:{event.probe_id}"
    if isinstance(event, NodeQos):
        return f"{node}:qos:{event.task_id}"  # once per scored task (or probe: "probe:<id>")
    assert isinstance(event, NodeBanned)
    return f"{node}:banned:{int(event.at)}"


def chain_log(event: ChainLog) -> str:
    """A contract event of a block, for good: the block's hash and the log's index."""
    return f"{event.block_hash}:{event.log_index}"


def chain_reorg(event: ChainReorg) -> str:
    return f"reorg:{event.orphaned[0]}"
