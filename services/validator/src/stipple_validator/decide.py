"""The outcome table (DESIGN.md, Crynux Hydrogen): pure functions, no I/O.

First each reveal is screened, and nothing a node revealed can make this module raise:

1. its nonce must be 32 bytes of hex, and the reveal must open the commitment, signed by
   the node's registered address; otherwise the verdict is `bad_commitment`;
2. its fields must be well-formed (`malformed`): 16-hex-digit pHashes, 64-hex-digit
   SHA-256s, keys under the node's own blob prefix, indexes 0..n-1 once each, the
   task's width, height and seeds; otherwise the verdict is `bad_result`;
3. what it stored must be what it revealed: the service reads each blob and recomputes
   its SHA-256, dimensions and pHash (blobcheck.py) and hands the result in as `checked`;
   a node whose blobs do not match is `bad_result` too.

All three verdicts are slashable and count as no result; the reason is kept in the
outcome's `verdict_details`. So is `withheld`: a node that committed, was asked to reveal
and did not (a node that learned from the wait that its task was sampled must not be able
to trade a committed cheat for a mere timeout). Then, with three nodes:  A,A,A -> succeeded/unanimous;
A,A,B -> succeeded/majority and B is "mismatch" (slashable);  A,A + error/timeout/bad ->
succeeded/majority, the third loses QoS (as does a node replaced for not accepting in
time, which does not count towards the majority);  A,B,C or A,B + one missing ->
aborted/no_agreement;  fewer than two results -> aborted/too_few_results. Where no majority
stands beside a valid result, the service draws more nodes instead (`more_nodes`) and
decides again over every result. A task run on one node (not sampled) succeeds with that
node's result when it passes the screening and the blob checks. Results agree when every
pair of per-image pHashes is within the threshold and, for two nodes of one
determinism class, every checkpoint is equal (their latents after 1/4, 1/2 and 3/4 of the
steps: stipple_common.checkpoints), which catches skipped steps that pHash misses; a
majority is the one largest set of results that all agree pairwise (`majority_of`); a
reveal without one checkpoint digest per fraction per image, or without a class, is
`bad_result`.

QoS per task: agreeing nodes score 10, 5, 2 in the order they committed (the first to
bind itself to a correct result was the fastest); everyone else scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import NamedTuple

from stipple_common import checkpoints
from stipple_common.aggregate import NodeRun, Task
from stipple_common.blobstore.intake import blob_prefix
from stipple_common.commitment import make_commitment, signer
from stipple_common.messages import TaskAborted, TaskSucceeded, Verdict
from stipple_common.phash import hamming, same_images

FINISH_SCORES = (10, 5, 2)
PHASH = re.compile(r"[0-9a-f]{16}")  # imagehash's str() of a 64-bit hash
SHA256 = re.compile(r"[0-9a-f]{64}")  # hashlib's hexdigest()
NONCE = re.compile(r"0x[0-9a-fA-F]{64}")  # commitment.new_nonce()
KEY_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # what a node's key may add under its prefix
MAX_KEY_LENGTH = 512  # the blob intake's limit

Checked = Mapping[str, str | None]
"""Per node, what reading its stored blobs showed: None when every image is what it
revealed, else why not (blobcheck.py). A node missing from it was not checked."""


Tolerance = Sequence[float] | None
"""Per checkpoint fraction, the largest relative L2 distance between two classes' latent
summaries that still agrees (measured: bench/RESULTS.md); None compares other classes by
pHash alone."""


class Result(NamedTuple):
    """What the comparison of two nodes' results looks at."""

    phashes: list[str]  # per image, in index order
    determinism: str = ""
    checkpoints: list[list[str]] = []  # per image, its checkpoint digests
    summaries: list[list[str]] = []  # per image, its checkpoint summaries


