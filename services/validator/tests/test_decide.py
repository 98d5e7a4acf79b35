"""The outcome table, case by case, and the screening of what nodes reveal: nothing a
node reveals makes `decide` raise; a malformed reveal, or one whose stored images do not
match it, is `bad_result` and counts as no result."""

import hashlib

import msgspec
import numpy as np
import pytest

from stipple_common import checkpoints, subjects
from stipple_common.aggregate import apply
from stipple_common.commitment import account_from_key, make_commitment, new_account, new_nonce, sign
from stipple_common.identity import dev_node_id, key_for
from stipple_common.messages import (
    ImageResult,
    NodeErrored,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskCommitted,
    TaskEscalated,
    TaskExtended,
    TaskReassigned,
    TaskRevealOpened,
    TaskSubmitted,
    TaskSucceeded,
    decode_task_event,
    encode,
)
from stipple_common.taskspec import MAX_IMAGES, parse_task
from stipple_common.vrf import SamplingProof, VrfKey
from stipple_validator.decide import MAX_KEY_LENGTH, candidates, decide, group_agreeing, more_nodes, screen_all

SPEC = parse_task(
    {
        "base_model": "tiny-sd",
        "prompt": "p",
        "task_config": {"seed": 1, "num_images": 2, "image_width": 64, "image_height": 64},
    }
)
A = ["0000000000000000", "ffffffffffffffff"]
A_NEAR = ["0000000000000003", "ffffffffffffffff"]  # 2 bits from A in image 0
B = ["f0f0f0f0f0f0f0f0", "ffffffffffffffff"]  # image 0 far from A
C = ["0f0f0f0f0f0f0f0f", "0000000000000000"]
THRESHOLD = 4

NAMES = ("n1", "n2", "n3", "slow", "n4", "n5")
ID = {name: dev_node_id(name) for name in NAMES}  # a node's id is its address
N1, N2, N3, SLOW, N4, N5 = (ID[name] for name in NAMES)
ACCOUNTS = {ID[name]: account_from_key(key_for(name)) for name in NAMES}
ADDRESSES = {node: node for node in ACCOUNTS}  # what the validator passes


CLASS = "cpu x86_64 test threads 1; torch 2.13.0+cpu; diffusers 0.42.1; float32"
HONEST_WORK = "honest"


def work_checkpoints(work=HONEST_WORK, index=0):
    """The checkpoint digests of one image: equal for equal work (the same latents)."""
    return [checkpoints.digest(f"{work}:{index}:{fraction}".encode()) for fraction in checkpoints.FRACTIONS]


def work_summaries(work=HONEST_WORK, index=0, determinism=""):
    """The latent summaries of one image: latents drawn from the work (equal for equal work),
    nudged by 1e-3 for another class's last bits (`determinism`; none for CLASS)."""
    out = []
    for k, _ in enumerate(checkpoints.FRACTIONS):
        seed = int.from_bytes(hashlib.sha256(f"{work}:{index}:{k}".encode()).digest()[:8], "big")
        latents = np.random.default_rng(seed).standard_normal((4, 8, 8)).astype(np.float32)
        if determinism and determinism != CLASS:
            nudge = int.from_bytes(hashlib.sha256(determinism.encode()).digest()[:8], "big")
            latents += 1e-3 * np.random.default_rng(nudge).standard_normal(latents.shape).astype(np.float32)
        out.append(checkpoints.summary(latents))
    return out


def images_of(node, hashes, task_id="t", work=HONEST_WORK, determinism=""):
    return [
        ImageResult(
            index=i,
            key=f"tasks/{task_id}/{node}/secret/{i}.png",
            phash=h,
            seed=1 + i,
            width=64,
            height=64,
            sha256=hashlib.sha256(f"{node}:{i}".encode()).hexdigest(),
            checkpoints=work_checkpoints(work, i),
            summaries=work_summaries(work, i, determinism),
        )
        for i, h in enumerate(hashes)
    ]


