"""The validator service on its own nats-server, driven through the protocol: nodes
(whose ids are their addresses) store their images, commit, the validator opens the
reveal and asks each committed node to reveal, reads the stored images back, then
decides: as soon as every node has answered, and at the deadlines when some never do (no
task hangs). Outcomes update each node's QoS."""

import asyncio
import contextlib
import secrets
import time
import uuid
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
import pytest

from stipple_common import bus, checkpoints, records, subjects
from stipple_common.blobstore.intake import blob_prefix
from stipple_common.commitment import account_from_key, make_commitment, new_nonce, sign
from stipple_common.identity import dev_node_id, key_for
from stipple_common.lease import partition_key
from stipple_common.messages import (
    SLASHABLE,
    ImageResult,
    NodeErrored,
    NodeProbed,
    NodeQos,
    ProbeRequest,
    ResultRevealed,
    RevealRequest,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskEscalated,
    TaskExtended,
    TaskSubmitted,
    TaskSucceeded,
    control_decoder,
    node_event_decoder,
    task_event_decoder,
)
from stipple_common.service import open_service
from stipple_common.taskspec import parse_task
from stipple_testkit.nodes import joined, publish_joined
from stipple_testkit.waits import until
from stipple_validator.qos import QOS_WINDOW, Sample
from stipple_validator.service import ValidatorSettings, serve

pytestmark = pytest.mark.integration

SPEC = parse_task(
    {"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1, "image_width": 64, "image_height": 64}}
)


ID = {name: dev_node_id(name) for name in "abcde"}  # a node's id is its address
a, b, c, d, e = (ID[name] for name in "abcde")
ACCOUNTS = {ID[name]: account_from_key(key_for(name)) for name in "abcde"}
MAX_BLOB_BYTES = 100_000
CLASS = "cpu test threads 1; torch 2.13.0+cpu; diffusers 0.42.1; float32"  # every node's here


class _Checkpoints(dict):
    """Picture -> the checkpoint digests of the work that made it (equal work, equal digests)."""

    def __missing__(self, picture):
        return [checkpoints.digest(f"picture {picture} after {f}".encode()) for f in checkpoints.FRACTIONS]


CHECKPOINTS = _Checkpoints()


SETTINGS = {
    "phash_threshold": 4,
    "deadline_grace_s": 0.1,
    "reveal_timeout_s": 1.0,
    "probe_every_s": 0.2,
    "probe_timeout_s": 5.0,
    "max_blob_bytes": MAX_BLOB_BYTES,
    "escalation_timeout_s": 1.0,  # no dispatcher here: an escalation waits 1 s, then decides with what is in
    "bus_recovery_s": 0.5,
}


@contextlib.asynccontextmanager
async def serving(nats_url, **overrides):
    """The validator (SETTINGS, then `overrides`), serving, with every node of ACCOUNTS
    joined; its ServiceContext (js, blobs, metrics) for the test."""
    settings = ValidatorSettings(nats_url=nats_url, **{**SETTINGS, **overrides})
    stop = asyncio.Event()
    async with open_service("validator", settings, blobs=True, stop=stop) as ctx:
        now = time.time()
        await publish_joined(ctx.js, *(joined(n, address=a.address, started_at=now) for n, a in ACCOUNTS.items()))
        runner = asyncio.create_task(serve(ctx, settings))
        try:
            yield ctx
        finally:
            stop.set()
            await asyncio.wait_for(runner, 10)


@pytest.fixture
async def net(fresh_nats_url):
    """The validator, serving; its ServiceContext (js, blobs, metrics) for the test."""
    async with serving(fresh_nats_url) as ctx:
        yield ctx


async def start_task(js, nodes=(a, b, c), deadline_in=30.0, task_id=None):
    task_id = task_id or uuid.uuid4().hex
    await bus.publish(
        js,
        subjects.task_subject(task_id, "submitted"),
        TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time()),
        msg_id=f"{task_id}:s",
    )
    assigned = TaskAssigned(task_id=task_id, nodes=list(nodes), deadline=time.time() + deadline_in)
    await bus.publish(js, subjects.task_subject(task_id, "assigned"), assigned, msg_id=f"{task_id}:a")
    return task_id


@dataclass(frozen=True)
class Stored:
    """What a node stores (None: nothing) and what it reveals of it."""

    png: bytes | None
    image: ImageResult


def honest(pictures, task_id, node, picture=0) -> Stored:
    """Picture `picture` (noise from that seed), stored where the node may store it, and
    its true hashes."""
    png = pictures.png(picture)
    phash, sha256 = pictures.hashes(png)
    key = f"{blob_prefix(task_id, node)}{secrets.token_hex(4)}/0.png"
    image = ImageResult(
        index=0, key=key, phash=phash, seed=1, width=64, height=64, sha256=sha256, checkpoints=CHECKPOINTS[picture]
    )
    return Stored(png, image)


