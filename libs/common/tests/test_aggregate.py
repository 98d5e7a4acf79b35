"""The task fold: every allowed transition, and every disallowed one."""

import pytest

from stipple_common.aggregate import InvalidTransition, apply, replay
from stipple_common.messages import (
    ImageResult,
    NodeErrored,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
)
from stipple_common.taskspec import parse_task

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1, "num_images": 1}})
IMG = ImageResult(index=0, key="k", phash="0" * 16, seed=1, width=64, height=64)

SUBMITTED = TaskSubmitted(task_id="t", spec=SPEC, submitted_at=1.0)
ASSIGNED = TaskAssigned(task_id="t", nodes=["a", "b", "c"], deadline=100.0)


def started(node):
    return TaskStarted(task_id="t", node_id=node)


def revealed(node, images=(IMG,)):
    return ResultRevealed(task_id="t", node_id=node, images=list(images))


def errored(node):
    return NodeErrored(task_id="t", node_id=node, code="oops", message="broke")


SUCCEEDED = TaskSucceeded(task_id="t", reason="unanimous", images=[IMG], verdicts={"a": "agree"})
ABORTED = TaskAborted(task_id="t", reason="no_agreement", detail="d")


def fold(*events):
    task = None
    for event in events:
        task = apply(task, event)
    return task


def test_submitted_starts_pending():
    task = fold(SUBMITTED)
    assert task.status == "pending"
    assert task.spec == SPEC
    assert not task.finished
    assert not task.results_in


def test_assigned_creates_one_run_per_node():
    task = fold(SUBMITTED, ASSIGNED)
    assert task.status == "assigned"
    assert list(task.nodes) == ["a", "b", "c"]
    assert all(run.status == "assigned" for run in task.nodes.values())
    assert task.deadline == 100.0


def test_started_revealed_errored_move_each_node():
    task = fold(SUBMITTED, ASSIGNED, started("a"), revealed("a"), errored("b"))
    assert task.status == "running"
    assert task.nodes["a"].status == "revealed"
    assert task.nodes["a"].images == [IMG]
    assert task.nodes["b"].status == "errored"
    assert task.nodes["b"].error_code == "oops"
    assert task.nodes["c"].status == "assigned"
    assert not task.results_in
    assert fold(SUBMITTED, ASSIGNED, revealed("a"), revealed("b"), errored("c")).results_in


def test_reveal_without_started_is_allowed():
    task = fold(SUBMITTED, ASSIGNED, revealed("c"))
    assert task.nodes["c"].status == "revealed"


def test_outcomes_are_terminal():
    done = fold(SUBMITTED, ASSIGNED, revealed("a"), SUCCEEDED)
    assert done.status == "succeeded"
    assert done.finished
    assert done.images == [IMG]
    assert done.verdicts == {"a": "agree"}
    aborted = fold(SUBMITTED, ASSIGNED, ABORTED)
    assert aborted.status == "aborted"
    assert aborted.reason == "no_agreement"
    assert aborted.detail == "d"


def test_a_pending_task_can_be_aborted_when_no_nodes():
    assert fold(SUBMITTED, TaskAborted(task_id="t", reason="no_nodes")).status == "aborted"


@pytest.mark.parametrize(
    ("history", "event", "why"),
    [
        ((), ASSIGNED, "never submitted"),
        ((), started("a"), "never submitted"),
        ((), SUCCEEDED, "never submitted"),
        ((SUBMITTED,), SUBMITTED, "already submitted"),
        ((SUBMITTED,), started("a"), "expected one of assigned, running"),
        ((SUBMITTED,), revealed("a"), "expected one of assigned, running"),
        ((SUBMITTED,), errored("a"), "expected one of assigned, running"),
        ((SUBMITTED,), SUCCEEDED, "expected one of assigned, running"),
        ((SUBMITTED, ASSIGNED), ASSIGNED, "expected one of pending"),
        ((SUBMITTED, ASSIGNED), started("z"), "not assigned to this task"),
        ((SUBMITTED, ASSIGNED), revealed("z"), "not assigned to this task"),
        ((SUBMITTED, ASSIGNED), revealed("a", images=(IMG, IMG)), "revealed 2 images, expected 1"),
        ((SUBMITTED, ASSIGNED, started("a")), started("a"), "already started"),
        ((SUBMITTED, ASSIGNED, revealed("a")), revealed("a"), "already revealed"),
        ((SUBMITTED, ASSIGNED, revealed("a")), errored("a"), "already revealed"),
        ((SUBMITTED, ASSIGNED, errored("a")), revealed("a"), "already errored"),
        ((SUBMITTED, ASSIGNED, revealed("a")), started("a"), "already revealed"),
        ((SUBMITTED, ASSIGNED, SUCCEEDED), ABORTED, "expected one of pending, assigned, running"),
        ((SUBMITTED, ASSIGNED, SUCCEEDED), SUCCEEDED, "expected one of assigned, running"),
        ((SUBMITTED, ASSIGNED, ABORTED), revealed("a"), "expected one of assigned, running"),
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
    events = [SUBMITTED, ASSIGNED, revealed("a"), revealed("a"), revealed("b"), SUCCEEDED, revealed("c")]
    task, rejected = replay(events)
    assert task.status == "succeeded"
    assert task.nodes["c"].status == "assigned"  # the late reveal after the outcome changed nothing
    assert [type(e).__name__ for e, _ in rejected] == ["ResultRevealed", "ResultRevealed"]
    assert all(isinstance(why, InvalidTransition) for _, why in rejected)


def test_replay_of_nothing_is_no_task():
    assert replay([]) == (None, [])


def test_fold_is_pure():
    task = fold(SUBMITTED, ASSIGNED)
    before = task.nodes["a"]
    apply(task, revealed("a"))
    assert task.nodes["a"] is before
    assert task.status == "assigned"