def latent_distances(a: Result, b: Result) -> list[list[float]] | None:
    """Per image and fraction, the relative L2 distance of the two results' summaries; None
    when either lacks a summary anywhere."""
    count = len(a.phashes)
    if len(a.summaries) != count or len(b.summaries) != count:
        return None
    out = []
    for ours, theirs in zip(a.summaries, b.summaries, strict=True):
        if len(ours) != len(checkpoints.FRACTIONS) or len(theirs) != len(checkpoints.FRACTIONS):
            return None
        out.append([checkpoints.summary_distance(x, y) for x, y in zip(ours, theirs, strict=True)])
    return out


def agree(a: Result, b: Result, threshold: int, tolerance: Tolerance = None) -> bool:
    """Two results agree when every pair of images is within the pHash threshold and their
    latents agree: within one determinism class, equal checkpoints (bit-identical latents
    at 1/4, 1/2 and 3/4 of the way: stipple_common.checkpoints); across classes, summaries
    of those latents within `tolerance` at every fraction (a result without them agrees
    with no other class). A node that skipped steps, or ran another scheduler, prompt or
    model, shows either way."""
    if not same_images(a.phashes, b.phashes, threshold):
        return False
    if a.determinism == b.determinism:
        return a.checkpoints == b.checkpoints
    if tolerance is None:
        return True
    distances = latent_distances(a, b)
    return distances is not None and all(
        d <= limit for image in distances for d, limit in zip(image, tolerance, strict=True)
    )


def group_agreeing(
    results: Mapping[str, Result | list[str]], threshold: int, tolerance: Tolerance = None
) -> list[list[str]]:
    """Partition nodes into groups whose results agree with the group's first member,
    in the given (assignment) order; largest group first, ties broken by that order."""
    given = {node: r if isinstance(r, Result) else Result(phashes=r) for node, r in results.items()}
    groups: list[list[str]] = []
    for node, result in given.items():
        for group in groups:
            if agree(given[group[0]], result, threshold, tolerance):
                group.append(node)
                break
        else:
            groups.append([node])
    return sorted(groups, key=len, reverse=True)


def majority_of(
    results: Mapping[str, Result], threshold: int, counted: int, tolerance: Tolerance = None
) -> list[str] | None:
    """The nodes whose results all agree with one another (every pair: agreement is not
    transitive across determinism classes, where only pHash is compared), when they are the
    one largest such set and a strict majority of the `counted` nodes; else None. So an
    honest node is never outvoted by a cheat that merely passes pHash against a node of
    another class: two largest sets that overlap (A with B, B with C, not A with C) are no
    majority, and more nodes are drawn. In assignment order."""
    nodes = list(results)
    agrees = {(a, b): agree(results[a], results[b], threshold, tolerance) for a, b in combinations(nodes, 2)}
    for size in range(len(nodes), 0, -1):
        largest = [group for group in combinations(nodes, size) if all(agrees[pair] for pair in combinations(group, 2))]
        if largest:
            return list(largest[0]) if len(largest) == 1 and 2 * size > counted else None
    return None


def reveal_is_honest(task_id: str, run: NodeRun, address: str | None) -> bool:
    """The reveal opens the commitment, and the commitment was signed by the node's key."""
    if not address or not run.signature or not run.nonce:
        return False
    recovered = signer(run.commitment, run.signature)
    if recovered is None or recovered.lower() != address.lower():
        return False
    try:
        return make_commitment(task_id, run.node_id, run.images, run.nonce, run.determinism) == run.commitment
    except ValueError:  # a nonce that is not hex (screened before; kept so this never raises)
        return False


def bad_key(task_id: str, node_id: str, key: str) -> str | None:
    """Why `key` is not a key this node may have stored its image under, or None."""
    prefix = blob_prefix(task_id, node_id)
    if len(key) > MAX_KEY_LENGTH:
        return f"key is {len(key)} characters, over {MAX_KEY_LENGTH}"
    if not key.startswith(prefix):
        return f"key {key[:100]!r} is not under {prefix!r}"
    rest = key[len(prefix) :].split("/")
    if not all(KEY_SEGMENT.fullmatch(segment) for segment in rest):
        return f"key {key[:100]!r}: empty, dot or unsafe segment under {prefix!r}"
    return None


