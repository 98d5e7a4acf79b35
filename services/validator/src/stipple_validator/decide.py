"""The outcome table (DESIGN.md, Crynux Hydrogen): pure functions, no I/O.

First each reveal is checked against its commitment: the signature must recover the
node's registered address, and the revealed images and nonce must hash to the committed
value; a reveal that fails is `bad_commitment` (slashable) and counts as no result.
Then, with three nodes:  A,A,A -> succeeded/unanimous;  A,A,B -> succeeded/majority and
B is "mismatch" (slashable);  A,A + error/timeout -> succeeded/majority, the third loses
QoS (as does a node replaced for not accepting in time, which does not count towards
the majority);  A,B,C or A,B + one missing -> aborted/no_agreement;  fewer than two results ->
aborted/too_few_results. Images agree when every pair of per-image pHashes is within
the threshold.

QoS per task: agreeing nodes score 10, 5, 2 in the order they committed (the first to
bind itself to a correct result was the fastest); everyone else scores 0.
"""

from __future__ import annotations

from collections.abc import Mapping

from stipple_common.aggregate import NodeRun, Task
from stipple_common.commitment import make_commitment, signer
from stipple_common.messages import TaskAborted, TaskSucceeded, Verdict
from stipple_common.phash import same_images

FINISH_SCORES = (10, 5, 2)


def group_agreeing(results: dict[str, list[str]], threshold: int) -> list[list[str]]:
    """Partition nodes into groups whose images agree with the group's first member,
    in the given (assignment) order; largest group first, ties broken by that order."""
    groups: list[list[str]] = []
    for node, hashes in results.items():
        for group in groups:
            if same_images(results[group[0]], hashes, threshold):
                group.append(node)
                break
        else:
            groups.append([node])
    return sorted(groups, key=len, reverse=True)


def reveal_is_honest(task_id: str, run: NodeRun, address: str | None) -> bool:
    """The reveal opens the commitment, and the commitment was signed by the node's key."""
    if not address or not run.signature or not run.nonce:
        return False
    recovered = signer(run.commitment, run.signature)
    if recovered is None or recovered.lower() != address.lower():
        return False
    try:
        return make_commitment(task_id, run.node_id, run.images, run.nonce) == run.commitment
    except ValueError:  # a nonce that is not hex
        return False


def qos_scores(task: Task, agreeing: list[str]) -> dict[str, int]:
    ranked = sorted(agreeing, key=lambda node: task.nodes[node].commit_order)
    scores = {node: 0 for node in task.nodes}
    for rank, node in enumerate(ranked):
        scores[node] = FINISH_SCORES[min(rank, len(FINISH_SCORES) - 1)]
    return scores


def decide(task: Task, threshold: int, addresses: Mapping[str, str]) -> TaskSucceeded | TaskAborted:
    """Decide a task from what is in; nodes with no result in time are `timeout`.
    `addresses` maps node ids to their registered Ethereum addresses."""
    results: dict[str, list[str]] = {}
    verdicts: dict[str, Verdict] = {}
    for node_id, run in task.nodes.items():
        if run.status == "revealed":
            if reveal_is_honest(task.task_id, run, addresses.get(node_id)):
                results[node_id] = [image.phash for image in run.images]
            else:
                verdicts[node_id] = "bad_commitment"
        elif run.status == "errored":
            verdicts[node_id] = "error"
        else:
            verdicts[node_id] = "timeout"

    groups = group_agreeing(results, threshold)
    counted = len(task.active)  # a node replaced by another is judged (timeout) but not counted
    majority = groups[0] if groups and 2 * len(groups[0]) > counted else None
    if majority is None:
        for node_id in results:
            verdicts[node_id] = "undecided"
        ordered = {node: verdicts[node] for node in task.nodes}
        zero = {node: 0 for node in task.nodes}
        if len(results) < 2:
            return TaskAborted(
                task_id=task.task_id,
                reason="too_few_results",
                detail=f"{len(results)} of {counted} nodes returned a valid result",
                verdicts=ordered,
                qos=zero,
            )
        return TaskAborted(
            task_id=task.task_id,
            reason="no_agreement",
            detail=f"{len(results)} results in {len(groups)} disagreeing groups",
            verdicts=ordered,
            qos=zero,
        )
    for node_id in results:
        verdicts[node_id] = "agree" if node_id in majority else "mismatch"
    unanimous = len(majority) == counted
    return TaskSucceeded(
        task_id=task.task_id,
        reason="unanimous" if unanimous else "majority",
        images=task.nodes[majority[0]].images,
        verdicts={node: verdicts[node] for node in task.nodes},
        qos=qos_scores(task, majority),
    )
