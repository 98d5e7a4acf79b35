"""Property tests (hypothesis): the task fold under hostile histories, and the decoders
under hostile bytes.

The fold (aggregate.py) is fed a valid history of a task (submitted, assigned, each node's
started / committed / revealed or errored, the reveal, an outcome) built from the real
message structs, and then the same events shuffled, duplicated and with gaps: `replay`
never raises, sets aside only InvalidTransition, a set-aside event has no effect, an event
applied once is never applied again (a duplicate changes nothing), the first outcome wins,
and the nodes' events may interleave in any order (only the commit order, which is the
arrival order by design, differs).

The decoders (messages.py, taskspec.py, checkpoints.py, vrf.py) get arbitrary bytes,
arbitrary JSON and real messages with a field changed: they answer, or refuse with the one
exception type they document (Rejected, InvalidInput, ValueError), never another.

Bounded for CI (STIPPLE_PROPERTY_EXAMPLES examples per property, default 200; derandomized,
so every run checks the same cases): `STIPPLE_PROPERTY_EXAMPLES=5000` runs them longer.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stipple_common import checkpoints, subjects, vrf
from stipple_common.aggregate import InvalidTransition, Task, apply, replay
from stipple_common.errors import InvalidInput, Rejected
from stipple_common.messages import (
    ImageResult,
    NodeErrored,
    Progress,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskEvent,
    TaskReassigned,
    TaskRevealOpened,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
    decode_node_event,
    decode_progress,
    decode_task_event,
    encode,
    event_name,
)
from stipple_common.taskspec import TaskSpec, parse_task

EXAMPLES = int(os.environ.get("STIPPLE_PROPERTY_EXAMPLES", "200"))
BOUNDED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TASK_ID = "0" * 31 + "1"
NODES = ("0xa", "0xb", "0xc")
SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1, "num_images": 1}})
IMAGE = ImageResult(index=0, key="k", phash="0" * 16, seed=1, width=64, height=64)
OUTCOMES = {
    "succeeded": TaskSucceeded(task_id=TASK_ID, reason="unanimous", images=[IMAGE], verdicts={}, qos={}),
    "aborted": TaskAborted(task_id=TASK_ID, reason="no_agreement", detail="d"),
    "cancelled": TaskCancelled(task_id=TASK_ID, detail="by the app"),
}
# A node's part: before the reveal opens, and after (a node that committed may still err)
FATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "reveals": (("started", "committed"), ("revealed",)),
    "reveals_unstarted": (("committed",), ("revealed",)),  # `started` is lost or never sent: allowed
    "errs": (("started", "errored"), ()),
    "errs_at_once": (("errored",), ()),
    "errs_after_commit": (("committed",), ("errored",)),
    # lost before committing: the dispatcher reassigns its part to another node, which reveals
    "replaced": (("started", "reassigned", "committed"), ("revealed",)),
}


def node_event(kind: str, node: str) -> TaskEvent:
    """One event of `node`'s part (of its replacement, `node`r, after `reassigned`)."""
    if kind == "started":
        return TaskStarted(task_id=TASK_ID, node_id=node)
    if kind == "reassigned":
        return TaskReassigned(task_id=TASK_ID, replaced=node, by=f"{node}r", deadline=150.0)
    if kind == "committed":
        return TaskCommitted(task_id=TASK_ID, node_id=node, commitment=f"0x{node}", signature="0xsig")
    if kind == "revealed":
        return ResultRevealed(task_id=TASK_ID, node_id=node, images=[IMAGE], nonce="0x01")
    return NodeErrored(task_id=TASK_ID, node_id=node, code="oops", message="broke")


class Plan(msgspec.Struct, frozen=True):
    """A task's history as each node's part: its events before the reveal opens and after."""

    nodes: list[str]
    before: dict[str, list[TaskEvent]]
    after: dict[str, list[TaskEvent]]
    committed: list[str]  # the nodes (or replacements) whose commitments the reveal names
    outcome: TaskEvent


def part(kinds: tuple[str, ...], node: str, replacement: str) -> list[TaskEvent]:
    """`node`'s events (`replacement`'s, once `node` is reassigned to it)."""
    events, actor = [], node
    for kind in kinds:
        events.append(node_event(kind, actor))
        if kind == "reassigned":
            actor = replacement
    return events


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    nodes = list(NODES[: draw(st.integers(1, len(NODES)))])
    fates = {node: draw(st.sampled_from(sorted(FATES))) for node in nodes}
    actor = {node: f"{node}r" if fates[node] == "replaced" else node for node in nodes}  # who commits
    before = {node: part(FATES[fates[node]][0], node, actor[node]) for node in nodes}
    after = {node: part(FATES[fates[node]][1], actor[node], actor[node]) for node in nodes}
    committed = [actor[node] for node in nodes if "committed" in FATES[fates[node]][0]]
    outcomes = sorted(OUTCOMES) if committed else ["aborted", "cancelled"]
    return Plan(nodes, before, after, committed, OUTCOMES[draw(st.sampled_from(outcomes))])


