"""The dispatcher's decisions: pure logic, no I/O (service.py carries them out).

`TaskQueue` holds every task this dispatcher handles, one `Task` record each, either
queued (waiting for free nodes; its `submitted` message held, unacknowledged) or
running (assigned: its nodes, which of them still hold a slot, which have not started
yet). Its methods take what happened (a task event, the time) and return what to do
about it: `Decision`s, plain records of the messages to publish, the held message to
settle and what to count. They never publish, await or read a clock other than
`time.perf_counter` (the cost of a decision, for its histogram); the node picks are
`NodeIndex.pick`'s (selection.py).

- `submit`: a task no registered node has ever served is aborted at once (`unservable`);
  any other joins the queue, ordered by fee per estimated GPU-second, then by age. Tasks
  that keep asking for a downloadable model (a URL or a hub repo id, `prefetch_demand`
  within `prefetch_window_s`) that fewer than `replication` live nodes hold get it
  pre-fetched by other live nodes, once per `prefetch_cooldown_s` and model (`Prefetch`).
- sampling: each task's copies are drawn when it is queued, by the dispatcher's VRF key
  over its id (stipple_common.vrf, `SamplingProof`): one node, or `replication` when the
  proof selects it (probability `validation_rate`) or the app asked for `full`
  validation. The proof rides on the `assigned` event, which no node reads, and every
  copy gets the same `Assignment` in the same decision: a node cannot tell.
- `pump`: each queued task, best first, gets its copies: eligible free nodes of distinct
  operators (`Assign`). A model with no free nodes is blocked for the rest of
  the pass: the tasks behind it for that model are not tried (`Wait`), unless they waited
  `dispatch_timeout_s`, which aborts them with `no_nodes` (`Abort`): no task hangs.
  Nodes with every model of the task loaded are drawn first (`warm_first`), and for its
  first `warm_wait_s` a task takes only those while enough live nodes have them loaded:
  it waits for one to free up rather than have a node spend as long loading them
  (bench/warm_models.py).
- `replace_overdue`: a node that has not `started` within `accept_timeout_s` of its
  assignment (`not_accepted`), or that started and was lost before it committed or erred
  (`node_lost`: no longer live by the node index, no heartbeat within `node_ttl_s` or
  quit, or banned), is replaced by an eligible node of an operator the task never had
  (`Replace`: the replaced node is cancelled; the reason is `reassigned.reason`), up to
  `max_reassignments` per task, once per node; beyond that, the validator's commit
  deadline takes over.
- `extend`: the validator found no majority and escalated (`escalated`): `more` eligible
  free nodes of operators the task never had get it too (`Extend`); when too few are
  free, the caller asks again later, and at the escalation's deadline gives up (`Extend`
  with no nodes: the validator decides with what is in).
- `apply`: `started` stops a node's accept timer and starts watching it for loss,
  `committed` / `errored` free its slot (and stop the watch: a node that committed is
  never replaced), an outcome forgets the task; `cancelled` drops a queued task or
  cancels an assigned one's nodes (`Cancel`).
- `status`: a queued task's position among the tasks that compete for its nodes (same
  base model) and an ETA from each node's measured speed (speed.py): when enough of its
  eligible nodes are free, counting what their running tasks have left, after the tasks
  ahead of it, plus its own run; a running task's ETA is its predicted run less what it
  has run. The times `apply` is given (`at`: when the stream stored the event) teach
  the speed model: from a node's assignment to its `committed`.

`pump` and `replace_overdue` decide lazily: each decision is applied to the state just
before it is yielded, and the next one is made only when the caller asks for it. A
caller whose publishing fails stops iterating (the rest of the queue stays as it was)
and hands the decision it could not carry out to `undo`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeAlias, TypeVar

import numpy as np

from stipple_common import __version__
from stipple_common.messages import (
    Assignment,
    CancelWork,
    NodeErrored,
    PrefetchRequest,
    QueueStatus,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskEscalated,
    TaskEvent,
    TaskExtended,
    TaskReassigned,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
)
from stipple_common.taskspec import TaskSpec
from stipple_common.vrf import SamplingProof, VrfKey

from .selection import NodeIndex, NotEnoughNodes, Requirements, task_models
from .settings import DispatcherSettings, parse_memory
from .speed import Forecast, Job, SpeedModel, work_of

H = TypeVar("H")
"""The I/O layer's handle on a task's held `submitted` message (a nats Msg): kept here
while the task is queued and handed back in the decision that ends its wait."""

Carrier = Mapping[str, str]
"""A task's trace context (tracing.carrier()): what is done for it later continues its trace."""

