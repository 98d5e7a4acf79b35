"""The node agent service on its own nats-server with the real diffusers pipeline:
announces itself, runs assignments, uploads images, and answers every task it cannot
run with a typed error event while staying up for the next one. A result is committed
(signed), and revealed only when asked; a cancelled task stops.

The node joins as its key (`key_for("n1")`, node id `dev_node_id("n1")`) and stores its
images through the gatekeeper's blob intake, as in production; the test plays the rest
of the control plane (it declares the streams, assigns work, reads the blob store)."""

import asyncio
import contextlib
import io
import re
import time
import uuid

import imagehash
import msgspec
import nats.js.errors
import pytest
from eth_account import Account
from PIL import Image

from stipple_common import bus, subjects
from stipple_common.commitment import make_commitment, signer
from stipple_common.errors import Transient
from stipple_common.identity import dev_node_id, key_for
from stipple_common.messages import (
    Assignment,
    CancelWork,
    NodeErrored,
    NodeJoined,
    NodeProbed,
    ProbeRequest,
    ResultRevealed,
    RevealRequest,
    TaskAssigned,
    TaskCommitted,
    TaskStarted,
    node_event_decoder,
    task_event_decoder,
)
from stipple_common.nodes import NodeDirectory
from stipple_common.service import open_service
from stipple_common.taskspec import LoraSpec, TaskSpec, parse_task
from stipple_gatekeeper.service import GatekeeperSettings
from stipple_gatekeeper.service import serve as serve_gatekeeper
from stipple_node.pipeline import PipelineRunner, platform_class
from stipple_node.service import (
    NodeAgent,
    NodeSettings,
    check_node_id,
    join_network,
    load_or_create_key,
    make_agent,
    parse_models,
    serve,
)
from stipple_node.unrevealed import UnrevealedStore

pytestmark = pytest.mark.integration

KEY = key_for("n1")
N1 = dev_node_id("n1")


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return PipelineRunner({"tiny-sd": tiny_model_dir})


@pytest.fixture
async def control(fresh_nats_url):
    """The control plane's connection (it declared the streams; its blob store is the one
    the intake writes to) with the gatekeeper's blob intake running on it."""
    settings = GatekeeperSettings(nats_url=fresh_nats_url, callout=False)
    stop = asyncio.Event()
    async with open_service("gatekeeper", settings, blobs=True, stop=stop) as ctx:
        task = asyncio.create_task(serve_gatekeeper(ctx, settings))
        yield ctx
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def running_node(url, runner, store=None, agent_type=None, unrevealed=None, **overrides):
    """A node agent with the key `KEY`, joined as it joins in production, until the block ends."""
    settings = NodeSettings(**{"nats_url": url, "node_id": N1, "heartbeat_s": 0.2, **overrides})
    stop = asyncio.Event()
    async with join_network(settings, Account.from_key(KEY), stop=stop) as ctx:
        agent = make_agent(ctx, settings, runner, store, KEY, agent_type, unrevealed=unrevealed)
        task = asyncio.create_task(serve(ctx, settings, runner, store, key=KEY, agent=agent))
        try:
            yield ctx
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


@pytest.fixture
async def node(fresh_nats_url, runner, control):
    """A running node; the test gets the control plane's connection to work with it."""
    async with running_node(fresh_nats_url, runner):
        yield control
    # leaving announces the quit
    raw = await control.js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject(N1, "quit"))
    assert node_event_decoder.decode(raw.data).node_id == N1


async def assign(js, spec: TaskSpec, deadline_in: float = 60.0) -> str:
    """What the dispatcher does: the task's assignment (the intake takes only an assigned
    node's uploads), then the node's work."""
    task_id = uuid.uuid4().hex
    deadline = time.time() + deadline_in
    assigned = TaskAssigned(task_id=task_id, nodes=[N1], deadline=deadline)
    await bus.publish(js, subjects.task_subject(task_id, "assigned"), assigned, msg_id=f"{task_id}:assigned")
    work = Assignment(task_id=task_id, spec=spec, deadline=deadline)
    await bus.publish(js, subjects.work_subject(N1), work, msg_id=task_id)
    return task_id