def malformed(task: Task, run: NodeRun) -> str | None:
    """Why a reveal's fields are not a well-formed result of this task, or None."""
    config = task.spec.task_config
    images = run.images
    if len(images) != config.num_images:
        return f"revealed {len(images)} images, the task asks for {config.num_images}"
    indexes = sorted(image.index for image in images)
    if indexes != list(range(len(images))):
        return f"image indexes {indexes[:20]}: expected 0..{len(images) - 1} once each"
    if len({image.key for image in images}) != len(images):
        return "two images share a key"
    for image in sorted(images, key=lambda image: image.index):
        where = f"image {image.index}"
        if not PHASH.fullmatch(image.phash):
            return f"{where}: pHash {image.phash[:40]!r} is not 16 lower-case hex digits"
        if not SHA256.fullmatch(image.sha256):
            return f"{where}: sha256 {image.sha256[:80]!r} is not 64 lower-case hex digits"
        why = bad_key(task.task_id, run.node_id, image.key)
        if why is not None:
            return f"{where}: {why}"
        if (image.width, image.height) != (config.image_width, config.image_height):
            return (
                f"{where}: {image.width}x{image.height}, the task asks for {config.image_width}x{config.image_height}"
            )
        if config.seed >= 0 and image.seed != config.seed + image.index:
            return f"{where}: seed {image.seed}, expected {config.seed + image.index} (task seed + index)"
        why = checkpoints.well_formed(image.checkpoints) or checkpoints.summaries_well_formed(image.summaries)
        if why is not None:
            return f"{where}: {why}"
    if not run.determinism or len(run.determinism) > checkpoints.MAX_CLASS_LENGTH:
        return f"determinism class of {len(run.determinism)} characters: 1 to {checkpoints.MAX_CLASS_LENGTH}"
    return None


def screen(task: Task, run: NodeRun, address: str | None, joined_class: str = "") -> tuple[Verdict, str] | None:
    """The verdict on a revealed run and why, when its reveal is no result; None when it
    is a candidate whose blobs are worth reading. `joined_class` is the class the node
    announced when it joined (its `determinism` but the dtype): a reveal of another class is
    a node choosing its class per task, to be compared by pHash alone (`bad_result`)."""
    if not NONCE.fullmatch(run.nonce):
        return "bad_result", f"nonce {run.nonce[:80]!r} is not 0x and 64 hex digits"
    if not reveal_is_honest(task.task_id, run, address):
        if not address:
            return "bad_commitment", "no registered address"
        return "bad_commitment", "the reveal does not open the commitment signed by the node's address"
    why = malformed(task, run)
    if why is None and joined_class and not run.determinism.startswith(joined_class + "; "):
        why = f"revealed determinism class {run.determinism[:80]!r}, not of the class it joined with"
    return ("bad_result", why) if why is not None else None


Screens = dict[str, tuple[Verdict, str] | None]


def screen_all(task: Task, addresses: Mapping[str, str], classes: Mapping[str, str] | None = None) -> Screens:
    """`screen` of every revealed node: each signature is recovered once per decision,
    for `candidates` and `decide` both (a recovery is most of a screen's cost)."""
    joined = classes or {}
    return {
        node_id: screen(task, run, addresses.get(node_id), joined.get(node_id, ""))
        for node_id, run in task.nodes.items()
        if run.status == "revealed"
    }


def candidates(screens: Screens) -> list[str]:
    """The revealed nodes whose reveal opens its signed commitment and is well-formed (of a
    task's `screen_all`): the results whose stored blobs the service checks before deciding."""
    return [node_id for node_id, screened in screens.items() if screened is None]


