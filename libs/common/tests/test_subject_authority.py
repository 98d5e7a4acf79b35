"""The subject is the authority: every event type on every subject a node may use.

NATS permissions decide who may publish on which subject (permissions.py); the decoders
believe a payload only as far as its subject allows. These tests try every task event
and node event on every subject form, with every field that could disagree."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from stipple_common import subjects
from stipple_common.errors import Rejected
from stipple_common.identity import dev_node_id
from stipple_common.messages import (
    MAX_ERROR_MESSAGE,
    NODE_WRITTEN,
    ImageResult,
    NodeBanned,
    NodeErrored,
    NodeEvent,
    NodeHeartbeat,
    NodeProbed,
    NodeQos,
    NodeQuit,
    Progress,
    ResultRevealed,
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
    decode_node_event,
    decode_progress,
    decode_task_event,
    encode,
    error_message,
    event_name,
)
from stipple_common.subjects import NODE_SELF_EVENTS as NODE_SELF
from stipple_common.subjects import NODE_TASK_EVENTS as NODE_TASK
from stipple_common.taskspec import MAX_IMAGES, parse_task
from stipple_testkit.nodes import joined

A, B = dev_node_id("a"), dev_node_id("b")
SPEC = parse_task({"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"seed": 3}})
IMG = ImageResult(index=0, key=f"tasks/t/{A}/0.png", phash="00ff00ff00ff00ff", seed=3, width=64, height=64)

CONTROL = [
    TaskSubmitted(task_id="t", spec=SPEC, submitted_at=1.5),
    TaskAssigned(task_id="t", nodes=[A, B], deadline=10.0),
    TaskReassigned(task_id="t", replaced=A, by=B, deadline=11.0),
    TaskRevealOpened(task_id="t", nodes=[A], deadline=12.0),
    TaskSucceeded(task_id="t", reason="unanimous", images=[IMG], verdicts={A: "agree"}),
    TaskEscalated(task_id="t", round=1, more=2, exclude=[A], deadline=1.0),
    TaskExtended(task_id="t", round=1, nodes=[], deadline=1.0),
    TaskAborted(task_id="t", reason="no_agreement"),
    TaskCancelled(task_id="t"),
]
NODE = [
    TaskStarted(task_id="t", node_id=A),
    TaskCommitted(task_id="t", node_id=A, commitment="0x00", signature="0x00"),
    ResultRevealed(task_id="t", node_id=A, images=[IMG]),
    NodeErrored(task_id="t", node_id=A, code="internal", message="x"),
]


def test_the_event_sets_cover_every_task_event():
    assert {event_name(e) for e in CONTROL} == set(subjects.CONTROL_TASK_EVENTS)
    assert {event_name(e) for e in NODE} == set(subjects.NODE_TASK_EVENTS)


@pytest.mark.parametrize("event", CONTROL + NODE, ids=lambda e: type(e).__name__)
def test_each_event_is_believed_on_its_own_subject(event):
    node = getattr(event, "node_id", "")
    assert decode_task_event(subjects.task_subject("t", event_name(event), node), encode(event)) == event


@pytest.mark.parametrize(
    ("event", "subject"),
    [
        # a node may publish only tasks.*.<node event>.<its id>: every other event there is refused
        *(
            (e, f"tasks.t.{name}.{A}")
            for e, name in itertools.product(CONTROL + NODE, subjects.NODE_TASK_EVENTS)
            if event_name(e) != name
        ),
        *((e, f"tasks.t.{event_name(e)}.{A}") for e in CONTROL),  # a control event on a node-shaped subject
        *((e, f"tasks.t.{event_name(e)}") for e in NODE),  # a node event without the node in the subject
        *((e, f"tasks.t.{event_name(e)}.{B}") for e in NODE),  # another node's subject
        *((e, f"tasks.other.{event_name(e)}" + (f".{A}" if e in NODE else "")) for e in CONTROL + NODE),
        (CONTROL[0], "tasks.t"),
        (CONTROL[0], "tasks.t.submitted.x.y"),
        (CONTROL[0], "tasks..submitted"),
        (NODE[0], "tasks.t.exploded.0x1"),
    ],
)
def test_a_payload_that_disagrees_with_its_subject_is_rejected(event, subject):
    with pytest.raises(Rejected) as caught:
        decode_task_event(subject, encode(event))
    parts = subject.split(".")
    assert caught.value.sender == (parts[3] if len(parts) == 4 else "")  # counted against who could send it


def test_garbage_on_a_node_subject_is_rejected_and_blamed_on_that_node():
    for data in (b"", b"not json", b'{"type": "started"}', b"[1,2]", b'{"type":"started","task_id":5}'):
        with pytest.raises(Rejected) as caught:
            decode_task_event(f"tasks.t.started.{A}", data)
        assert (caught.value.reason, caught.value.sender) == ("undecodable", A)


def test_rejections_are_not_decode_errors_but_carry_a_reason():
    with pytest.raises(Rejected) as caught:
        decode_task_event(
            f"tasks.t.started.{A}", encode(TaskSucceeded(task_id="t", reason="x", images=[], verdicts={}))
        )
    assert caught.value.reason == "type_mismatch"
    assert not isinstance(caught.value, msgspec.ValidationError)


JOINED = joined(A, address=A.upper(), started_at=1.0)
SELF = [
    JOINED,
    NodeHeartbeat(node_id=A, at=2.0),
    NodeQuit(node_id=A, at=3.0),
    NodeProbed(node_id=A, probe_id="p", elapsed_s=0.1),
]
ABOUT = [
    NodeQos(node_id=A, qos=9.0, samples=3, recent_timeouts=0),
    NodeBanned(node_id=A, reason="not_assigned", detail="x", until=5.0, at=1.0),
]


@pytest.mark.parametrize("event", SELF + ABOUT, ids=lambda e: type(e).__name__)
def test_node_events_are_keyed_by_the_subject(event):
    name = type(event).__struct_config__.tag
    assert decode_node_event(subjects.node_subject(A, name), encode(event)) == event
    with pytest.raises(Rejected, match="node_mismatch|an event of node"):
        decode_node_event(subjects.node_subject(B, name), encode(event))  # speaking of another node


def test_a_node_cannot_pass_one_event_for_another():
    for event, name in itertools.product(SELF + ABOUT, [*subjects.NODE_SELF_EVENTS, *subjects.NODE_CONTROL_EVENTS]):
        if type(event).__struct_config__.tag != name:
            with pytest.raises(Rejected):
                decode_node_event(subjects.node_subject(A, name), encode(event))


def test_the_qos_and_ban_subjects_are_not_a_nodes():
    allowed = {subjects.node_subject(A, e) for e in subjects.NODE_SELF_EVENTS}
    assert not allowed & {subjects.node_subject(A, e) for e in subjects.NODE_CONTROL_EVENTS}


def test_an_announcement_must_carry_the_nodes_own_address():
    other = msgspec.structs.replace(JOINED, address=B)
    with pytest.raises(Rejected) as caught:
        decode_node_event(subjects.node_subject(A, "joined"), encode(other))
    assert caught.value.reason == "address_mismatch"
    with pytest.raises(Rejected):
        decode_node_event("nodes.x.joined.y", encode(JOINED))


def test_progress_is_believed_only_on_the_nodes_own_subject():
    progress = Progress(task_id="t", node_id=A, step=1, total=4)
    assert decode_progress(subjects.progress_subject("t", A), encode(progress)) == progress
    for subject in (subjects.progress_subject("t", B), subjects.progress_subject("u", A), "progress.t"):
        with pytest.raises(Rejected):
            decode_progress(subject, encode(progress))


@pytest.mark.parametrize(("step", "total"), [(5, 4), (-1, 4), (0, -1), (2, 10**7), (10**7, 10**7)])
def test_progress_past_its_total_or_out_of_range_is_refused(step, total):
    """What the app is shown as a fraction (A1111's `progress`, the ETA) stays within 0..1."""
    progress = Progress(task_id="t", node_id=A, step=step, total=total)
    with pytest.raises(Rejected) as caught:
        decode_progress(subjects.progress_subject("t", A), encode(progress))
    assert (caught.value.reason, caught.value.sender) == ("undecodable", A)
    done = Progress(task_id="t", node_id=A, step=4, total=4)
    assert decode_progress(subjects.progress_subject("t", A), encode(done)) == done


def _unbounded(t: msgspec.inspect.Type, where: str, seen: set[type]) -> list[str]:
    """The places under `t` where a string, bytes or a collection has no maximum length."""
    mi = msgspec.inspect
    if isinstance(t, mi.StructType):
        if t.cls in seen:
            return []
        seen.add(t.cls)
        return [u for f in t.fields for u in _unbounded(f.type, f"{t.cls.__name__}.{f.name}", seen)]
    if isinstance(t, mi.UnionType):
        return [u for member in t.types for u in _unbounded(member, where, seen)]
    found = []
    if isinstance(t, (mi.StrType, mi.BytesType, mi.ByteArrayType, mi.MemoryViewType)) and t.max_length is None:
        found.append(where)
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType, mi.DictType)):
        if t.max_length is None:
            found.append(where)
        if isinstance(t, mi.DictType):
            found += _unbounded(t.key_type, f"{where} (key)", seen) + _unbounded(t.value_type, f"{where}[]", seen)
        else:
            found += _unbounded(t.item_type, f"{where}[]", seen)
    if isinstance(t, (mi.AnyType, mi.RawType)):
        found.append(f"{where} (any)")
    return found


