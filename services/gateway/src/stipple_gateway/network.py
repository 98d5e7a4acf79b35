"""The network as the web pages show it: ``GET /v1/network``, ``GET /v1/nodes/{node_id}``,
and the pages themselves (``/``, ``/network``, ``/nodes/{node_id}``, their files under ``/web/``).

The JSON comes from what the gateway already follows or may read, never from a stream
read per request:

- nodes (models, device, stake, liveness, busy, QoS, pause, ban): the gateway's
  NodeDirectory (the NODES stream and the `stakes` bucket). A node is *paused* while the
  validator's ``nodes.<id>.qos`` counts 2 timeouts among its last 3 tasks (what the
  dispatcher skips it for), *busy* as its last heartbeat says.
- recent tasks and their verdicts: `NetworkFold`, a bounded in-memory fold of the core
  NATS task events (``submitted``, ``assigned``, ``reassigned``, ``extended`` and the
  outcomes) that this gateway sees from its start: the last `RECENT_TASKS` tasks, and
  each node's last `PER_NODE` of them. Like step progress (progress.py), a gateway that
  starts late knows the tasks since it started, and a lost core message is a task shown
  without its model or its outcome.
- QoS history: the validator's window of the node's last 50 scored tasks (the `qos`
  bucket, one KV read per request), and the QoS means the validator published
  (``nodes.<id>.qos``) since this gateway started.
- earnings and slashes: the chain-indexer's contract events (``chain.TaskPayment.Settled``,
  ``chain.NodeStaking.Slashed``) from the CHAIN stream: one ordered consumer per gateway
  that replays the stream's last `CHAIN_REPLAY` events at start and then follows it (a
  ``chain.reorg`` voids the orphaned blocks' events). A network without a chain has none:
  the answers say so (`chain`).
- the queue length: the dispatcher's count, asked (``dispatch.queue``) about a task this
  gateway saw waiting; the dispatcher has no "whole queue" question, so with no waiting
  task in the fold it is 0, and if the dispatcher does not answer it is the fold's count.

Pages are one HTML shell per page (an import map and a module script) over Preact and htm,
vendored from npm in ``static/web/vendor/`` with their licences (no CDN, no build step, no
external fonts): they work with no internet. Files are served from a fixed list built
from that folder at import, so no request path can reach outside it.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import mimetypes
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import nats.errors
import structlog
from eth_utils import keccak
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from stipple_common import records, subjects
from stipple_common.errors import Rejected
from stipple_common.identity import is_node_id
from stipple_common.messages import (
    OUTCOME_EVENTS,
    ChainLog,
    ChainReorg,
    NodeQos,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskExtended,
    TaskReassigned,
    TaskSucceeded,
    Verdict,
    chain_decoder,
    decode_node_event,
    decode_task_event,
    queue_status_decoder,
)
from stipple_common.nodes import NodeDirectory, NodeEntry
from stipple_common.taskspec import MAX_SIDE, MAX_STEPS, SAMPLERS

from .errors import ApiError

if TYPE_CHECKING:  # the task service (tasks.py) imports this module for the fold, and knows no web framework
    from starlette.requests import Request
    from starlette.responses import Response

    from .tasks import TaskService

__all__ = ["NetworkFold", "NetworkRoutes", "NetworkView", "NodeDetail", "add_openapi", "web_assets"]

log = structlog.get_logger("stipple.gateway.network")

RECENT_TASKS = 500  # tasks the fold keeps (the oldest goes first)
PER_NODE = 50  # each node's last tasks, earnings, slashes and QoS points
MAX_NODES = 10_000  # nodes the fold keeps anything of (the least recently touched goes first)
CHAIN_REPLAY = 10_000  # CHAIN events replayed at start (the stream's last ones)
PAUSE_TIMEOUTS = 2  # timeouts among a node's last 3 tasks that pause it (validator/qos.py, dispatcher selection.py)
SHOWN_TASKS = 100  # recent tasks in GET /v1/network

WEB_DIR = Path(__file__).parent / "static" / "web"

# --------------------------------------------------------------------------- answers

NodeState = Literal["live", "busy", "paused", "banned", "offline", "quit"]
TaskState = Literal["pending", "assigned", "succeeded", "aborted", "cancelled"]
ENDED: frozenset[str] = frozenset({"succeeded", "aborted", "cancelled"})


def task_key(task_id: str) -> str:
    """The bytes32 the chain knows a task by (keccak-256 of its id), in 0x hex: public (every
    contract event names it) and taken by no route, so it stands in for an id not to show."""
    return "0x" + keccak(text=task_id).hex()


class NetworkNode(msgspec.Struct, kw_only=True):
    node_id: str  # the node's Ethereum address in lower case
    address: str  # ... checksummed
    operator: str  # who owns its stake (the node itself when it staked alone)
    device: str
    models: list[str]
    stake: int  # as the chain says (smallest token unit; 0 while leaving or with no chain)
    state: NodeState  # live (idle), busy, paused (2 recent timeouts: probed), banned, offline (no heartbeat), quit
    live: bool
    busy: bool
    paused: bool
    qos: float | None  # the validator's mean score (0..10) over its last `qos_samples` tasks; None: none yet
    qos_samples: int
    recent_timeouts: int
    last_seen_s_ago: float


class TaskSummary(msgspec.Struct, kw_only=True):
    """A task as the network pages show it (no prompt, no owner: the pages are for anyone).
    With API keys on, a task another key submitted is shown by its task key (0x..., what the
    chain calls it), not its id. The nodes of a task are shown once it ended: a node that saw
    who else runs its task would know, before it commits, whether the secret sample drew it."""

    task_id: str  # the id, or (another key's task) its task key
    status: TaskState
    model: str  # "" when this gateway missed its `submitted` event
    source: str
    submitted_at: float | None
    nodes: list[str]  # [] until the task ended
    verdicts: dict[str, Verdict]  # once finished (succeeded, aborted)
    qos: dict[str, int]  # the task's QoS score per node (10/5/2 by commit order when agreeing)
    reason: str  # the outcome's reason: unanimous, majority, no_agreement, ...
    finished_at: float | None


class QueueLength(msgspec.Struct, kw_only=True):
    length: int
    source: Literal["dispatcher", "gateway"]  # the dispatcher's count, or the tasks this gateway saw waiting


class NetworkView(msgspec.Struct, kw_only=True):
    nodes: list[NetworkNode]
    live: int
    recent_tasks: list[TaskSummary]  # newest first, at most 100
    queue: QueueLength
    chain: bool  # the network runs a chain (a chain-indexer): earnings and slashes are on chain
    since: float  # when this gateway began to follow tasks: older ones are not listed


class Payment(msgspec.Struct, kw_only=True):
    task_id: str  # "" when the task is not among the fold's (then `task_key` only)
    task_key: str  # the bytes32 the chain knows the task by (keccak-256 of its id)
    amount: int
    block_number: int
    tx_hash: str


class Slash(msgspec.Struct, kw_only=True):
    task_id: str
    task_key: str
    amount: int
    remaining: int  # the stake left after it
    block_number: int
    tx_hash: str


class Earnings(msgspec.Struct, kw_only=True):
    total: int  # over the events replayed and followed (the stream's last 10,000 at start)
    recent: list[Payment]  # newest first


class Slashes(msgspec.Struct, kw_only=True):
    total: int
    recent: list[Slash]


class QosPoint(msgspec.Struct, kw_only=True):
    at: float  # when the validator published it (this gateway's clock)
    qos: float
    samples: int
    recent_timeouts: int
    task_id: str  # the task that changed it ("probe:<id>" for a passed check)


class QosSampleView(msgspec.Struct, kw_only=True):
    task_id: str
    score: int
    verdict: str  # a verdict, or "cleared": a passed check


class NodeDetail(msgspec.Struct, kw_only=True):
    node: NetworkNode | None  # None: the node is no longer in the directory (it left long ago)
    node_id: str
    recent_tasks: list[TaskSummary]  # newest first
    qos_window: list[QosSampleView]  # the validator's window, oldest first (the `qos` bucket)
    qos_history: list[QosPoint]  # the means published since this gateway started, oldest first
    earnings: Earnings
    slashes: Slashes
    chain: bool


# --------------------------------------------------------------------------- the fold


class _SpecLite(msgspec.Struct):
    base_model: str | dict[str, Any]


class _SubmittedLite(msgspec.Struct):
    """What the fold needs of ``submitted`` (its input images, up to a megabyte, are skipped)."""

    task_id: str
    spec: _SpecLite
    submitted_at: float
    source: str = "native"
    owner: str = ""  # the API key id: who may see the task's id (`NetworkRoutes.shown_task`)


_submitted_decoder = msgspec.json.Decoder(_SubmittedLite)


class _NodeRecord:
    def __init__(self) -> None:
        self.tasks: deque[TaskSummary] = deque(maxlen=PER_NODE)
        self.qos: deque[QosPoint] = deque(maxlen=PER_NODE)
        self.payments: deque[tuple[str, Payment]] = deque(maxlen=PER_NODE)  # (block hash, payment)
        self.slashes: deque[tuple[str, Slash]] = deque(maxlen=PER_NODE)
        self.earned = 0
        self.slashed = 0
        self.by_block: dict[str, list[tuple[str, int]]] = {}  # block hash -> ("earned"|"slashed", amount)


class NetworkFold:
    """The bounded fold behind the network pages (see the module docstring)."""

    def __init__(self) -> None:
        self.tasks: OrderedDict[str, TaskSummary] = OrderedDict()
        self.keys: dict[str, str] = {}  # task key (0x hex) -> task id, for the tasks in `tasks`
        self.owners: dict[str, str] = {}  # task id -> the API key id that submitted it, for the tasks in `tasks`
        self.nodes: OrderedDict[str, _NodeRecord] = OrderedDict()
        self.since = time.time()
        self.chain = False  # a contract event was seen (NetworkRoutes.has_chain asks the `chain` bucket too)
        self.rejected = 0

    # ------------------------------------------------------------------ folding

    def node(self, node_id: str) -> _NodeRecord:
        record = self.nodes.get(node_id)
        if record is None:
            record = self.nodes[node_id] = _NodeRecord()
            while len(self.nodes) > MAX_NODES:
                self.nodes.popitem(last=False)
        else:
            self.nodes.move_to_end(node_id)
        return record

    def task(self, task_id: str) -> TaskSummary:
        summary = self.tasks.get(task_id)
        if summary is None:
            summary = self.tasks[task_id] = TaskSummary(
                task_id=task_id,
                status="pending",
                model="",
                source="",
                submitted_at=None,
                nodes=[],
                verdicts={},
                qos={},
                reason="",
                finished_at=None,
            )
            self.keys[task_key(task_id)] = task_id
            while len(self.tasks) > RECENT_TASKS:
                old, _ = self.tasks.popitem(last=False)
                self.keys.pop(task_key(old), None)
                self.owners.pop(old, None)
        return summary

    def submitted(self, task_id: str, model: str, source: str, at: float, owner: str = "") -> None:
        summary = self.task(task_id)
        summary.model, summary.source, summary.submitted_at = model, source, at
        self.owners[task_id] = owner

    def assigned(self, task_id: str, nodes: list[str]) -> None:
        summary = self.task(task_id)
        if summary.status == "pending":
            summary.status = "assigned"
        for node_id in nodes:
            if node_id not in summary.nodes:
                summary.nodes.append(node_id)
                self.node(node_id).tasks.append(summary)

    def finished(self, event: TaskSucceeded | TaskAborted | TaskCancelled) -> None:
        summary = self.task(event.task_id)
        if summary.status in ("succeeded", "aborted", "cancelled"):
            return  # the first outcome stands
        summary.finished_at = time.time()
        if isinstance(event, TaskCancelled):
            summary.status, summary.reason = "cancelled", "cancelled"
            return
        summary.status = "succeeded" if isinstance(event, TaskSucceeded) else "aborted"
        summary.reason, summary.verdicts, summary.qos = event.reason, dict(event.verdicts), dict(event.qos)
        for node_id in event.verdicts:  # a node this gateway did not see assigned
            if node_id not in summary.nodes:
                self.assigned(event.task_id, [node_id])

    def qos_published(self, event: NodeQos) -> None:
        point = QosPoint(
            at=time.time(),
            qos=round(event.qos, 3),
            samples=event.samples,
            recent_timeouts=event.recent_timeouts,
            task_id=event.task_id,
        )
        self.node(event.node_id).qos.append(point)

    def chain_event(self, message: ChainLog | ChainReorg) -> None:
        if isinstance(message, ChainReorg):
            orphaned = set(message.orphaned)
            for record in self.nodes.values():
                for block in orphaned & record.by_block.keys():
                    for kind, amount in record.by_block.pop(block):
                        if kind == "earned":
                            record.earned -= amount
                        else:
                            record.slashed -= amount
                record.payments = deque(((b, p) for b, p in record.payments if b not in orphaned), maxlen=PER_NODE)
                record.slashes = deque(((b, s) for b, s in record.slashes if b not in orphaned), maxlen=PER_NODE)
            return
        args = message.args
        task_key = str(args.get("taskId", "")).lower()
        task_id = self.keys.get(task_key, "")
        if message.contract == "TaskPayment" and message.event == "Settled":
            nodes, amounts = args.get("nodes") or [], args.get("amounts") or []
            if not isinstance(nodes, list) or not isinstance(amounts, list):
                return
            for node, amount in zip(nodes, amounts, strict=False):
                if not isinstance(node, str) or not isinstance(amount, int):
                    continue
                record = self.node(node.lower())
                while len(record.by_block) >= 4 * PER_NODE:  # a reorg is never deeper than a few hundred blocks
                    record.by_block.pop(next(iter(record.by_block)))
                record.earned += amount
                record.by_block.setdefault(message.block_hash, []).append(("earned", amount))
                payment = Payment(
                    task_id=task_id,
                    task_key=task_key,
                    amount=amount,
                    block_number=message.block_number,
                    tx_hash=message.tx_hash,
                )
                record.payments.append((message.block_hash, payment))
        elif message.contract == "NodeStaking" and message.event == "Slashed":
            node, slashed, remaining = args.get("node"), args.get("amount"), args.get("remaining")
            if not isinstance(node, str) or not isinstance(slashed, int):
                return
            amount = slashed
            record = self.node(node.lower())
            while len(record.by_block) >= 4 * PER_NODE:
                record.by_block.pop(next(iter(record.by_block)))
            record.slashed += amount
            record.by_block.setdefault(message.block_hash, []).append(("slashed", amount))
            slash = Slash(
                task_id=task_id,
                task_key=task_key,
                amount=amount,
                remaining=remaining if isinstance(remaining, int) else 0,
                block_number=message.block_number,
                tx_hash=message.tx_hash,
            )
            record.slashes.append((message.block_hash, slash))

    # ------------------------------------------------------------------ following

    async def follow(self, nc: NATS, js: JetStreamContext) -> list[Any]:
        """Subscribe to task events, QoS and chain events; returns the subscriptions."""

        async def on_task(msg: Msg) -> None:
            try:
                task_id, name, _ = subjects.parse_task_subject(msg.subject)
                if name == "submitted":
                    lite = _submitted_decoder.decode(msg.data)
                    if lite.task_id != task_id:
                        raise msgspec.ValidationError(f"an event of task {lite.task_id!r} on {msg.subject!r}")
                    model = lite.spec.base_model
                    name_of = model if isinstance(model, str) else str(model.get("name", ""))
                    self.submitted(task_id, name_of, lite.source, lite.submitted_at, lite.owner)
                    return
                event = decode_task_event(msg.subject, msg.data)
            except (Rejected, subjects.SubjectError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.rejected += 1
                log.debug("network_event_rejected", subject=msg.subject, error=str(exc))
                return
            if isinstance(event, TaskAssigned | TaskExtended):
                self.assigned(event.task_id, list(event.nodes))
            elif isinstance(event, TaskReassigned):
                self.assigned(event.task_id, [event.by])
            elif isinstance(event, TaskSucceeded | TaskAborted | TaskCancelled):
                self.finished(event)

        async def on_qos(msg: Msg) -> None:
            try:
                event = decode_node_event(msg.subject, msg.data)
            except Rejected as exc:
                log.debug("network_qos_rejected", subject=msg.subject, error=exc.message)
                return
            if isinstance(event, NodeQos):
                self.qos_published(event)

        events = ("submitted", "assigned", "reassigned", "extended", *OUTCOME_EVENTS)
        subs = [await nc.subscribe(subjects.all_tasks(event), cb=on_task) for event in events]
        subs.append(await nc.subscribe(subjects.node_subject("*", "qos"), cb=on_qos))
        subs.append(await self.follow_chain(nc, js))
        return subs

    async def follow_chain(self, nc: NATS, js: JetStreamContext) -> Any:
        """The CHAIN stream's last `CHAIN_REPLAY` events, then the live ones (an ordered
        consumer: one per gateway); without the stream (no chain-indexer yet), core NATS."""

        async def on_chain(msg: Msg) -> None:
            try:
                message = chain_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.debug("network_chain_event_undecodable", subject=msg.subject, error=str(exc))
                return
            self.chain = self.chain or isinstance(message, ChainLog)
            self.chain_event(message)

        try:
            info = await js.stream_info(subjects.CHAIN_STREAM)
        except NotFoundError:
            return await nc.subscribe("chain.>", cb=on_chain)
        start = max(1, info.state.last_seq - CHAIN_REPLAY + 1)
        return await js.subscribe(
            "chain.>",
            stream=subjects.CHAIN_STREAM,
            cb=on_chain,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=ConsumerConfig(opt_start_seq=start),
        )

    # ------------------------------------------------------------------ reading

    def recent(self, limit: int = SHOWN_TASKS) -> list[TaskSummary]:
        return list(reversed(list(self.tasks.values())[-limit:]))

    def waiting(self) -> list[TaskSummary]:
        return [t for t in self.tasks.values() if t.status == "pending" and t.submitted_at is not None]


def node_state(entry: NodeEntry, ttl_s: float, now: float) -> tuple[NodeState, bool, bool]:
    """(state, live, paused) of a directory entry, as the dispatcher would judge it."""
    paused = entry.qos is not None and entry.qos.recent_timeouts >= PAUSE_TIMEOUTS
    live = not entry.quit and now - entry.last_seen <= ttl_s and entry.banned_until <= now
    if entry.quit:
        return "quit", False, paused
    if entry.banned_until > now:
        return "banned", False, paused
    if not live:
        return "offline", False, paused
    if paused:
        return "paused", True, True
    return ("busy" if entry.busy else "live"), True, False


def network_node(directory: NodeDirectory, entry: NodeEntry, now: float) -> NetworkNode:
    state, live, paused = node_state(entry, directory.ttl_s, now)
    joined, qos = entry.joined, entry.qos
    return NetworkNode(
        node_id=joined.node_id,
        address=joined.address,
        operator=directory.operator(joined.node_id),
        device=joined.device,
        models=list(joined.models),
        stake=directory.stake(joined.node_id),
        state=state,
        live=live,
        busy=live and entry.busy,
        paused=paused,
        qos=round(qos.qos, 3) if qos is not None and qos.samples else None,
        qos_samples=qos.samples if qos is not None else 0,
        recent_timeouts=qos.recent_timeouts if qos is not None else 0,
        last_seen_s_ago=round(now - entry.last_seen, 3),
    )


# --------------------------------------------------------------------------- static files


def web_assets() -> dict[str, str]:
    """Every file under static/web/ (relative path -> media type): the only paths ``/web/``
    serves, fixed at import."""
    out: dict[str, str] = {}
    for path in sorted(WEB_DIR.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            name = path.relative_to(WEB_DIR).as_posix()
            if name.endswith((".js", ".mjs")):
                media = "text/javascript"
            else:
                media = mimetypes.guess_type(name)[0] or "text/plain"
            out[name] = media
    return out


WEB_ASSETS = web_assets()
IMPORT_MAP = {
    "imports": {
        "preact": "/web/vendor/preact.mjs",
        "preact/hooks": "/web/vendor/hooks.mjs",
        "htm": "/web/vendor/htm.mjs",
    }
}
PAGE_CONFIG = {"samplers": list(SAMPLERS), "max_side": MAX_SIDE, "max_steps": MAX_STEPS}
PAGES = {"generator": "Stipple: generate", "network": "Stipple: network", "node": "Stipple: node"}


def page_html(page: str) -> str:
    """A page's HTML shell: the import map, the stylesheet, its config and its module."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{PAGES[page]}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/web/style.css">