def node_order(per_node: dict[str, list[TaskEvent]]) -> st.SearchStrategy[list[str]]:
    return st.permutations([node for node, events in per_node.items() for _ in events])


def interleave(per_node: dict[str, list[TaskEvent]], order: list[str]) -> list[TaskEvent]:
    """The nodes' events merged in `order` (a node id per event), each node's in its own order."""
    queues = {node: list(events) for node, events in per_node.items()}
    return [queues[node].pop(0) for node in order]


def history(plan: Plan, order_before: list[str], order_after: list[str]) -> list[TaskEvent]:
    """The plan's events with the nodes' parts interleaved in the orders given."""
    events: list[TaskEvent] = [
        TaskSubmitted(task_id=TASK_ID, spec=SPEC, submitted_at=1.0),
        TaskAssigned(task_id=TASK_ID, nodes=plan.nodes, deadline=100.0),
        *interleave(plan.before, order_before),
    ]
    if plan.committed:
        events.append(TaskRevealOpened(task_id=TASK_ID, nodes=plan.committed, deadline=200.0))
        events += interleave(plan.after, order_after)
    return [*events, plan.outcome]


@st.composite
def histories(draw: st.DrawFn) -> list[TaskEvent]:
    """A valid history of one task, in an order the network could store it."""
    plan = draw(plans())
    return history(plan, draw(node_order(plan.before)), draw(node_order(plan.after)))


def hostile(history: list[TaskEvent]) -> st.SearchStrategy[list[TaskEvent]]:
    """The history's events in any order, any of them repeated or missing: shuffled; in order
    with gaps and repeats; or anything."""
    indices = st.lists(st.integers(0, len(history) - 1), max_size=2 * len(history))
    return st.one_of(
        st.permutations(history),
        indices.map(lambda chosen: [history[i] for i in sorted(chosen)]),
        indices.map(lambda chosen: [history[i] for i in chosen]),
    )


def applied_indices(events: list[TaskEvent]) -> list[int]:
    """Where the events are that the fold applies (`apply` does not refuse), in order."""
    task: Task | None = None
    out = []
    for i, event in enumerate(events):
        try:
            task = apply(task, event)
        except InvalidTransition:
            continue
        out.append(i)
    return out


def without_commit_order(task: Task) -> Task:
    nodes = {node: msgspec.structs.replace(run, commit_order=0) for node, run in task.nodes.items()}
    return msgspec.structs.replace(task, nodes=nodes)


# ---------------------------------------------------------------------------- the fold


@BOUNDED
@given(histories())
def test_a_valid_history_folds_with_nothing_set_aside(history):
    task, rejected = replay(history)
    assert rejected == []
    assert task is not None
    assert task.finished
    assert task.status == event_name(history[-1])


@BOUNDED
@given(st.data())
def test_a_hostile_history_never_raises_and_a_set_aside_event_has_no_effect(data):
    history = data.draw(histories())
    events = data.draw(hostile(history))
    task, rejected = replay(events)  # raises nothing: InvalidTransition is set aside, anything else is a bug
    assert all(isinstance(exc, InvalidTransition) for _, exc in rejected)
    assert all(f"for task {TASK_ID}" in str(exc) for _, exc in rejected)  # the refusal names the task
    applied = [events[i] for i in applied_indices(events)]
    assert len(applied) + len(rejected) == len(events)
    assert replay(applied) == (task, [])  # the set-aside events changed nothing
    assert (task is None) == (not any(isinstance(event, TaskSubmitted) for event in applied))


@BOUNDED
@given(st.data())
def test_the_fold_is_deterministic_also_through_the_wire(data):
    """The same events fold to the same task, also after encoding and decoding each on its
    subject (as a service reads them from the stream)."""
    events = data.draw(hostile(data.draw(histories())))
    decoded = [
        decode_task_event(subjects.task_subject(TASK_ID, event_name(e), getattr(e, "node_id", "")), encode(e))
        for e in events
    ]
    assert decoded == events
    first, second = replay(events), replay(decoded)
    assert first[0] == second[0]
    assert [(e, str(x)) for e, x in first[1]] == [(e, str(x)) for e, x in second[1]]