def test_every_string_and_list_a_node_writes_is_bounded():
    """The class, not one field: whatever a node may publish (its task events, what it says
    of itself, progress, downloads, chain requests) has a maximum length at every string and
    list, so no payload a node writes is bigger than an honest one's by more than the bounds."""
    node_task = {t.cls for t in msgspec.inspect.type_info(TaskEvent).types if t.cls.__struct_config__.tag in NODE_TASK}
    node_self = {t.cls for t in msgspec.inspect.type_info(NodeEvent).types if t.cls.__struct_config__.tag in NODE_SELF}
    assert len(node_task) == len(NODE_TASK)
    assert len(node_self) == len(NODE_SELF)
    assert node_task | node_self <= set(NODE_WRITTEN)  # every event a node may send is listed
    unbounded = [u for cls in NODE_WRITTEN for u in _unbounded(msgspec.inspect.type_info(cls), cls.__name__, set())]
    assert unbounded == []
    assert _unbounded(msgspec.inspect.type_info(TaskSubmitted), "TaskSubmitted", set())  # (the walk finds one)


def _rejected_as_undecodable(event: msgspec.Struct) -> None:
    subject = (
        subjects.task_subject("t", event_name(event), A)
        if hasattr(event, "task_id")
        else subjects.node_subject(A, type(event).__struct_config__.tag)
    )
    decode = decode_task_event if hasattr(event, "task_id") else decode_node_event
    with pytest.raises(Rejected) as caught:
        decode(subject, encode(event))
    assert (caught.value.reason, caught.value.sender) == ("undecodable", A), caught.value


