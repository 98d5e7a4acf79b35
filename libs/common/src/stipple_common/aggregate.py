"""The task aggregate: a task's state is the fold of its events (``tasks.<id>.>``).

`apply` is pure and strict: an event that is not allowed in the current state raises
InvalidTransition. `replay` folds a stream's worth of events and sets aside the ones
that do not apply (a node that answers twice, an event for a finished task), so a
projection can always be rebuilt. The state machine is drawn in docs/task-lifecycle.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import singledispatch
from typing import Literal

import msgspec

from .errors import StippleError
from .messages import (
    ImageResult,
    NodeErrored,
    ResultRevealed,
    SamplingProof,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskEscalated,
    TaskEvent,
    TaskExtended,
    TaskReassigned,
    TaskRevealOpened,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
    Validation,
    Verdict,
)
from .taskspec import TaskSpec

TaskStatus = Literal["pending", "assigned", "running", "revealing", "escalating", "succeeded", "aborted", "cancelled"]
NodeStatus = Literal["assigned", "started", "committed", "revealed", "errored", "replaced"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "aborted", "cancelled"})
LIVE: tuple[str, ...] = ("assigned", "running", "revealing", "escalating")


class InvalidTransition(StippleError):
    code = "invalid_transition"


class NodeRun(msgspec.Struct, frozen=True, kw_only=True):
    """One node's part in a task."""

    node_id: str
    status: NodeStatus = "assigned"
    images: list[ImageResult] = []
    elapsed_s: float = 0.0
    error_code: str = ""
    error_message: str = ""
    commitment: str = ""
    signature: str = ""
    commit_order: int = 0  # 1 for the first node to commit, 2 for the second, ...
    nonce: str = ""
    determinism: str = ""  # the class the node revealed (checkpoints.py)


