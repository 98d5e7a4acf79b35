"""The outcome table, case by case."""

import pytest

from stipple_common.aggregate import apply
from stipple_common.commitment import make_commitment, new_account, new_nonce, sign
from stipple_common.messages import (
    ImageResult,
    NodeErrored,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskCommitted,
    TaskReassigned,
    TaskRevealOpened,
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


ACCOUNTS = {f"n{i}": new_account() for i in range(1, 4)}
ADDRESSES = {node: account.address for node, account in ACCOUNTS.items()}


def images_of(node, hashes):
    return [
        ImageResult(index=i, key=f"{node}/{i}", phash=h, seed=1 + i, width=64, height=64) for i, h in enumerate(hashes)
    ]


def task_with(results, *, commit_order=None, tamper=None):
    """results: node -> list of hashes | "error" | None (no answer). Nodes commit (signed)
    in `commit_order`, then reveal; `tamper` maps a node to a function that changes its
    reveal or commitment before it is applied."""
    task = apply(None, TaskSubmitted(task_id="t", spec=SPEC, submitted_at=0.0))
    task = apply(task, TaskAssigned(task_id="t", nodes=list(results), deadline=1.0))
    reveals = {}
    for node in commit_order or list(results):
        result = results[node]
        if result == "error":
            task = apply(task, NodeErrored(task_id="t", node_id=node, code="x", message="y"))
        elif result is not None:
            nonce = new_nonce()
            value = make_commitment("t", node, images_of(node, result), nonce)
            commit = TaskCommitted(task_id="t", node_id=node, commitment=value, signature=sign(ACCOUNTS[node], value))
            reveal = ResultRevealed(task_id="t", node_id=node, images=images_of(node, result), nonce=nonce)
            if tamper and node in tamper:
                commit, reveal = tamper[node](commit, reveal)
            task = apply(task, commit)
            reveals[node] = reveal
    if reveals:
        task = apply(task, TaskRevealOpened(task_id="t", nodes=list(reveals), deadline=2.0))
    for reveal in reveals.values():
        task = apply(task, reveal)
    return task


def test_all_agree_is_unanimous():
    outcome = decide(task_with({"n1": A, "n2": A, "n3": A_NEAR}), THRESHOLD, ADDRESSES)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "unanimous"
    assert outcome.verdicts == {"n1": "agree", "n2": "agree", "n3": "agree"}
    assert [i.key for i in outcome.images] == ["n1/0", "n1/1"]


def test_two_agree_one_differs_is_majority_and_marks_the_odd_one():
    outcome = decide(task_with({"n1": B, "n2": A, "n3": A}), THRESHOLD, ADDRESSES)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {"n1": "mismatch", "n2": "agree", "n3": "agree"}
    assert outcome.images[0].key == "n2/0"  # images come from the majority


@pytest.mark.parametrize(("third", "verdict"), [("error", "error"), (None, "timeout")])
def test_two_agree_one_failed(third, verdict):
    outcome = decide(task_with({"n1": A, "n2": third, "n3": A}), THRESHOLD, ADDRESSES)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {"n1": "agree", "n2": verdict, "n3": "agree"}


def test_three_different_aborts_without_blaming_anyone():
    outcome = decide(task_with({"n1": A, "n2": B, "n3": C}), THRESHOLD, ADDRESSES)
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "no_agreement"
    assert set(outcome.verdicts.values()) == {"undecided"}


def test_two_different_and_one_missing_aborts():
    outcome = decide(task_with({"n1": A, "n2": B, "n3": None}), THRESHOLD, ADDRESSES)
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "no_agreement"
    assert outcome.verdicts["n3"] == "timeout"


@pytest.mark.parametrize("results", [{"n1": A, "n2": None, "n3": "error"}, {"n1": None, "n2": None, "n3": None}])
def test_fewer_than_two_results_aborts(results):
    outcome = decide(task_with(results), THRESHOLD, ADDRESSES)
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "too_few_results"


def test_threshold_decides_what_is_the_same():
    assert decide(task_with({"n1": A, "n2": A_NEAR, "n3": A_NEAR}), 1, ADDRESSES).reason == "majority"
    assert decide(task_with({"n1": A, "n2": A_NEAR, "n3": A_NEAR}), 2, ADDRESSES).reason == "unanimous"


def test_grouping_keeps_assignment_order_on_ties():
    assert group_agreeing({"x": A, "y": B}, THRESHOLD) == [["x"], ["y"]]
    assert group_agreeing({"x": B, "y": A, "z": A}, THRESHOLD) == [["y", "z"], ["x"]]


def test_qos_scores_follow_commit_order_among_agreeing_nodes():
    outcome = decide(task_with({"n1": A, "n2": A, "n3": A}, commit_order=["n3", "n1", "n2"]), THRESHOLD, ADDRESSES)
    assert outcome.qos == {"n1": 5, "n2": 2, "n3": 10}
    outcome = decide(task_with({"n1": B, "n2": A, "n3": A}, commit_order=["n1", "n3", "n2"]), THRESHOLD, ADDRESSES)
    assert outcome.qos == {"n1": 0, "n2": 5, "n3": 10}  # the fast wrong node scores nothing


def _other_nonce(commit, reveal):
    return commit, ResultRevealed(task_id="t", node_id=reveal.node_id, images=reveal.images, nonce=new_nonce())


def _other_images(commit, reveal):
    return commit, ResultRevealed(task_id="t", node_id=reveal.node_id, images=images_of("n1", A), nonce=reveal.nonce)


def _signed_by_another(commit, reveal):
    forged = TaskCommitted(
        task_id="t",
        node_id=commit.node_id,
        commitment=commit.commitment,
        signature=sign(new_account(), commit.commitment),
    )
    return forged, reveal


def _garbage_signature(commit, reveal):
    return TaskCommitted(task_id="t", node_id=commit.node_id, commitment=commit.commitment, signature="0x00"), reveal


@pytest.mark.parametrize("tamper", [_other_nonce, _other_images, _signed_by_another, _garbage_signature])
def test_a_reveal_that_does_not_open_its_signed_commitment_is_bad(tamper):
    """n3 reveals something other than it committed to (e.g. copies n1's result after
    seeing it), or its commitment is not signed by its registered key."""
    outcome = decide(task_with({"n1": A, "n2": A, "n3": B}, tamper={"n3": tamper}), THRESHOLD, ADDRESSES)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.verdicts == {"n1": "agree", "n2": "agree", "n3": "bad_commitment"}
    assert outcome.qos["n3"] == 0


def test_a_node_with_no_registered_address_cannot_be_trusted():
    outcome = decide(task_with({"n1": A, "n2": A, "n3": A}), THRESHOLD, {"n1": ADDRESSES["n1"], "n2": ADDRESSES["n2"]})
    assert outcome.verdicts["n3"] == "bad_commitment"
    assert outcome.reason == "majority"


def test_a_replaced_node_times_out_and_does_not_count_towards_the_majority():
    task = apply(None, TaskSubmitted(task_id="t", spec=SPEC, submitted_at=0.0))
    task = apply(task, TaskAssigned(task_id="t", nodes=["n1", "n2", "slow"], deadline=1.0))
    task = apply(task, TaskReassigned(task_id="t", replaced="slow", by="n3", deadline=2.0))
    reveals = []
    for node in ("n1", "n2", "n3"):
        nonce = new_nonce()
        value = make_commitment("t", node, images_of(node, A), nonce)
        task = apply(
            task, TaskCommitted(task_id="t", node_id=node, commitment=value, signature=sign(ACCOUNTS[node], value))
        )
        reveals.append(ResultRevealed(task_id="t", node_id=node, images=images_of(node, A), nonce=nonce))
    task = apply(task, TaskRevealOpened(task_id="t", nodes=["n1", "n2", "n3"], deadline=3.0))
    for reveal in reveals:
        task = apply(task, reveal)
    outcome = decide(task, THRESHOLD, ADDRESSES)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "unanimous"  # of the three that count
    assert outcome.verdicts == {"n1": "agree", "n2": "agree", "slow": "timeout", "n3": "agree"}
    assert outcome.qos["slow"] == 0