Forecasted: TypeAlias = tuple[float, tuple[int, ...], float, tuple[float, float, int], dict[str, float]]
"""A model's last ETA pass: when, `_fingerprint`, its cost (s), the nodes' mean (overhead,
per_work) and slot count, and each queued task's predicted end."""

ReplaceReason: TypeAlias = Literal["not_accepted", "node_lost"]
"""Why a node is replaced (`TaskReassigned.reason`): it did not start in time, or it
started and its node was lost (not live, or banned) before it committed or erred."""


def estimate_seconds(spec: TaskSpec, seconds_per_step: float) -> float:
    """GPU seconds a task is expected to take on one node (scales with steps and pixels)."""
    config = spec.task_config
    steps = config.steps + (spec.refiner.steps if spec.refiner else 0)
    return seconds_per_step * steps * config.num_images * (config.image_width * config.image_height) / 512**2


@dataclass(eq=False)
class Task(Generic[H]):
    """One task this dispatcher handles, queued or running."""

    event: TaskSubmitted
    estimate_s: float  # GPU seconds on one node (estimate_seconds)
    trace: Carrier = field(default_factory=dict)
    held: H | None = None  # while queued: its `submitted` message, settled when the wait ends
    members: list[str] = field(default_factory=list)  # once assigned: every node it ever had, replaced ones too
    holding: set[str] = field(default_factory=set)  # nodes still holding a slot for it (not committed or errored)
    accepting: dict[str, float] = field(default_factory=dict)  # node -> when it was assigned, until it starts
    working: set[str] = field(default_factory=set)  # started, neither committed nor errored: watched for loss
    began: dict[str, float] = field(default_factory=dict)  # node -> when it was assigned, kept once it started (ETAs)
    last_commit: float = 0.0  # when its latest `committed` was stored (the validator's time is timed from it)
    sampling: SamplingProof | None = None  # the VRF's draw for this task (None: no key)
    copies: int = 1  # nodes it runs on: 1, or `replication` when sampled or `full`
    extended: int = 0  # nodes added by escalations (not reassignments)
    rank: tuple[float, float] = field(init=False, repr=False)  # queue order: best first

    def __post_init__(self) -> None:
        # by what the app pays per node-run: `full` pays for every copy; a sampled task pays for
        # one, and is not to wait longer because the draw chose it (nor show that it was)
        paid = self.copies if self.event.validation == "full" else 1
        priority = self.event.fee / max(self.estimate_s * paid, 1e-6)
        self.rank = (-priority, self.event.submitted_at)

    @property
    def task_id(self) -> str:
        return self.event.task_id


# ---------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Assign(Generic[H]):
    """Publish `assigned`, then `work` to each of its nodes, then settle `held`."""

    assigned: TaskAssigned
    work: Assignment
    held: H | None
    trace: Carrier
    submitted_at: float
    waited_s: float  # in the queue, when it was decided
    decision_s: float


@dataclass(frozen=True)
class Wait:
    """No free nodes for the task yet: it stays queued (only the decision's cost to count)."""

    task_id: str
    decision_s: float


@dataclass(frozen=True)
class Abort(Generic[H]):
    """Publish `aborted` (its reason is the `tasks_total` result), then settle `held`.
    `trace` is None when decided in the task's own message handler (`unservable`);
    `decision_s` is None when no nodes were picked."""

    aborted: TaskAborted
    held: H | None = None
    trace: Carrier | None = None
    decision_s: float | None = None


@dataclass(frozen=True)
class Replace:
    """Publish `reassigned`, then `work` to the new node (`reassigned.by`), then `cancel`
    to the node it replaces (`reassigned.replaced`); why: `reassigned.reason`."""

    reassigned: TaskReassigned
    work: Assignment
    cancel: CancelWork
    trace: Carrier