def task_with(results, *, commit_order=None, tamper=None, images=None, classes=None, work=None):
    """results: node -> list of hashes | "error" | None (no answer). Nodes commit (signed)
    in `commit_order`, then reveal; `tamper` maps a node to a function that changes its
    reveal or commitment before it is applied; `images` maps a node to a function that
    changes its images before it commits to them (a node that commits to garbage);
    `classes` and `work` map a node to its determinism class (else CLASS) and to the work
    its checkpoints come from (else the honest work)."""
    task = apply(None, TaskSubmitted(task_id="t", spec=SPEC, submitted_at=0.0))
    task = apply(task, TaskAssigned(task_id="t", nodes=list(results), deadline=1.0))
    reveals = {}
    for node in commit_order or list(results):
        result = results[node]
        if result == "error":
            task = apply(task, NodeErrored(task_id="t", node_id=node, code="x", message="y"))
        elif result is not None:
            nonce = new_nonce()
            revealed = images_of(
                node, result, work=(work or {}).get(node, HONEST_WORK), determinism=(classes or {}).get(node, CLASS)
            )
            if images and node in images:
                revealed = images[node](revealed)
            determinism = (classes or {}).get(node, CLASS)
            value = make_commitment("t", node, revealed, nonce, determinism)
            commit = TaskCommitted(task_id="t", node_id=node, commitment=value, signature=sign(ACCOUNTS[node], value))
            reveal = ResultRevealed(task_id="t", node_id=node, images=revealed, nonce=nonce, determinism=determinism)
            if tamper and node in tamper:
                commit, reveal = tamper[node](commit, reveal)
            task = apply(task, commit)
            reveals[node] = reveal
    if reveals:
        task = apply(task, TaskRevealOpened(task_id="t", nodes=list(reveals), deadline=2.0))
    for reveal in reveals.values():
        task = apply(task, reveal)
    return task


def decided(task, threshold=THRESHOLD, addresses=ADDRESSES, bad_blobs=None):
    """`decide` after blob checks that found `bad_blobs` (node -> why) and nothing else."""
    checked = {node: (bad_blobs or {}).get(node) for node in candidates(screen_all(task, addresses))}
    return decide(task, threshold, addresses, checked)


def test_all_agree_is_unanimous():
    outcome = decided(task_with({N1: A, N2: A, N3: A_NEAR}))
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "unanimous"
    assert outcome.verdicts == {N1: "agree", N2: "agree", N3: "agree"}
    assert [i.key for i in outcome.images] == [f"tasks/t/{N1}/secret/0.png", f"tasks/t/{N1}/secret/1.png"]
    assert outcome.verdict_details == {}


def test_two_agree_one_differs_is_majority_and_marks_the_odd_one():
    outcome = decided(task_with({N1: B, N2: A, N3: A}))
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {N1: "mismatch", N2: "agree", N3: "agree"}
    assert outcome.images[0].key.startswith(f"tasks/t/{N2}/")  # images come from the majority


@pytest.mark.parametrize(("third", "verdict"), [("error", "error"), (None, "timeout")])
def test_two_agree_one_failed(third, verdict):
    outcome = decided(task_with({N1: A, N2: third, N3: A}))
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {N1: "agree", N2: verdict, N3: "agree"}


def test_three_different_aborts_without_blaming_anyone():
    outcome = decided(task_with({N1: A, N2: B, N3: C}))
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "no_agreement"
    assert set(outcome.verdicts.values()) == {"undecided"}


def test_two_different_and_one_missing_aborts():
    outcome = decided(task_with({N1: A, N2: B, N3: None}))
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "no_agreement"
    assert outcome.verdicts[N3] == "timeout"


@pytest.mark.parametrize("results", [{N1: A, N2: None, N3: "error"}, {N1: None, N2: None, N3: None}])
def test_fewer_than_two_results_aborts(results):
    outcome = decided(task_with(results))
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "too_few_results"


def test_threshold_decides_what_is_the_same():
    assert decided(task_with({N1: A, N2: A_NEAR, N3: A_NEAR}), 1).reason == "majority"
    assert decided(task_with({N1: A, N2: A_NEAR, N3: A_NEAR}), 2).reason == "unanimous"


def test_grouping_keeps_assignment_order_on_ties():
    assert group_agreeing({"x": A, "y": B}, THRESHOLD) == [["x"], ["y"]]
    assert group_agreeing({"x": B, "y": A, "z": A}, THRESHOLD) == [["y", "z"], ["x"]]