def mismatch_evidence(
    lead: Result, odd: Result, majority: list[str], threshold: int, tolerance: Tolerance = None
) -> str:
    """Why an outvoted node is slashed, with the evidence: the nodes that agreed, and either
    the images whose pHashes are over the threshold from the majority's (both hashes and
    the distance), or, when every image is within it and the node is of the majority's
    determinism class, the checkpoints where its latents differ (both digests)."""
    agreed = f"outvoted by {len(majority)} agreeing nodes ({', '.join(majority)})"
    far = [
        f"image {i}: pHash {theirs} vs {ours} ({hamming(ours, theirs)} bits)"
        for i, (ours, theirs) in enumerate(zip(lead.phashes, odd.phashes, strict=False))
        if hamming(ours, theirs) > threshold
    ]
    if far:
        return f"{agreed}; over the pHash threshold of {threshold}: {'; '.join(far[:4])}"
    if lead.determinism != odd.determinism:
        distances = latent_distances(lead, odd)
        if distances is None:
            return f"{agreed}; of another determinism class and without latent summaries to compare across classes"
        off = [
            f"image {i} after {checkpoints.FRACTIONS[k]:g} of the steps: relative L2 {d:.3g} over {limit:.3g}"
            for i, image in enumerate(distances)
            for k, (d, limit) in enumerate(zip(image, tolerance or (), strict=False))
            if d > limit
        ]
        return f"{agreed}; its latents are off theirs across classes: {'; '.join(off[:4])} (skipped or other work)"
    differ = [
        f"image {i} after {checkpoints.FRACTIONS[k]:g} of the steps: {y} vs {x}"
        for i, (ours, theirs) in enumerate(zip(lead.checkpoints, odd.checkpoints, strict=False))
        for k, (x, y) in enumerate(zip(ours, theirs, strict=False))
        if x != y
    ]
    return (
        f"{agreed}; its images are within the pHash threshold of the majority's and it is of their determinism "
        f"class ({odd.determinism}), but its latents differ: {'; '.join(differ[:4]) or 'at every checkpoint'} "
        "(skipped or other work)"
    )


def more_nodes(task: Task, outcome: TaskSucceeded | TaskAborted, max_nodes: int) -> int:
    """How many more nodes to draw instead of publishing `outcome` (0: publish it). A task
    whose results stand without a majority (they disagree, or too few came in beside one
    valid result) draws two more nodes, while it has had fewer than `max_nodes`: the next
    decision counts every result, so a node is slashed only when a majority outvotes it,
    never one against one."""
    if not isinstance(outcome, TaskAborted) or outcome.reason not in ("no_agreement", "too_few_results"):
        return 0
    if not any(verdict == "undecided" for verdict in outcome.verdicts.values()):  # no valid result at all
        return 0
    return 2 if len(task.nodes) + 2 <= max_nodes else 0


def qos_scores(task: Task, agreeing: list[str]) -> dict[str, int]:
    ranked = sorted(agreeing, key=lambda node: task.nodes[node].commit_order)
    scores = {node: 0 for node in task.nodes}
    for rank, node in enumerate(ranked):
        scores[node] = FINISH_SCORES[min(rank, len(FINISH_SCORES) - 1)]
    return scores


