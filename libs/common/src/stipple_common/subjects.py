"""Subject names, stream names and consumer names: the whole NATS contract in one place.

Streams
- TASKS  ``tasks.<task_id>.<event>``: every task event; the task is the fold of ``tasks.<id>.>``.
  A node's events carry its id as a fourth token, ``tasks.<task_id>.<event>.<node_id>``,
  so NATS permissions can let a node publish only its own.
- WORK   ``work.<node_id>.task``: assignments for one node; ``work.<node_id>.control``: reveal
  requests and cancellations for it (work-queue retention, one consumer each).
- NODES  ``nodes.<node_id>.<event>``: announcements, heartbeats, quits (last per subject kept).
Core NATS (not stored)
- ``progress.<task_id>``: per-step progress from nodes; lossy by design.
- ``downloads.<node_id>``: model-download progress from a node's store.
- ``dispatch.queue``: request-reply, a task id -> its QueueStatus (the dispatcher answers).
"""

from __future__ import annotations

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

TASKS_STREAM = "TASKS"
WORK_STREAM = "WORK"
NODES_STREAM = "NODES"

DISPATCHER_DURABLE = "dispatcher"
VALIDATOR_DURABLE = "validator"

IMAGES_BUCKET = "stipple-images"
QUEUE_STATUS = "dispatch.queue"
QOS_BUCKET = "qos"  # KV: node id -> its last 50 scored tasks (the validator's)
CHAIN_STREAM = "CHAIN"  # contract events from confirmed blocks: chain.<contract>.<event>
CHAIN_BUCKET = "chain"  # KV (the chain-indexer's): deployment, cursor
STAKES_BUCKET = "stakes"  # KV: node address -> its indexed stake (the chain-indexer's projection)
SETTLER_DURABLE = "chain-settler"
CHAIN_REORG = "chain.reorg"


NODE_EVENTS = ("started", "committed", "revealed", "errored")  # published by a node, about itself


def task_subject(task_id: str, event: str, node_id: str = "") -> str:
    if event in NODE_EVENTS:
        if not node_id:
            raise ValueError(f"a node's {event!r} event needs the node id in its subject")
        return f"tasks.{task_id}.{event}.{node_id}"
    return f"tasks.{task_id}.{event}"


def task_events(task_id: str) -> str:
    """All events of one task."""
    return f"tasks.{task_id}.>"


def all_tasks(event: str) -> str:
    """One event type across all tasks (and all nodes, for a node's event)."""
    return f"tasks.*.{event}.*" if event in NODE_EVENTS else f"tasks.*.{event}"


def work_subject(node_id: str) -> str:
    return f"work.{node_id}.task"


def control_subject(node_id: str) -> str:
    return f"work.{node_id}.control"


def node_subject(node_id: str, event: str) -> str:
    return f"nodes.{node_id}.{event}"


def chain_subject(contract: str, event: str) -> str:
    """Where a contract event from a confirmed block goes: ``chain.<contract>.<event>``."""
    return f"chain.{contract}.{event}"


def chain_rpc_subject(node_id: str) -> str:
    """Where a node asks the chain-indexer about the chain (not in any stream)."""
    return f"rpc.chain.{node_id}"


def node_durable(node_id: str) -> str:
    return f"node-{node_id}"


def node_control_durable(node_id: str) -> str:
    return f"node-{node_id}-control"


def progress_subject(task_id: str) -> str:
    return f"progress.{task_id}"


def download_subject(node_id: str) -> str:
    return f"downloads.{node_id}"


def subject_token(subject: str, index: int) -> str:
    return subject.split(".")[index]


def stream_configs(*, replicas: int = 1, task_max_age_s: float = 7 * 24 * 3600) -> list[StreamConfig]:
    """The streams every service may declare at start (declaring is idempotent)."""
    return [
        StreamConfig(
            name=TASKS_STREAM,
            subjects=["tasks.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=task_max_age_s,
            duplicate_window=120.0,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=WORK_STREAM,
            subjects=["work.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=24 * 3600.0,  # work for a node that never came back; deadlines are far shorter
            duplicate_window=120.0,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=NODES_STREAM,
            subjects=["nodes.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            discard=DiscardPolicy.OLD,
            duplicate_window=30.0,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=CHAIN_STREAM,
            subjects=["chain.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            # a block hash and log index identify an event for good: a re-published event
            # after a restart is dropped however late it comes (within a day)
            duplicate_window=24 * 3600.0,
            num_replicas=replicas,
        ),
    ]
