"""The outcome table, case by case."""

import pytest

from stipple_common.aggregate import apply
from stipple_common.messages import (
    ImageResult,
    NodeErrored,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskSubmitted,
    TaskSucceeded,
)
from stipple_common.taskspec import parse_task
from stipple_validator.decide import decide, group_agreeing

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1, "num_images": 2}})
A = ["0000000000000000", "ffffffffffffffff"]
A_NEAR = ["0000000000000003", "ffffffffffffffff"]  # 2 bits from A in image 0
B = ["f0f0f0f0f0f0f0f0", "ffffffffffffffff"]  # image 0 far from A
C = ["0f0f0f0f0f0f0f0f", "0000000000000000"]
THRESHOLD = 4


def task_with(results):
    """results: node -> list of hashes | "error" | None (no answer)."""
    task = apply(None, TaskSubmitted(task_id="t", spec=SPEC, submitted_at=0.0))
    task = apply(task, TaskAssigned(task_id="t", nodes=list(results), deadline=1.0))
    for node, result in results.items():
        if result == "error":
            task = apply(task, NodeErrored(task_id="t", node_id=node, code="x", message="y"))
        elif result is not None:
            images = [
                ImageResult(index=i, key=f"{node}/{i}", phash=h, seed=1 + i, width=64, height=64)
                for i, h in enumerate(result)
            ]
            task = apply(task, ResultRevealed(task_id="t", node_id=node, images=images))
    return task


def test_all_agree_is_unanimous():
    outcome = decide(task_with({"n1": A, "n2": A, "n3": A_NEAR}), THRESHOLD)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "unanimous"
    assert outcome.verdicts == {"n1": "agree", "n2": "agree", "n3": "agree"}
    assert [i.key for i in outcome.images] == ["n1/0", "n1/1"]


def test_two_agree_one_differs_is_majority_and_marks_the_odd_one():
    outcome = decide(task_with({"n1": B, "n2": A, "n3": A}), THRESHOLD)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {"n1": "mismatch", "n2": "agree", "n3": "agree"}
    assert outcome.images[0].key == "n2/0"  # images come from the majority


@pytest.mark.parametrize(("third", "verdict"), [("error", "error"), (None, "timeout")])
def test_two_agree_one_failed(third, verdict):
    outcome = decide(task_with({"n1": A, "n2": third, "n3": A}), THRESHOLD)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {"n1": "agree", "n2": verdict, "n3": "agree"}


def test_three_different_aborts_without_blaming_anyone():
    outcome = decide(task_with({"n1": A, "n2": B, "n3": C}), THRESHOLD)
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "no_agreement"
    assert set(outcome.verdicts.values()) == {"undecided"}


def test_two_different_and_one_missing_aborts():
    outcome = decide(task_with({"n1": A, "n2": B, "n3": None}), THRESHOLD)
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "no_agreement"
    assert outcome.verdicts["n3"] == "timeout"


@pytest.mark.parametrize("results", [{"n1": A, "n2": None, "n3": "error"}, {"n1": None, "n2": None, "n3": None}])
def test_fewer_than_two_results_aborts(results):
    outcome = decide(task_with(results), THRESHOLD)
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "too_few_results"


def test_threshold_decides_what_is_the_same():
    assert decide(task_with({"n1": A, "n2": A_NEAR, "n3": A_NEAR}), 1).reason == "majority"
    assert decide(task_with({"n1": A, "n2": A_NEAR, "n3": A_NEAR}), 2).reason == "unanimous"


def test_grouping_keeps_assignment_order_on_ties():
    assert group_agreeing({"x": A, "y": B}, THRESHOLD) == [["x"], ["y"]]
    assert group_agreeing({"x": B, "y": A, "z": A}, THRESHOLD) == [["y", "z"], ["x"]]