def test_a_node_event_past_a_bound_is_rejected_and_one_at_it_is_not():
    errored = NodeErrored(task_id="t", node_id=A, code="internal", message="m" * MAX_ERROR_MESSAGE)
    revealed = ResultRevealed(task_id="t", node_id=A, images=[IMG] * MAX_IMAGES, determinism="d" * 256)
    committed = TaskCommitted(task_id="t", node_id=A, commitment="0x" + "a" * 64, signature="0x" + "b" * 130)
    for fine in (errored, revealed, committed):
        assert decode_task_event(subjects.task_subject("t", event_name(fine), A), encode(fine)) == fine
    replace = msgspec.structs.replace
    for past in (
        replace(errored, message="m" * (MAX_ERROR_MESSAGE + 1)),
        replace(errored, code="c" * 65),
        replace(revealed, images=[IMG] * (MAX_IMAGES + 1)),
        replace(revealed, determinism="d" * 257),
        replace(revealed, nonce="0x" + "0" * 255),
        replace(revealed, images=[replace(IMG, key="k" * 513)]),
        replace(revealed, images=[replace(IMG, summaries=["s"] * 9)]),
        replace(revealed, images=[replace(IMG, checkpoints=["c" * 1025] * 3)]),
        replace(committed, signature="0x" + "b" * 255),
        NodeProbed(node_id=A, probe_id="p" * 129, elapsed_s=1.0),
        NodeQuit(node_id="0x" + "1" * 127, at=1.0),  # (past the bound before it is checked against the subject)
    ):
        _rejected_as_undecodable(past)


def test_an_honest_node_cuts_a_long_error_message_to_the_bound():
    long = "RuntimeError: " + "shape mismatch " * 1000
    cut = error_message(long)
    assert len(cut) == MAX_ERROR_MESSAGE
    assert cut.startswith("RuntimeError: ")
    assert cut.endswith("...")
    assert error_message("short") == "short"
    event = NodeErrored(task_id="t", node_id=A, code="internal", message=cut)
    assert decode_task_event(subjects.task_subject("t", "errored", A), encode(event)).message == cut


def test_what_a_node_says_of_itself_is_bounded():
    """Each model name becomes a column of the dispatcher's index: an announcement with
    too many, or too long, names does not decode (a rejection, and a strike)."""
    many = msgspec.structs.replace(JOINED, models=[f"m{i}" for i in range(257)])
    long = msgspec.structs.replace(JOINED, models_on_disk=["x" * 2001])
    for event in (many, long):
        with pytest.raises(Rejected) as caught:
            decode_node_event(subjects.node_subject(A, "joined"), encode(event))
        assert (caught.value.reason, caught.value.sender) == ("undecodable", A)
    beat = NodeHeartbeat(node_id=A, at=1.0, models_loaded=[f"m{i}" for i in range(257)])
    with pytest.raises(Rejected):
        decode_node_event(subjects.node_subject(A, "heartbeat"), encode(beat))
