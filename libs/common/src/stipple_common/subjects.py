"""Subject names, stream names, KV bucket names and consumer configurations: the whole
NATS contract in one place.

The subject is the authority (docs/security.md): who wrote a message, about which task
and which node, and what kind of event it is, are read from the subject the server
delivered it on, because NATS permissions decide who may publish where. A payload that
disagrees with its subject is rejected (`parse_task_subject`, `parse_node_subject`,
`messages.decode_task_event`).

Streams
- TASKS  ``tasks.<task_id>.<event>``: the control plane's task events (CONTROL_TASK_EVENTS,
  OUTCOME_EVENTS among them); ``tasks.<task_id>.<event>.<node_id>``: a node's
  (NODE_TASK_EVENTS), the only task subjects a node may publish on, and only with its own
  id. The task is the fold of ``tasks.<id>.>``.
- WORK   ``work.<node_id>.task``: assignments for one node; ``work.<node_id>.control``: its
  control messages (reveal requests, cancellations, model pre-fetches and the probes a
  paused node must pass), work-queue retention, one consumer each, created by the
  gatekeeper when the node is admitted; nodes cannot create or change consumers.
- NODES  ``nodes.<node_id>.<event>``: what a node says of itself (NODE_SELF_EVENTS:
  announcements, heartbeats, quits, probe answers) and what the control plane says of it
  (NODE_CONTROL_EVENTS: QoS, bans); the last message per subject is kept.
- CHAIN  ``chain.<contract>.<event>``: contract events from confirmed blocks, and
  ``chain.reorg`` (CHAIN_REORG) when published blocks left the chain (the chain-indexer's).
- VALIDATION ``vp.<partition>.<task_id>.<event>[.<node_id>]``: with the validator partitioned
  (STIPPLE_PARTITIONS > 1) only, a copy of every TASKS message that the server makes
  (a source with a subject transform: the partition is a hash of the task id), so all of a
  task's events reach the one replica that holds its partition (`validation_stream`). No
  client publishes here.
Core NATS (not stored)
- ``progress.<task_id>.<node_id>``: per-step progress from nodes; lossy by design.
- ``downloads.<node_id>``: model-download progress from a node's store.
- ``dispatch.queue``: request-reply, a task id -> its QueueStatus (the dispatcher answers).
- ``rpc.chain.<node_id>``: a node's requests to the chain relay; ``rpc.chain.gateway``
  (RESERVE_SUBJECT): the gateway's fee reservations (no node may publish there).
- ``rpc.blobs.<node_id>[.>]``: a node's uploads, to the gatekeeper's blob intake.
- ``rpc.join.<node_id>``: "am I admitted, and if not, why?" (the gatekeeper answers).
KV buckets (their records: records.py)
- ``qos``, ``chain`` (deployment, cursor), ``stakes``, ``bans``, ``sampling`` (the VRF keys),
  ``reservations`` (fees not yet escrowed), ``gateway-limits`` (shared rate limits), ``leases`` (which
  replica is active: lease.py); objects in IMAGES_BUCKET.
Durable consumers (their configurations are built here, so every instance of a service
shares one): `dispatcher_consumer`, `validator_consumer`, `settler_consumer` and
`webhooks_consumer` on TASKS; `node_work_consumer` and `node_control_consumer` on WORK.
"""

from __future__ import annotations

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)

TASKS_STREAM = "TASKS"
WORK_STREAM = "WORK"
NODES_STREAM = "NODES"

DISPATCHER_DURABLE = "dispatcher"
VALIDATOR_DURABLE = "validator"
VALIDATION_STREAM = "VALIDATION"
PARTITION_PREFIX = "vp"
MAX_PARTITIONS = 1024

IMAGES_BUCKET = "stipple-images"
QUEUE_STATUS = "dispatch.queue"
QOS_BUCKET = "qos"  # KV: node id -> its last 50 scored tasks (the validator's)
CHAIN_STREAM = "CHAIN"  # contract events from confirmed blocks: chain.<contract>.<event>
CHAIN_BUCKET = "chain"  # KV (the chain-indexer's): deployment, cursor
STAKES_BUCKET = "stakes"  # KV: node address -> its indexed stake (the chain-indexer's projection)
SETTLER_DURABLE = "chain-settler"
CHAIN_REORG = "chain.reorg"


