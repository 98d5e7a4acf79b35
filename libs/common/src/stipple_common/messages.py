"""Every message that crosses NATS, as msgspec Structs.

Several types on one subject family form a tagged union (tag field ``type``), so one
decoder reads any event of the family. Rules (see docs/protocol.md): new fields get
defaults; an existing field never changes type; internal decoding is lenient about
unknown fields so that an older service can read a newer event.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from . import subjects
from .errors import Rejected, shorten
from .records import Ban as Ban  # KV records, re-exported: they live in records.py
from .records import IndexedStake as IndexedStake
from .records import ban_decoder as ban_decoder
from .records import indexed_stake_decoder as indexed_stake_decoder
from .taskspec import MAX_IMAGES, TaskSpec
from .vrf import SamplingProof as SamplingProof

Validation = Literal["sampled", "full"]
"""How a task is checked: `sampled` (the default) runs it on one node and, when the
control plane's VRF selects it (probability `STIPPLE_VALIDATION_RATE`), on three that are
compared; `full` always runs it on three (the app pays for three). Three is
`STIPPLE_REPLICATION`."""

# --------------------------------------------------------------------------- bounds

# Every string and list a node writes is bounded (`NODE_WRITTEN`, and a test walks them):
# an event past a bound does not decode, so it is Rejected as `undecodable` and counted
# against its node (the sentinel), never stored in a fold, shown to an app or logged whole.
# The bounds are loose (an honest node's values are far inside them): a value's form and
# tighter limits (hex digits, a signature that recovers, a key of at most 512 characters,
# a class of at most 200) are the validator's, which judges a reveal past them a bad result.
Id = Annotated[str, msgspec.Meta(max_length=128)]  # a task, node or probe id (also checked against its subject)
Digest = Annotated[str, msgspec.Meta(max_length=256)]  # a hash, commitment, signature, nonce or address
Determinism = Annotated[str, msgspec.Meta(max_length=256)]  # (the validator's is 200: longer is a bad result)
MAX_ERROR_CODE = 64
ErrorCode = Annotated[str, msgspec.Meta(max_length=MAX_ERROR_CODE)]
MAX_ERROR_MESSAGE = 2000  # characters: a node cuts a longer message (`error_message`)
ErrorMessage = Annotated[str, msgspec.Meta(max_length=MAX_ERROR_MESSAGE)]
BlobKey = Annotated[str, msgspec.Meta(max_length=512)]
MAX_PROGRESS_STEPS = 1_000_000  # a task's steps are at most 150 per image and phase
# a checkpoint digest (32 hex digits) or a latent summary (checkpoints.MAX_SUMMARY_CHARS: 686), one per fraction (3)
LatentSummaries = Annotated[list[Annotated[str, msgspec.Meta(max_length=1024)]], msgspec.Meta(max_length=8)]


def error_message(text: str) -> str:
    """`text` as a node may send it in `errored` (at most `MAX_ERROR_MESSAGE` characters)."""
    return shorten(text, MAX_ERROR_MESSAGE)


# --------------------------------------------------------------------------- tasks


class ImageResult(msgspec.Struct, frozen=True, kw_only=True):
    """One image a node computed: where it is stored, its perceptual hash and the
    SHA-256 of its PNG bytes. A node's claims: the validator recomputes both hashes from
    the stored blob before it hands an image to an app, and the gateway checks the
    SHA-256 again when it serves the image."""

    index: int
    key: BlobKey  # blob-store key, under tasks/<task_id>/<node_id>/
    phash: Digest  # 64-bit pHash as 16 hex digits
    seed: int
    width: int
    height: int
    sha256: Digest = ""  # of the PNG bytes, 64 hex digits
    # digests of this image's latents after 1/4, 1/2 and 3/4 of the steps (checkpoints.py):
    # equal between nodes of one determinism class, so skipped work shows
    checkpoints: LatentSummaries = []
    # per fraction, a summary of those latents (checkpoints.summary): compared with a measured
    # tolerance between nodes of two classes, where the digests cannot be equal
    summaries: LatentSummaries = []


class TaskSubmitted(msgspec.Struct, frozen=True, kw_only=True, tag="submitted", tag_field="type"):
    task_id: str
    spec: TaskSpec  # seed already resolved
    submitted_at: float
    source: str = "native"  # which API the app used: native, sdcn, ...
    fee: int = 0  # what the app pays for the task (smallest token unit); orders the dispatch queue
    owner: str = ""  # the API key's id that submitted it ("" when keys are off)
    webhook_url: str = ""  # where the gateway POSTs the outcome (HMAC-signed)
    validation: Validation = "sampled"  # `full`: three nodes always (`fee` pays for three)


class TaskAssigned(msgspec.Struct, frozen=True, kw_only=True, tag="assigned", tag_field="type"):
    """The dispatcher gave the task to `nodes`: one, or three when `sampling` selected it
    (or the app asked for `full` validation). No node reads this event (permissions.py):
    a node cannot tell whether it runs alone or beside two others."""

    task_id: str
    nodes: list[str]
    deadline: float  # epoch seconds by which every node must have revealed
    sampling: SamplingProof | None = None  # the VRF proof for the task id, selected or not (vrf.py)


class TaskReassigned(msgspec.Struct, frozen=True, kw_only=True, tag="reassigned", tag_field="type"):
    """`replaced` did not accept its assignment in time (reason `not_accepted`), or started
    and was lost before committing: no heartbeat within the TTL, quit or banned (`node_lost`);
    `by` takes its place, and the commit deadline moves to `deadline` (the replacement needs
    time to compute)."""

    task_id: str
    replaced: str
    by: str
    deadline: float
    reason: str = "not_accepted"


class TaskStarted(msgspec.Struct, frozen=True, kw_only=True, tag="started", tag_field="type"):
    task_id: Id
    node_id: Id


class TaskCommitted(msgspec.Struct, frozen=True, kw_only=True, tag="committed", tag_field="type"):
    """A node's binding promise of its result, before anyone reveals: `commitment` is
    `commitment.make_commitment(...)` (keccak-256, 0x hex) and `signature` its EIP-191
    signature by the node's Ethereum key (0x hex, 65 bytes)."""

    task_id: Id
    node_id: Id
    commitment: Digest
    signature: Digest
    elapsed_s: float = 0.0