async def reveal(net, task_id, node, stored: Stored, *, answer=True, delay=0.0, patience=10.0):
    """Act as a node: store the image (the blob intake's write), commit to the result,
    wait for the validator's request, reveal (unless `answer` is False). Returns once
    committed; the reveal runs on."""
    js, image = net.js, stored.image
    if stored.png is not None:
        await net.blobs.put(image.key, stored.png, content_type="image/png")
    nonce = new_nonce()
    value = make_commitment(task_id, node, [image], nonce, CLASS)
    commit = TaskCommitted(task_id=task_id, node_id=node, commitment=value, signature=sign(ACCOUNTS[node], value))
    key = (id(js), node)
    if key not in control_subs:  # one consumer per node subject: WORK is a work queue
        control_subs[key] = await js.pull_subscribe(subjects.control_subject(node), stream=subjects.WORK_STREAM)
    requests = control_subs[key]
    await bus.publish(js, subjects.task_subject(task_id, "committed", node), commit, msg_id=f"{task_id}:{node}:c")

    async def on_request():
        give_up = time.monotonic() + patience
        while True:
            try:
                msgs = await requests.fetch(1, timeout=min(10.0, max(0.1, give_up - time.monotonic())))
            except nats.errors.TimeoutError:
                if time.monotonic() < give_up:
                    continue
                raise
            for msg in msgs:
                await msg.ack()
                request = control_decoder.decode(msg.data)
                if isinstance(request, RevealRequest) and request.task_id == task_id:
                    await asyncio.sleep(delay)
                    if answer:
                        event = ResultRevealed(
                            task_id=task_id, node_id=node, images=[image], nonce=nonce, determinism=CLASS
                        )
                        await bus.publish(
                            js, subjects.task_subject(task_id, "revealed", node), event, msg_id=f"{task_id}:{node}:r"
                        )
                    return

    pending.add(asyncio.create_task(on_request()))


pending: set[asyncio.Task] = set()
control_subs: dict = {}