@BOUNDED
@given(st.data())
def test_a_duplicate_of_an_applied_event_changes_nothing(data):
    events = data.draw(hostile(data.draw(histories())))
    task, rejected = replay(events)
    applied = applied_indices(events)
    if not applied:
        return
    i = data.draw(st.sampled_from(applied), label="duplicated")
    j = data.draw(st.integers(i + 1, len(events)), label="at")
    duplicated = [*events[:j], events[i], *events[j:]]
    again, rejected_again = replay(duplicated)
    assert again == task
    assert len(rejected_again) == len(rejected) + 1  # the copy was set aside


@BOUNDED
@given(st.data())
def test_the_first_outcome_wins(data):
    history = data.draw(histories())
    outcome = data.draw(st.sampled_from(sorted(OUTCOMES)), label="second outcome")
    events = data.draw(hostile(history))
    events.insert(data.draw(st.integers(0, len(events)), label="at"), OUTCOMES[outcome])
    task, _ = replay(events)
    for i in range(len(events)):
        prefix, _ = replay(events[: i + 1])
        if prefix is not None and prefix.finished:
            assert task == prefix  # nothing after the first outcome applied changes the task
            break
    else:
        assert task is None or not task.finished


@BOUNDED
@given(st.data())
def test_the_nodes_events_may_interleave_in_any_order(data):
    """Two valid histories of the same events, the nodes' events interleaved differently,
    fold to the same task but for `commit_order`, which is the order commitments arrived."""
    plan = data.draw(plans())
    first, second = (history(plan, data.draw(node_order(plan.before)), data.draw(node_order(plan.after))) for _ in "12")
    task_1, rejected_1 = replay(first)
    task_2, rejected_2 = replay(second)
    assert rejected_1 == rejected_2 == []
    assert task_1 is not None
    assert task_2 is not None
    assert without_commit_order(task_1) == without_commit_order(task_2)
    for events, task in ((first, task_1), (second, task_2)):
        commits = [e.node_id for e in events if isinstance(e, TaskCommitted)]
        assert {node: task.nodes[node].commit_order for node in commits} == {n: i + 1 for i, n in enumerate(commits)}


# ---------------------------------------------------------------------------- decoders


def outcome(decode: Any, *args: Any, refusal: type[Exception]) -> tuple[Any, Any]:
    """(what `decode` returned, None), or (None, the `refusal` it raised); any other exception propagates."""
    try:
        return decode(*args), None
    except refusal as exc:
        return None, exc


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
TOKEN = st.text(st.characters(blacklist_characters=".", blacklist_categories=("Cs",)), max_size=12)
SAMPLE_EVENTS: list[TaskEvent] = [
    TaskSubmitted(task_id=TASK_ID, spec=SPEC, submitted_at=1.0),
    TaskAssigned(task_id=TASK_ID, nodes=list(NODES), deadline=100.0),
    TaskRevealOpened(task_id=TASK_ID, nodes=list(NODES), deadline=200.0),
    *(node_event(kind, NODES[0]) for kind in subjects.NODE_TASK_EVENTS),
    *OUTCOMES.values(),
]


def task_subjects() -> st.SearchStrategy[str]:
    """Task subjects, well-formed or nearly, and arbitrary text."""
    event = st.sampled_from([*subjects.CONTROL_TASK_EVENTS, *subjects.NODE_TASK_EVENTS]) | TOKEN
    shaped = st.builds(
        lambda task, name, node: ".".join(["tasks", task, name, *([node] if node is not None else [])]),
        st.sampled_from([TASK_ID, "t"]) | TOKEN,
        event,
        st.none() | st.sampled_from(NODES) | TOKEN,
    )
    return shaped | st.text(max_size=40)