class TaskRevealOpened(msgspec.Struct, frozen=True, kw_only=True, tag="reveal", tag_field="type"):
    """Every commitment is in (or the deadline passed): `nodes` may now reveal, by `deadline`.
    `round` 0 is the task's first reveal; round k the reveal of the nodes drawn by its k-th
    escalation."""

    task_id: str
    nodes: list[str]
    deadline: float
    round: int = 0


class TaskEscalated(msgspec.Struct, frozen=True, kw_only=True, tag="escalated", tag_field="type"):
    """The validator found no majority among the results (`detail` says how they split):
    rather than abort, or slash one node against one, it asks for `more` nodes to compute
    the task too, of operators the task has not had (`exclude`: its nodes so far). By
    `deadline` the dispatcher answers with `extended`; else the validator decides with what
    is in. `round` counts the task's escalations from 1."""

    task_id: str
    round: int
    more: int
    exclude: list[str]
    deadline: float
    detail: str = ""


class TaskExtended(msgspec.Struct, frozen=True, kw_only=True, tag="extended", tag_field="type"):
    """The dispatcher's answer to `escalated` (same `round`): `nodes` compute the task too and
    must commit by `deadline`; no nodes when none was eligible and free (`detail` says why),
    and the validator then decides with what is in."""

    task_id: str
    round: int
    nodes: list[str]
    deadline: float
    detail: str = ""


class ResultRevealed(msgspec.Struct, frozen=True, kw_only=True, tag="revealed", tag_field="type"):
    task_id: Id
    node_id: Id
    images: Annotated[list[ImageResult], msgspec.Meta(max_length=MAX_IMAGES)]
    elapsed_s: float = 0.0
    nonce: Digest = ""  # 0x hex, 32 bytes: opens the commitment
    # what makes this node's floating point bit-identical to another's (device, driver and
    # CUDA, torch, diffusers, dtype; threads on a CPU): results of one class must match exactly
    determinism: Determinism = ""