async def outcome(js, task_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await bus.read_subject(js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)
        done = [e for e in events if isinstance(e, (TaskSucceeded, TaskAborted, TaskCancelled))]
        if done:
            assert len(done) == 1
            return done[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} was never decided")


async def test_decides_as_soon_as_all_answered(net, pictures):
    task_id = await start_task(net.js, deadline_in=30)
    started = time.monotonic()
    for node in (a, b, c):
        await reveal(net, task_id, node, honest(pictures, task_id, node))
    result = await outcome(net.js, task_id)
    assert time.monotonic() - started < 5  # well before the 30 s deadline
    assert isinstance(result, TaskSucceeded)
    assert result.reason == "unanimous"
    assert result.images[0].key.startswith(blob_prefix(task_id, a))
    assert blob_checks(net, "ok") == 3


async def test_majority_with_one_wrong_and_one_error(net, pictures):
    task_id = await start_task(net.js, nodes=(a, b, c, d, e))
    for node, picture in ((a, 0), (b, 1), (c, 0), (d, 0)):
        await reveal(net, task_id, node, honest(pictures, task_id, node, picture))
    error = NodeErrored(task_id=task_id, node_id=e, code="out_of_memory", message="CUDA OOM")
    await bus.publish(net.js, subjects.task_subject(task_id, "errored", e), error, msg_id="e")
    result = await outcome(net.js, task_id)
    assert isinstance(result, TaskSucceeded)
    assert result.verdicts == {a: "agree", b: "mismatch", c: "agree", d: "agree", e: "error"}


async def test_deadline_decides_with_what_is_in(net, pictures):
    task_id = await start_task(net.js, deadline_in=1.0)
    await reveal(net, task_id, a, honest(pictures, task_id, a))
    await reveal(net, task_id, b, honest(pictures, task_id, b))
    result = await outcome(net.js, task_id)
    assert isinstance(result, TaskSucceeded)
    assert result.verdicts[c] == "timeout"


async def test_a_committed_node_that_never_reveals_is_judged_withheld_at_the_reveal_deadline(net, pictures):
    """Withholding a reveal is slashable: a node that learned from the wait that its task
    was sampled must not trade a committed cheat for a timeout."""
    task_id = await start_task(net.js)
    await reveal(net, task_id, a, honest(pictures, task_id, a))
    await reveal(net, task_id, b, honest(pictures, task_id, b))
    await reveal(net, task_id, c, honest(pictures, task_id, c), answer=False)
    started = time.monotonic()
    result = await outcome(net.js, task_id)
    assert time.monotonic() - started >= 0.9  # waited for the 1 s reveal deadline
    assert isinstance(result, TaskSucceeded)
    assert result.verdicts == {a: "agree", b: "agree", c: "withheld"}
    assert "withheld" in SLASHABLE
    assert "did not reveal" in result.verdict_details[c]
    assert result.qos[c] == 0


async def _bus_away_once_the_reveal_opens(js, task_id, away_s):
    """Act as an election inside the reveal window: once the reveal is open, the validator's
    `bus.weather` records a spell of `away_s` (what its probe and its failed calls record
    when a stream has no leader; the cluster test, tests/test_cluster_faults.py, makes a real one)."""
    for _ in range(200):
        if await bus.read_messages(js, subjects.TASKS_STREAM, subjects.task_subject(task_id, "reveal")):
            break
        await asyncio.sleep(0.02)
    bus.weather.away()
    await asyncio.sleep(away_s)
    bus.weather.fair()


async def test_the_reveal_deadline_moves_by_the_time_the_bus_was_away_and_a_late_reveal_counts(
    fresh_nats_url, pictures
):
    """An election inside the reveal window: an honest node's reveal, stored after the
    deadline but within the time the bus took away (and bus_recovery_s), is judged with the
    others, not `withheld`. The window is 3 s here, so that the spell starts well before
    the deadline on a loaded machine, after the other two reveals were taken (a message
    taken from the consumer ends a spell: the bus is back)."""
    async with serving(fresh_nats_url, reveal_timeout_s=3.0) as net:
        task_id = await start_task(net.js)
        await reveal(net, task_id, a, honest(pictures, task_id, a))
        await reveal(net, task_id, b, honest(pictures, task_id, b))
        await reveal(net, task_id, c, honest(pictures, task_id, c), delay=3.6)  # the deadline is 3 s
        for node in (a, b):
            subject = subjects.task_subject(task_id, "revealed", node)
            for _ in range(200):
                if await bus.read_messages(net.js, subjects.TASKS_STREAM, subject):
                    break
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # taken by the validator's consumer
        await _bus_away_once_the_reveal_opens(net.js, task_id, 3.0)
        result = await outcome(net.js, task_id, timeout=20)
    assert isinstance(result, TaskSucceeded)
    assert result.verdicts == {a: "agree", b: "agree", c: "agree"}


async def test_a_node_that_does_not_reveal_while_the_bus_was_away_is_timed_out_not_slashed(net, pictures):
    task_id = await start_task(net.js)
    await reveal(net, task_id, a, honest(pictures, task_id, a))
    await reveal(net, task_id, b, honest(pictures, task_id, b))
    await reveal(net, task_id, c, honest(pictures, task_id, c), answer=False)
    await _bus_away_once_the_reveal_opens(net.js, task_id, 0.3)
    result = await outcome(net.js, task_id)
    assert isinstance(result, TaskSucceeded)
    assert result.verdicts == {a: "agree", b: "agree", c: "timeout"}
    assert "the bus was away" in result.verdict_details[c]


# --------------------------------------------------------------------------- checked against the blobs


def blob_checks(net, outcome):
    return net.metrics.registry.get_sample_value("stipple_validator_blob_checks_total", {"outcome": outcome})


def other_bytes(pictures, task_id, node):
    """The honest pHash and SHA-256 (of picture 0), but picture 1 stored."""
    stored = honest(pictures, task_id, node)
    return Stored(pictures.png(1), stored.image)


def copied_key(pictures, task_id, node):
    """A's key and hashes (a node that copies another's stored image instead of computing)."""
    return Stored(None, msgspec.structs.replace(honest(pictures, task_id, node).image, key=COPIED[task_id]))


def missing(pictures, task_id, node):
    return Stored(None, honest(pictures, task_id, node).image)


def too_large(pictures, task_id, node):
    """A PNG with a trailer that takes it over the limit (its hashes match what is stored)."""
    stored = honest(pictures, task_id, node)
    blob = stored.png + b"\0" * MAX_BLOB_BYTES
    phash, sha256 = pictures.hashes(blob)
    return Stored(blob, msgspec.structs.replace(stored.image, phash=phash, sha256=sha256))


def claims_the_others_phash(pictures, task_id, node):
    """Stored picture 1 with its true SHA-256, but picture 0's pHash: to agree with the others."""
    own = honest(pictures, task_id, node, picture=1)
    return Stored(own.png, msgspec.structs.replace(own.image, phash=honest(pictures, task_id, node).image.phash))


def malformed_phash(pictures, task_id, node):
    return Stored(None, msgspec.structs.replace(honest(pictures, task_id, node).image, phash="not-a-phash-hex!"))


def malformed_sha256(pictures, task_id, node):
    stored = honest(pictures, task_id, node)
    return Stored(stored.png, msgspec.structs.replace(stored.image, sha256=stored.image.sha256.upper()))


COPIED: dict[str, str] = {}
BAD = {
    "other bytes": (other_bytes, "sha256_mismatch", "sha256_mismatch"),
    "outside its prefix": (copied_key, None, "is not under"),
    "missing": (missing, "missing", "missing"),
    "too large": (too_large, "too_large", f"over the limit of {MAX_BLOB_BYTES}"),
    "pHash of another image": (claims_the_others_phash, "phash_mismatch", "phash_mismatch"),
    "malformed pHash": (malformed_phash, None, "pHash"),
    "malformed sha256": (malformed_sha256, None, "sha256"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_a_node_whose_reveal_is_not_what_it_stored_is_bad_result(net, pictures, case):
    """c commits to and reveals (validly signed) a result that its stored blob does not
    back, or that is malformed: bad_result (slashable), with the reason in the outcome,
    and the task succeeds on a and b."""
    make, counted_as, why = BAD[case]
    task_id = await start_task(net.js)
    first = honest(pictures, task_id, a)
    COPIED[task_id] = first.image.key
    await reveal(net, task_id, a, first)
    await reveal(net, task_id, b, honest(pictures, task_id, b))
    await reveal(net, task_id, c, make(pictures, task_id, c))
    result = await outcome(net.js, task_id)
    assert isinstance(result, TaskSucceeded)
    assert result.reason == "majority"
    assert result.verdicts == {a: "agree", b: "agree", c: "bad_result"}
    assert why in result.verdict_details[c]
    assert list(result.verdict_details) == [c]
    assert result.qos[c] == 0
    assert blob_checks(net, "ok") == 2
    if counted_as:
        assert blob_checks(net, counted_as) == 1
    assert (await node_qos(net.js, c, task_id)).qos == 0.0


async def test_a_majority_that_leaned_on_a_bad_blob_aborts(net, pictures):
    """b agrees with a by its revealed hashes, but stored other bytes: without b, a and c
    disagree, and the task is aborted (not decided for a)."""
    task_id = await start_task(net.js)
    await reveal(net, task_id, a, honest(pictures, task_id, a))
    await reveal(net, task_id, b, other_bytes(pictures, task_id, b))
    await reveal(net, task_id, c, honest(pictures, task_id, c, picture=2))
    result = await outcome(net.js, task_id)
    assert isinstance(result, TaskAborted)
    assert result.reason == "no_agreement"
    assert result.verdicts == {a: "undecided", b: "bad_result", c: "undecided"}
    assert "sha256_mismatch" in result.detail


async def node_qos(js, node, task_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            raw = await js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject(node, "qos"))
        except Exception:
            raw = None
        if raw is not None:
            event = node_event_decoder.decode(raw.data)
            if isinstance(event, NodeQos) and event.task_id == task_id:
                return event
        await asyncio.sleep(0.05)
    raise AssertionError(f"no QoS for {node} after {task_id}")


async def test_outcomes_update_each_nodes_qos_window_and_two_timeouts_pause(net, pictures):
    scores = {}
    for _ in range(2):
        task_id = await start_task(net.js, deadline_in=1.0)
        await reveal(net, task_id, a, honest(pictures, task_id, a))
        await reveal(net, task_id, b, honest(pictures, task_id, b))
        result = await outcome(net.js, task_id)
        for node in (a, b, c):
            scores[node] = await node_qos(net.js, node, task_id)
    assert result.qos[a] == 10  # a committed first both times
    assert scores[a].qos == 10.0
    assert scores[a].samples == 2
    assert scores[b].qos == 5.0
    assert scores[c].qos == 0.0
    assert scores[c].recent_timeouts == 2  # the dispatcher pauses c
    assert scores[a].recent_timeouts == 0


async def test_a_steady_nodes_unchanged_qos_is_not_published_again_but_its_window_counts_the_task(net, pictures):
    """A full window of equal scores stays the same summary after one more such task: the
    window is rewritten (the task counted once) and `nodes.<id>.qos` keeps what it holds;
    a node whose summary moves gets its message."""
    deadline = time.monotonic() + 10
    while True:  # made when the validator starts serving
        try:
            kv = await net.js.key_value(subjects.QOS_BUCKET)
            break
        except nats.js.errors.BucketNotFoundError:
            assert time.monotonic() < deadline, "the validator made no qos bucket"
            await asyncio.sleep(0.05)
    full = [Sample(task_id=f"old{i}", score=10, verdict="agree") for i in range(QOS_WINDOW)]
    await kv.put(a, records.encode(full))
    await kv.put(b, records.encode(full[1:]))  # 49: one more task changes its count
    unchanged = net.metrics.registry.get_sample_value("stipple_validator_qos_unchanged_total")
    for node in (a, b):
        task_id = await start_task(net.js, nodes=(node,))
        await reveal(net, task_id, node, honest(pictures, task_id, node))
        result = await outcome(net.js, task_id)
        assert isinstance(result, TaskSucceeded)
        assert result.qos == {node: 10}
        deadline = time.monotonic() + 10
        while (window := records.qos_window_decoder.decode((await kv.get(node)).value or b"[]"))[-1].task_id != task_id:
            assert time.monotonic() < deadline, f"{task_id} never reached {node}'s window"
            await asyncio.sleep(0.05)
        assert len(window) == QOS_WINDOW
    assert (await node_qos(net.js, b, task_id)).samples == QOS_WINDOW  # b's count moved: published
    with pytest.raises(Exception, match="not found|no message"):  # a's did not: nothing since
        await net.js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject(a, "qos"))
    assert net.metrics.registry.get_sample_value("stipple_validator_qos_unchanged_total") == unchanged + 1


async def next_probe(sub, timeout=10.0) -> ProbeRequest:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(1, timeout=1)
        except TimeoutError:
            continue
        for msg in msgs:
            await msg.ack()
            request = control_decoder.decode(msg.data)
            if isinstance(request, ProbeRequest):
                return request
    raise AssertionError("no probe came")


async def answer_probe(js, node, probe_id, error=""):
    event = NodeProbed(node_id=node, probe_id=probe_id, elapsed_s=0.1, phash="" if error else "0" * 16, error=error)
    await bus.publish(js, subjects.node_subject(node, "probed"), event, msg_id=f"{node}:probe:{probe_id}:{error}")


async def test_a_paused_node_is_probed_and_only_a_passed_probe_lifts_the_pause(net, pictures):
    js = net.js
    probes = await js.pull_subscribe(subjects.control_subject(c), stream=subjects.WORK_STREAM)
    for _ in range(2):  # c never commits: two timeouts pause it
        task_id = await start_task(js, deadline_in=1.0)
        await reveal(net, task_id, a, honest(pictures, task_id, a))
        await reveal(net, task_id, b, honest(pictures, task_id, b))
        await outcome(js, task_id)
    assert (await node_qos(js, c, task_id)).recent_timeouts == 2

    first = await next_probe(probes)
    assert first.spec.model_name == "tiny-sd"  # a model c announced
    assert (first.spec.task_config.steps, first.spec.task_config.image_width) == (1, 64)
    await answer_probe(js, c, first.probe_id, error="internal")  # failed: still paused, and probed again
    second = await next_probe(probes)
    assert second.probe_id != first.probe_id
    await answer_probe(js, c, first.probe_id)  # an answer to an older probe counts for nothing
    await asyncio.sleep(0.5)
    raw = await js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject(c, "qos"))
    assert node_event_decoder.decode(raw.data).recent_timeouts == 2

    await answer_probe(js, c, second.probe_id)
    cleared = await node_qos(js, c, f"probe:{second.probe_id}")
    assert cleared.recent_timeouts == 0  # the dispatcher lifts the pause
    assert (cleared.samples, cleared.qos) == (2, 0.0)  # the check is no scored task

    # one more timeout after the check does not pause c again at once
    task_id = await start_task(js, deadline_in=1.0)
    await reveal(net, task_id, a, honest(pictures, task_id, a))
    await reveal(net, task_id, b, honest(pictures, task_id, b))
    await outcome(js, task_id)
    assert (await node_qos(js, c, task_id)).recent_timeouts == 1


async def test_a_cancelled_task_is_not_decided_and_changes_no_qos(net, pictures):
    js = net.js
    task_id = await start_task(js)
    await reveal(net, task_id, a, honest(pictures, task_id, a))
    cancel = TaskCancelled(task_id=task_id, detail="app")
    await bus.publish(js, subjects.task_subject(task_id, "cancelled"), cancel, msg_id=f"{task_id}:outcome")
    await reveal(net, task_id, b, honest(pictures, task_id, b))
    await reveal(net, task_id, c, honest(pictures, task_id, c))
    await asyncio.sleep(0.5)
    result = await outcome(js, task_id)  # asserts there is exactly one outcome
    assert isinstance(result, TaskCancelled)
    with pytest.raises(Exception, match="not found|no message"):
        await js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject(a, "qos"))