SAMPLING_BUCKET = "sampling"  # KV: VRF public key (hex) -> the rate it sampled at and since when (the dispatcher's)
BANS_BUCKET = "bans"  # KV: node id -> why and until when it may not join (the validator's sentinel writes it)
RESERVATIONS_BUCKET = "reservations"  # KV (the chain-indexer's): custodial account -> fees reserved, not yet escrowed
LIMITS_BUCKET = "gateway-limits"  # KV (the gateways'): API key or client IP -> its shared token bucket (limits.py)
GATEWAY_BUCKET = "gateway"  # KV (the gateways'): secrets every gateway replica shares (the task-id secret)
LEASES_BUCKET = "leases"  # KV: service name -> which instance is its active replica, until when (lease.py)
GATEKEEPER_QUEUE = "gatekeeper"

# tasks.<task_id>.<event>.<node_id>: published by a node, about its own part in a task
NODE_TASK_EVENTS = ("started", "committed", "revealed", "errored")
# tasks.<task_id>.<event>: published by the control plane only
CONTROL_TASK_EVENTS = (
    "submitted",
    "assigned",
    "reassigned",
    "reveal",
    "escalated",
    "extended",
    "succeeded",
    "aborted",
    "cancelled",
)
# nodes.<node_id>.<event>: what a node may say of itself ...
NODE_SELF_EVENTS = ("joined", "heartbeat", "quit", "probed")
# ... and what only the control plane says of a node
NODE_CONTROL_EVENTS = ("qos", "banned")

# Stream limits (docs/security.md, "bounded reach"). A task subject holds at most this many
# messages and the first ones win (the server refuses more: discard-new per subject), so a
# node cannot store more than this on any subject it may use, nor replace what it said.
# `reassigned` (max_reassignments), and `reveal`, `escalated` and `extended` (once per escalation
# round) are the control-plane subjects written more than once.
MAX_MSGS_PER_TASK_SUBJECT = 4
MAX_TASK_MESSAGE_BYTES = 1024 * 1024  # a `submitted` event carries the app's input images
MAX_NODE_MESSAGE_BYTES = 64 * 1024  # an announcement with its model lists
# Two consumers per admitted node on WORK. nats-server caps a stream that names no limit
# at 1,000 consumers (500 nodes); this one names its own.
MAX_WORK_CONSUMERS = 200_000


class SubjectError(ValueError):
    """A subject that does not have the shape its stream's contract gives it."""


def task_subject(task_id: str, event: str, node_id: str = "") -> str:
    if event in NODE_TASK_EVENTS:
        if not node_id:
            raise ValueError(f"a node's {event!r} event needs the node id in its subject")
        return f"tasks.{task_id}.{event}.{node_id}"
    if node_id:
        raise ValueError(f"{event!r} is a control-plane event: its subject has no node id")
    return f"tasks.{task_id}.{event}"


def parse_task_subject(subject: str) -> tuple[str, str, str]:
    """(task id, event, node id or "") of a TASKS subject; SubjectError when the event
    is not one that may be published on a subject of that shape."""
    parts = subject.split(".")
    if parts[0] != "tasks" or len(parts) not in (3, 4) or not all(parts[1:]):
        raise SubjectError(f"not a task event subject: {subject!r}")
    event = parts[2]
    if len(parts) == 4:
        if event not in NODE_TASK_EVENTS:
            raise SubjectError(f"{event!r} is not a node's event (on {subject!r})")
        return parts[1], event, parts[3]
    if event not in CONTROL_TASK_EVENTS:
        raise SubjectError(f"{event!r} is not a control-plane event (on {subject!r})")
    return parts[1], event, ""


