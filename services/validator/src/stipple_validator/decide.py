"""The outcome table (DESIGN.md, Crynux Hydrogen): pure functions, no I/O.

With three nodes:  A,A,A -> succeeded/unanimous;  A,A,B -> succeeded/majority and B is
"mismatch" (slashable);  A,A + error/timeout -> succeeded/majority, the third loses QoS;
A,B,C or A,B + one missing -> aborted/no_agreement;  fewer than two results ->
aborted/too_few_results. Images agree when every pair of per-image pHashes is within
the threshold.
"""

from __future__ import annotations

from stipple_common.aggregate import Task
from stipple_common.messages import TaskAborted, TaskSucceeded, Verdict
from stipple_common.phash import same_images


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


def decide(task: Task, threshold: int) -> TaskSucceeded | TaskAborted:
    """Decide a task from the results that are in; nodes with nothing in timed out."""
    results: dict[str, list[str]] = {}
    verdicts: dict[str, Verdict] = {}
    for node_id, run in task.nodes.items():
        if run.status == "revealed":
            results[node_id] = [image.phash for image in run.images]
        elif run.status == "errored":
            verdicts[node_id] = "error"
        else:
            verdicts[node_id] = "timeout"

    groups = group_agreeing(results, threshold)
    majority = groups[0] if groups and 2 * len(groups[0]) > len(task.nodes) else None
    if majority is None:
        for node_id in results:
            verdicts[node_id] = "undecided"
        if len(results) < 2:
            return TaskAborted(
                task_id=task.task_id,
                reason="too_few_results",
                detail=f"{len(results)} of {len(task.nodes)} nodes returned a result",
                verdicts=verdicts,
            )
        return TaskAborted(
            task_id=task.task_id,
            reason="no_agreement",
            detail=f"{len(results)} results in {len(groups)} disagreeing groups",
            verdicts=verdicts,
        )
    for node_id in results:
        verdicts[node_id] = "agree" if node_id in majority else "mismatch"
    unanimous = len(majority) == len(task.nodes)
    return TaskSucceeded(
        task_id=task.task_id,
        reason="unanimous" if unanimous else "majority",
        images=task.nodes[majority[0]].images,
        verdicts={node: verdicts[node] for node in task.nodes},
    )