async def test_nothing_by_the_deadline_aborts(net):
    task_id = await start_task(net.js, deadline_in=0.5)
    result = await outcome(net.js, task_id)
    assert isinstance(result, TaskAborted)
    assert result.reason == "too_few_results"
    assert result.verdicts == {a: "timeout", b: "timeout", c: "timeout"}


async def first_event(js, task_id, kind, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await bus.read_subject(js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)
        found = [e for e in events if isinstance(e, kind)]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind.__name__} for task {task_id}")


async def test_no_majority_escalates_and_the_drawn_nodes_decide_who_is_slashed(net, pictures):
    """a and b disagree and c never commits: one against one is never decided. The validator
    asks for two more nodes (the test plays the dispatcher), d and e side with a, and the
    five-node decision slashes b alone, naming the three that outvoted it."""
    task_id = await start_task(net.js, deadline_in=1.0)
    await reveal(net, task_id, a, honest(pictures, task_id, a, picture=0))
    await reveal(net, task_id, b, honest(pictures, task_id, b, picture=1))
    escalated = await first_event(net.js, task_id, TaskEscalated)
    assert escalated.round == 1
    assert escalated.more == 2
    assert set(escalated.exclude) == {a, b, c}
    extended = TaskExtended(task_id=task_id, round=1, nodes=[d, e], deadline=time.time() + 30)
    await bus.publish_event(net.js, extended)
    await reveal(net, task_id, d, honest(pictures, task_id, d, picture=0))
    await reveal(net, task_id, e, honest(pictures, task_id, e, picture=0))
    result = await outcome(net.js, task_id)
    assert isinstance(result, TaskSucceeded)
    assert result.verdicts == {a: "agree", b: "mismatch", c: "timeout", d: "agree", e: "agree"}
    assert f"outvoted by 3 agreeing nodes ({a}, {d}, {e})" in result.verdict_details[b]