def test_qos_scores_follow_commit_order_among_agreeing_nodes():
    outcome = decided(task_with({N1: A, N2: A, N3: A}, commit_order=[N3, N1, N2]))
    assert outcome.qos == {N1: 5, N2: 2, N3: 10}
    outcome = decided(task_with({N1: B, N2: A, N3: A}, commit_order=[N1, N3, N2]))
    assert outcome.qos == {N1: 0, N2: 5, N3: 10}  # the fast wrong node scores nothing


def _other_nonce(commit, reveal):
    return commit, ResultRevealed(task_id="t", node_id=reveal.node_id, images=reveal.images, nonce=new_nonce())


def _other_images(commit, reveal):
    return commit, ResultRevealed(task_id="t", node_id=reveal.node_id, images=images_of(N1, A), nonce=reveal.nonce)


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
    outcome = decided(task_with({N1: A, N2: A, N3: B}, tamper={N3: tamper}))
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.verdicts == {N1: "agree", N2: "agree", N3: "bad_commitment"}
    assert outcome.qos[N3] == 0
    assert "does not open the commitment" in outcome.verdict_details[N3]


def test_a_node_with_no_registered_address_cannot_be_trusted():
    addresses = {N1: N1, N2: N2}
    outcome = decided(task_with({N1: A, N2: A, N3: A}), addresses=addresses)
    assert outcome.verdicts[N3] == "bad_commitment"
    assert outcome.reason == "majority"


def test_a_replaced_node_times_out_and_does_not_count_towards_the_majority():
    task = apply(None, TaskSubmitted(task_id="t", spec=SPEC, submitted_at=0.0))
    task = apply(task, TaskAssigned(task_id="t", nodes=[N1, N2, SLOW], deadline=1.0))
    task = apply(task, TaskReassigned(task_id="t", replaced=SLOW, by=N3, deadline=2.0))
    reveals = []
    for node in (N1, N2, N3):
        nonce = new_nonce()
        value = make_commitment("t", node, images_of(node, A), nonce, CLASS)
        task = apply(
            task, TaskCommitted(task_id="t", node_id=node, commitment=value, signature=sign(ACCOUNTS[node], value))
        )
        reveal = ResultRevealed(task_id="t", node_id=node, images=images_of(node, A), nonce=nonce, determinism=CLASS)
        reveals.append(reveal)
    task = apply(task, TaskRevealOpened(task_id="t", nodes=[N1, N2, N3], deadline=3.0))
    for reveal in reveals:
        task = apply(task, reveal)
    outcome = decided(task)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "unanimous"  # of the three that count
    assert outcome.verdicts == {N1: "agree", N2: "agree", SLOW: "timeout", N3: "agree"}
    assert outcome.qos[SLOW] == 0


# --------------------------------------------------------------------------- malformed reveals


def _image0(**changes):
    """Change image 0 of a node's reveal before it commits to it."""

    def change(images):
        return [msgspec.structs.replace(images[0], **changes), *images[1:]]

    return change


def _images(change):
    return lambda images: [change(i, image) for i, image in enumerate(images)]


