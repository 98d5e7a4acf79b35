"""The node agent service on its own nats-server with the real diffusers pipeline:
announces itself, runs assignments, uploads images, and answers every task it cannot
run with a typed error event while staying up for the next one. A result is committed
(signed), and revealed only when asked; a cancelled task stops."""

import asyncio
import io
import re
import time
import uuid

import imagehash
import msgspec
import pytest
from PIL import Image

from stipple_common import bus, subjects
from stipple_common.commitment import make_commitment, signer
from stipple_common.errors import Transient
from stipple_common.messages import (
    Assignment,
    CancelWork,
    NodeErrored,
    NodeJoined,
    NodeProbed,
    ProbeRequest,
    ResultRevealed,
    RevealRequest,
    TaskCommitted,
    TaskStarted,
    node_event_decoder,
    task_event_decoder,
)
from stipple_common.nodes import NodeDirectory
from stipple_common.service import open_service
from stipple_common.taskspec import LoraSpec, TaskSpec, parse_task
from stipple_node.pipeline import PipelineRunner
from stipple_node.service import NodeAgent, NodeSettings, load_or_create_key, parse_models, serve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return PipelineRunner({"tiny-sd": tiny_model_dir})


@pytest.fixture
async def node(fresh_nats_url, runner):
    settings = NodeSettings(nats_url=fresh_nats_url, node_id="n1", operator="op", heartbeat_s=0.2)
    stop = asyncio.Event()
    async with open_service("node-agent", settings, blobs=True, stop=stop) as ctx:
        task = asyncio.create_task(serve(ctx, settings, runner))
        yield ctx
        stop.set()
        await asyncio.wait_for(task, 30)
        # leaving announces the quit
        raw = await ctx.js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject("n1", "quit"))
        assert node_event_decoder.decode(raw.data).node_id == "n1"


async def assign(js, spec: TaskSpec, deadline_in: float = 60.0) -> str:
    task_id = uuid.uuid4().hex
    work = Assignment(task_id=task_id, spec=spec, deadline=time.time() + deadline_in)
    await bus.publish(js, subjects.work_subject("n1"), work, msg_id=task_id)
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


async def final_event(js, task_id, timeout=60.0, node="n1"):
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
        assert joined.node_id == "n1"
        assert joined.operator == "op"
        assert joined.models == ["tiny-sd"]
        assert joined.memory_bytes > 0
        await asyncio.sleep(1.5)  # longer than the TTL: only heartbeats keep it live
        assert [n.node_id for n in directory.live()] == ["n1"]
    finally:
        await sub.unsubscribe()


async def test_runs_a_task_and_uploads_its_images(node):
    progress = []

    async def on_progress(msg):
        progress.append(msgspec.json.decode(msg.data))

    sub = await node.nc.subscribe("progress.>", cb=on_progress)
    task_id = await assign(node.js, spec(num_images=2))
    events, result = await final_event(node.js, task_id)
    await sub.unsubscribe()
    assert isinstance(events[0], TaskStarted)
    assert isinstance(events[1], TaskCommitted)
    assert isinstance(result, ResultRevealed)
    assert [i.seed for i in result.images] == [5, 6]
    # the reveal opens the commitment, which the node's announced key signed
    commit = events[1]
    raw = await node.js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject("n1", "joined"))
    joined = node_event_decoder.decode(raw.data)
    assert isinstance(joined, NodeJoined)
    assert make_commitment(task_id, "n1", result.images, result.nonce) == commit.commitment
    assert signer(commit.commitment, commit.signature) == joined.address
    for image in result.images:
        assert re.fullmatch(rf"tasks/{task_id}/n1/[0-9a-f]{{16}}/{image.index}\.png", image.key)
        png = await node.blobs.get(image.key)
        decoded = Image.open(io.BytesIO(png))
        assert decoded.size == (64, 64)
        assert str(imagehash.phash(decoded, hash_size=8)) == image.phash
    mine = [(p["step"], p["total"]) for p in progress if p["task_id"] == task_id]
    assert mine, "no progress was published"
    assert mine[-1][0] == mine[-1][1]  # the last report is the last step
    assert mine[-1][1] >= 2 * 2  # counts the steps of both images


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
    await bus.publish(node.js, subjects.control_subject("n1"), again, msg_id=f"{task_id}:again")
    await asyncio.sleep(0.3)
    events = await bus.read_subject(node.js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)
    assert sum(isinstance(e, ResultRevealed) for e in events) == 1


async def test_a_probe_is_answered_with_its_result_or_its_error(node):
    answers = asyncio.Queue()

    async def on_answer(msg):
        await answers.put(node_event_decoder.decode(msg.data))

    sub = await node.nc.subscribe(subjects.node_subject("n1", "probed"), cb=on_answer)
    try:
        for probe_id, model in (("p1", "tiny-sd"), ("p2", "no-such-model")):
            probe_spec = msgspec.structs.replace(spec(steps=1), base_model=model)
            probe = ProbeRequest(probe_id=probe_id, spec=probe_spec, deadline=time.time() + 30)
            await bus.publish(node.js, subjects.control_subject("n1"), probe, msg_id=probe_id)
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