class NodeErrored(msgspec.Struct, frozen=True, kw_only=True, tag="errored", tag_field="type"):
    """A node could not run the task (bad input that slipped through, model missing, OOM...)."""

    task_id: Id
    node_id: Id
    code: ErrorCode
    message: ErrorMessage  # shown to the app: a node cuts it with `error_message`


# agree: paid by QoS share. mismatch, bad_commitment, bad_result, withheld: slashable. error, timeout: QoS 0.
# bad_result: what the node revealed is malformed or does not match what it stored (a blob
# whose hashes differ from the reported ones, a key outside its own prefix, a blob too big).
# withheld: the node committed, was asked to reveal and did not: the reveal is one message
# about work already done, and a node that learned (from the wait) that its task was
# sampled could otherwise hide a cheat it committed to at the price of a timeout.
# undecided: no majority (the task is refunded). cancelled: the app cancelled first.
Verdict = Literal[
    "agree", "mismatch", "bad_commitment", "bad_result", "withheld", "undecided", "error", "timeout", "cancelled"
]
SLASHABLE: tuple[Verdict, ...] = (
    "mismatch",
    "bad_commitment",
    "bad_result",
    "withheld",
)  # the verdicts that cost stake


class TaskSucceeded(msgspec.Struct, frozen=True, kw_only=True, tag="succeeded", tag_field="type"):
    """The outcome for the app, and the per-node verdicts for QoS, payment and slashing.
    One event carries both, so a decision is never half-published."""

    task_id: str
    reason: str  # unanimous | majority
    images: list[ImageResult]  # the accepted images (from an agreeing node)
    verdicts: dict[str, Verdict]
    qos: dict[str, int] = {}  # this task's QoS score per node: 10/5/2 by commit order if agreeing, else 0
    verdict_details: dict[str, str] = {}  # why, for a node judged bad_result or bad_commitment
    sampling: SamplingProof | None = None  # the assignment's VRF proof, for auditors (`stipple audit`)


class TaskAborted(msgspec.Struct, frozen=True, kw_only=True, tag="aborted", tag_field="type"):
    task_id: str
    reason: str  # no_agreement | too_few_results | no_nodes | unservable
    detail: str = ""
    verdicts: dict[str, Verdict] = {}
    qos: dict[str, int] = {}
    verdict_details: dict[str, str] = {}  # why, for a node judged bad_result or bad_commitment
    sampling: SamplingProof | None = None  # the assignment's VRF proof, when it was assigned


class TaskCancelled(msgspec.Struct, frozen=True, kw_only=True, tag="cancelled", tag_field="type"):
    """The app cancelled the task; nodes stop, nobody is paid or slashed, the fee is refunded."""

    task_id: str
    detail: str = ""


TaskEvent = (
    TaskSubmitted
    | TaskAssigned
    | TaskReassigned
    | TaskStarted
    | TaskCommitted
    | TaskRevealOpened
    | TaskEscalated
    | TaskExtended
    | ResultRevealed
    | NodeErrored
    | TaskSucceeded
    | TaskAborted
    | TaskCancelled
)
# The events that end a task. They share one message id (`<task_id>:outcome`), so the
# first published wins and a late second one is dropped by JetStream's deduplication.
OUTCOME_EVENTS = subjects.OUTCOME_EVENTS


def event_name(event: TaskEvent | NodeEvent) -> str:
    """The last subject token of an event: its tag."""
    # msgspec types a tag as str | int | None; every event above declares a str tag
    return type(event).__struct_config__.tag  # type: ignore[return-value]


# --------------------------------------------------------------------------- work


class Assignment(msgspec.Struct, frozen=True, kw_only=True):
    """What a node receives on ``work.<node_id>.task``. It does not name the other nodes."""

    task_id: str
    spec: TaskSpec
    deadline: float  # epoch seconds by which the node must have committed


