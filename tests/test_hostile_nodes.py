"""Hostile nodes, tried against the real network with their real permissions.

One network for the module, like production: nats-server with authentication on, the
gatekeeper (auth callout, blob intake), the chain-indexer on its embedded chain, the
dispatcher, the validator and the gateway, each with its own NATS user. Every node is the
real node agent joining through the real protocol: it signs the server's nonce with its
key, is admitted as an applicant, stakes the minimum through the chain relay and is then
admitted as a node. Cheaters are node agents with one behaviour changed; the hostile
node uses its own connection (the one the gatekeeper admitted, with a node's
permissions) to try what a cheater would. Each attack is refused or caught with a reason
and a metric, no honest node is penalized, and every task ends with the right outcome.

Who serves what, so that each task's nodes are known: honest-1, honest-2 and honest-3
serve tiny-sd; honest-1, honest-2 and a cheater serve cheat-sd (each cheat test brings a
fresh cheater: the last one was slashed); the hostile node and the flooder serve models
nobody asks for, so they are never assigned and can only attack.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats.errors
import numpy as np
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from PIL import Image

from stipple_common import bus, commitment, subjects
from stipple_common.blobstore.intake import IntakeClient, UploadRefused
from stipple_common.identity import dev_node_id, key_for, node_id_of
from stipple_common.messages import (
    ChainInfoRequest,
    ImageResult,
    NodeErrored,
    NodeQos,
    NodeQuit,
    Progress,
    ReserveRequest,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskReassigned,
    TaskRevealOpened,
    TaskStarted,
    TaskSucceeded,
    chain_reply_decoder,
    decode_task_event,
    encode,
    join_status_decoder,
)
from stipple_common.pngfacts import METADATA_KEY, PngFacts
from stipple_node.pipeline import GeneratedImage, PipelineRunner
from stipple_node.service import NodeAgent, NodeSettings, NotAdmitted, join_network
from stipple_testkit.network import Network, NodeHandle
from stipple_testkit.nodes import joined

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

TOKEN = 10**18
MIN_STAKE = 100 * TOKEN
STRIKES = 10  # refused messages within a minute that ban a node
HONEST = [dev_node_id(f"honest-{i}") for i in (1, 2, 3)]


# ------------------------------------------------------------------ the network


_RUNNERS: dict[tuple[str, ...], PipelineRunner] = {}


def runner_for(folder: Path, *names: str) -> PipelineRunner:
    """The tiny model under each of `names` (one set of weights, several model names)."""
    from stipple_node.pipeline import configure_determinism
    from stipple_node.tinymodel import make_tiny_model

    if names not in _RUNNERS:
        configure_determinism(1)
        model = make_tiny_model(folder / "tiny")
        runner = PipelineRunner(dict.fromkeys(names, model))
        for name in names:
            runner.load(name)
        _RUNNERS[names] = runner
    return _RUNNERS[names]


def noise_png() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Cheater(NodeAgent):
    """Computes honestly, then lies as `mode` says."""

    mode = "honest"

    def prepare(self, task_id: str, images: list[GeneratedImage], elapsed: float) -> Any:
        if self.mode == "malformed_phash":
            images = [
                GeneratedImage(png=i.png, phash="zz", seed=i.seed, width=i.width, height=i.height) for i in images
            ]
        pending = super().prepare(task_id, images, elapsed)
        self.stored_keys = [r.key for r in pending.images]
        if self.mode == "foreign_key":  # names another node's prefix in its (signed) result
            other = [
                msgspec.structs.replace(r, key=f"tasks/{task_id}/{HONEST[0]}/x/{r.index}.png") for r in pending.images
            ]
            value = commitment.make_commitment(task_id, self.node_id, other, pending.nonce, pending.determinism)
            pending.images = other
            pending.event = msgspec.structs.replace(
                pending.event, commitment=value, signature=commitment.sign(self.account, value)
            )
        if self.mode == "stores_other_bytes":  # reports the honest hashes, stores noise
            pending.pngs[:] = [noise_png() for _ in pending.pngs]
        return pending

    async def _upload(self, pending: Any) -> None:
        if self.mode == "foreign_key":  # stores under its own keys, reveals the other ones
            for key, png in zip(self.stored_keys, pending.pngs, strict=True):
                await self.blobs.put(key, png, content_type="image/png")
            pending.uploaded.set()
            return
        await super()._upload(pending)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("models"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(tmp_path_factory: pytest.TempPathFactory, models: Path) -> AsyncIterator[Network]:
    async with Network.secured(Path(tmp_path_factory.mktemp("nats"))) as net:
        await net.chain_indexer(min_stake=MIN_STAKE, confirmations=1, embedded_block_s=0.2, poll_s=0.1)
        await net.gatekeeper(min_stake=MIN_STAKE, reconcile_s=2.0)
        await net.dispatcher(min_stake=MIN_STAKE, task_timeout_s=20.0)
        await net.validator(phash_threshold=2, reveal_timeout_s=5.0, deadline_grace_s=0.1, sentinel_strikes=STRIKES)
        await net.gateway()
        both = runner_for(models, "tiny-sd", "cheat-sd")
        for name in ("honest-1", "honest-2"):
            await net.node(both, name, chain=True)
        await net.node(runner_for(models, "tiny-sd"), "honest-3", chain=True)
        await asyncio.sleep(1.5)  # heartbeats reach the directories
        yield net


@pytest_asyncio.fixture(loop_scope="module")
async def hostile(net: Network, models: Path) -> AsyncIterator[NodeHandle]:
    """A freshly staked node of its own (the last one may have been banned), serving a
    model nobody asks for: it is never assigned, it can only attack."""
    handle = await net.node(runner_for(models, "hostile-sd"), f"hostile-{uuid.uuid4().hex[:8]}", chain=True)
    await asyncio.sleep(1.0)
    yield handle
    await handle.stop()


async def submit(net: Network, model: str = "tiny-sd", seed: int = 5) -> str:
    body = {
        "base_model": model,
        "prompt": "a red fox in the snow",
        "task_config": {"image_width": 64, "image_height": 64, "steps": 8, "seed": seed},
    }
    async with httpx.AsyncClient(base_url=net.gateway_url, timeout=30) as http:
        answer = await http.post("/v1/tasks", json=body)
    assert answer.status_code == 202, answer.text
    return answer.json()["task_id"]


async def view(net: Network, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=net.gateway_url, timeout=30) as http:
        return (await http.get(f"/v1/tasks/{task_id}")).json()


async def finished(net: Network, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = await view(net, task_id)
        if seen["status"] in ("succeeded", "aborted", "cancelled"):
            return seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"task {task_id} did not end within {timeout} s: {seen}")


async def refused(handle: NodeHandle, attempt: Callable[[NATS], Awaitable[object]]) -> list[str]:
    """What the server refused (permissions violations) while `attempt` ran on the node's
    own connection."""
    seen: list[str] = []
    nc = handle.ctx.nc
    original = nc._error_cb

    async def record(exc: Exception) -> None:
        seen.append(str(exc).lower())

    nc._error_cb = record
    try:
        await attempt(nc)
        await nc.flush(timeout=2)
        await asyncio.sleep(0.3)
    finally:
        nc._error_cb = original
    return seen


async def ask_join(nc: NATS, node_id: str) -> Any:
    return join_status_decoder.decode((await nc.request(subjects.join_rpc_subject(node_id), b"", timeout=5)).data)


def strikes(net: Network) -> float:
    from stipple_validator.sentinel import REASONS

    return sum(net.metric("validator", "stipple_validator_strikes_total", reason=r) for r in REASONS)


async def outcome_event(net: Network, task_id: str) -> TaskSucceeded | TaskAborted:
    client = await net.client()
    msgs = await bus.read_messages(client.js, subjects.TASKS_STREAM, subjects.task_events(task_id))
    events = [decode_task_event(m.subject, m.data) for m in msgs if m.subject.count(".") == 2]
    outcomes = [e for e in events if isinstance(e, TaskSucceeded | TaskAborted)]
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


# ------------------------------------------------------------------ events and the directory


# every event type on every subject a node may use, each one waited for: 22 s alone, and it
# ran past the 60 s default once beside the other CI worker (a clean-clone CI run)
@pytest.mark.timeout(180)
async def test_forged_events_of_every_type_on_every_subject_a_node_may_use(net: Network, hostile: NodeHandle) -> None:
    task_id = await submit(net)
    image = ImageResult(
        index=0, key=f"tasks/{task_id}/{hostile.node_id}/0.png", phash="0" * 16, seed=5, width=64, height=64
    )
    soon = time.time() + 60
    forged = [
        TaskSucceeded(task_id=task_id, reason="unanimous", images=[image], verdicts={hostile.node_id: "agree"}),
        TaskAborted(task_id=task_id, reason="no_agreement"),
        TaskCancelled(task_id=task_id),
        TaskAssigned(task_id=task_id, nodes=[hostile.node_id], deadline=soon),
        TaskReassigned(task_id=task_id, replaced=HONEST[0], by=hostile.node_id, deadline=soon),
        TaskRevealOpened(task_id=task_id, nodes=[hostile.node_id], deadline=soon),
        TaskStarted(task_id=task_id, node_id=HONEST[0]),  # in other nodes' names
        TaskCommitted(task_id=task_id, node_id=HONEST[1], commitment="0x00", signature="0x00"),
        ResultRevealed(task_id=task_id, node_id=HONEST[2], images=[image]),
        NodeErrored(task_id=task_id, node_id=HONEST[0], code="internal", message="forged"),
    ]
    before = strikes(net)
    # subject by subject: the first two subjects' stored forgeries (2 x MAX_MSGS_PER_TASK_SUBJECT
    # = 8) are fewer strikes than a ban needs (10), so there the cap alone refuses the rest; on
    # the later subjects the ban may land first (a CI run saw it at 13 stored) and refuse them
    stored = dict.fromkeys(subjects.NODE_TASK_EVENTS, 0)
    refused_by_server = 0
    for name in subjects.NODE_TASK_EVENTS:  # every task subject this node may publish on
        subject = subjects.task_subject(task_id, name, hostile.node_id)
        for event in forged:
            try:
                await bus.publish(hostile.ctx.js, subject, event, msg_id=uuid.uuid4().hex)
                stored[name] += 1
            except nats.errors.Error:  # the cap (MAX_MSGS_PER_TASK_SUBJECT per subject), or banned
                refused_by_server += 1
    # and on the control plane's subjects: the server refuses them outright
    denied = await refused(
        hostile, lambda nc: nc.publish(subjects.task_subject(task_id, "succeeded"), encode(forged[0]))
    )
    assert any("permissions violation" in text for text in denied)
    done = await finished(net, task_id)
    assert done["status"] == "succeeded", done
    assert done["outcome"]["verdicts"] == dict.fromkeys(HONEST, "agree")
    accepted = await outcome_event(net, task_id)
    assert {image.key.split("/")[2] for image in accepted.images} <= set(HONEST)
    cap = subjects.MAX_MSGS_PER_TASK_SUBJECT
    assert 2 * cap < STRIKES  # (what makes the first two subjects' counts exact)
    assert [stored[name] for name in subjects.NODE_TASK_EVENTS[:2]] == [cap, cap], stored
    assert all(n <= cap for n in stored.values()), stored
    assert sum(stored.values()) >= STRIKES  # no ban before the strikes it takes
    assert refused_by_server >= 2 * (len(forged) - cap)  # the cap refused the rest on the first two
    # every stored forgery was refused by the validator, and counted
    assert strikes(net) - before >= sum(stored.values())
    # ... and the node that sent them is banned: closed by the gatekeeper, back as an applicant
    await asyncio.sleep(1.0)
    status = await ask_join(hostile.ctx.nc, hostile.node_id)
    assert (status.level, status.reason) == ("applicant", "banned"), status


async def test_the_directory_believes_nothing_a_node_says_of_others(net: Network, hostile: NodeHandle) -> None:
    ghost = node_id_of("0x" + "42" * 20)
    honest = HONEST[0]

    as_ghost = joined(ghost, device="ghost", started_at=1.0)
    before = net.metric("dispatcher", "stipple_dispatcher_node_qos", node_id=hostile.node_id)
    banned = net.metric("dispatcher", "stipple_dispatcher_nodes", state="banned")

    async def attempt(nc: NATS) -> None:
        js = nc.jetstream()
        own = hostile.node_id
        # a ghost node, in its own name and on the ghost's subject
        await bus.publish(js, subjects.node_subject(own, "joined"), as_ghost, msg_id=uuid.uuid4().hex)
        await nc.publish(subjects.node_subject(ghost, "joined"), encode(as_ghost))
        # another node's address under its own id (the victim's signatures would fail)
        with_honest_address = joined(own, address=honest, device="ghost", started_at=1.0)
        await bus.publish(js, subjects.node_subject(own, "joined"), with_honest_address, msg_id=uuid.uuid4().hex)
        # QoS 10 for itself, a lifted pause, another node quitting
        top = NodeQos(node_id=own, qos=10.0, samples=50, recent_timeouts=0)
        await bus.publish(js, subjects.node_subject(own, "heartbeat"), top, msg_id=uuid.uuid4().hex)
        await nc.publish(subjects.node_subject(own, "qos"), encode(top))
        await nc.publish(subjects.node_subject(honest, "quit"), encode(NodeQuit(node_id=honest, at=time.time())))
        await bus.publish(
            js, subjects.node_subject(own, "quit"), NodeQuit(node_id=honest, at=time.time()), msg_id=uuid.uuid4().hex
        )

    denied = await refused(hostile, attempt)
    assert sum("permissions violation" in text for text in denied) == 3  # ghost subject, qos, another's quit
    await asyncio.sleep(1.0)
    async with httpx.AsyncClient(base_url=net.gateway_url) as http:
        nodes = {n["node_id"]: n for n in (await http.get("/v1/nodes")).json()["nodes"]}
    assert ghost not in nodes
    assert nodes[honest]["live"] is True
    assert nodes[hostile.node_id]["address"].lower() == hostile.node_id  # not the victim's
    assert net.metric("dispatcher", "stipple_dispatcher_node_qos", node_id=hostile.node_id) == before
    assert net.metric("dispatcher", "stipple_dispatcher_nodes", state="banned") == banned
    # the victim still works: a task runs on the honest nodes and succeeds
    done = await finished(net, await submit(net, seed=6))
    assert done["outcome"]["verdicts"] == dict.fromkeys(HONEST, "agree")


async def test_forged_progress_is_never_shown(net: Network, hostile: NodeHandle) -> None:
    task_id = await submit(net, seed=7)

    async def attempt(nc: NATS) -> None:
        for step in range(5):
            mine = Progress(task_id=task_id, node_id=hostile.node_id, step=step, total=5)
            await nc.publish(subjects.progress_subject(task_id, hostile.node_id), encode(mine))
            theirs = Progress(task_id=task_id, node_id=HONEST[0], step=4, total=5)
            await nc.publish(subjects.progress_subject(task_id, HONEST[0]), encode(theirs))

    denied = await refused(hostile, attempt)
    assert any(f'publish to "progress.{task_id}.{HONEST[0]}"' in text for text in denied)
    shown = await view(net, task_id)
    assert all(node["node_id"] != hostile.node_id for node in shown["nodes"])
    assert all("progress" not in node or node["node_id"] in HONEST for node in shown["nodes"])
    await finished(net, task_id)


# ------------------------------------------------------------------ reach


async def test_a_node_reads_nothing_and_takes_nothing_of_another(net: Network, hostile: NodeHandle) -> None:
    honest = HONEST[0]
    bucket = subjects.IMAGES_BUCKET
    subscriptions = (
        "tasks.>",
        "work.>",
        "nodes.>",
        "_INBOX.>",
        f"$O.{bucket}.>",
        "progress.*.*",
        "rpc.>",
        "$SYS.>",
        "$KV.>",
    )
    requests = (
        f"$JS.API.STREAM.MSG.GET.OBJ_{bucket}",
        f"$JS.API.DIRECT.GET.OBJ_{bucket}",
        f"$JS.API.STREAM.INFO.{subjects.TASKS_STREAM}",
        "$JS.API.STREAM.NAMES",
        f"$JS.API.CONSUMER.CREATE.OBJ_{bucket}",
        f"$JS.API.CONSUMER.CREATE.{subjects.TASKS_STREAM}",
        f"$JS.API.CONSUMER.CREATE.{subjects.WORK_STREAM}.steal.work.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.WORK_STREAM}.{subjects.node_durable(hostile.node_id)}",
        f"$JS.API.CONSUMER.MSG.NEXT.{subjects.WORK_STREAM}.{subjects.node_durable(honest)}",
        f"$JS.API.CONSUMER.DELETE.{subjects.WORK_STREAM}.{subjects.node_durable(honest)}",
        f"$JS.API.DIRECT.GET.KV_{subjects.STAKES_BUCKET}",
        f"$JS.API.DIRECT.GET.KV_{subjects.BANS_BUCKET}",
        f"$JS.API.DIRECT.GET.KV_{subjects.GATEWAY_BUCKET}",  # the task-id secret (stipple_gateway.taskids)
        f"$JS.API.STREAM.MSG.GET.KV_{subjects.GATEWAY_BUCKET}",
        subjects.chain_rpc_subject(honest),
        subjects.blob_rpc_subject(honest),
        subjects.join_rpc_subject(honest),
    )
    not_refused = []
    for subject in subscriptions:
        if not await refused(hostile, lambda nc, subject=subject: nc.subscribe(subject)):
            not_refused.append(f"subscribe {subject}")
    for subject in requests:
        if not await refused(hostile, lambda nc, subject=subject: nc.publish(subject, b"{}", reply=nc.new_inbox())):
            not_refused.append(subject)
    assert not_refused == []


async def test_the_blob_intake_takes_a_node_s_own_uploads_only(net: Network, hostile: NodeHandle) -> None:
    task_id = await submit(net, seed=8)
    done = await finished(net, task_id)
    assert done["status"] == "succeeded"
    intake = IntakeClient(hostile.ctx.nc, hostile.node_id)
    honest = (await outcome_event(net, task_id)).images[0]
    honest_key = honest.key
    # stored with the facts the intake computed from the bytes: what the validator judged
    stored = await net.contexts["validator"].blobs.stat(honest_key)
    assert stored is not None
    facts = PngFacts.decode(stored.metadata.get(METADATA_KEY))
    assert facts is not None
    assert (facts.sha256, facts.width, facts.height, facts.phash) == (
        honest.sha256,
        honest.width,
        honest.height,
        honest.phash,
    )
    for key, reason in (
        (honest_key, "bad_key"),  # overwrite an honest node's accepted image
        (f"tasks/{task_id}/{HONEST[1]}/x/0.png", "bad_key"),  # another node's prefix
        (f"tasks/{task_id}/{hostile.node_id}/../{HONEST[1]}/0.png", "bad_key"),
        (f"tasks/{task_id}/{hostile.node_id}/x/0.png", "not_assigned"),  # its own prefix, not its task
        ("elsewhere/0.png", "bad_key"),
    ):
        with pytest.raises(UploadRefused, match=reason):
            await intake.put(key, noise_png())
    assert net.metric("gatekeeper", "stipple_gatekeeper_uploads_total", outcome="bad_key") >= 4


async def test_the_chain_relay_answers_a_node_only_about_itself(net: Network, hostile: NodeHandle) -> None:
    nc = hostile.ctx.nc

    async def ask(request: Any) -> Any:
        msg = await nc.request(subjects.chain_rpc_subject(hostile.node_id), encode(request), timeout=10)
        return chain_reply_decoder.decode(msg.data)

    reserve = await ask(ReserveRequest(task_id="t", fee=10**30))  # hold every app's deposit
    assert (reserve.ok, reserve.error) == (False, "forbidden")
    other = await ask(ChainInfoRequest(address=HONEST[0]))
    assert (other.ok, other.error) == (False, "forbidden")
    answers = [await ask(ChainInfoRequest(address=hostile.node_id)) for _ in range(30)]
    assert answers[0].ok
    assert any(a.error == "rate_limited" for a in answers)
    # meanwhile the network's own work goes on
    done = await finished(net, await submit(net, seed=9))
    assert done["status"] == "succeeded"


# ------------------------------------------------------------------ results


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("stores_other_bytes", "sha256"),
        ("malformed_phash", "phash"),
        ("foreign_key", "key"),
    ],
)
async def test_a_result_that_does_not_match_what_was_stored_is_bad_and_costs_the_stake(
    net: Network, models: Path, mode: str, reason: str
) -> None:
    name = f"cheater-{mode}"
    Cheater.mode = mode
    cheater = await net.node(runner_for(models, "cheat-sd"), name, Cheater, chain=True)
    await asyncio.sleep(1.5)
    task_id = await submit(net, model="cheat-sd", seed=10)
    done = await finished(net, task_id)
    assert done["status"] == "succeeded", done
    assert done["outcome"]["verdicts"] == {HONEST[0]: "agree", HONEST[1]: "agree", cheater.node_id: "bad_result"}
    assert reason in done["outcome"]["verdict_details"][cheater.node_id].lower()
    accepted = await outcome_event(net, task_id)
    assert {image.key.split("/")[2] for image in accepted.images} <= set(HONEST[:2])
    # the settler slashes it; below the minimum, the gatekeeper closes its connection and it
    # comes back as an applicant: it can no longer act as a node
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        try:
            status = await ask_join(cheater.ctx.nc, cheater.node_id)
        except (nats.errors.Error, TimeoutError):
            status = None
        if status is not None and status.level == "applicant":
            break
        await asyncio.sleep(0.5)
    assert status is not None
    assert (status.level, status.reason) in {("applicant", "below_minimum"), ("applicant", "no_stake")}, status
    await cheater.stop()


async def test_a_key_without_stake_cannot_join_as_a_node_and_is_told_why(net: Network, models: Path) -> None:
    settings = NodeSettings(nats_url=net.url, chain=False)
    from eth_account import Account

    with pytest.raises(NotAdmitted, match="no_stake"):
        async with join_network(settings, Account.from_key(key_for("unstaked"))):
            pass


# ------------------------------------------------------------------ floods


async def test_a_flooding_node_is_banned_and_the_network_carries_on(net: Network, models: Path) -> None:
    flooder = await net.node(runner_for(models, "flood-sd"), "flooder", chain=True)
    await asyncio.sleep(1.0)
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    flooder.ctx.nc._reconnected_cb = on_reconnect
    for _ in range(STRIKES * 5):  # events for tasks that do not exist
        event = TaskStarted(task_id=uuid.uuid4().hex, node_id=flooder.node_id)
        subject = subjects.task_subject(event.task_id, "started", flooder.node_id)
        try:
            await flooder.ctx.nc.publish(subject, encode(event))
        except nats.errors.Error:
            break
    task_id = await submit(net, seed=11)  # the network's work goes on meanwhile
    await asyncio.wait_for(reconnected.wait(), 30)  # banned: the gatekeeper closed its connection
    status = await ask_join(flooder.ctx.nc, flooder.node_id)
    assert (status.level, status.reason) == ("applicant", "banned"), status
    assert net.metric("validator", "stipple_validator_bans_total", reason="unknown_task") == 1
    assert net.metric("gatekeeper", "stipple_gatekeeper_kicks_total", reason="banned") >= 1
    done = await finished(net, task_id)
    assert done["outcome"]["verdicts"] == dict.fromkeys(HONEST, "agree")
    await asyncio.sleep(1.0)
    assert net.metric("dispatcher", "stipple_dispatcher_nodes", state="banned") >= 1
    await flooder.stop()