def decide(
    task: Task,
    threshold: int,
    addresses: Mapping[str, str],
    checked: Checked,
    classes: Mapping[str, str] | None = None,
    tolerance: Tolerance = None,
    bus_away_s: float = 0.0,
    screens: Screens | None = None,
) -> TaskSucceeded | TaskAborted:
    """Decide a task from what is in; nodes with no result in time are `timeout`.
    `bus_away_s`: how long the validator found the bus away while the reveal was open; a
    committed node that did not reveal is then `timeout`, not `withheld` (slashable): the
    deadline was not its to meet while nothing could be stored (the validator's own
    observation: a node cannot claim it).
    `addresses` maps node ids to their registered Ethereum addresses; `checked` is what
    the blob checks found for the `candidates` (a candidate missing from it is not
    trusted and judged `undecided`, which costs it nothing); `classes` the class each node
    joined with (NodeJoined.determinism; a node missing from it is not checked); `screens`
    the `screen_all` of this task made for `candidates`, when the caller has it."""
    screens = screen_all(task, addresses, classes) if screens is None else screens
    results: dict[str, Result] = {}
    verdicts: dict[str, Verdict] = {}
    details: dict[str, str] = {}
    for node_id, run in task.nodes.items():
        if run.status == "revealed":
            screened = (
                screens[node_id]
                if node_id in screens
                else screen(task, run, addresses.get(node_id), (classes or {}).get(node_id, ""))
            )
            if screened is not None:
                verdicts[node_id], details[node_id] = screened
            elif node_id not in checked:
                verdicts[node_id] = "undecided"
            elif checked[node_id] is not None:
                verdicts[node_id], details[node_id] = "bad_result", f"stored images: {checked[node_id]}"
            else:
                ordered_images = sorted(run.images, key=lambda image: image.index)
                results[node_id] = Result(
                    phashes=[image.phash for image in ordered_images],
                    determinism=run.determinism,
                    checkpoints=[image.checkpoints for image in ordered_images],
                    summaries=[image.summaries for image in ordered_images],
                )
        elif run.status == "errored" and run.commitment:
            verdicts[node_id] = "withheld"
            details[node_id] = f"committed, then reported an error ({run.error_code}) instead of revealing"
        elif run.status == "errored":
            verdicts[node_id] = "error"
        elif run.status == "committed" and task.reveal_deadline is not None and bus_away_s > 0:
            verdicts[node_id] = "timeout"
            details[node_id] = f"committed and did not reveal in time; the bus was away {bus_away_s:.1f} s meanwhile"
        elif run.status == "committed" and task.reveal_deadline is not None:
            verdicts[node_id] = "withheld"
            details[node_id] = "committed, was asked to reveal, and did not reveal in time"
        else:
            verdicts[node_id] = "timeout"

    groups = group_agreeing(results, threshold, tolerance)  # how the results split, for the detail
    counted = len(task.active)  # a node replaced by another is judged (timeout) but not counted
    majority = majority_of(results, threshold, counted, tolerance)
    if majority is None:
        for node_id in results:
            verdicts[node_id] = "undecided"
        ordered = {node: verdicts[node] for node in task.nodes}
        zero = {node: 0 for node in task.nodes}
        rejected = "".join(f"; {node} {verdicts[node]}: {why}" for node, why in details.items())
        if len(results) < 2:
            return TaskAborted(
                task_id=task.task_id,
                reason="too_few_results",
                detail=f"{len(results)} of {counted} nodes returned a valid result{rejected}",
                verdicts=ordered,
                qos=zero,
                verdict_details=details,
                sampling=task.sampling,
            )
        return TaskAborted(
            task_id=task.task_id,
            reason="no_agreement",
            detail=f"{len(results)} results in {len(groups)} disagreeing groups{rejected}",
            verdicts=ordered,
            qos=zero,
            verdict_details=details,
            sampling=task.sampling,
        )
    lead = results[majority[0]]
    for node_id in results:
        verdicts[node_id] = "agree" if node_id in majority else "mismatch"
        if node_id not in majority:
            details[node_id] = mismatch_evidence(lead, results[node_id], majority, threshold, tolerance)
    unanimous = len(majority) == counted
    return TaskSucceeded(
        task_id=task.task_id,
        reason="unanimous" if unanimous else "majority",
        images=sorted(task.nodes[majority[0]].images, key=lambda image: image.index),
        verdicts={node: verdicts[node] for node in task.nodes},
        qos=qos_scores(task, majority),
        verdict_details=details,
        sampling=task.sampling,
    )