<script type="importmap">{IMPORT_MAP_JSON}</script>
<script type="application/json" id="stipple-config">{json.dumps(PAGE_CONFIG)}</script>
<script type="module" src="/web/{page}.js"></script>
</head>
<body>
<div id="app"><noscript>This page needs JavaScript. The API is documented at <a href="/docs">/docs</a>.</noscript></div>
</body>
</html>
"""


# --------------------------------------------------------------------------- handlers


# The pages' security headers: scripts, styles, fetches and everything else from this
# origin only (images also from blob: and data:, which the pages make of fetched PNGs and of
# a chosen source image). The import map is the one inline script, allowed by its hash; the
# JSON config block is data, which no browser runs. Node-announced strings (device, models)
# and task fields are rendered as text by Preact; this is the second line behind that.
IMPORT_MAP_JSON = json.dumps(IMPORT_MAP)
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'sha256-"
        + base64.b64encode(hashlib.sha256(IMPORT_MAP_JSON.encode()).digest()).decode()
        + "'",
        "img-src 'self' blob: data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _caller(request: Request) -> str:
    """The API key id the request came with ("" with keys off)."""
    return getattr(request.state, "key_id", "")


def _json(body: msgspec.Struct) -> Response:
    from starlette.responses import Response  # here, not at the top: see TYPE_CHECKING above

    return Response(
        msgspec.json.encode(body), media_type="application/json", headers={"X-Content-Type-Options": "nosniff"}
    )


def _html(page: str) -> Response:
    from starlette.responses import HTMLResponse

    return HTMLResponse(page_html(page), headers=SECURITY_HEADERS)


class NetworkRoutes:
    """The network's JSON and the web pages (routes in app.py's `create_app`)."""

    def __init__(self, tasks: TaskService) -> None:
        self.tasks = tasks
        self._qos_kv: KeyValue | None = None

    @property
    def fold(self) -> NetworkFold:
        return self.tasks.network

    def shown_id(self, task_id: str, caller: str) -> str:
        """`task_id` if `caller` (an API key id, "" with keys off) may see it, else its task key:
        with keys on, only the key that submitted a task learns its id from these answers."""
        if not self.tasks.keys.enabled or self.fold.owners.get(task_id) == caller:
            return task_id
        return task_key(task_id)

    def shown_task(self, summary: TaskSummary, caller: str) -> TaskSummary:
        """`summary` as `caller` may see it (TaskSummary's docstring says why)."""
        task_id = self.shown_id(summary.task_id, caller)
        if summary.status in ENDED and task_id == summary.task_id:
            return summary
        if summary.status in ENDED:
            return msgspec.structs.replace(summary, task_id=task_id)
        return msgspec.structs.replace(summary, task_id=task_id, nodes=[], verdicts={}, qos={})

    def _nodes(self, now: float) -> list[NetworkNode]:
        directory = self.tasks.directory
        nodes = [network_node(directory, entry, now) for entry in directory.entries.values()]
        return sorted(nodes, key=lambda n: (not n.live, n.node_id))

    async def queue_length(self) -> QueueLength:
        waiting = self.fold.waiting()
        if not waiting:
            return QueueLength(length=0, source="gateway")
        try:
            reply = await self.tasks.nc.request(subjects.QUEUE_STATUS, waiting[0].task_id.encode(), timeout=0.25)
            status = queue_status_decoder.decode(reply.data)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            log.info("queue_length_unavailable", error=type(exc).__name__)
            return QueueLength(length=len(waiting), source="gateway")
        if status.queued:
            return QueueLength(length=status.queue_length, source="dispatcher")
        return QueueLength(length=len(waiting), source="gateway")  # assigned meanwhile: the fold's count

    async def has_chain(self) -> bool:
        """Does this network run a chain: a contract event seen, or the chain-indexer's
        deployment record (what the gateway's wallet asks too, payment.py)."""
        if self.fold.chain:
            return True
        try:
            await (await self.tasks.js.key_value(subjects.CHAIN_BUCKET)).get(records.DEPLOYMENT_KEY)
        except (BucketNotFoundError, KeyNotFoundError):
            return False
        self.fold.chain = True
        return True

    async def network(self, request: Request) -> Response:
        now = time.time()
        nodes = self._nodes(now)
        caller = _caller(request)
        return _json(
            NetworkView(
                nodes=nodes,
                live=sum(1 for n in nodes if n.live),
                recent_tasks=[self.shown_task(t, caller) for t in self.fold.recent()],
                queue=await self.queue_length(),
                chain=await self.has_chain(),
                since=self.fold.since,
            )
        )

    async def qos_window(self, node_id: str) -> list[QosSampleView]:
        try:
            if self._qos_kv is None:
                self._qos_kv = await self.tasks.js.key_value(subjects.QOS_BUCKET)
            window = await records.get(self._qos_kv, node_id, records.qos_window_decoder)
        except BucketNotFoundError:
            return []  # no validator has scored anything yet
        except msgspec.DecodeError as exc:
            log.warning("qos_window_undecodable", node_id=node_id, error=str(exc))
            return []
        return [QosSampleView(task_id=s.task_id, score=s.score, verdict=s.verdict) for s in window or []]

    async def node(self, request: Request) -> Response:
        node_id = request.path_params["node_id"]
        if not is_node_id(node_id):
            raise ApiError(
                404,
                "not_found",
                f"node_id: {node_id[:100]!r} is not a node id (0x and 40 lower-case hex digits)",
                field="node_id",
                value=node_id[:100],
            )
        entry = self.tasks.directory.entries.get(node_id)
        record = self.fold.nodes.get(node_id)
        if entry is None and record is None:
            raise ApiError(404, "not_found", f"node_id: no node {node_id!r} is known", field="node_id", value=node_id)
        record = record or _NodeRecord()
        caller = _caller(request)
        shown = self.shown_id
        window = [msgspec.structs.replace(s, task_id=shown(s.task_id, caller)) for s in await self.qos_window(node_id)]
        # a payment or slash names its task key always, and its id only to whom shown_id shows it
        payments = [
            msgspec.structs.replace(p, task_id="" if shown(p.task_id, caller) != p.task_id else p.task_id)
            for _, p in reversed(record.payments)
        ]
        slashes = [
            msgspec.structs.replace(s, task_id="" if shown(s.task_id, caller) != s.task_id else s.task_id)
            for _, s in reversed(record.slashes)
        ]
        detail = NodeDetail(
            node=network_node(self.tasks.directory, entry, time.time()) if entry is not None else None,
            node_id=node_id,
            # ended tasks only: one running would tell who else runs it (TaskSummary)
            recent_tasks=[self.shown_task(t, caller) for t in reversed(record.tasks) if t.status in ENDED],
            qos_window=window,
            qos_history=[msgspec.structs.replace(p, task_id=shown(p.task_id, caller)) for p in record.qos],
            earnings=Earnings(total=record.earned, recent=payments),
            slashes=Slashes(total=record.slashed, recent=slashes),
            chain=await self.has_chain(),
        )
        return _json(detail)

    async def generator_page(self, request: Request) -> Response:
        return _html("generator")

    async def network_page(self, request: Request) -> Response:
        return _html("network")

    async def node_page(self, request: Request) -> Response:
        return _html("node")

    async def asset(self, request: Request) -> Response:
        """A file of the pages, from the fixed list (`WEB_ASSETS`); anything else is 404."""
        name = request.path_params["path"]
        media_type = WEB_ASSETS.get(name)
        if media_type is None:
            raise ApiError(404, "not_found", f"no web asset {name[:100]!r}", field="path", value=name[:100])
        from starlette.responses import FileResponse

        # no-cache: revalidated (ETag) on every load, so a new release is never mixed with an old file
        return FileResponse(
            WEB_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache", **SECURITY_HEADERS}
        )


# --------------------------------------------------------------------------- OpenAPI


def add_openapi(paths: dict[str, Any], schemas: dict[str, Any], keyed: Any, responses: Any, ref: Any) -> None:
    """Add the routes above, and their answers' schemas, to the OpenAPI document that
    openapi.py's `build` makes (it passes its `KEYED`, `_responses(ok, errors)` and `_json(name)`)."""
    _, own = msgspec.json.schema_components([NetworkView, NodeDetail], ref_template="#/components/schemas/{name}")
    for name, schema in own.items():
        if "description" in schema:  # msgspec releases differ in how they dedent docstrings
            schema["description"] = inspect.cleandoc(schema["description"])
        if schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas named {name!r} in the OpenAPI document")
    page = {
        "200": {
            "description": "An HTML page (its scripts under /web/: it works with no internet).",
            "content": {"text/html": {}},
        }
    }
    node_id = {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}
    asset = {"name": "path", "in": "path", "required": True, "schema": {"type": "string", "enum": sorted(WEB_ASSETS)}}
    files: dict[str, Any] = {"text/javascript": {}, "text/css": {}, "text/plain": {}}
    paths.update(
        {
            "/v1/network": {
                "get": {
                    "summary": "Nodes with state, stake, QoS and models; recent tasks with verdicts; queue length",
                    "operationId": "getNetwork",
                    "security": keyed,
                    "responses": responses({"200": {"description": "The network.", "content": ref("NetworkView")}}, []),
                }
            },
            "/v1/nodes/{node_id}": {
                "get": {
                    "summary": "One node: its recent tasks and verdicts, QoS history, earnings and slashes",
                    "operationId": "getNode",
                    "security": keyed,
                    "parameters": [{**node_id, "schema": {"type": "string", "pattern": "^0x[0-9a-f]{40}$"}}],
                    "responses": responses({"200": {"description": "The node.", "content": ref("NodeDetail")}}, [404]),
                }
            },
            "/": {
                "get": {
                    "summary": "Web page: generate images",
                    "operationId": "generatorPage",
                    "security": [],
                    "responses": page,
                }
            },
            "/network": {
                "get": {
                    "summary": "Web page: the network",
                    "operationId": "networkPage",
                    "security": [],
                    "responses": page,
                }
            },
            "/nodes/{node_id}": {
                "get": {
                    "summary": "Web page: one node",
                    "operationId": "nodePage",
                    "security": [],
                    "parameters": [node_id],
                    "responses": page,
                }
            },
            "/web/{path}": {
                "get": {
                    "summary": "The web pages' scripts, stylesheet and vendored libraries (Preact, htm)",
                    "operationId": "webAsset",
                    "security": [],
                    "parameters": [asset],
                    "responses": {
                        "200": {"description": "The file.", "content": files},
                        "404": {"description": "No such file.", "content": ref("ErrorBody")},
                    },
                }
            },
        }
    )
