"""The task fold: every allowed transition, and every disallowed one."""

import pytest

from stipple_common.aggregate import InvalidTransition, apply, replay
from stipple_common.messages import (
    ImageResult,
    NodeErrored,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskReassigned,
    TaskRevealOpened,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
)
from stipple_common.taskspec import parse_task

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1, "num_images": 1}})
IMG = ImageResult(index=0, key="k", phash="0" * 16, seed=1, width=64, height=64)

SUBMITTED = TaskSubmitted(task_id="t", spec=SPEC, submitted_at=1.0, fee=7, owner="app", webhook_url="http://h/")
ASSIGNED = TaskAssigned(task_id="t", nodes=["a", "b", "c"], deadline=100.0)


def started(node):
    return TaskStarted(task_id="t", node_id=node)


def committed(node):
    return TaskCommitted(task_id="t", node_id=node, commitment=f"0x{node}", signature="0xsig")


def opened(*nodes):
    return TaskRevealOpened(task_id="t", nodes=list(nodes), deadline=200.0)


def revealed(node, images=(IMG,)):
    return ResultRevealed(task_id="t", node_id=node, images=list(images), nonce="0x01")


def errored(node):
    return NodeErrored(task_id="t", node_id=node, code="oops", message="broke")


SUCCEEDED = TaskSucceeded(task_id="t", reason="unanimous", images=[IMG], verdicts={"a": "agree"}, qos={"a": 10})
ABORTED = TaskAborted(task_id="t", reason="no_agreement", detail="d")
CANCELLED = TaskCancelled(task_id="t", detail="by the app")
ALL_COMMITTED = (SUBMITTED, ASSIGNED, committed("a"), committed("b"), committed("c"))


def fold(*events):
    task = None
    for event in events:
        task = apply(task, event)
    return task


def test_submitted_starts_pending_and_keeps_the_app_fields():
    task = fold(SUBMITTED)
    assert task.status == "pending"
    assert task.spec == SPEC
    assert (task.fee, task.owner, task.webhook_url) == (7, "app", "http://h/")
    assert not task.finished
    assert not task.commitments_in


def test_assigned_creates_one_run_per_node():
    task = fold(SUBMITTED, ASSIGNED)
    assert task.status == "assigned"
    assert list(task.nodes) == ["a", "b", "c"]
    assert all(run.status == "assigned" for run in task.nodes.values())
    assert task.deadline == 100.0


def test_commitments_are_numbered_in_arrival_order():
    task = fold(SUBMITTED, ASSIGNED, started("a"), committed("b"), committed("a"), errored("c"))
    assert task.status == "running"
    assert task.nodes["b"].commit_order == 1
    assert task.nodes["a"].commit_order == 2
    assert task.nodes["a"].commitment == "0xa"
    assert task.nodes["c"].status == "errored"
    assert task.commitments_in
    assert task.committed_nodes() == ["a", "b"]
    assert not fold(SUBMITTED, ASSIGNED, committed("a"), committed("b")).commitments_in


def test_reveal_opens_then_reveals_complete_the_task():
    task = fold(*ALL_COMMITTED, opened("a", "b", "c"), revealed("a"), revealed("b"))
    assert task.status == "revealing"
    assert task.reveal_deadline == 200.0
    assert task.nodes["a"].status == "revealed"
    assert task.nodes["a"].nonce == "0x01"
    assert not task.reveals_in
    assert fold(*ALL_COMMITTED, opened("a", "b", "c"), revealed("a"), revealed("b"), errored("c")).reveals_in


def test_outcomes_are_terminal():
    done = fold(*ALL_COMMITTED, opened("a", "b", "c"), revealed("a"), SUCCEEDED)
    assert done.status == "succeeded"
    assert done.finished
    assert done.images == [IMG]
    assert done.verdicts == {"a": "agree"}
    assert done.qos == {"a": 10}
    aborted = fold(SUBMITTED, ASSIGNED, ABORTED)
    assert aborted.status == "aborted"
    assert aborted.reason == "no_agreement"
    assert aborted.detail == "d"


def test_a_pending_task_can_be_aborted_when_no_nodes():
    assert fold(SUBMITTED, TaskAborted(task_id="t", reason="no_nodes")).status == "aborted"


@pytest.mark.parametrize(
    "history",
    [(SUBMITTED,), (SUBMITTED, ASSIGNED), (SUBMITTED, ASSIGNED, committed("a")), (*ALL_COMMITTED, opened("a"))],
)
def test_cancel_ends_a_task_in_any_live_state(history):
    task = fold(*history, CANCELLED)
    assert task.status == "cancelled"
    assert task.finished
    assert set(task.verdicts.values()) <= {"cancelled"}