class RevealRequest(msgspec.Struct, frozen=True, kw_only=True, tag="reveal", tag_field="type"):
    """On ``work.<node_id>.control``: every commitment is in; reveal by `deadline`."""

    task_id: str
    deadline: float


class CancelWork(msgspec.Struct, frozen=True, kw_only=True, tag="cancel", tag_field="type"):
    """On ``work.<node_id>.control``: stop the task (the app cancelled it, or it ended)."""

    task_id: str


class PrefetchRequest(msgspec.Struct, frozen=True, kw_only=True, tag="prefetch", tag_field="type"):
    """On ``work.<node_id>.control``: download `ref` into the model store ahead of demand
    (fewer than three live nodes hold a model tasks keep asking for), then announce it."""

    ref: str
    kind: str = "model"  # the store's kind: model, lora, vae, controlnet, ...
    task_id: str = ""  # not a task's: control messages share the field


class ProbeRequest(msgspec.Struct, frozen=True, kw_only=True, tag="probe", tag_field="type"):
    """On ``work.<node_id>.control``: the check a paused node must pass to be dispatched
    again. Run `spec` (a tiny task on a model the node serves) and answer with
    ``nodes.<node_id>.probed`` by `deadline`."""

    probe_id: str
    spec: TaskSpec
    deadline: float
    task_id: str = ""  # not a task's: control messages share the field


ControlMessage = RevealRequest | CancelWork | PrefetchRequest | ProbeRequest


# --------------------------------------------------------------------------- nodes

# What a node may say of itself is bounded (an announcement over these limits does not
# decode: it is Rejected, and a strike): every model name becomes a column of the
# dispatcher's index, so an unbounded list would be memory a node could make us spend.
ModelName = Annotated[str, msgspec.Meta(max_length=2000)]  # as long as a task's model reference may be
ModelNames = Annotated[list[ModelName], msgspec.Meta(max_length=256)]
ModelsOnDisk = Annotated[list[ModelName], msgspec.Meta(max_length=2048)]


class NodeJoined(msgspec.Struct, frozen=True, kw_only=True, tag="joined", tag_field="type"):
    """A node's announcement of itself. Believed only as far as it can be checked: the
    node id (its address) comes from the subject, the address in it must be that id, and
    its stake and operator (the stake's owner) come from the chain, never from here."""

    node_id: Id
    device: Annotated[str, msgspec.Meta(max_length=256)]  # e.g. "NVIDIA H100 80GB HBM3" or "cpu: AMD EPYC ..."
    memory_bytes: int  # VRAM (or RAM for CPU nodes)
    models: ModelNames
    version: Annotated[str, msgspec.Meta(max_length=64)]
    started_at: float
    models_on_disk: ModelsOnDisk = []  # in the node's model store (the dispatcher prefers nodes that have a model)
    models_loaded: ModelNames = []  # in memory
    # the LoRAs among models_on_disk (store entries of kind "lora"), most recently used first: what
    # the gateway lists as A1111's `GET /sdapi/v1/loras`; empty from nodes older than the field
    loras_on_disk: ModelNames = []
    address: Digest = ""  # the node's Ethereum address (its id, checksummed): it signs commitments and stakes
    # its determinism class but the dtype (hardware, driver and CUDA, torch, diffusers; threads on a
    # CPU): what it reveals must be this plus the task's dtype, and the dispatcher puts a sampled
    # task's copies in the class of its first node where it can (docs/validation.md)
    determinism: Determinism = ""

    def serves(self, model: str) -> bool:
        """The node can run `model` without a download: it serves it by name or has it on disk."""
        return model in self.models or model in self.models_on_disk


class NodeHeartbeat(msgspec.Struct, frozen=True, kw_only=True, tag="heartbeat", tag_field="type"):
    node_id: Id
    at: float
    busy: bool = False
    models_loaded: ModelNames = []


class NodeQuit(msgspec.Struct, frozen=True, kw_only=True, tag="quit", tag_field="type"):
    node_id: Id
    at: float