async def test_an_escalation_no_node_answers_decides_with_what_is_in_and_slashes_nobody(net, pictures):
    task_id = await start_task(net.js, deadline_in=1.0)
    await reveal(net, task_id, a, honest(pictures, task_id, a, picture=0))
    await reveal(net, task_id, b, honest(pictures, task_id, b, picture=1))
    await first_event(net.js, task_id, TaskEscalated)
    await bus.publish_event(net.js, TaskExtended(task_id=task_id, round=1, nodes=[], deadline=time.time() + 30))
    result = await outcome(net.js, task_id)
    assert isinstance(result, TaskAborted)
    assert result.reason == "no_agreement"
    assert result.verdicts == {a: "undecided", b: "undecided", c: "timeout"}


@dataclass
class Killable:
    """A validator serving on a connection of its own until `kill`: its connection closed
    and its task cancelled, nothing given back (as a SIGKILL)."""

    ctx: object
    runs: asyncio.Task
    stop: asyncio.Event
    service: contextlib.AbstractAsyncContextManager

    async def kill(self) -> None:
        await self.ctx.nc.close()
        self.runs.cancel()
        self.stop.set()
        await asyncio.gather(self.runs, return_exceptions=True)
        with contextlib.suppress(Exception):  # (its connection is gone already)
            await self.service.__aexit__(None, None, None)