@pytest.mark.parametrize(
    ("history", "event", "why"),
    [
        ((), ASSIGNED, "never submitted"),
        ((), started("a"), "never submitted"),
        ((), SUCCEEDED, "never submitted"),
        ((SUBMITTED,), SUBMITTED, "already submitted"),
        ((SUBMITTED,), started("a"), "expected one of assigned, running"),
        ((SUBMITTED,), committed("a"), "expected one of assigned, running"),
        ((SUBMITTED,), revealed("a"), "expected one of revealing"),
        ((SUBMITTED,), errored("a"), "expected one of assigned, running, revealing"),
        ((SUBMITTED,), SUCCEEDED, "expected one of assigned, running, revealing"),
        ((SUBMITTED, ASSIGNED), ASSIGNED, "expected one of pending"),
        ((SUBMITTED, ASSIGNED), started("z"), "not assigned to this task"),
        ((SUBMITTED, ASSIGNED), committed("z"), "not assigned to this task"),
        ((SUBMITTED, ASSIGNED), revealed("a"), "expected one of revealing"),  # no reveal before the opening
        ((SUBMITTED, ASSIGNED, committed("a")), opened("a", "b"), r"nodes \['b'\] have not committed"),
        ((*ALL_COMMITTED, opened("a", "b")), revealed("a", images=(IMG, IMG)), "revealed 2 images, expected 1"),
        ((*ALL_COMMITTED, opened("a", "b")), committed("a"), "expected one of assigned, running"),
        ((SUBMITTED, ASSIGNED, started("a")), started("a"), "already started"),
        ((SUBMITTED, ASSIGNED, committed("a")), committed("a"), "already committed"),
        ((*ALL_COMMITTED, opened("a"), revealed("a")), revealed("a"), "already revealed"),
        ((*ALL_COMMITTED, opened("a"), revealed("a")), errored("a"), "already revealed"),
        ((SUBMITTED, ASSIGNED, errored("a")), committed("a"), "already errored"),
        ((SUBMITTED, ASSIGNED, committed("a")), started("a"), "already committed"),
        ((SUBMITTED, ASSIGNED, SUCCEEDED), ABORTED, "expected one of pending, assigned, running, revealing"),
        ((SUBMITTED, ASSIGNED, SUCCEEDED), CANCELLED, "expected one of pending, assigned, running, revealing"),
        ((SUBMITTED, ASSIGNED, CANCELLED), SUCCEEDED, "expected one of assigned, running, revealing"),
        ((SUBMITTED, ASSIGNED, ABORTED), committed("a"), "expected one of assigned, running"),
        ((SUBMITTED, ASSIGNED, ABORTED), started("b"), "expected one of assigned, running"),
        ((SUBMITTED,), TaskAssigned(task_id="t", nodes=["a", "a"], deadline=1.0), "distinct"),
        ((SUBMITTED,), TaskAssigned(task_id="t", nodes=[], deadline=1.0), "distinct and non-empty"),
        ((SUBMITTED,), TaskStarted(task_id="other", node_id="a"), "belongs to task other"),
    ],
)
def test_invalid_transitions_raise(history, event, why):
    task = fold(*history)
    with pytest.raises(InvalidTransition, match=why):
        apply(task, event)


def test_replay_sets_aside_what_does_not_apply():
    events = [*ALL_COMMITTED, opened("a", "b"), revealed("a"), revealed("a"), revealed("b"), SUCCEEDED, revealed("c")]
    task, rejected = replay(events)
    assert task.status == "succeeded"
    assert task.nodes["c"].status == "committed"  # the late reveal after the outcome changed nothing
    assert [type(e).__name__ for e, _ in rejected] == ["ResultRevealed", "ResultRevealed"]
    assert all(isinstance(why, InvalidTransition) for _, why in rejected)


def test_replay_of_nothing_is_no_task():
    assert replay([]) == (None, [])


def test_fold_is_pure():
    task = fold(SUBMITTED, ASSIGNED)
    before = task.nodes["a"]
    apply(task, committed("a"))
    assert task.nodes["a"] is before
    assert task.status == "assigned"


def reassigned(replaced, by, deadline=150.0):
    return TaskReassigned(task_id="t", replaced=replaced, by=by, deadline=deadline)


def test_a_node_that_has_not_committed_can_be_replaced():
    task = fold(SUBMITTED, ASSIGNED, started("c"), reassigned("c", "d"))
    assert task.nodes["c"].status == "replaced"
    assert task.nodes["d"].status == "assigned"
    assert list(task.active) == ["a", "b", "d"]
    assert task.reassignments == 1
    assert task.deadline == 150.0  # the replacement gets time to compute
    task = fold(SUBMITTED, ASSIGNED, committed("a"), committed("b"), reassigned("c", "d"), committed("d"))
    assert task.commitments_in  # the replaced node is not waited for
    assert fold(SUBMITTED, ASSIGNED, reassigned("c", "d", deadline=50.0)).deadline == 100.0  # never earlier


@pytest.mark.parametrize(
    ("history", "event", "why"),
    [
        ((SUBMITTED, ASSIGNED, committed("c")), reassigned("c", "d"), "not an assigned node that has yet to commit"),
        ((SUBMITTED, ASSIGNED), reassigned("z", "d"), "not an assigned node"),
        ((SUBMITTED, ASSIGNED), reassigned("c", "a"), "already has a part"),
        ((SUBMITTED, ASSIGNED, reassigned("c", "d")), committed("c"), "already replaced"),
        ((SUBMITTED,), reassigned("c", "d"), "expected one of assigned, running"),
    ],
)
def test_invalid_reassignments_raise(history, event, why):
    with pytest.raises(InvalidTransition, match=why):
        apply(fold(*history), event)