async def wait_for_event(js, task_id, types, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await bus.read_subject(js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)
        found = [e for e in events if isinstance(e, types)]
        if found:
            return events, found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"node never answered task {task_id} with {types}")


async def final_event(js, task_id, timeout=60.0, node=N1):
    """The node's last word: it commits (or errors); asked to reveal, it reveals."""
    _, first = await wait_for_event(js, task_id, (TaskCommitted, NodeErrored), timeout)
    if isinstance(first, TaskCommitted):
        request = RevealRequest(task_id=task_id, deadline=time.time() + 10)
        await bus.publish(js, subjects.control_subject(node), request, msg_id=f"{task_id}:reveal")
        return await wait_for_event(js, task_id, ResultRevealed, timeout)
    return await wait_for_event(js, task_id, NodeErrored, timeout)


def spec(**config):
    return parse_task(
        {
            "base_model": "tiny-sd",
            "prompt": "a fox",
            "task_config": {"image_width": 64, "image_height": 64, "steps": 2, "seed": 5, **config},
        }
    )


async def test_announces_itself_and_stays_live(node):
    directory = NodeDirectory(ttl_s=1.0)
    sub = await directory.follow(node.js)
    try:
        (joined,) = await directory.wait_for(1, timeout=5)
        assert joined.node_id == N1  # its key's address, in lower case
        assert joined.address == Account.from_key(KEY).address  # checksummed: it signs with it
        assert joined.models == ["tiny-sd"]
        assert joined.memory_bytes > 0
        assert joined.determinism == platform_class("cpu")  # what its reveals must start with
        await asyncio.sleep(1.5)  # longer than the TTL: only heartbeats keep it live
        assert [n.node_id for n in directory.live()] == [N1]
    finally:
        await sub.unsubscribe()


async def test_runs_a_task_and_uploads_its_images(node):
    progress = []

    async def on_progress(msg):
        progress.append((msg.subject, msgspec.json.decode(msg.data)))

    sub = await node.nc.subscribe("progress.>", cb=on_progress)
    task_id = await assign(node.js, spec(num_images=2))
    events, result = await final_event(node.js, task_id)
    await sub.unsubscribe()
    assert [type(e) for e in events[:3]] == [TaskAssigned, TaskStarted, TaskCommitted]
    assert isinstance(result, ResultRevealed)
    assert [i.seed for i in result.images] == [5, 6]
    # the reveal opens the commitment, which the node's announced key signed
    commit = events[2]
    raw = await node.js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject(N1, "joined"))
    joined = node_event_decoder.decode(raw.data)
    assert isinstance(joined, NodeJoined)
    assert make_commitment(task_id, N1, result.images, result.nonce, result.determinism) == commit.commitment
    assert result.determinism
    assert all(len(image.checkpoints) == 3 for image in result.images)
    assert signer(commit.commitment, commit.signature) == joined.address
    for image in result.images:  # stored by the intake, under the node's own prefix
        assert re.fullmatch(rf"tasks/{task_id}/{N1}/[0-9a-f]{{16}}/{image.index}\.png", image.key)
        png = await node.blobs.get(image.key)
        decoded = Image.open(io.BytesIO(png))
        assert decoded.size == (64, 64)
        assert str(imagehash.phash(decoded, hash_size=8)) == image.phash
    mine = [(p["step"], p["total"]) for subject, p in progress if p["task_id"] == task_id]
    assert {subject for subject, _ in progress} == {subjects.progress_subject(task_id, N1)}
    assert mine, "no progress was published"
    assert mine[-1][0] == mine[-1][1]  # the last report is the last step
    assert mine[-1][1] >= 2 * 2  # counts the steps of both images