class NodeQos(msgspec.Struct, frozen=True, kw_only=True, tag="qos", tag_field="type"):
    """The validator's view of a node after a task it took part in, when the view changed
    (a full window of equal scores stays the same: the last message still holds)."""

    node_id: str
    qos: float  # mean score (0..10) over the last `samples` tasks (at most 50)
    samples: int
    recent_timeouts: int  # timeouts among the last 3 tasks since the last passed check; 2 or more pauses the node
    task_id: str = ""  # the task that changed it ("probe:<id>" for a passed check)


class NodeProbed(msgspec.Struct, frozen=True, kw_only=True, tag="probed", tag_field="type"):
    """A node's answer to a ProbeRequest: it ran the probe (`error` empty) or could not."""

    node_id: Id
    probe_id: Id
    elapsed_s: float
    phash: Digest = ""
    error: ErrorCode = ""  # the error code when the probe failed


class NodeBanned(msgspec.Struct, frozen=True, kw_only=True, tag="banned", tag_field="type"):
    """The control plane's (the validator's sentinel) word that a node may not take part
    until `until`: it flooded the network with messages it had no business sending. The
    gatekeeper refuses it at connect and closes its connections; the dispatcher skips it."""

    node_id: str
    reason: str  # the rejection reason that tripped the sentinel (not_assigned, bad_subject, ...)
    detail: str
    until: float  # epoch seconds
    at: float


NodeEvent = NodeJoined | NodeHeartbeat | NodeQuit | NodeQos | NodeProbed | NodeBanned


# --------------------------------------------------------------------------- chain


class ChainLog(msgspec.Struct, frozen=True, kw_only=True, tag="log", tag_field="type"):
    """A contract event from a block with enough confirmations, on
    ``chain.<contract>.<event>`` with message id ``<block_hash>:<log_index>``. `args` are
    the event's arguments by name: addresses as checksummed strings, bytes as 0x hex,
    integers as integers (uint256 amounts in the smallest token unit)."""

    contract: str  # StippleToken | NodeStaking | TaskPayment
    event: str
    args: dict[str, object]
    block_number: int
    block_hash: str
    log_index: int
    tx_hash: str


class ChainReorg(msgspec.Struct, frozen=True, kw_only=True, tag="reorg", tag_field="type"):
    """On ``chain.reorg``: blocks whose events were published are no longer on the chain
    (a reorg deeper than the confirmations). Their events are void; the events of the
    blocks that replaced them follow, with their own message ids."""

    from_block: int  # the first block no longer on the chain
    orphaned: list[str]  # the hashes of the blocks whose events are void
    at: float


ChainMessage = ChainLog | ChainReorg
chain_decoder = msgspec.json.Decoder(ChainMessage)


# Requests to the chain-indexer on ``rpc.chain.<node_id>`` (core NATS request-reply): a
# node reaches the chain through the indexer, which holds the connection (the embedded
# chain lives inside it). The node signs its own transactions; the indexer only relays.


class ChainInfoRequest(msgspec.Struct, frozen=True, kw_only=True, tag="info", tag_field="type"):
    address: Digest


class SendRawTransaction(msgspec.Struct, frozen=True, kw_only=True, tag="send", tag_field="type"):
    raw: Annotated[str, msgspec.Meta(max_length=2 + 2 * 128 * 1024)]  # the signed transaction, 0x hex (geth's 128 KiB)


class FaucetRequest(msgspec.Struct, frozen=True, kw_only=True, tag="faucet", tag_field="type"):
    """Development chains only (the embedded one): tokens to stake and ether for gas."""

    address: Digest
    tokens: int


class ReserveRequest(msgspec.Struct, frozen=True, kw_only=True, tag="reserve", tag_field="type"):
    """From the gateway, custodial mode: hold `fee` of the apps' deposit for `task_id`
    (the settler escrows it on chain soon after). The reply says whether it fits and
    what is left (`deposit`)."""

    task_id: str
    fee: int


