"""Who is paid for a task's outcome: the one rule the chain-indexer's settler applies and
`stipple chain reconcile` checks.

- `succeeded`: the fee goes to the nodes that agreed, in proportion to this task's QoS
  scores (10/5/2 by commit order), in equal shares when every score is 0. A node's id is
  its Ethereum address in lower case (identity.py), so it is paid at that address.
- `succeeded` with no agreeing node, `aborted` and `cancelled`: the fee is refunded.

A paid task therefore ends SETTLED or REFUNDED on TaskPayment (`final_state`).
"""

from __future__ import annotations

from eth_utils import to_checksum_address

from .chain import Settlement, TaskState
from .identity import is_node_id
from .messages import TaskAborted, TaskCancelled, TaskSucceeded

Outcome = TaskSucceeded | TaskAborted | TaskCancelled


def settlement_of(outcome: TaskSucceeded) -> Settlement | None:
    """Whom `outcome`'s fee pays and in which shares; None when nobody is paid (refund).
    A verdict under a key that is not a node id names no address, and is never paid."""
    agreeing = [node for node, verdict in outcome.verdicts.items() if verdict == "agree" and is_node_id(node)]
    if not agreeing:
        return None
    shares = [outcome.qos.get(node, 0) for node in agreeing]
    if sum(shares) == 0:
        shares = [1] * len(agreeing)
    return Settlement(task_id=outcome.task_id, nodes=[to_checksum_address(node) for node in agreeing], shares=shares)


def final_state(outcome: Outcome) -> TaskState:
    """The state a paid task must end in on TaskPayment after `outcome`."""
    if isinstance(outcome, TaskSucceeded) and settlement_of(outcome) is not None:
        return TaskState.SETTLED
    return TaskState.REFUNDED