@pytest.mark.parametrize(("interval", "every_step"), [(0.0, True), (3600.0, False)])
async def test_step_progress_is_the_first_step_the_last_and_one_per_interval_between(
    fresh_nats_url, runner, control, interval, every_step
):
    """Each report is a message to every watching gateway: a GPU's 20 to 50 steps a second
    are thinned to one per `progress_interval_s`, and the first and the last always go."""
    seen = []

    async def on_progress(msg):
        seen.append(msgspec.json.decode(msg.data))

    sub = await control.nc.subscribe(subjects.progress_subject("*", N1), cb=on_progress)
    async with running_node(fresh_nats_url, runner, progress_interval_s=interval):
        task_id = await assign(control.js, spec(steps=12))
        await final_event(control.js, task_id)
        await control.nc.flush()
        await asyncio.sleep(0.2)  # core NATS: the last report may trail the reveal
    await sub.unsubscribe()
    steps = [(p["step"], p["total"]) for p in seen if p["task_id"] == task_id]
    total = steps[-1][1]
    assert total >= 12  # (the scheduler's timesteps: 12 asked)
    assert steps[-1][0] == total
    if every_step:
        assert [step for step, _ in steps] == list(range(1, total + 1))
    else:
        assert [step for step, _ in steps] == [1, total]


@pytest.mark.parametrize(
    ("bad", "code", "words"),
    [
        (msgspec.structs.replace(spec(), base_model="sd-9000"), "model_not_found", "sd-9000"),
        (msgspec.structs.replace(spec(), sampler="Warp 9"), "invalid_input", "sampler"),
    ],
)
async def test_a_task_that_cannot_run_gets_a_typed_error_and_the_node_stays_up(node, bad, code, words):
    task_id = await assign(node.js, bad)
    _, result = await final_event(node.js, task_id)
    assert isinstance(result, NodeErrored)
    assert result.code == code
    assert words in result.message
    good = await assign(node.js, spec())
    _, after = await final_event(node.js, good)
    assert isinstance(after, ResultRevealed)


async def test_an_assignment_past_its_deadline_is_refused(node):
    task_id = await assign(node.js, spec(), deadline_in=-1)
    events, result = await final_event(node.js, task_id)
    assert isinstance(result, NodeErrored)
    assert result.code == "deadline_passed"
    assert not any(isinstance(e, TaskStarted) for e in events)


async def test_a_node_reveals_only_when_asked_and_only_once(node):
    task_id = await assign(node.js, spec())
    await wait_for_event(node.js, task_id, TaskCommitted)
    await asyncio.sleep(0.3)
    events = await bus.read_subject(node.js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)
    assert not any(isinstance(e, ResultRevealed) for e in events), "revealed before anyone asked"
    await final_event(node.js, task_id)
    again = RevealRequest(task_id=task_id, deadline=time.time() + 10)
    await bus.publish(node.js, subjects.control_subject(N1), again, msg_id=f"{task_id}:again")
    await asyncio.sleep(0.3)
    events = await bus.read_subject(node.js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)
    assert sum(isinstance(e, ResultRevealed) for e in events) == 1


async def test_a_probe_is_answered_with_its_result_or_its_error(node):
    answers = asyncio.Queue()

    async def on_answer(msg):
        await answers.put(node_event_decoder.decode(msg.data))

    sub = await node.nc.subscribe(subjects.node_subject(N1, "probed"), cb=on_answer)
    try:
        for probe_id, model in (("p1", "tiny-sd"), ("p2", "no-such-model")):
            probe_spec = msgspec.structs.replace(spec(steps=1), base_model=model)
            probe = ProbeRequest(probe_id=probe_id, spec=probe_spec, deadline=time.time() + 30)
            await bus.publish(node.js, subjects.control_subject(N1), probe, msg_id=probe_id)
        got = [await asyncio.wait_for(answers.get(), 30) for _ in range(2)]
        ok, failed = sorted(got, key=lambda answer: answer.probe_id)
    finally:
        await sub.unsubscribe()
    assert isinstance(ok, NodeProbed)
    assert (ok.probe_id, ok.error, len(ok.phash)) == ("p1", "", 16)
    assert (failed.probe_id, failed.error) == ("p2", "model_not_found")


class SlowStorage(NodeAgent):
    """Its blob store takes a second to accept the images; the first upload fails."""

    uploads = 0

    async def _upload(self, pending):
        type(self).uploads += 1
        if type(self).uploads == 1:
            raise Transient("the blob store is unreachable")
        await asyncio.sleep(1.0)
        await super()._upload(pending)