MALFORMED = {
    "phash not hex": (_image0(phash="zzzzzzzzzzzzzzzz"), "pHash"),
    "phash too short": (_image0(phash="000000000000000"), "pHash"),
    "phash upper case": (_image0(phash="FFFFFFFFFFFFFFFF"), "pHash"),
    "phash empty": (_image0(phash=""), "pHash"),
    "sha256 empty": (_image0(sha256=""), "sha256"),
    "sha256 not hex": (_image0(sha256="g" * 64), "sha256"),
    "sha256 too long": (_image0(sha256="0" * 66), "sha256"),
    "key of another node": (_image0(key=f"tasks/t/{dev_node_id('n1')}/secret/0.png"), "is not under"),
    "key of another task": (_image0(key="tasks/other/{node}/secret/0.png"), "is not under"),
    "key climbs out": (_image0(key="tasks/t/{node}/../../x/0.png"), "segment"),
    "key empty segment": (_image0(key="tasks/t/{node}//0.png"), "segment"),
    "key is the prefix": (_image0(key="tasks/t/{node}/"), "segment"),
    "key too long": (_image0(key="tasks/t/{node}/" + "k" * 600), "over 512"),
    "duplicate index": (_images(lambda i, image: msgspec.structs.replace(image, index=0)), "indexes"),
    "index out of range": (_image0(index=7), "indexes"),
    "negative index": (_image0(index=-1), "indexes"),
    "shared key": (_images(lambda i, image: msgspec.structs.replace(image, key="tasks/t/{node}/k.png")), "share"),
    "other width": (_image0(width=72), "64x64"),
    "other height": (_image0(height=72), "64x64"),
    "huge size": (_image0(width=2**40, height=2**40), "64x64"),
    "other seed": (_image0(seed=99), "seed"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_reveal_is_bad_result_and_never_raises(case):
    """n3 commits (signed, and its reveal opens the commitment) to fields no honest node
    reveals: the verdict is bad_result, it counts as no result, and the task is decided on
    the two others. (A malformed pHash used to raise in the Hamming distance.)"""
    change, why = MALFORMED[case]

    def malformed(images):
        changed = change(images)
        return [msgspec.structs.replace(i, key=i.key.replace("{node}", N3)) for i in changed]

    task = task_with({N1: A, N2: A, N3: A}, images={N3: malformed})
    assert N3 not in candidates(screen_all(task, ADDRESSES))  # its blobs are not even read
    outcome = decided(task)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {N1: "agree", N2: "agree", N3: "bad_result"}
    assert why in outcome.verdict_details[N3]
    assert outcome.qos[N3] == 0


def _bad_nonce(commit, reveal):
    return commit, msgspec.structs.replace(reveal, nonce="0x" + "zz" * 32)


def _short_nonce(commit, reveal):
    return commit, msgspec.structs.replace(reveal, nonce="0x1234")


@pytest.mark.parametrize("tamper", [_bad_nonce, _short_nonce])
def test_a_nonce_that_is_not_32_bytes_of_hex_is_bad_result(tamper):
    outcome = decided(task_with({N1: A, N2: A, N3: A}, tamper={N3: tamper}))
    assert outcome.verdicts == {N1: "agree", N2: "agree", N3: "bad_result"}
    assert "nonce" in outcome.verdict_details[N3]


def test_malformed_hashes_everywhere_abort_instead_of_raising():
    garbage = _image0(phash="not a phash at all")
    outcome = decided(task_with({N1: A, N2: A, N3: A}, images={N1: garbage, N2: garbage, N3: garbage}))
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "too_few_results"
    assert set(outcome.verdicts.values()) == {"bad_result"}
    assert f"{N1} bad_result: image 0: pHash" in outcome.detail


# --------------------------------------------------------------------------- what the blobs showed


def test_a_node_whose_stored_images_do_not_match_is_bad_result_and_the_honest_two_decide():
    task = task_with({N1: A, N2: A, N3: A})
    outcome = decided(task, bad_blobs={N3: "image 0 (k): sha256_mismatch: ..."})
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {N1: "agree", N2: "agree", N3: "bad_result"}
    assert outcome.verdict_details == {N3: "stored images: image 0 (k): sha256_mismatch: ..."}
    assert outcome.qos[N3] == 0


def test_a_majority_that_needed_a_bad_blob_no_longer_stands():
    outcome = decided(task_with({N1: A, N2: A, N3: B}), bad_blobs={N2: "image 1 (k): missing: no blob"})
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "no_agreement"
    assert outcome.verdicts == {N1: "undecided", N2: "bad_result", N3: "undecided"}
    assert "missing" in outcome.detail
    assert outcome.verdict_details == {N2: "stored images: image 1 (k): missing: no blob"}

    outcome = decided(task_with({N1: A, N2: A, N3: A}), bad_blobs={N1: "x", N2: "y"})
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "too_few_results"
    assert outcome.verdicts == {N1: "bad_result", N2: "bad_result", N3: "undecided"}


def test_a_candidate_the_blob_checks_did_not_cover_is_not_trusted_nor_blamed():
    task = task_with({N1: A, N2: A, N3: A})
    outcome = decide(task, THRESHOLD, ADDRESSES, {N1: None, N2: None})
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.verdicts == {N1: "agree", N2: "agree", N3: "undecided"}


def test_images_of_the_outcome_are_in_index_order():
    def reversed_order(images):
        return list(reversed(images))

    outcome = decided(task_with({N1: A, N2: A, N3: A}, images={N1: reversed_order}))
    assert [i.index for i in outcome.images] == [0, 1]


def test_skipped_work_within_the_phash_threshold_is_outvoted_by_its_checkpoints():
    """A node of the majority's class whose images pass pHash (A_NEAR is 2 bits from A) but
    whose latents differ (it ran fewer steps) is a mismatch, with the evidence named."""
    outcome = decided(task_with({N1: A, N2: A_NEAR, N3: A}, work={N2: "half the steps"}))
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {N1: "agree", N2: "mismatch", N3: "agree"}
    detail = outcome.verdict_details[N2]
    assert "latents differ: image 0 after 0.25 of the steps" in detail
    lead = task_with({N1: A, N2: A_NEAR}, work={N2: "half the steps"}).nodes[N1]
    assert lead.images[0].checkpoints[0] in detail  # the evidence: both digests
    assert "outvoted by 2 agreeing nodes" in detail
    assert N1 in detail
    assert N3 in detail
    assert outcome.qos[N2] == 0


def test_the_same_work_passes_and_other_classes_are_compared_by_phash_alone():
    same = decided(task_with({N1: A, N2: A_NEAR, N3: A}))  # honest, one class: equal checkpoints
    assert isinstance(same, TaskSucceeded)
    assert same.reason == "unanimous"
    # another class computes other last bits: only pHash can compare it with the others
    other = decided(
        task_with({N1: A, N2: A_NEAR, N3: A}, classes={N2: "NVIDIA H100 sm9.0; float16"}, work={N2: "gpu bits"})
    )
    assert isinstance(other, TaskSucceeded)
    assert other.verdicts[N2] == "agree"


def test_no_two_of_one_class_agree_on_their_latents_then_there_is_no_majority():
    outcome = decided(task_with({N1: A, N2: A, N3: A}, work={N2: "fewer steps", N3: "another scheduler"}))
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "no_agreement"
    assert set(outcome.verdicts.values()) == {"undecided"}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda images: [msgspec.structs.replace(i, checkpoints=[]) for i in images], "0 checkpoints, expected 3"),
        (lambda images: [msgspec.structs.replace(i, checkpoints=i.checkpoints[:2]) for i in images], "2 checkpoints"),
        (
            lambda images: [msgspec.structs.replace(i, checkpoints=["XYZ", *i.checkpoints[1:]]) for i in images],
            "is not 32 lower-case hex digits",
        ),
    ],
    ids=["none", "too few", "not a digest"],
)
def test_a_reveal_without_its_checkpoints_is_a_bad_result(change, why):
    outcome = decided(task_with({N1: A, N2: A, N3: A}, images={N3: change}))
    assert outcome.verdicts[N3] == "bad_result"
    assert why in outcome.verdict_details[N3]