def payloads() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, arbitrary JSON, and real events with one field replaced by any JSON value."""
    mutated = st.builds(
        lambda event, key, value: msgspec.json.encode({**msgspec.to_builtins(event), key: value}),
        st.sampled_from(SAMPLE_EVENTS),
        st.sampled_from(["type", "task_id", "node_id", "nodes", "images", "spec", "deadline", "x"]),
        JSON,
    )
    return (
        st.binary(max_size=200) | JSON.map(msgspec.json.encode) | mutated | st.sampled_from(SAMPLE_EVENTS).map(encode)
    )


@BOUNDED
@given(task_subjects(), payloads())
def test_decode_task_event_answers_or_rejects(subject, data):
    event, refusal = outcome(decode_task_event, subject, data, refusal=Rejected)
    if refusal is not None:
        assert refusal.reason in {"bad_subject", "undecodable", "type_mismatch", "task_mismatch", "node_mismatch"}
        return
    name = subject.split(".")[2]
    assert event_name(event) == name
    assert event.task_id == subject.split(".")[1]


@BOUNDED
@given(
    st.builds(lambda node, name: f"nodes.{node}.{name}", TOKEN, st.sampled_from(subjects.NODE_SELF_EVENTS) | TOKEN)
    | st.text(max_size=40),
    payloads(),
)
def test_decode_node_event_answers_or_rejects(subject, data):
    try:
        event = decode_node_event(subject, data)
    except Rejected:
        return
    assert event.node_id == subject.split(".")[1]


@BOUNDED
@given(
    st.builds(lambda task, node: f"progress.{task}.{node}", TOKEN, TOKEN) | st.text(max_size=40),
    st.binary(max_size=100)
    | JSON.map(msgspec.json.encode)
    | st.builds(
        lambda task, node, step, total: encode(Progress(task_id=task, node_id=node, step=step, total=total)),
        TOKEN,
        TOKEN,
        st.integers(),
        st.integers(),
    ),
)
def test_decode_progress_answers_or_rejects(subject, data):
    try:
        progress = decode_progress(subject, data)
    except Rejected:
        return
    assert subject == f"progress.{progress.task_id}.{progress.node_id}"
    assert 0 <= progress.step <= progress.total  # shown to apps as a fraction


VALID_TASK = {"base_model": "tiny-sd", "prompt": "p", "task_config": {"image_width": 64, "image_height": 64}}
TASK_KEYS = ["base_model", "prompt", "task_config", "loras", "lora", "controlnet", "scheduler", "sampler", "x"]


@BOUNDED
@given(
    st.binary(max_size=200)
    | st.text(max_size=100)
    | JSON
    | st.builds(lambda key, value: {**VALID_TASK, key: value}, st.sampled_from(TASK_KEYS), JSON)
    | st.builds(lambda key, value: {**VALID_TASK, "task_config": {key: value}}, TOKEN, JSON)
)
def test_parse_task_answers_or_refuses_with_invalid_input(body: Any):
    spec, refusal = outcome(parse_task, body, refusal=InvalidInput)
    if refusal is not None:
        assert isinstance(refusal.field, str)  # names the field ("$": the whole body)
        return
    assert isinstance(spec, TaskSpec)
    assert parse_task(msgspec.json.encode(spec)) == spec  # canonical: parsing its own output changes nothing


SUMMARY = checkpoints.summary(np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8))


@BOUNDED
@given(st.text(max_size=300) | st.just(SUMMARY) | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()))
def test_checkpoint_summaries_decode_or_are_none(text):
    values = checkpoints.decode_summary(text)
    assert values is None or (values.dtype == np.float32 and np.all(np.isfinite(values)))
    why = checkpoints.summaries_well_formed([text] * len(checkpoints.FRACTIONS))
    assert (why is None) == (values is not None)
    distance = checkpoints.summary_distance(text, SUMMARY)
    assert distance >= 0.0  # a float, infinite when it is not a summary


VRF_KEY = vrf.VrfKey(bytes(range(32)))
ALPHA = vrf.alpha_for_task(TASK_ID)
PROOF = VRF_KEY.prove(ALPHA)


@BOUNDED
@given(
    st.binary(max_size=100)
    | st.binary(min_size=vrf.PROOF_BYTES, max_size=vrf.PROOF_BYTES)
    | st.builds(
        lambda i, bit: PROOF[:i] + bytes([PROOF[i] ^ (1 << bit)]) + PROOF[i + 1 :],
        st.integers(0, vrf.PROOF_BYTES - 1),
        st.integers(0, 7),
    )
)
def test_vrf_proofs_decode_or_raise_value_error_and_only_the_real_one_verifies(pi):
    try:
        beta = vrf.proof_to_hash(pi)
    except ValueError:
        beta = None
    assert beta is None or len(beta) == 64
    verified = vrf.verify(VRF_KEY.public, pi, ALPHA)  # None, never an exception
    assert verified is None  # every proof here differs from the real one
    assert vrf.verify(pi[:32], PROOF, ALPHA) is None or pi[:32] == VRF_KEY.public


def test_the_real_vrf_proof_verifies():
    assert vrf.verify(VRF_KEY.public, PROOF, ALPHA) == vrf.proof_to_hash(PROOF)