async def test_the_commitment_goes_out_after_the_upload_and_a_retry_keeps_the_result(fresh_nats_url, runner, control):
    """Once committed, a node must reveal (not revealing is `withheld`, slashed), so the
    commitment goes out only once the images are stored: an upload that fails leaves no
    commitment behind, and the redelivered assignment uploads the same result, then commits
    to it; the reveal opens that one commitment."""
    ctx = control
    async with running_node(fresh_nats_url, runner, agent_type=SlowStorage):
        task_id = await assign(ctx.js, spec())
        _, redelivered = await wait_until_redelivered(ctx.js, task_id)
        assert redelivered, "the failed upload was not retried"
        events, commit = await wait_for_event(ctx.js, task_id, TaskCommitted)
        assert SlowStorage.uploads == 2  # committed only after the second upload stored the images
        request = RevealRequest(task_id=task_id, deadline=time.time() + 10)
        await bus.publish(ctx.js, subjects.control_subject(N1), request, msg_id=f"{task_id}:reveal")
        events, revealed = await wait_for_event(ctx.js, task_id, ResultRevealed)
        for image in revealed.images:  # stored before the reveal named them
            assert await ctx.blobs.get(image.key)
        assert sum(isinstance(e, TaskCommitted) for e in events) == 1
        assert make_commitment(task_id, N1, revealed.images, revealed.nonce, revealed.determinism) == commit.commitment