@pytest.mark.parametrize("determinism", ["", "x" * 201], ids=["empty", "too long"])
def test_a_reveal_without_a_determinism_class_is_a_bad_result(determinism):
    outcome = decided(task_with({N1: A, N2: A, N3: A}, classes={N3: determinism}))
    assert outcome.verdicts[N3] == "bad_result"
    assert "determinism class" in outcome.verdict_details[N3]


def test_the_commitment_binds_the_checkpoints_and_the_class():
    """Changing either after committing no longer opens the commitment."""

    def other_checkpoints(commit, reveal):
        images = [msgspec.structs.replace(i, checkpoints=work_checkpoints("other", i.index)) for i in reveal.images]
        return commit, msgspec.structs.replace(reveal, images=images)

    def other_class(commit, reveal):
        return commit, msgspec.structs.replace(reveal, determinism="another class")

    outcome = decided(task_with({N1: A, N2: A, N3: A}, tamper={N2: other_checkpoints, N3: other_class}))
    assert outcome.verdicts[N2] == "bad_commitment"
    assert outcome.verdicts[N3] == "bad_commitment"


def test_an_outvoted_node_over_the_phash_threshold_gets_both_hashes_and_the_distance():
    outcome = decided(task_with({N1: A, N2: B, N3: A}))
    detail = outcome.verdict_details[N2]
    assert f"outvoted by 2 agreeing nodes ({N1}, {N3})" in detail
    assert f"pHash {B[0]} vs {A[0]}" in detail
    assert "bits)" in detail