ChainRequest = ChainInfoRequest | SendRawTransaction | FaucetRequest | ReserveRequest
chain_request_decoder = msgspec.json.Decoder(ChainRequest)


class ChainReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    error: str = ""  # an error code: faucet_unavailable, reverted, bad_request, chain_unavailable
    message: str = ""
    chain_id: int = 0
    token: str = ""
    staking: str = ""
    payment: str = ""
    nonce: int = 0  # the address's pending transaction count
    gas_price: int = 0
    ether: int = 0  # the address's balance in wei, for gas
    tokens: int = 0  # its token balance
    deposit: int = 0  # its balance in TaskPayment (what it can pay fees from)
    stake: int = 0  # its stake
    leaving: bool = False
    min_stake: int = 0
    tx_hash: str = ""
    owner: str = ""  # who owns its stake (its operator, node id form); "": the address itself, or nobody


chain_reply_decoder = msgspec.json.Decoder(ChainReply)


# --------------------------------------------------------------------------- joining


AdmissionLevel = Literal["node", "applicant"]


class JoinStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The gatekeeper's answer on ``rpc.join.<node_id>``: how this key is admitted, and why.
    `reason`: ok | no_stake | below_minimum | leaving | banned."""

    node_id: str
    level: AdmissionLevel
    reason: str
    detail: str = ""
    stake: int = 0
    min_stake: int = 0
    owner: str = ""
    banned_until: float = 0.0


class UploadReply(msgspec.Struct, frozen=True, kw_only=True):
    """The blob intake's answer to one part of an upload on ``rpc.blobs.<node_id>``.
    `continue_on`: where the next parts of this upload go (the instance that holds it)."""

    ok: bool
    error: str = ""  # bad_key | not_assigned | too_large | exists | bad_part | store_unavailable
    message: str = ""
    key: str = ""
    size: int = 0
    sha256: str = ""
    continue_on: str = ""


join_status_decoder = msgspec.json.Decoder(JoinStatus)
upload_reply_decoder = msgspec.json.Decoder(UploadReply)


# --------------------------------------------------------------------------- queue


class QueueStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The dispatcher's answer on ``dispatch.queue`` (the request is the task id)."""

    task_id: str
    queued: bool  # False: not waiting (assigned, ended or unknown)
    position: int = 0  # tasks ahead of it for the same nodes; 0 is next
    queue_length: int = 0  # every queued task
    eta_s: float = 0.0  # estimated seconds until it finishes, from the estimates ahead of it


# --------------------------------------------------------------------------- progress


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """Ephemeral step progress on ``progress.<task_id>.<node_id>`` (core NATS, may be lost);
    shown only for a node the task is assigned to."""

    task_id: Id
    node_id: Id
    step: Annotated[int, msgspec.Meta(ge=0, le=MAX_PROGRESS_STEPS)]  # and at most `total` (decode_progress)
    total: Annotated[int, msgspec.Meta(ge=0, le=MAX_PROGRESS_STEPS)]


class DownloadProgress(msgspec.Struct, frozen=True, kw_only=True):
    """Ephemeral model-download progress on ``downloads.<node_id>`` (core NATS)."""

    node_id: Id
    ref: ModelName
    downloaded_bytes: int
    total_bytes: int | None
    done: bool


NODE_WRITTEN: tuple[type[msgspec.Struct], ...] = (
    TaskStarted,
    TaskCommitted,
    ResultRevealed,
    NodeErrored,
    NodeJoined,
    NodeHeartbeat,
    NodeQuit,
    NodeProbed,
    Progress,
    DownloadProgress,
    ChainInfoRequest,
    SendRawTransaction,
    FaucetRequest,
)
"""Every payload a node may publish (`permissions.node_permissions`; its blob uploads are
bytes with headers the intake bounds, and its join question is empty): each of their strings
and lists has a bound."""

