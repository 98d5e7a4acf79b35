"""The settlement rule the settler applies and `stipple chain reconcile` checks: agreeing
nodes by QoS share, equal shares when every score is 0, nobody to pay -> refund."""

from __future__ import annotations

from eth_utils import to_checksum_address

from stipple_common.chain import TaskState
from stipple_common.identity import dev_node_id
from stipple_common.messages import TaskAborted, TaskCancelled, TaskSucceeded
from stipple_common.settlement import final_state, settlement_of

A, B, C = (dev_node_id(name) for name in "abc")


def succeeded(verdicts: dict, qos: dict | None = None) -> TaskSucceeded:
    return TaskSucceeded(task_id="t", reason="majority", images=[], verdicts=verdicts, qos=qos or {})


def test_agreeing_nodes_are_paid_by_qos_share_at_their_addresses():
    outcome = succeeded({A: "agree", B: "agree", C: "mismatch"}, {A: 10, B: 5, C: 0})
    settlement = settlement_of(outcome)
    assert settlement is not None
    assert settlement.task_id == "t"
    assert list(settlement.nodes) == [to_checksum_address(A), to_checksum_address(B)]
    assert list(settlement.shares) == [10, 5]
    assert final_state(outcome) == TaskState.SETTLED


def test_all_scores_zero_means_equal_shares():
    settlement = settlement_of(succeeded(dict.fromkeys((A, B, C), "agree")))
    assert settlement is not None
    assert list(settlement.shares) == [1, 1, 1]


def test_nobody_agreeing_or_an_id_that_is_no_address_is_a_refund():
    assert settlement_of(succeeded({A: "mismatch", B: "timeout"})) is None
    assert final_state(succeeded({A: "error"})) == TaskState.REFUNDED
    only_names = succeeded({"node-a": "agree"}, {"node-a": 10})  # no address to pay
    assert settlement_of(only_names) is None
    assert final_state(only_names) == TaskState.REFUNDED
    mixed = settlement_of(succeeded({"node-a": "agree", B: "agree"}, {"node-a": 10, B: 2}))
    assert mixed is not None
    assert (list(mixed.nodes), list(mixed.shares)) == ([to_checksum_address(B)], [2])


def test_aborted_and_cancelled_tasks_are_refunded():
    assert final_state(TaskAborted(task_id="t", reason="no_agreement", verdicts={A: "agree"})) == TaskState.REFUNDED
    assert final_state(TaskCancelled(task_id="t")) == TaskState.REFUNDED