class Task(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    status: TaskStatus
    spec: TaskSpec
    submitted_at: float
    source: str = "native"
    fee: int = 0
    owner: str = ""
    webhook_url: str = ""
    validation: Validation = "sampled"
    sampling: SamplingProof | None = None  # the dispatcher's VRF proof (its `assigned` event)
    deadline: float | None = None  # for commitments
    reveal_deadline: float | None = None
    round: int = 0  # escalations so far (TaskEscalated): each drew more nodes
    escalation_deadline: float | None = None  # while escalating: when the validator stops waiting for nodes
    lapsed: list[str] = []  # nodes of an earlier round that had not committed by its deadline: not waited for
    nodes: dict[str, NodeRun] = {}
    reason: str = ""  # outcome reason code
    detail: str = ""
    images: list[ImageResult] = []  # accepted images, once succeeded
    verdicts: dict[str, Verdict] = {}
    verdict_details: dict[str, str] = {}  # why a node's result was not believed (bad_result, bad_commitment)
    qos: dict[str, int] = {}

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def active(self) -> dict[str, NodeRun]:
        """The nodes that count: all but those replaced by another."""
        return {node: run for node, run in self.nodes.items() if run.status != "replaced"}

    @property
    def reassignments(self) -> int:
        return sum(1 for run in self.nodes.values() if run.status == "replaced")

    @property
    def commitments_in(self) -> bool:
        """Every active node has committed (or errored)."""
        return bool(self.nodes) and all(
            run.status not in ("assigned", "started") for node, run in self.active.items() if node not in self.lapsed
        )

    @property
    def reveals_in(self) -> bool:
        """The reveal is open and every node that committed has revealed (or errored)."""
        return self.status == "revealing" and all(run.status != "committed" for run in self.nodes.values())

    def committed_nodes(self) -> list[str]:
        return [node for node, run in self.nodes.items() if run.status == "committed"]


def _fail(task: Task | None, event: TaskEvent, why: str) -> InvalidTransition:
    state = task.status if task else "none"
    return InvalidTransition(f"{type(event).__name__} for task {event.task_id} not allowed in state {state}: {why}")


@singledispatch
def _mutate(event: TaskEvent, task: Task | None) -> Task:
    raise TypeError(f"no mutator for {type(event).__name__}")


@_mutate.register
def _(event: TaskSubmitted, task: Task | None) -> Task:
    if task is not None:
        raise _fail(task, event, "already submitted")
    return Task(
        task_id=event.task_id,
        status="pending",
        spec=event.spec,
        submitted_at=event.submitted_at,
        source=event.source,
        fee=event.fee,
        owner=event.owner,
        webhook_url=event.webhook_url,
        validation=event.validation,
    )


def _require(task: Task | None, event: TaskEvent, *allowed: str) -> Task:
    if task is None:
        raise _fail(task, event, "task was never submitted")
    if task.status not in allowed:
        raise _fail(task, event, f"expected one of {', '.join(allowed)}")
    return task


@_mutate.register
def _(event: TaskAssigned, task: Task | None) -> Task:
    task = _require(task, event, "pending")
    if len(set(event.nodes)) != len(event.nodes) or not event.nodes:
        raise _fail(task, event, f"nodes must be distinct and non-empty, got {event.nodes}")
    runs = {node: NodeRun(node_id=node) for node in event.nodes}
    return msgspec.structs.replace(
        task, status="assigned", nodes=runs, deadline=event.deadline, sampling=event.sampling
    )


def _node_run(
    task: Task, event: TaskStarted | TaskCommitted | ResultRevealed | NodeErrored, *allowed: NodeStatus
) -> NodeRun:
    run = task.nodes.get(event.node_id)
    if run is None:
        raise _fail(task, event, f"node {event.node_id} is not assigned to this task")
    if run.status not in allowed:
        raise _fail(task, event, f"node {event.node_id} is already {run.status}")
    return run


def _with_run(task: Task, run: NodeRun) -> Task:
    status = task.status if task.status in ("revealing", "escalating") else "running"
    return msgspec.structs.replace(task, status=status, nodes={**task.nodes, run.node_id: run})


@_mutate.register
def _(event: TaskReassigned, task: Task | None) -> Task:
    task = _require(task, event, "assigned", "running")
    run = task.nodes.get(event.replaced)
    if run is None or run.status not in ("assigned", "started"):
        raise _fail(task, event, f"node {event.replaced} is not an assigned node that has yet to commit")
    if event.by in task.nodes:
        raise _fail(task, event, f"node {event.by} already has a part in this task")
    nodes = {**task.nodes, event.replaced: msgspec.structs.replace(run, status="replaced")}
    nodes[event.by] = NodeRun(node_id=event.by)
    return msgspec.structs.replace(task, nodes=nodes, deadline=max(task.deadline or 0.0, event.deadline))


@_mutate.register
def _(event: TaskStarted, task: Task | None) -> Task:
    task = _require(task, event, "assigned", "running")
    run = _node_run(task, event, "assigned")
    return _with_run(task, msgspec.structs.replace(run, status="started"))


@_mutate.register
def _(event: TaskCommitted, task: Task | None) -> Task:
    task = _require(task, event, "assigned", "running")
    run = _node_run(task, event, "assigned", "started")
    order = 1 + sum(1 for r in task.nodes.values() if r.commit_order)
    committed = msgspec.structs.replace(
        run,
        status="committed",
        commitment=event.commitment,
        signature=event.signature,
        commit_order=order,
        elapsed_s=event.elapsed_s,
    )
    return _with_run(task, committed)


@_mutate.register
def _(event: TaskRevealOpened, task: Task | None) -> Task:
    task = _require(task, event, "assigned", "running")
    not_committed = [node for node in event.nodes if task.nodes.get(node, NodeRun(node_id=node)).status != "committed"]
    if not_committed:
        raise _fail(task, event, f"nodes {not_committed} have not committed")
    return msgspec.structs.replace(task, status="revealing", reveal_deadline=event.deadline)


@_mutate.register
def _(event: TaskEscalated, task: Task | None) -> Task:
    task = _require(task, event, "revealing")
    if event.round != task.round + 1:
        raise _fail(task, event, f"round {event.round}, expected {task.round + 1}")
    return msgspec.structs.replace(task, status="escalating", round=event.round, escalation_deadline=event.deadline)


@_mutate.register
def _(event: TaskExtended, task: Task | None) -> Task:
    task = _require(task, event, "escalating")
    if event.round != task.round:
        raise _fail(task, event, f"round {event.round}, expected {task.round}")
    if len(set(event.nodes)) != len(event.nodes) or set(event.nodes) & set(task.nodes):
        raise _fail(task, event, f"nodes must be distinct and new to the task, got {event.nodes}")
    if not event.nodes:  # none could be drawn: the validator decides with what is in
        return msgspec.structs.replace(task, escalation_deadline=0.0)
    lapsed = [node for node, run in task.active.items() if run.status in ("assigned", "started")]
    nodes = {**task.nodes, **{node: NodeRun(node_id=node) for node in event.nodes}}
    return msgspec.structs.replace(
        task,
        status="assigned",
        nodes=nodes,
        deadline=event.deadline,
        reveal_deadline=None,
        escalation_deadline=None,
        lapsed=[*task.lapsed, *lapsed],
    )


@_mutate.register
def _(event: ResultRevealed, task: Task | None) -> Task:
    task = _require(task, event, "revealing")
    run = _node_run(task, event, "committed")
    expected = task.spec.task_config.num_images
    if len(event.images) != expected:
        raise _fail(task, event, f"node {event.node_id} revealed {len(event.images)} images, expected {expected}")
    revealed = msgspec.structs.replace(
        run, status="revealed", images=event.images, nonce=event.nonce, determinism=event.determinism
    )
    return _with_run(task, revealed)


@_mutate.register
def _(event: NodeErrored, task: Task | None) -> Task:
    task = _require(task, event, *LIVE)
    run = _node_run(task, event, "assigned", "started", "committed")
    errored = msgspec.structs.replace(run, status="errored", error_code=event.code, error_message=event.message)
    return _with_run(task, errored)


@_mutate.register
def _(event: TaskSucceeded, task: Task | None) -> Task:
    task = _require(task, event, *LIVE)
    return msgspec.structs.replace(
        task,
        status="succeeded",
        reason=event.reason,
        images=event.images,
        verdicts=event.verdicts,
        verdict_details=event.verdict_details,
        qos=event.qos,
    )


@_mutate.register
def _(event: TaskAborted, task: Task | None) -> Task:
    task = _require(task, event, "pending", *LIVE)
    return msgspec.structs.replace(
        task,
        status="aborted",
        reason=event.reason,
        detail=event.detail,
        verdicts=event.verdicts,
        verdict_details=event.verdict_details,
        qos=event.qos,
    )


@_mutate.register
def _(event: TaskCancelled, task: Task | None) -> Task:
    task = _require(task, event, "pending", *LIVE)
    verdicts: dict[str, Verdict] = {node: "cancelled" for node in task.nodes}
    return msgspec.structs.replace(task, status="cancelled", reason="cancelled", detail=event.detail, verdicts=verdicts)


def apply(task: Task | None, event: TaskEvent) -> Task:
    """The state after `event`; raises InvalidTransition if the event is not allowed."""
    if task is not None and event.task_id != task.task_id:
        raise _fail(task, event, f"event belongs to task {event.task_id}, not {task.task_id}")
    return _mutate(event, task)


def replay(events: Iterable[TaskEvent]) -> tuple[Task | None, list[tuple[TaskEvent, InvalidTransition]]]:
    """Fold events in stream order, setting aside the ones that do not apply."""
    task: Task | None = None
    rejected: list[tuple[TaskEvent, InvalidTransition]] = []
    for event in events:
        try:
            task = apply(task, event)
        except InvalidTransition as exc:
            rejected.append((event, exc))
    return task, rejected