# Encoders and decoders are built once and reused.
encoder = msgspec.json.Encoder()
task_event_decoder = msgspec.json.Decoder(TaskEvent)
node_event_decoder = msgspec.json.Decoder(NodeEvent)
assignment_decoder = msgspec.json.Decoder(Assignment)
control_decoder = msgspec.json.Decoder(ControlMessage)
queue_status_decoder = msgspec.json.Decoder(QueueStatus)
progress_decoder = msgspec.json.Decoder(Progress)


def sender_of(subject: str) -> str:
    """The node a message on `subject` came from, if a node may publish there ("" for a
    control-plane subject): what a rejection is logged and counted against."""
    parts = subject.split(".")
    if parts[0] == "tasks" and len(parts) == 4:
        return parts[3]
    if parts[0] == "nodes" and len(parts) == 3 and parts[2] in subjects.NODE_SELF_EVENTS:
        return parts[1]
    if parts[0] == "progress" and len(parts) == 3:
        return parts[2]
    return ""


def _reject(subject: str, reason: str, text: str) -> Rejected:
    return Rejected(f"{text} (on {subject!r})", reason=reason, sender=sender_of(subject))


def decode_task_event(subject: str, data: bytes) -> TaskEvent:
    """A task event, believed only as far as its subject allows: the event type, the task
    id and (for a node's event) the node id are the subject's, and the payload must agree.
    Only the control plane may publish on ``tasks.<id>.<event>``; a node only on
    ``tasks.<id>.<event>.<its id>`` with a node event (NATS permissions). Anything else is
    Rejected (a consumer terminates it and counts it; a fold leaves it out)."""
    try:
        task_id, name, node_id = subjects.parse_task_subject(subject)
    except subjects.SubjectError as exc:
        raise _reject(subject, "bad_subject", str(exc)) from None
    try:
        event = task_event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # nested past the limit
        raise _reject(subject, "undecodable", f"undecodable {name} event: {exc}") from None
    if event_name(event) != name:
        raise _reject(subject, "type_mismatch", f"a {event_name(event)!r} payload on a {name!r} subject")
    if event.task_id != task_id:
        raise _reject(subject, "task_mismatch", f"an event of task {event.task_id!r} on task {task_id!r}'s subject")
    if node_id and getattr(event, "node_id", None) != node_id:
        raise _reject(subject, "node_mismatch", f"an event of node {getattr(event, 'node_id', None)!r}")
    return event


def decode_node_event(subject: str, data: bytes) -> NodeEvent:
    """A node event, checked like `decode_task_event`: type and node id from the subject
    (``nodes.<node_id>.<event>``), and an announcement's address must be its node id."""
    try:
        node_id, name = subjects.parse_node_subject(subject)
    except subjects.SubjectError as exc:
        raise _reject(subject, "bad_subject", str(exc)) from None
    try:
        event = node_event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # nested past the limit
        raise _reject(subject, "undecodable", f"undecodable {name} event: {exc}") from None
    if type(event).__struct_config__.tag != name:
        raise _reject(subject, "type_mismatch", f"a {type(event).__struct_config__.tag!r} payload")
    if event.node_id != node_id:
        raise _reject(subject, "node_mismatch", f"an event of node {event.node_id!r}")
    if isinstance(event, NodeJoined) and event.address.lower() != node_id:
        raise _reject(subject, "address_mismatch", f"an announcement with address {event.address!r}")
    return event


def decode_progress(subject: str, data: bytes) -> Progress:
    """Step progress from ``progress.<task_id>.<node_id>``, checked against its subject."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "progress":
        raise _reject(subject, "bad_subject", "not a progress subject")
    try:
        progress = progress_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # nested past the limit
        raise _reject(subject, "undecodable", f"undecodable progress: {exc}") from None
    if progress.task_id != parts[1] or progress.node_id != parts[2]:
        raise _reject(subject, "node_mismatch", f"progress of {progress.node_id!r} in {progress.task_id!r}")
    if progress.step > progress.total:  # (shown to the app as a fraction: never past 1)
        raise _reject(subject, "undecodable", f"progress at step {progress.step} of {progress.total}")
    return progress


def encode(message: msgspec.Struct) -> bytes:
    return encoder.encode(message)
