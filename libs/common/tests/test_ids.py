"""Message ids, the deduplication contract: built from the message, so services agree."""

from __future__ import annotations

import msgspec

from stipple_common import ids
from stipple_common.identity import dev_node_id
from stipple_common.messages import (
    CancelWork,
    NodeBanned,
    NodeHeartbeat,
    NodeJoined,
    NodeQos,
    PrefetchRequest,
    RevealRequest,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskReassigned,
    TaskSucceeded,
)

A, B = dev_node_id("a"), dev_node_id("b")


def test_every_outcome_of_a_task_has_one_id_so_the_first_stored_wins():
    outcomes = [
        TaskSucceeded(task_id="t", reason="unanimous", images=[], verdicts={}),
        TaskAborted(task_id="t", reason="no_nodes"),
        TaskCancelled(task_id="t"),
    ]
    assert {ids.task_event(e) for e in outcomes} == {ids.outcome("t")} == {"t:outcome"}


def test_task_events_are_one_per_task_per_node_or_per_replacement():
    assert ids.task_event(TaskAssigned(task_id="t", nodes=[A], deadline=1.0)) == "t:assigned"
    committed = TaskCommitted(task_id="t", node_id=A, commitment="0x", signature="0x")
    assert ids.task_event(committed) == f"t:{A}:committed"
    first = TaskReassigned(task_id="t", replaced=A, by=B, deadline=2.0)
    second = TaskReassigned(task_id="t", replaced=B, by=A, deadline=3.0)
    assert ids.task_event(first) != ids.task_event(second)  # two replacements are two messages


def test_control_messages_are_one_per_task_and_node():
    assert ids.control(RevealRequest(task_id="t", deadline=1.0), A) == f"t:{A}:reveal"
    assert ids.control(CancelWork(task_id="t"), A) != ids.control(CancelWork(task_id="t"), B)
    prefetch = PrefetchRequest(ref="org/model")
    assert ids.control(prefetch, A, round_id=1) != ids.control(prefetch, A, round_id=2)  # a later round asks again
    assert ids.work("t", A) == f"t:{A}:work"


def test_an_announcement_is_one_message_per_content():
    joined = NodeJoined(node_id=A, device="cpu", memory_bytes=1, models=["m"], version="0.1", started_at=1.0)
    retried = msgspec.structs.replace(joined)
    downloaded = msgspec.structs.replace(joined, models_on_disk=["org/model"])
    assert ids.node_event(joined) == ids.node_event(retried)
    assert ids.node_event(joined) != ids.node_event(downloaded)
    assert ids.node_event(NodeHeartbeat(node_id=A, at=1.0)) != ids.node_event(NodeHeartbeat(node_id=A, at=2.0))
    qos = NodeQos(node_id=A, qos=5.0, samples=1, recent_timeouts=0, task_id="t")
    assert ids.node_event(qos) == f"{A}:qos:t"  # once per scored task
    banned = NodeBanned(node_id=A, reason="x", detail="", until=9.0, at=1.5)
    assert ids.node_event(banned) == f"{A}:banned:1"