async def wait_until_redelivered(js, task_id, timeout=10.0):
    """Wait until the node's work consumer has delivered the assignment a second time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = await js.consumer_info(subjects.WORK_STREAM, subjects.node_durable(N1))
        except nats.js.errors.NotFoundError:  # the node has not made its consumer yet
            info = None
        if info is not None and info.num_redelivered:
            return info, True
        await asyncio.sleep(0.05)
    return None, False


async def test_a_cancelled_task_stops_at_the_next_step_and_the_node_goes_on(node):
    steps = []
    running = asyncio.Event()

    async def on_progress(msg):
        steps.append(msgspec.json.decode(msg.data))
        running.set()

    sub = await node.nc.subscribe("progress.>", cb=on_progress)
    long_task = await assign(node.js, spec(steps=150, image_width=256, image_height=256))
    await asyncio.wait_for(running.wait(), 30)
    await bus.publish(node.js, subjects.control_subject(N1), CancelWork(task_id=long_task), msg_id="c1")
    queued = await assign(node.js, spec())  # waits behind the long task
    await bus.publish(node.js, subjects.control_subject(N1), CancelWork(task_id=queued), msg_id="c2")
    after = await assign(node.js, spec())
    _, result = await final_event(node.js, after)
    await sub.unsubscribe()
    assert isinstance(result, ResultRevealed)
    for cancelled in (long_task, queued):
        events = await bus.read_subject(
            node.js, subjects.TASKS_STREAM, subjects.task_events(cancelled), task_event_decoder
        )
        assert not any(isinstance(e, (TaskCommitted, NodeErrored)) for e in events)
    done = [p["step"] for p in steps if p["task_id"] == long_task]
    assert max(done) < 150, "the cancelled task ran to the end"


def test_the_node_key_is_created_once_and_checked(tmp_path):
    from stipple_common.commitment import account_from_key
    from stipple_common.settings import InvalidSettings

    path = tmp_path / "keys" / "node.key"
    key = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(path) == key
    assert account_from_key(key).address.startswith("0x")
    path.write_text("not a key")
    with pytest.raises(InvalidSettings, match="STIPPLE_KEY_FILE"):
        load_or_create_key(path)


def test_model_settings_are_checked_at_start(tmp_path, tiny_model_dir):
    from stipple_common.settings import InvalidSettings

    assert parse_models(f"tiny-sd={tiny_model_dir}", tmp_path) == {"tiny-sd": tiny_model_dir}
    with pytest.raises(InvalidSettings, match="expected name=folder"):
        parse_models("tiny-sd", tmp_path)
    with pytest.raises(InvalidSettings, match="has no model_index.json"):
        parse_models(f"x={tmp_path}", tmp_path)
    with pytest.raises(InvalidSettings, match="only 'tiny-sd' is built in"):
        parse_models("sdxl=builtin", tmp_path)
    with pytest.raises(InvalidSettings, match="empty"):
        parse_models(" , ", tmp_path)


async def test_a_lora_from_a_url_is_downloaded_with_progress_on_nats(fresh_nats_url, tiny_model_dir, tmp_path, control):
    """The real store inside the real node: the task names a LoRA by URL (as Civitai
    links are); the node downloads it, reports progress on downloads.<node_id>, uses it."""
    from stipple_node.service import DownloadReporter
    from stipple_node.store import ModelStore
    from stipple_testkit.fileserver import FileServer, Served
    from stipple_testkit.tinyzoo import make_tiny_lora

    lora = make_tiny_lora(tmp_path / "lora.safetensors", base="sd15").read_bytes()
    reporter = DownloadReporter()
    with (
        FileServer() as files,
        ModelStore(tmp_path / "store", budget_bytes=None, progress=reporter) as store,
    ):
        url = files.add("/api/download/models/1", Served(lora, filename="fox-style.safetensors", chunk_bytes=4096))
        runner = PipelineRunner({"tiny-sd": tiny_model_dir}, store=store)
        events = []

        async def on_download(msg):
            events.append(msgspec.json.decode(msg.data))

        sub = await control.nc.subscribe(subjects.download_subject(N1), cb=on_download)
        async with running_node(fresh_nats_url, runner, store) as ctx:
            reporter.attach(ctx, asyncio.get_running_loop(), N1)
            task_id = await assign(control.js, msgspec.structs.replace(spec(), loras=[LoraSpec(model=url, weight=0.9)]))
            _, result = await final_event(control.js, task_id)
            assert isinstance(result, ResultRevealed), result
            plain = await assign(control.js, spec())
            _, plain_result = await final_event(control.js, plain)
            with_lora_png = await control.blobs.get(result.images[0].key)
            plain_png = await control.blobs.get(plain_result.images[0].key)
            await asyncio.sleep(0.2)
        await sub.unsubscribe()
        assert with_lora_png != plain_png  # the downloaded LoRA was applied
        assert events, "no download progress was published"
        assert events[-1]["done"] is True
        assert events[-1]["downloaded_bytes"] == len(lora)
        assert [m.ref for m in store.inventory()] == [url]
        assert len(files.requests("/api/download/models/1")) == 1  # downloaded once, then from disk


async def test_a_prefetch_request_downloads_the_model_and_announces_it(
    fresh_nats_url, tiny_model_dir, tmp_path, control
):
    from stipple_common.messages import PrefetchRequest
    from stipple_node.store import ModelStore
    from stipple_testkit.fileserver import FileServer, Served
    from stipple_testkit.tinyzoo import make_tiny_lora

    lora = make_tiny_lora(tmp_path / "lora.safetensors", base="sd15").read_bytes()
    js = control.js
    joined_subject = subjects.node_subject(N1, "joined")
    with FileServer() as files, ModelStore(tmp_path / "store", budget_bytes=None) as store:
        url = files.add("/loras/fox.safetensors", Served(lora, filename="fox.safetensors"))
        runner = PipelineRunner({"tiny-sd": tiny_model_dir}, store=store)
        async with running_node(fresh_nats_url, runner, store):
            await asyncio.sleep(0.3)
            first = node_event_decoder.decode((await js.get_last_msg(subjects.NODES_STREAM, joined_subject)).data)
            assert url not in first.models_on_disk
            request = PrefetchRequest(ref=url, kind="lora")
            await bus.publish(js, subjects.control_subject(N1), request, msg_id="p1")
            again = first
            for _ in range(100):
                again = node_event_decoder.decode((await js.get_last_msg(subjects.NODES_STREAM, joined_subject)).data)
                if url in again.models_on_disk:
                    break
                await asyncio.sleep(0.05)
    assert url in again.models_on_disk
    assert first.loras_on_disk == []
    assert again.loras_on_disk == [url]  # prefetched as a LoRA: the gateway lists it (GET /sdapi/v1/loras)
    assert again.started_at == first.started_at  # not a restart: a pause would stay
    assert [m.ref for m in store.inventory()] == [url]


def stored(root, *held):
    """A model store whose index holds `held`: (ref, kind, last_used) each, with a file."""
    from stipple_node.store.index import Entry, save_index

    entries = {}
    for i, (ref, kind, last_used) in enumerate(held):
        (root / f"e{i}").mkdir(parents=True)
        entries[ref] = Entry(
            key=ref,
            ref=ref,
            source="url" if ref.startswith("https://") else "hf",
            kind=kind,
            path=f"e{i}",
            evict_path=f"e{i}",
            size_bytes=1,
            last_used=last_used,
        )
    save_index(root, entries)


def announced(runner, store):
    from stipple_common.metrics import Metrics
    from stipple_node.metrics import NodeMetrics

    settings = NodeSettings()
    metrics = NodeMetrics.of(Metrics("node"), settings.device)
    agent = NodeAgent(nc=None, js=None, runner=runner, settings=settings, metrics=metrics, store=store, key=KEY)
    return agent.announcement()


def test_the_announcement_names_the_stored_loras_most_recently_used_first(runner, tmp_path):
    from stipple_node.store import ModelStore

    stored(
        tmp_path / "store",
        ("https://civitai.test/api/download/models/1", "lora", 10.0),
        ("acme/sd15-base", "model", 40.0),
        ("acme/fox-lora", "lora", 30.0),
        ("https://x.test/cat.pt", "embedding", 20.0),
        ("acme/never-used-lora", "lora", 0.0),
    )
    with ModelStore(tmp_path / "store", budget_bytes=None) as store:
        joined = announced(runner, store)
    assert joined.loras_on_disk == [
        "acme/fox-lora",
        "https://civitai.test/api/download/models/1",
        "acme/never-used-lora",
    ]
    assert set(joined.loras_on_disk) < set(joined.models_on_disk)  # still there too, as before
    assert announced(runner, None).loras_on_disk == []  # no store: nothing on disk


def test_the_announced_loras_are_bounded_as_the_network_reads_them(runner, tmp_path):
    """`ModelNames` holds 256: a node with more announces the 256 it used last."""
    from stipple_node.store import ModelStore

    stored(tmp_path / "store", *((f"acme/lora-{i}", "lora", float(i)) for i in range(300)))
    with ModelStore(tmp_path / "store", budget_bytes=None) as store:
        joined = announced(runner, store)
    assert joined.loras_on_disk == [f"acme/lora-{i}" for i in range(299, 43, -1)]
    assert node_event_decoder.decode(msgspec.json.encode(joined)).loras_on_disk == joined.loras_on_disk


def test_the_node_id_is_the_keys_address_and_a_setting_cannot_change_it():
    from stipple_common.settings import InvalidSettings

    address = Account.from_key(KEY).address
    assert check_node_id(NodeSettings(), address) == N1
    assert check_node_id(NodeSettings(node_id=address), address) == N1  # any case
    with pytest.raises(InvalidSettings, match="STIPPLE_NODE_ID='n1': a node's id is its key's address"):
        check_node_id(NodeSettings(node_id="n1"), address)
    with pytest.raises(InvalidSettings, match=N1):
        check_node_id(NodeSettings(node_id=dev_node_id("n2")), address)


async def test_a_node_that_restarts_after_committing_still_reveals_what_it_committed_to(
    fresh_nats_url, runner, control, tmp_path
):
    """Not revealing once committed is `withheld` (slashed): the unrevealed result is kept on
    disk, and the node that comes back reveals it, opening the commitment it published."""
    ctx = control
    kept = UnrevealedStore(tmp_path / "unrevealed")
    async with running_node(fresh_nats_url, runner, unrevealed=kept):
        task_id = await assign(ctx.js, spec())
        _, commit = await wait_for_event(ctx.js, task_id, TaskCommitted)
    assert [record.task_id for record in kept.load()] == [task_id]  # the process is gone; the file is not
    async with running_node(fresh_nats_url, runner, unrevealed=UnrevealedStore(tmp_path / "unrevealed")):
        request = RevealRequest(task_id=task_id, deadline=time.time() + 10)
        await bus.publish(ctx.js, subjects.control_subject(N1), request, msg_id=f"{task_id}:reveal")
        _, revealed = await wait_for_event(ctx.js, task_id, ResultRevealed)
    assert make_commitment(task_id, N1, revealed.images, revealed.nonce, revealed.determinism) == commit.commitment
    assert kept.load() == []  # revealed: forgotten