async def killable(settings, serving) -> Killable:
    """`serving(ctx)` as a Killable validator, with every node of ACCOUNTS joined."""
    stop = asyncio.Event()
    service = open_service("validator", settings, blobs=True, stop=stop)
    ctx = await service.__aenter__()
    now = time.time()
    await publish_joined(ctx.js, *(joined(n, address=acct.address, started_at=now) for n, acct in ACCOUNTS.items()))
    return Killable(ctx, asyncio.create_task(serving(ctx)), stop, service)


@pytest.mark.timeout(120)  # a lease ttl, then up to the consumer's 30 s ack wait for what the dead one held
async def test_the_standby_validator_takes_over_a_killed_active_one_and_decides_its_tasks(fresh_nats_url, pictures):
    """Two validators, active/standby by the lease (STIPPLE_LEASE_S): the active one is
    killed (its connection closed, its lease not released: as a SIGKILL) while a task waits
    for its reveals; the standby takes the lease after its ttl, rebuilds the task from the
    stream, asks for the reveals again if need be, and decides it."""
    from stipple_common.service import serve_as_leader

    served: list[str] = []

    def recorded(instance):
        async def serving(ctx, settings):
            served.append(instance)
            await serve(ctx, settings)

        return serving

    def settings_of(instance):
        return ValidatorSettings(
            nats_url=fresh_nats_url,
            phash_threshold=4,
            deadline_grace_s=0.1,
            reveal_timeout_s=60.0,  # the reveals outwait the takeover
            max_blob_bytes=MAX_BLOB_BYTES,
            lease_s=2.0,
            instance=instance,
        )

    leading = recorded("v0")
    first = await killable(settings_of("v0"), lambda ctx: serve_as_leader(ctx, "validator", settings_of("v0"), leading))
    stop_b = asyncio.Event()
    async with open_service("validator", settings_of("v1"), blobs=True, stop=stop_b) as second:
        b_runs = asyncio.create_task(serve_as_leader(second, "validator", settings_of("v1"), recorded("v1")))
        try:
            before = await start_task(second.js)
            for node in (a, b, c):
                await reveal(second, before, node, honest(pictures, before, node))
            assert isinstance(await outcome(second.js, before, timeout=20), TaskSucceeded)
            assert served == ["v0"]  # the standby consumed nothing

            during = await start_task(second.js)
            for node in (a, b, c):  # committed; each reveals when asked, by whichever validator
                await reveal(second, during, node, honest(pictures, during, node), patience=60.0)
            await first.kill()

            # the standby holds the lease after its ttl; what the dead one held unacknowledged
            # comes back after the consumer's ack wait (30 s): the takeover's worst case
            result = await outcome(second.js, during, timeout=60)
            assert isinstance(result, TaskSucceeded)
            assert result.verdicts == {a: "agree", b: "agree", c: "agree"}
            assert served == ["v0", "v1"]
        finally:
            stop_b.set()
            await asyncio.wait_for(b_runs, 10)