@dataclass(frozen=True)
class NoReplacement:
    """A silent or lost node could not be replaced now (nothing to publish: a warning)."""

    task_id: str
    node_id: str
    detail: str
    trace: Carrier
    reason: ReplaceReason = "not_accepted"


@dataclass(frozen=True)
class Extend:
    """Publish `extended`, then `work` to each of its nodes (none: nothing could be drawn)."""

    extended: TaskExtended
    work: Assignment
    trace: Carrier


@dataclass(frozen=True)
class Cancel(Generic[H]):
    """Settle `held` (a queued task), then send `cancel` to each of `nodes`. `nodes` is
    None for a task this dispatcher does not hold: its `assigned` event (in the stream)
    names them, if there is one."""

    cancel: CancelWork
    nodes: list[str] | None
    held: H | None
    was_queued: bool


@dataclass(frozen=True)
class Prefetch:
    """Send `request` to each of `nodes` (one round: `round_id`); `holders` live nodes have it."""

    request: PrefetchRequest
    nodes: list[str]
    round_id: int
    holders: int


Decision: TypeAlias = Assign[H] | Wait | Abort[H] | Replace | NoReplacement | Extend | Cancel[H] | Prefetch


# ---------------------------------------------------------------------- the queue


class TaskQueue(Generic[H]):
    """The tasks this dispatcher holds, and every decision about them (see the module)."""

    def __init__(
        self,
        index: NodeIndex,
        settings: DispatcherSettings,
        rng: np.random.Generator | None = None,
        key: VrfKey | None = None,
    ) -> None:
        self.index = index
        self.settings = settings
        self.rng = rng or np.random.default_rng()
        self.key = key or VrfKey.generate()  # selects the tasks to compare
        self.memory = parse_memory(settings.model_memory_gb)
        self.queued: dict[str, Task[H]] = {}  # waiting for free nodes
        self.running: dict[str, Task[H]] = {}  # assigned, until its outcome
        self.demand: dict[str, deque[float]] = {}  # model ref -> when tasks asked for it
        self.prefetched: dict[str, float] = {}  # model ref -> its last pre-fetch round
        self.speed = SpeedModel(settings.seconds_per_step, settings.eta_alpha, max_s=settings.task_timeout_s)
        self._forecasts: dict[str, Forecasted] = {}  # model -> its last pass (`_forecast`)
        self.slots_freed = 0  # slots given back so far: an event that frees none leaves `pump` nothing new

    def requirements(self, spec: TaskSpec) -> Requirements:
        return Requirements(
            min_stake=self.settings.min_stake,
            memory_bytes=self.memory.get(spec.model_name, 0),
            slots=self.settings.node_slots,
            version=__version__,
            class_operators=self.settings.class_operators,
            warm_first=self.settings.warm_first,
            warm_max_loaded=self.settings.warm_max_loaded,
        )

    # ------------------------------------------------------------------ events

    def submit(self, event: TaskSubmitted, held: H | None, trace: Carrier, now: float) -> list[Decision[H]]:
        """A task new to this dispatcher (neither queued nor running here): refused when no
        registered node serves its model, else queued with `held`, its message (settled
        by the decision that ends its wait); and pre-fetches its demand calls for."""
        if self.index.registered_serving(event.spec.model_name) == 0 and self.index.size:
            detail = f"no registered node serves {event.spec.model_name!r}"
            return [Abort(TaskAborted(task_id=event.task_id, reason="unservable", detail=detail))]
        estimate = estimate_seconds(event.spec, self.settings.seconds_per_step)
        sampling, copies = self.draw(event)
        self.queued[event.task_id] = Task(
            event=event, estimate_s=estimate, trace=trace, held=held, sampling=sampling, copies=copies
        )
        return [*self._prefetch(event.spec, now)]

    def draw(self, event: TaskSubmitted) -> tuple[SamplingProof, int]:
        """The task's sampling proof and how many nodes it runs on: `replication` when the
        VRF selects it or the app asked for `full` validation, else one. Deterministic
        (RFC 9381 proofs are): a task queued again draws the same."""
        settings = self.settings
        proof = SamplingProof.make(self.key, event.task_id, settings.validation_rate)
        compared = proof.selected or event.validation == "full"
        return proof, settings.replication if compared else 1

    @property
    def expected_copies(self) -> float:
        """Nodes per task on average at the sampling rate (`full` tasks aside)."""
        rate = self.settings.validation_rate
        return 1 + rate * (self.settings.replication - 1)

    def resubmitted(self, task_id: str, held: H) -> H | None:
        """A queued task's `submitted` came again (redelivered): keep the newest message;
        returns the one it replaces (no longer to be kept alive), if any."""
        task = self.queued[task_id]
        previous, task.held = task.held, held
        return previous

    def apply(self, event: TaskEvent, at: float | None = None) -> list[Decision[H]]:
        """Any task event but `submitted`: accept timers, slots, the end of a task; and, given
        `at` (when the stream stored it), the node's speed (`_timed`)."""
        task_id = event.task_id
        out: list[Decision[H]] = []
        if isinstance(event, TaskCancelled):
            out.append(self._cancel(task_id))
        task = self.running.get(task_id)
        if task is None:
            return out
        if isinstance(event, (TaskStarted, TaskCommitted, NodeErrored)):
            assigned_at = task.accepting.pop(event.node_id, None)
            if assigned_at is not None:
                task.began.setdefault(event.node_id, assigned_at)
        if isinstance(event, (TaskCommitted, TaskSucceeded)) and at is not None:
            self._timed(task, event, at)
        if isinstance(event, TaskStarted) and event.node_id in task.holding:  # not one replaced, committed or errored
            task.working.add(event.node_id)
        if isinstance(event, (TaskCommitted, NodeErrored)):
            task.working.discard(event.node_id)
            self._release(task, [event.node_id])
        elif isinstance(event, (TaskSucceeded, TaskAborted)):
            self._release(task, task.holding)
            del self.running[task_id]
        return out

    def _cancel(self, task_id: str) -> Cancel[H]:
        cancel = CancelWork(task_id=task_id)
        queued = self.queued.pop(task_id, None)
        if queued is not None:
            return Cancel(cancel=cancel, nodes=[], held=queued.held, was_queued=True)
        task = self.running.pop(task_id, None)
        if task is None:
            return Cancel(cancel=cancel, nodes=None, held=None, was_queued=False)
        self._release(task, task.holding)
        return Cancel(cancel=cancel, nodes=list(task.members), held=None, was_queued=False)

    def _release(self, task: Task[H], nodes: list[str] | set[str]) -> None:
        freed = task.holding & set(nodes)
        self.index.assigned(freed, -1)
        task.holding -= freed
        self.slots_freed += len(freed)

    def _timed(self, task: Task[H], event: TaskCommitted | TaskSucceeded, at: float) -> None:
        """Teach the speed model what this dispatcher saw: a node's run from its assignment
        to its `committed` (not the `elapsed_s` the node claims), or the validator's time
        from the last commitment to `succeeded`. Only a node that still held its slot (not
        replaced, not one that erred) and whose assignment this process made is timed."""
        if isinstance(event, TaskSucceeded):
            if task.last_commit:
                self.speed.observe_finish(at - task.last_commit)
            return
        since = task.began.get(event.node_id)
        if since is None or event.node_id not in task.holding:
            return
        task.last_commit = max(task.last_commit, at)
        self.speed.observe(event.node_id, task.event.spec, at - since)

    # ------------------------------------------------------------------ pre-fetch

    def _prefetch(self, spec: TaskSpec, now: float) -> list[Prefetch]:
        """Ask live nodes to fetch a wanted model that too few of them hold."""
        settings = self.settings
        out: list[Prefetch] = []
        if len(self.demand) > 10_000:  # forget models nobody asked for lately
            self.demand = {
                ref: seen for ref, seen in self.demand.items() if now - seen[-1] <= settings.prefetch_window_s
            }
        for ref, kind in task_models(spec).items():
            if "/" not in ref:
                continue  # a bare name is a model an operator configures, not something to download
            seen = self.demand.setdefault(ref, deque())
            seen.append(now)
            while now - seen[0] > settings.prefetch_window_s:
                seen.popleft()
            if (
                len(seen) < settings.prefetch_demand
                or now - self.prefetched.get(ref, 0.0) < settings.prefetch_cooldown_s
            ):
                continue
            holders = self.index.holders(ref, now, settings.node_ttl_s)
            missing = settings.replication - len(holders)
            candidates = np.setdiff1d(self.index.live_rows(now, settings.node_ttl_s), holders)
            if missing <= 0 or not len(candidates):
                continue
            self.prefetched[ref] = now
            rows = self.rng.choice(candidates, min(missing, len(candidates)), False)
            prefetch = Prefetch(
                request=PrefetchRequest(ref=ref, kind=kind),
                nodes=[self.index.ids[row] for row in rows],
                round_id=int(now // settings.prefetch_cooldown_s),
                holders=len(holders),
            )
            out.append(prefetch)
        return out

    # ------------------------------------------------------------------ the clock

    def pump(self, now: float) -> Iterator[Assign[H] | Wait | Abort[H]]:
        """Decide for the queued tasks, best first, while nodes are free (lazily: see the module)."""
        settings = self.settings
        blocked: set[str] = set()  # models with no free nodes in this pass
        warm_blocked: set[str] = set()  # models with no free node that has them loaded, in this pass
        for task in sorted(self.queued.values(), key=lambda queued: queued.rank):
            event = task.event
            model = event.spec.model_name
            waited = now - event.submitted_at
            if model in blocked and waited < settings.dispatch_timeout_s:
                continue
            warm_only = self._warm_wait(task, waited, now)
            if warm_only and model in warm_blocked:
                continue
            started = time.perf_counter()
            req = self.requirements(event.spec)
            try:
                nodes = self.index.pick(
                    event.spec,
                    task.copies,
                    self.rng,
                    now=now,
                    ttl_s=settings.node_ttl_s,
                    req=dataclasses.replace(req, warm_only=True) if warm_only else req,
                )
            except NotEnoughNodes as exc:
                decision_s = time.perf_counter() - started
                (warm_blocked if warm_only else blocked).add(model)
                if waited < settings.dispatch_timeout_s:
                    yield Wait(task_id=task.task_id, decision_s=decision_s)
                    continue
                del self.queued[task.task_id]
                aborted = TaskAborted(task_id=task.task_id, reason="no_nodes", detail=exc.message)
                yield Abort(aborted=aborted, held=task.held, trace=task.trace, decision_s=decision_s)
                continue
            yield self._assign(task, nodes, now, time.perf_counter() - started)

    def _warm_wait(self, task: Task[H], waited: float, now: float) -> bool:
        """Whether `task` waits for nodes that have its models loaded (`warm_wait_s`): it has
        not waited that long yet, and enough live nodes, free or not, have them loaded. Loading
        costs a node about as long, and delays the task as much: the wait is cheaper."""
        settings = self.settings
        if not settings.warm_first or waited >= settings.warm_wait_s:
            return False
        models = list(task_models(task.event.spec))
        return self.index.warm_live(models, now, settings.node_ttl_s, settings.warm_max_loaded) >= task.copies

    def _assign(self, task: Task[H], nodes: list[str], now: float, decision_s: float) -> Assign[H]:
        deadline = now + self.settings.task_timeout_s
        decision = Assign(
            assigned=TaskAssigned(task_id=task.task_id, nodes=nodes, deadline=deadline, sampling=task.sampling),
            work=Assignment(task_id=task.task_id, spec=task.event.spec, deadline=deadline),
            held=task.held,
            trace=task.trace,
            submitted_at=task.event.submitted_at,
            waited_s=now - task.event.submitted_at,
            decision_s=decision_s,
        )
        del self.queued[task.task_id]
        task.held = None
        task.members = list(nodes)
        task.holding = set(nodes)
        task.accepting = dict.fromkeys(nodes, now)
        self.index.assigned(nodes)
        self.running[task.task_id] = task
        return decision

    def replace_overdue(self, now: float) -> Iterator[Replace | NoReplacement]:
        """Replace each node that has not started its assignment in time (`not_accepted`)
        and each started node that was lost before it committed or erred (`node_lost`), the
        one overdue the longest first (lazily: see the module). Each node gets one try."""
        settings = self.settings
        overdue: list[tuple[float, Task[H], str, ReplaceReason]] = [
            (at + settings.accept_timeout_s, task, node, "not_accepted")
            for task in self.running.values()
            for node, at in task.accepting.items()
            if now - at > settings.accept_timeout_s
        ]
        overdue += self._lost(now)
        overdue.sort(key=lambda entry: entry[0])
        for _, task, node, reason in overdue:
            task.accepting.pop(node, None)
            task.working.discard(node)
            if task.task_id not in self.running:
                continue
            if len(task.members) - task.copies - task.extended >= settings.max_reassignments:
                continue  # the validator's commit deadline takes it from here
            try:
                (by,) = self.index.pick(
                    task.event.spec,
                    1,
                    self.rng,
                    now=now,
                    ttl_s=settings.node_ttl_s,
                    req=self.requirements(task.event.spec),
                    exclude=task.members,  # the replaced node and its operator too
                )
            except NotEnoughNodes as exc:
                yield NoReplacement(
                    task_id=task.task_id, node_id=node, detail=exc.message, trace=task.trace, reason=reason
                )
                continue
            deadline = now + settings.task_timeout_s
            replace = Replace(
                reassigned=TaskReassigned(task_id=task.task_id, replaced=node, by=by, deadline=deadline, reason=reason),
                work=Assignment(task_id=task.task_id, spec=task.event.spec, deadline=deadline),
                cancel=CancelWork(task_id=task.task_id),
                trace=task.trace,
            )
            task.members.append(by)
            self._release(task, [node])
            self.index.assigned([by])
            task.holding.add(by)
            task.accepting[by] = now
            yield replace

    def extend(self, event: TaskEscalated, spec: TaskSpec, now: float, *, give_up: bool) -> Extend | None:
        """Draw `event.more` nodes for an escalated task, of operators it never had; None
        when too few are free now (ask again later), unless `give_up`: then an `Extend`
        with no nodes."""
        settings = self.settings
        task = self.running.get(event.task_id)
        exclude = [*event.exclude, *(task.members if task else [])]
        deadline = now + settings.task_timeout_s
        try:
            nodes = self.index.pick(
                spec,
                event.more,
                self.rng,
                now=now,
                ttl_s=settings.node_ttl_s,
                req=self.requirements(spec),
                exclude=exclude,
            )
            detail = ""
        except NotEnoughNodes as exc:
            if not give_up:
                return None
            nodes, detail = [], exc.message
        extended = TaskExtended(task_id=event.task_id, round=event.round, nodes=nodes, deadline=deadline, detail=detail)
        if task is not None and nodes:
            task.members += nodes
            task.holding.update(nodes)
            task.accepting.update(dict.fromkeys(nodes, now))
            task.extended += len(nodes)
            self.index.assigned(nodes)
        work = Assignment(task_id=event.task_id, spec=spec, deadline=deadline)
        return Extend(extended=extended, work=work, trace=task.trace if task else {})

    def _lost(self, now: float) -> list[tuple[float, Task[H], str, ReplaceReason]]:
        """The started nodes, not committed or errored, that are no longer live (no
        heartbeat within `node_ttl_s`, or quit) or are banned, each with when it was lost
        (its TTL ran out; `now` for one that quit or was banned)."""
        watched = [(task, node) for task in self.running.values() for node in task.working]
        if not watched:
            return []
        index, ttl_s = self.index, self.settings.node_ttl_s
        live = index.live(now, ttl_s)
        lost: list[tuple[float, Task[H], str, ReplaceReason]] = []
        for task, node in watched:
            row = index.row.get(node)
            if row is None or (live[row] and index.banned_until[row] <= now):
                continue
            lost.append((min(now, float(index.last_seen[row]) + ttl_s), task, node, "node_lost"))
        return lost

    def undo(self, decision: Assign[H] | Replace | Extend) -> None:
        """`decision` was not carried out (publishing its event failed): back to the state
        before it. An assigned task is queued again with its message; a replacement's
        new node gives its slot back to the node it was to replace (whose timer or
        watch is gone: it had its one try)."""
        if isinstance(decision, Extend):
            extended = self.running.get(decision.extended.task_id)
            added = set(decision.extended.nodes)
            if extended is not None and added:
                extended.members = [node for node in extended.members if node not in added]
                for node in added:
                    extended.accepting.pop(node, None)
                extended.extended -= len(added)
                self._release(extended, added)
            return
        if isinstance(decision, Assign):
            task = self.running.pop(decision.assigned.task_id, None)
            if task is None:
                return
            self._release(task, task.holding)
            task.members, task.accepting, task.working, task.held = [], {}, set(), decision.held
            self.queued[task.task_id] = task
            return
        reassigned = decision.reassigned
        running = self.running.get(reassigned.task_id)
        if running is None or reassigned.by not in running.members:
            return
        running.members.remove(reassigned.by)
        running.accepting.pop(reassigned.by, None)
        self._release(running, [reassigned.by])
        running.holding.add(reassigned.replaced)
        self.index.assigned([reassigned.replaced])

    # ------------------------------------------------------------------ questions

    def status(self, task_id: str, now: float) -> QueueStatus:
        """Where a task stands: a queued one's position among the tasks that compete for the
        same nodes (same base model) and its ETA (`_forecast`); a running one's ETA alone
        (`queued` False). The tasks ahead take `expected_copies` nodes on average, spread
        over them by position; what the sample drew for any task is not told."""
        task = self.queued.get(task_id)
        if task is None:
            running = self.running.get(task_id)
            eta = self._remaining(running, now) if running is not None else 0.0
            return QueueStatus(task_id=task_id, queued=False, eta_s=round(eta, 3))
        model = task.event.spec.model_name
        ahead = [q for q in sorted(self.queued.values(), key=lambda q: q.rank) if q.event.spec.model_name == model]
        position = ahead.index(task)
        end = self._forecast(model, ahead, position, now)
        # no eligible live node (or too few for its copies): the estimates, one after another
        queued_eta = end - now if end is not None else sum(q.estimate_s for q in ahead[: position + 1])
        return QueueStatus(
            task_id=task_id,
            queued=True,
            position=position,
            queue_length=len(self.queued),
            eta_s=round(max(0.0, queued_eta), 3),
        )

    SIMULATED = 1_000
    """Queued tasks of a model placed one by one (`Forecast`); those behind them count as
    their share of every node's time (a status answer stays cheap behind a long queue)."""

    ETA_REUSE_S = 1.0
    ETA_CHEAP_S = 0.005
    """One pass gives every queued task of a model its ETA, and apps poll: a pass is reused
    until something it depends on changes (`_fingerprint`), or, when it took longer than
    `ETA_CHEAP_S` (thousands of nodes, where something changes all the time), for
    `ETA_REUSE_S`; a task queued since is placed behind the last one ahead of it that the
    pass placed, at the nodes' mean speed."""

    def _copies(self, task: Task[H], position: int) -> int:
        """Nodes a task is counted on at `position`: `replication` for `full` (the app's own
        choice), else `expected_copies` spread over positions (1, 1, 1, 1, 2, ... at 1.2),
        which tells nothing about what the VRF drew."""
        if task.event.validation == "full":
            return task.copies
        expected = self.expected_copies
        return max(1, math.floor((position + 1) * expected + 1e-9) - math.floor(position * expected + 1e-9))

    def _fingerprint(self, model: str, now: float) -> tuple[int, ...]:
        """What a model's forecast depends on, cheaply: the queue's and the nodes' state."""
        live = self.index.serving_live(model, now, self.settings.node_ttl_s)
        busy = int(self.index.inflight[: self.index.size].sum())
        return (len(self.queued), len(self.running), busy, live, self.index.size, self.speed.observations)

    def _forecast(self, model: str, tasks: list[Task[H]], position: int, now: float) -> float | None:
        """When `tasks[position]` is predicted to end (absolute time), from a pass over a
        model's queued tasks (`tasks`, in queue order: `_place`), made now or reused (see
        `ETA_REUSE_S`); None when no eligible node is live."""
        fingerprint = self._fingerprint(model, now)
        cached = self._forecasts.get(model)
        if cached is not None:
            at, held, cost_s, tail, ends = cached
            age = now - at
            if 0 <= age <= self.ETA_REUSE_S and (held == fingerprint or cost_s > self.ETA_CHEAP_S):
                end = ends.get(tasks[position].task_id)
                if end is not None:
                    return end
                if ends:  # queued since (the fingerprint changed: an expensive pass is reused)
                    before = next((ends[q.task_id] for q in reversed(tasks[:position]) if q.task_id in ends), now)
                    overhead, per_work, slots = tail
                    own = overhead + per_work * work_of(tasks[position].event.spec)
                    return max(before, now + own) + own * self._copies(tasks[position], position) / slots
        started = time.perf_counter()
        ends, tail = self._place(tasks, now)
        if len(self._forecasts) > 1_000:
            self._forecasts.clear()
        self._forecasts[model] = (now, fingerprint, time.perf_counter() - started, tail, ends)
        return ends.get(tasks[position].task_id)

    def _place(self, tasks: list[Task[H]], now: float) -> tuple[dict[str, float], tuple[float, float, int]]:
        """When each of `tasks` (a model's queued tasks, in queue order) is predicted to end:
        each on the earliest free eligible nodes (a node running tasks is free when their
        predicted remainder ends), at each node's measured speed, plus the validator's usual
        time; and the nodes' mean (overhead, per_work) and slot count. Empty when no eligible
        node is live; a task that needs more nodes than there are, and those behind it, are
        left out."""
        spec = tasks[0].event.spec
        req = dataclasses.replace(self.requirements(spec), slots=2**62)  # busy ones too: when do they free up?
        rows = self.index.eligible(spec, now, self.settings.node_ttl_s, req)
        if not len(rows):
            return {}, (0.0, 0.0, 1)
        ids = [self.index.ids[row] for row in rows]
        where = {node: i for i, node in enumerate(ids)}
        lines = np.array([self.speed.line(node, spec.model_name) for node in ids], dtype=np.float64)
        ends: dict[int, list[float]] = {}
        for running in self.running.values():
            for node in running.holding:
                i = where.get(node)
                if i is not None:
                    ends.setdefault(i, []).append(now + self._left(running, node, now))
        # busy with tasks this process did not assign (a restart): half the first task's run left
        halves = (now + 0.5 * (lines[:, 0] + lines[:, 1] * work_of(spec))).tolist()
        inflight = self.index.inflight[rows].tolist()
        per_node = self.settings.node_slots
        slots: list[tuple[float, int]] = []
        for i in range(len(ids)):
            known = sorted(ends[i]) if i in ends else []
            count = max(per_node, len(known))
            known += [halves[i]] * max(0, min(inflight[i], count) - len(known))
            slots += [(known[k] if k < len(known) else now, i) for k in range(count)]
        forecast = Forecast(slots, lines, self.index.weights(rows, list(task_models(spec))), now)
        finish_s = self.speed.finish_s
        out: dict[str, float] = {}
        end = now
        overhead, per_work = lines.mean(axis=0)
        for position, queued in enumerate(tasks):
            work, copies = work_of(queued.event.spec), self._copies(queued, position)
            if position < self.SIMULATED:
                placed = forecast.place(Job(work, copies))
                if placed is None:  # fewer eligible nodes than copies: it waits for nodes that are not there
                    break
                end = placed
            else:  # the far ones: their work over every slot, at the mean speed
                end += float(overhead + per_work * work) * copies / len(slots)
            out[queued.task_id] = end + finish_s
        return out, (float(overhead), float(per_work), len(slots))

    def _left(self, task: Task[H], node: str, now: float) -> float:
        """Seconds `node` is predicted to need yet for `task`: its predicted run less what
        it has run; one overdue is given a tenth of its prediction more."""
        since = task.began.get(node, task.accepting.get(node, now))
        predicted = self.speed.predict(node, task.event.spec)
        return max(predicted - (now - since), 0.1 * predicted)

    def _remaining(self, task: Task[H], now: float) -> float:
        """A running task's ETA: its slowest node still working, then the validator."""
        if task.holding:
            return max(self._left(task, node, now) for node in task.holding) + self.speed.finish_s
        return max(0.0, self.speed.finish_s - (now - task.last_commit)) if task.last_commit else self.speed.finish_s