def test_a_task_on_one_node_succeeds_with_its_result_and_carries_its_sampling_proof():
    key = VrfKey.generate()
    proof = SamplingProof.make(key, "t", 0.1)
    task = task_with({N1: A})
    task = msgspec.structs.replace(task, sampling=proof)
    outcome = decided(task)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "unanimous"
    assert outcome.verdicts == {N1: "agree"}
    assert outcome.sampling == proof
    assert decided(msgspec.structs.replace(task_with({N1: A, N2: B, N3: C}), sampling=proof)).sampling == proof


@pytest.mark.parametrize(
    ("results", "more"),
    [
        ({N1: A, N2: B, N3: C}, 2),  # three ways: draw two more
        ({N1: A, N2: B, N3: None}, 2),  # one against one: never decided there
        ({N1: A, N2: None, N3: "error"}, 2),  # one valid result beside two failures
        ({N1: None, N2: None, N3: "error"}, 0),  # nothing to compare more nodes with
        ({N1: A, N2: A, N3: B}, 0),  # a majority stands
        ({N1: A}, 0),  # one node, one result: it stands
    ],
)
def test_no_majority_draws_two_more_nodes_while_the_task_may_have_more(results, more):
    task = task_with(results)
    assert more_nodes(task, decided(task), max_nodes=7) == more
    assert more_nodes(task, decided(task), max_nodes=len(task.nodes) + 1) == 0  # the cap


def test_an_escalated_task_decides_over_every_round_and_slashes_only_the_outvoted():
    """A and B disagree with a third silent; two more nodes are drawn and side with A: the
    five-node decision has a majority of three, and only B (outvoted by it) is slashed."""
    task = task_with({N1: A, N2: B, N3: None})
    assert more_nodes(task, decided(task), max_nodes=7) == 2
    task = apply(task, TaskEscalated(task_id="t", round=1, more=2, exclude=list(task.nodes), deadline=5.0))
    assert task.status == "escalating"
    task = apply(task, TaskExtended(task_id="t", round=1, nodes=[N4, N5], deadline=6.0))
    assert task.status == "assigned"
    assert task.reveal_deadline is None
    reveals = []
    for node in (N4, N5):
        nonce, revealed = new_nonce(), images_of(node, A)
        value = make_commitment("t", node, revealed, nonce, CLASS)
        signed = TaskCommitted(task_id="t", node_id=node, commitment=value, signature=sign(ACCOUNTS[node], value))
        task = apply(task, signed)
        reveals.append(ResultRevealed(task_id="t", node_id=node, images=revealed, nonce=nonce, determinism=CLASS))
    task = apply(task, TaskRevealOpened(task_id="t", nodes=[N4, N5], deadline=7.0, round=1))
    for reveal in reveals:
        task = apply(task, reveal)
    outcome = decided(task)
    assert isinstance(outcome, TaskSucceeded)
    assert outcome.reason == "majority"
    assert outcome.verdicts == {N1: "agree", N2: "mismatch", N3: "timeout", N4: "agree", N5: "agree"}
    assert "outvoted by 3 agreeing nodes" in outcome.verdict_details[N2]
    assert more_nodes(task, outcome, max_nodes=7) == 0


def test_a_reveal_of_another_class_than_the_node_joined_with_is_a_bad_result():
    """A node may not pick its class per task (to be compared by pHash alone): what it
    reveals must be the class it announced at join, plus the dtype."""
    task = task_with({N1: A, N2: A, N3: A}, classes={N3: "NVIDIA H100 sm9.0; torch 2.13.0; float16"})
    joined = dict.fromkeys((N1, N2, N3), CLASS.rsplit("; ", 1)[0])
    checked = {node: None for node in candidates(screen_all(task, ADDRESSES, joined))}
    assert N3 not in checked
    outcome = decide(task, THRESHOLD, ADDRESSES, checked, joined)
    assert outcome.verdicts == {N1: "agree", N2: "agree", N3: "bad_result"}
    assert "not of the class it joined with" in outcome.verdict_details[N3]
    assert decided(task).verdicts[N3] == "agree"  # without the joined classes, nothing to hold it to