async def test_the_commitment_goes_out_with_the_upload_and_a_retry_keeps_it(fresh_nats_url, runner):
    """The commitment needs only the hashes, so it is published while the images upload;
    a reveal asked for before they are stored waits for them. When the upload fails after
    the commitment went out, the redelivered assignment uploads the same result: the
    reveal still opens the one commitment that is stored."""
    settings = NodeSettings(nats_url=fresh_nats_url, node_id="n1", operator="op")
    stop = asyncio.Event()
    async with open_service("node-agent", settings, blobs=True, stop=stop) as ctx:
        task = asyncio.create_task(serve(ctx, settings, runner, agent_type=SlowStorage))
        try:
            task_id = await assign(ctx.js, spec())
            events, commit = await wait_for_event(ctx.js, task_id, TaskCommitted)
            _, redelivered = await wait_until_redelivered(ctx.js, task_id)
            assert redelivered, "the failed upload was not retried"
            request = RevealRequest(task_id=task_id, deadline=time.time() + 10)
            await bus.publish(ctx.js, subjects.control_subject("n1"), request, msg_id=f"{task_id}:reveal")
            events, revealed = await wait_for_event(ctx.js, task_id, ResultRevealed)
            for image in revealed.images:  # stored before the reveal named them
                assert await ctx.blobs.get(image.key)
            assert sum(isinstance(e, TaskCommitted) for e in events) == 1
            assert make_commitment(task_id, "n1", revealed.images, revealed.nonce) == commit.commitment
            assert SlowStorage.uploads == 2
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def wait_until_redelivered(js, task_id, timeout=10.0):
    """Wait until the node's work consumer has delivered the assignment a second time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.consumer_info(subjects.WORK_STREAM, subjects.node_durable("n1"))
        if info.num_redelivered:
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
    await bus.publish(node.js, subjects.control_subject("n1"), CancelWork(task_id=long_task), msg_id="c1")
    queued = await assign(node.js, spec())  # waits behind the long task
    await bus.publish(node.js, subjects.control_subject("n1"), CancelWork(task_id=queued), msg_id="c2")
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


async def test_a_lora_from_a_url_is_downloaded_with_progress_on_nats(fresh_nats_url, tiny_model_dir, tmp_path):
    """The real store inside the real node: the task names a LoRA by URL (as Civitai
    links are); the node downloads it, reports progress on downloads.<node_id>, uses it."""
    from stipple_node.service import DownloadReporter
    from stipple_node.store import ModelStore
    from stipple_node.store.testing import FileServer, Served
    from stipple_node.tinyzoo import make_tiny_lora

    lora = make_tiny_lora(tmp_path / "lora.safetensors", base="sd15").read_bytes()
    settings = NodeSettings(nats_url=fresh_nats_url, node_id="n1", operator="op", heartbeat_s=0.2)
    reporter = DownloadReporter()
    stop = asyncio.Event()
    with (
        FileServer() as files,
        ModelStore(tmp_path / "store", budget_bytes=None, progress=reporter) as store,
    ):
        url = files.add("/api/download/models/1", Served(lora, filename="fox-style.safetensors", chunk_bytes=4096))
        runner = PipelineRunner({"tiny-sd": tiny_model_dir}, store=store)
        async with open_service("node-agent", settings, blobs=True, stop=stop) as ctx:
            reporter.attach(ctx, asyncio.get_running_loop(), "n1")
            events = []

            async def on_download(msg):
                events.append(msgspec.json.decode(msg.data))

            sub = await ctx.nc.subscribe(subjects.download_subject("n1"), cb=on_download)
            task = asyncio.create_task(serve(ctx, settings, runner, store))
            task_id = await assign(ctx.js, msgspec.structs.replace(spec(), loras=[LoraSpec(model=url, weight=0.9)]))
            _, result = await final_event(ctx.js, task_id)
            assert isinstance(result, ResultRevealed), result
            plain = await assign(ctx.js, spec())
            _, plain_result = await final_event(ctx.js, plain)
            with_lora_png = await ctx.blobs.get(result.images[0].key)
            plain_png = await ctx.blobs.get(plain_result.images[0].key)
            await asyncio.sleep(0.2)
            await sub.unsubscribe()
            stop.set()
            await asyncio.wait_for(task, 30)
        assert with_lora_png != plain_png  # the downloaded LoRA was applied
        assert events, "no download progress was published"
        assert events[-1]["done"] is True
        assert events[-1]["downloaded_bytes"] == len(lora)
        assert [m.ref for m in store.inventory()] == [url]
        assert len(files.requests("/api/download/models/1")) == 1  # downloaded once, then from disk


async def test_a_prefetch_request_downloads_the_model_and_announces_it(fresh_nats_url, tiny_model_dir, tmp_path):
    from stipple_common.messages import PrefetchRequest
    from stipple_node.store import ModelStore
    from stipple_node.store.testing import FileServer, Served
    from stipple_node.tinyzoo import make_tiny_lora

    lora = make_tiny_lora(tmp_path / "lora.safetensors", base="sd15").read_bytes()
    settings = NodeSettings(nats_url=fresh_nats_url, node_id="n1", operator="op", heartbeat_s=0.2)
    stop = asyncio.Event()
    with FileServer() as files, ModelStore(tmp_path / "store", budget_bytes=None) as store:
        url = files.add("/loras/fox.safetensors", Served(lora, filename="fox.safetensors"))
        runner = PipelineRunner({"tiny-sd": tiny_model_dir}, store=store)
        async with open_service("node-agent", settings, blobs=True, stop=stop) as ctx:
            task = asyncio.create_task(serve(ctx, settings, runner, store))
            await asyncio.sleep(0.3)
            first = node_event_decoder.decode(
                (await ctx.js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject("n1", "joined"))).data
            )
            assert url not in first.models_on_disk
            request = PrefetchRequest(ref=url, kind="lora")
            await bus.publish(ctx.js, subjects.control_subject("n1"), request, msg_id="p1")
            again = first
            for _ in range(100):
                raw = await ctx.js.get_last_msg(subjects.NODES_STREAM, subjects.node_subject("n1", "joined"))
                again = node_event_decoder.decode(raw.data)
                if url in again.models_on_disk:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 30)
    assert url in again.models_on_disk
    assert again.started_at == first.started_at  # not a restart: a pause would stay
    assert [m.ref for m in store.inventory()] == [url]