def decided(ctx) -> float:
    """How many tasks this validator decided (its outcomes counter, every label)."""
    return sum(
        sample.value
        for family in ctx.metrics.registry.collect()
        if family.name == "stipple_validator_outcomes"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


async def partition_holders(js, partitions) -> dict[int, str]:
    try:
        kv = await js.key_value(subjects.LEASES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return {}  # (made when a validator starts serving)
    holders = {}
    for k in range(partitions):
        with contextlib.suppress(Exception):
            entry = await kv.get(partition_key(subjects.VALIDATOR_DURABLE, k))
            holders[k] = msgspec.json.decode(entry.value)["holder"]
    return holders


@pytest.mark.timeout(150)  # a lease ttl, then up to the consumer's 30 s ack wait for what the dead one held
async def test_partitioned_validators_both_decide_and_one_killed_loses_no_task(fresh_nats_url, pictures):
    """STIPPLE_PARTITIONS=4 on two validators: both are active, each on two partitions, and
    every task is decided once by the one that holds its partition. Then one dies without a
    word (its connection closed, nothing given back: as a SIGKILL) while a task of its
    partitions waits for its reveals: the other takes its partitions after the lease ttl,
    rebuilds the task from TASKS and decides it."""
    partitions = 4

    def settings_of(instance):
        return ValidatorSettings(
            nats_url=fresh_nats_url,
            **{**SETTINGS, "reveal_timeout_s": 60.0},  # the reveals outwait the takeover
            partitions=partitions,
            lease_s=1.0,
            instance=instance,
        )

    zero = await killable(settings_of("v0"), lambda ctx: serve(ctx, settings_of("v0")))
    stop_1 = asyncio.Event()
    async with open_service("validator", settings_of("v1"), blobs=True, stop=stop_1) as one:
        one_runs = asyncio.create_task(serve(one, settings_of("v1")))
        try:
            deadline = time.monotonic() + 20
            while sorted((await partition_holders(one.js, partitions)).values()) != ["v0", "v0", "v1", "v1"]:
                assert time.monotonic() < deadline, await partition_holders(one.js, partitions)
                await asyncio.sleep(0.1)
            for _ in range(12):
                task_id = await start_task(one.js)
                for node in (a, b, c):
                    await reveal(one, task_id, node, honest(pictures, task_id, node))
                assert isinstance(await outcome(one.js, task_id, timeout=20), TaskSucceeded)  # exactly one outcome
            assert decided(zero.ctx) + decided(one) == 12
            assert decided(zero.ctx) > 0
            assert decided(one) > 0  # (all 12 in one replica's half: 1 in 2,048)

            holders = await partition_holders(one.js, partitions)
            theirs = uuid.uuid4().hex
            while holders[subjects.partition_for(theirs, partitions)] != "v0":
                theirs = uuid.uuid4().hex
            during = await start_task(one.js, task_id=theirs)
            for node in (a, b, c):  # committed; each reveals when asked, by whichever validator
                await reveal(one, during, node, honest(pictures, during, node), patience=90.0)
            await zero.kill()

            result = await outcome(one.js, during, timeout=90)
            assert isinstance(result, TaskSucceeded)
            assert result.verdicts == {a: "agree", b: "agree", c: "agree"}
            assert set((await partition_holders(one.js, partitions)).values()) == {"v1"}
            assert one.metrics.registry.get_sample_value("stipple_validator_partitions_held") == partitions
        finally:
            stop_1.set()
            await asyncio.wait_for(one_runs, 20)


async def test_a_task_whose_commitments_the_consumer_lost_is_found_by_the_sweep_and_decided(
    fresh_nats_url, pictures, monkeypatch
):
    """Every `committed` of a task is lost on the way to the validator (acknowledged and
    dropped, as a message lost while the cluster elected a leader): the task's fold goes
    quiet, the sweep checks it against the stream, finds every commitment in, opens the
    reveal and decides, long before the commit deadline (30 s) would have."""
    from stipple_validator.service import Validator

    lost: set[str] = set()
    original = Validator.handle

    async def losing(self, msg):
        if subjects.subject_token(msg.subject, 2) == "committed" and subjects.subject_token(msg.subject, 1) in lost:
            return None  # acknowledged, never folded
        return await original(self, msg)

    monkeypatch.setattr(Validator, "handle", losing)
    async with serving(fresh_nats_url, reveal_timeout_s=5.0, sweep_quiet_s=1.0, sweep_every_s=0.2) as ctx:
        task_id = await start_task(ctx.js, deadline_in=30)
        lost.add(task_id)
        for node in (a, b, c):
            await reveal(ctx, task_id, node, honest(pictures, task_id, node))
        result = await outcome(ctx.js, task_id, timeout=15)  # the commit deadline is 30 s away
        assert isinstance(result, TaskSucceeded)
        assert result.verdicts == {a: "agree", b: "agree", c: "agree"}


def timers(ctx) -> float:
    """The deadlines the validator holds (stipple_validator_timers)."""
    return ctx.metrics.registry.get_sample_value("stipple_validator_timers") or 0.0


async def test_a_task_that_ends_before_its_deadlines_leaves_nothing_to_come_back(net, pictures):
    """The `assigned` and `reveal` events set the task's deadlines; the validator holds
    the message of the later one and acks it when the task ends. Nothing is redelivered
    at the deadlines (until stop 25 both were nak'ed until then: two deliveries, two naks
    and two advisories per task, for a task long decided), and the stream is not read."""
    task_id = await start_task(net.js, deadline_in=1.5)
    reads: list[str] = []

    async def on_create(msg) -> None:
        if task_id in msg.subject or task_id.encode() in msg.data:
            reads.append(msg.subject)

    tap = await net.nc.subscribe("$JS.API.CONSUMER.CREATE.>", cb=on_create)
    try:

        async def one_timer() -> bool:
            return timers(net) == 1

        await until("the assigned event held", one_timer)  # the `assigned` event's deadline, held
        for node in (b, c):
            await reveal(net, task_id, node, honest(pictures, task_id, node))
        assert isinstance(await outcome(net.js, task_id), TaskSucceeded)

        async def settled() -> bool:
            info = await net.js.consumer_info(subjects.TASKS_STREAM, subjects.VALIDATOR_DURABLE)
            return info.num_ack_pending == 0 and timers(net) == 0

        await until("the held message acked", settled)  # the outcome acked the held message
        await net.nc.flush()
        decided = len(reads)  # the test's own reads of the outcome
        before = await net.js.consumer_info(subjects.TASKS_STREAM, subjects.VALIDATOR_DURABLE)
        await asyncio.sleep(2.5)  # past both deadlines (1.5 s, and the reveal's 1 s) and the grace
        after = await net.js.consumer_info(subjects.TASKS_STREAM, subjects.VALIDATOR_DURABLE)
        assert after.delivered.consumer_seq == before.delivered.consumer_seq  # nothing came back
        # (a fresh server: every TASKS message is this task's, each delivered once)
        assert after.delivered.consumer_seq == after.delivered.stream_seq
        assert after.num_redelivered == 0
        assert after.num_ack_pending == 0
        assert reads[decided:] == [], "the validator read a task that had ended"
    finally:
        await tap.unsubscribe()


async def test_a_stopped_validator_gives_its_deadlines_back_and_the_next_decides_on_time(fresh_nats_url):
    """A validator that stops hands each held deadline back with its time left (a nak
    with that delay): the next validator decides the task at its deadline, not after the
    consumer's 30 s ack wait, which is what a killed one leaves it to."""
    async with serving(fresh_nats_url) as first:
        task_id = await start_task(first.js, deadline_in=4.0)  # no node ever commits

        async def held() -> bool:
            return timers(first) == 1

        await until("the deadline held", held)
    stopped = time.monotonic()
    async with serving(fresh_nats_url) as second:
        result = await outcome(second.js, task_id, timeout=20)  # < the 30 s ack wait
        assert isinstance(result, TaskAborted)
        assert result.verdicts == {a: "timeout", b: "timeout", c: "timeout"}
        assert time.monotonic() - stopped < 20