def test_a_cheat_that_passes_phash_against_another_class_cannot_outvote_an_honest_node_of_its_own():
    """N1 skipped steps and claims the honest N2's class, so their checkpoints differ; N3 is of
    another class and compared to both by pHash alone, which both pass. Agreement is not
    transitive here: N1-N3 and N2-N3 both agree, N1-N2 do not. Two largest agreeing sets:
    no majority, nobody slashed, and more nodes are drawn."""
    other = "NVIDIA H100 sm9.0 cuda 12.8; torch 2.13.0; diffusers 0.42.1; float16"
    task = task_with({N1: A_NEAR, N2: A, N3: A}, work={N1: "fewer steps"}, classes={N3: other})
    outcome = decided(task)
    assert isinstance(outcome, TaskAborted)
    assert outcome.reason == "no_agreement"
    assert set(outcome.verdicts.values()) == {"undecided"}
    assert more_nodes(task, outcome, max_nodes=7) == 2
    # in any order: the first node's group must not decide it
    task = task_with({N3: A, N1: A_NEAR, N2: A}, work={N1: "fewer steps"}, classes={N3: other})
    assert decided(task).verdicts[N2] != "mismatch"


TOLERANCE = (0.01, 0.01, 0.01)
GPU = "NVIDIA H100 sm9.0 cuda 12.8; torch 2.13.0; diffusers 0.42.1; float16"


def decided_with_tolerance(task):
    checked = {node: None for node in candidates(screen_all(task, ADDRESSES))}
    return decide(task, THRESHOLD, ADDRESSES, checked, tolerance=TOLERANCE)


def test_across_classes_latent_summaries_within_the_tolerance_agree():
    outcome = decided_with_tolerance(task_with({N1: A, N2: A, N3: A_NEAR}, classes={N3: GPU}))
    assert outcome.reason == "unanimous"
    assert set(outcome.verdicts.values()) == {"agree"}


def test_across_classes_skipped_work_that_passes_phash_is_caught_by_its_latent_summaries():
    """N3 is of its own class, so its checkpoints cannot be compared bit for bit; its image
    passes pHash, but its latents are far off the two others': outvoted, with the distances."""
    task = task_with({N1: A, N2: A, N3: A_NEAR}, classes={N3: GPU}, work={N3: "fewer steps"})
    assert decided(task).verdicts[N3] == "agree"  # pHash alone lets it through
    outcome = decided_with_tolerance(task)
    assert outcome.verdicts == {N1: "agree", N2: "agree", N3: "mismatch"}
    assert "latents are off theirs across classes" in outcome.verdict_details[N3]
    assert "relative L2" in outcome.verdict_details[N3]


def test_across_classes_a_result_without_summaries_agrees_with_no_other_class():
    def without_summaries(images):
        return [msgspec.structs.replace(image, summaries=[]) for image in images]

    task = task_with({N1: A, N2: A, N3: A}, classes={N3: GPU}, images={N3: without_summaries})
    outcome = decided_with_tolerance(task)
    assert outcome.verdicts[N3] == "mismatch"
    assert "without latent summaries" in outcome.verdict_details[N3]


@pytest.mark.parametrize(
    ("summaries", "why"),
    [(["AAA="], "expected none or 3"), (["!!", "!!", "!!"], "not base64"), (["A" * 5000] * 3, "at most")],
)
def test_malformed_summaries_are_a_bad_result(summaries, why):
    def garbled(images):
        return [msgspec.structs.replace(image, summaries=summaries) for image in images]

    outcome = decided_with_tolerance(task_with({N1: A, N2: A, N3: A}, images={N3: garbled}))
    assert outcome.verdicts[N3] == "bad_result"
    assert why in outcome.verdict_details[N3]


def test_a_reveal_at_every_limit_the_validator_judges_still_decodes():
    """The decode bounds every node payload has (messages.NODE_WRITTEN) hold the validator's
    own limits (a key, a summary, a class): a reveal at them reaches the judgement above,
    which gives the verdict, never an `undecodable` refusal that would hide why."""
    image = ImageResult(
        index=0,
        key="k" * MAX_KEY_LENGTH,
        phash="0" * 16,
        seed=1,
        width=64,
        height=64,
        sha256="0" * 64,
        checkpoints=work_checkpoints(),
        summaries=["A" * checkpoints.MAX_SUMMARY_CHARS] * len(checkpoints.FRACTIONS),
    )
    determinism = "d" * checkpoints.MAX_CLASS_LENGTH
    event = ResultRevealed(
        task_id="t", node_id=N1, images=[image] * MAX_IMAGES, nonce="0x" + "0" * 64, determinism=determinism
    )
    assert decode_task_event(subjects.task_subject("t", "revealed", N1), encode(event)) == event