def parse_node_subject(subject: str) -> tuple[str, str]:
    """(node id, event) of a NODES subject."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "nodes" or parts[2] not in (*NODE_SELF_EVENTS, *NODE_CONTROL_EVENTS):
        raise SubjectError(f"not a node event subject: {subject!r}")
    return parts[1], parts[2]


def task_events(task_id: str) -> str:
    """All events of one task."""
    return f"tasks.{task_id}.>"


def all_tasks(event: str) -> str:
    """One event type across all tasks (and all nodes, for a node's event)."""
    return f"tasks.*.{event}.*" if event in NODE_TASK_EVENTS else f"tasks.*.{event}"


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


RESERVE_SUBJECT = "rpc.chain.gateway"  # fee reservations: only the gateway may publish here


def blob_rpc_subject(node_id: str) -> str:
    """Where a node hands its images to the gatekeeper's blob intake."""
    return f"rpc.blobs.{node_id}"


def join_rpc_subject(node_id: str) -> str:
    """Where a connected key asks the gatekeeper whether it is admitted as a node, and why not."""
    return f"rpc.join.{node_id}"


def node_durable(node_id: str) -> str:
    return f"node-{node_id}"


def node_control_durable(node_id: str) -> str:
    return f"node-{node_id}-control"


def node_work_consumer(node_id: str) -> ConsumerConfig:
    """A node's assignments. Created by the gatekeeper when it admits the node (a node may
    only fetch and ack: it cannot choose the filter or make it a push consumer)."""
    return ConsumerConfig(
        durable_name=node_durable(node_id),
        filter_subject=work_subject(node_id),
        ack_policy=AckPolicy.EXPLICIT,
        # short, so a node that restarts after a crash gets its next work within seconds
        # (the crashed delivery blocks the consumer until then); in_progress() keeps a
        # running task's delivery alive
        ack_wait=15.0,
        max_deliver=3,
        max_ack_pending=1,
        inactive_threshold=24 * 3600.0,  # a node id that never comes back leaves no consumer behind
    )


def node_control_consumer(node_id: str) -> ConsumerConfig:
    """A node's reveal requests, cancellations, pre-fetches and probes (created like `node_work_consumer`)."""
    return ConsumerConfig(
        durable_name=node_control_durable(node_id),
        filter_subject=control_subject(node_id),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=5,
        max_ack_pending=1_000,
        inactive_threshold=24 * 3600.0,
    )


# The events that end a task (a task has one: whichever is stored first).
OUTCOME_EVENTS = ("succeeded", "aborted", "cancelled")
WEBHOOKS_DURABLE = "gateway-webhooks"


def dispatcher_consumer() -> ConsumerConfig:
    """The dispatcher's: what fills and empties its queue and frees nodes. Queued tasks'
    messages are held (not acked) while they wait."""
    events = ("submitted", "cancelled", "started", "committed", "errored", "escalated", "succeeded", "aborted")
    return ConsumerConfig(
        durable_name=DISPATCHER_DURABLE,
        filter_subjects=[all_tasks(e) for e in events],
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=10.0,  # held (queued) messages are kept alive every 4 s
        max_deliver=-1,
        max_ack_pending=20_000,  # the most tasks that can wait in the queue
    )


def validator_consumer() -> ConsumerConfig:
    """The validator's: every task event, in order (its in-memory fold needs them all)."""
    return ConsumerConfig(
        durable_name=VALIDATOR_DURABLE,
        filter_subject="tasks.>",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=50,
        max_ack_pending=20_000,
    )


def validator_partition_consumer(partition: int) -> ConsumerConfig:
    """A partitioned validator's, one per partition on VALIDATION: every event of the tasks
    whose id hashes to `partition`, in order (shared, in turn, by whichever replica holds
    the partition's lease: lease.PartitionLeases)."""
    config = validator_consumer()
    config.durable_name = f"{VALIDATOR_DURABLE}-p{partition}"
    config.filter_subject = f"{PARTITION_PREFIX}.{partition}.>"
    return config


def validation_stream(
    partitions: int, *, replicas: int = 1, task_max_age_s: float = 7 * 24 * 3600, start_seq: int | None = None
) -> StreamConfig:
    """VALIDATION: TASKS as the partitioned validator reads it. The server copies each TASKS
    message (a source; nothing else writes here) to ``vp.<partition>.<task id>...``, the
    partition being nats-server's hash of the task id token (``partition(n, 1)``), so a
    task's events stay in one partition, in TASKS order. Work-queue retention: what every
    partition's consumer acknowledged is gone. `start_seq`: the first TASKS message copied
    (None: all of them)."""
    if not 2 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions={partitions!r}: from 2 to {MAX_PARTITIONS}")
    source = StreamSource(
        name=TASKS_STREAM,
        opt_start_seq=start_seq,
        subject_transforms=[
            SubjectTransform(
                src="tasks.*.>",
                dest=f"{PARTITION_PREFIX}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.>",
            )
        ],
    )
    return StreamConfig(
        name=VALIDATION_STREAM,
        subjects=[],
        sources=[source],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_age=task_max_age_s,
        num_replicas=replicas,
    )


def partitions_of(config: StreamConfig) -> int:
    """How many partitions a VALIDATION stream was made with (0: not one of ours)."""
    for source in config.sources or []:
        for transform in source.subject_transforms or []:
            dest = transform.dest or ""
            start = dest.find("{{partition(")
            if start >= 0:
                count = dest[start + len("{{partition(") :].split(",", 1)[0]
                return int(count) if count.strip().isdigit() else 0
    return 0


def unpartitioned(subject: str) -> str:
    """The TASKS subject of a VALIDATION message (``vp.<k>.<rest>`` -> ``tasks.<rest>``);
    any other subject as it is."""
    if subject.startswith(PARTITION_PREFIX + "."):
        parts = subject.split(".", 2)
        if len(parts) == 3:
            return "tasks." + parts[2]
    return subject


def partition_for(task_id: str, partitions: int) -> int:
    """The partition nats-server's ``partition(n, 1)`` transform puts a task in: FNV-1a
    (32 bits) of the task id token, modulo the count (which replica holds a task: its
    partition's lease, ``validator.p<k>`` in KV `leases`)."""
    h = 2166136261
    for byte in task_id.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h % partitions


def partition_of(subject: str) -> int:
    """The partition of a VALIDATION subject; -1 for any other."""
    parts = subject.split(".", 2)
    if parts[0] == PARTITION_PREFIX and len(parts) == 3 and parts[1].isdigit():
        return int(parts[1])
    return -1


def source_sequence(headers: dict[str, str] | None) -> int:
    """The TASKS sequence of a message the server copied into VALIDATION, from the
    ``Nats-Stream-Source`` header it wrote (``TASKS <seq> ...``; the server refuses a
    client's publish that carries this header, so it is the server's own). 0 when absent
    or not from TASKS."""
    value = (headers or {}).get("Nats-Stream-Source", "")
    fields = value.split(" ")
    if len(fields) >= 2 and fields[0] == TASKS_STREAM and fields[1].isdigit():
        return int(fields[1])
    return 0


def settler_consumer() -> ConsumerConfig:
    """The chain-indexer's settler: submissions (escrow) and outcomes (settle, refund,
    slash), held until their transaction is mined."""
    return ConsumerConfig(
        durable_name=SETTLER_DURABLE,
        filter_subjects=[all_tasks(name) for name in ("submitted", *OUTCOME_EVENTS)],
        ack_policy=AckPolicy.EXPLICIT,
        # held until the batch's receipt, kept alive every 10 s meanwhile; what a killed
        # settler held comes back to the next lease holder after this
        ack_wait=30.0,
        max_deliver=-1,
        max_ack_pending=20_000,
    )


def webhooks_consumer(*, timeout_s: float, max_attempts: int) -> ConsumerConfig:
    """The gateways' webhooks (one consumer shared by every gateway): outcomes to POST.
    A POST may take `timeout_s`; a message is delivered at most `max_attempts` times."""
    return ConsumerConfig(
        durable_name=WEBHOOKS_DURABLE,
        description="gateway: POST outcomes to tasks' webhook_url",
        filter_subjects=[all_tasks(event) for event in OUTCOME_EVENTS],
        deliver_policy=DeliverPolicy.NEW,  # when first created: outcomes from then on
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=timeout_s + 30.0,
        max_deliver=max_attempts,
    )


def progress_subject(task_id: str, node_id: str = "*") -> str:
    """``progress.<task_id>.<node_id>``: one node's step progress in a task (``*``: every node's)."""
    return f"progress.{task_id}.{node_id}"


ALL_PROGRESS = "progress.*.*"


def download_subject(node_id: str) -> str:
    return f"downloads.{node_id}"


def subject_token(subject: str, index: int) -> str:
    return subject.split(".")[index]


def stream_configs(
    *, replicas: int = 1, task_max_age_s: float = 7 * 24 * 3600, max_bytes: int = -1
) -> list[StreamConfig]:
    """The streams every service may declare at start (declaring is idempotent).
    `max_bytes` caps TASKS and NODES each (-1: only the server's disk)."""
    return [
        StreamConfig(
            name=TASKS_STREAM,
            subjects=["tasks.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=task_max_age_s,
            duplicate_window=120.0,
            num_replicas=replicas,
            max_bytes=max_bytes,
            max_msg_size=MAX_TASK_MESSAGE_BYTES,
            max_msgs_per_subject=MAX_MSGS_PER_TASK_SUBJECT,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            # a task is read by Direct Get (bus.read_direct: no consumer per read); an update turns it on
            allow_direct=True,
        ),
        StreamConfig(
            name=WORK_STREAM,
            subjects=["work.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=24 * 3600.0,  # work for a node that never came back; deadlines are far shorter
            duplicate_window=120.0,
            num_replicas=replicas,
            max_consumers=MAX_WORK_CONSUMERS,
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
            max_bytes=max_bytes,
            max_msg_size=MAX_NODE_MESSAGE_BYTES,
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
