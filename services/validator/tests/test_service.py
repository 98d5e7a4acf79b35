"""The validator service on its own nats-server: decides as soon as every node has
answered, and at the deadline when some never do (no task hangs)."""

import asyncio
import time
import uuid

import pytest

from stipple_common import bus, subjects
from stipple_common.messages import (
    ImageResult,
    NodeErrored,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskSubmitted,
    TaskSucceeded,
    task_event_decoder,
)
from stipple_common.service import open_service
from stipple_common.taskspec import parse_task
from stipple_validator.service import ValidatorSettings, serve

pytestmark = pytest.mark.integration

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})


@pytest.fixture
async def js(fresh_nats_url):
    settings = ValidatorSettings(nats_url=fresh_nats_url, phash_threshold=4, deadline_grace_s=0.1)
    stop = asyncio.Event()
    async with open_service("validator", settings, stop=stop) as ctx:
        runner = asyncio.create_task(serve(ctx, settings))
        yield ctx.js
        stop.set()
        await asyncio.wait_for(runner, 10)


async def start_task(js, nodes=("a", "b", "c"), deadline_in=30.0):
    task_id = uuid.uuid4().hex
    await bus.publish(
        js,
        subjects.task_subject(task_id, "submitted"),
        TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time()),
        msg_id=f"{task_id}:s",
    )
    assigned = TaskAssigned(task_id=task_id, nodes=list(nodes), deadline=time.time() + deadline_in)
    await bus.publish(js, subjects.task_subject(task_id, "assigned"), assigned, msg_id=f"{task_id}:a")
    return task_id


async def reveal(js, task_id, node, phash):
    image = ImageResult(index=0, key=f"{task_id}/{node}", phash=phash, seed=1, width=64, height=64)
    event = ResultRevealed(task_id=task_id, node_id=node, images=[image])
    await bus.publish(js, subjects.task_subject(task_id, "revealed"), event, msg_id=f"{task_id}:{node}:r")


async def outcome(js, task_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await bus.read_subject(js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)
        done = [e for e in events if isinstance(e, (TaskSucceeded, TaskAborted))]
        if done:
            assert len(done) == 1
            return done[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} was never decided")


async def test_decides_as_soon_as_all_answered(js):
    task_id = await start_task(js, deadline_in=30)
    started = time.monotonic()
    for node in "abc":
        await reveal(js, task_id, node, "00000000000000ff")
    result = await outcome(js, task_id)
    assert time.monotonic() - started < 5  # well before the 30 s deadline
    assert isinstance(result, TaskSucceeded)
    assert result.reason == "unanimous"


async def test_majority_with_one_wrong_and_one_error(js):
    task_id = await start_task(js, nodes=("a", "b", "c", "d", "e"))
    for node, phash in (("a", "0" * 16), ("b", "f" * 16), ("c", "0" * 16), ("d", "0" * 16)):
        await reveal(js, task_id, node, phash)
    error = NodeErrored(task_id=task_id, node_id="e", code="out_of_memory", message="CUDA OOM")
    await bus.publish(js, subjects.task_subject(task_id, "errored"), error, msg_id="e")
    result = await outcome(js, task_id)
    assert isinstance(result, TaskSucceeded)
    assert result.verdicts == {"a": "agree", "b": "mismatch", "c": "agree", "d": "agree", "e": "error"}


async def test_deadline_decides_with_what_is_in(js):
    task_id = await start_task(js, deadline_in=1.0)
    await reveal(js, task_id, "a", "0" * 16)
    await reveal(js, task_id, "b", "0" * 16)
    result = await outcome(js, task_id)
    assert isinstance(result, TaskSucceeded)
    assert result.verdicts["c"] == "timeout"


async def test_nothing_by_the_deadline_aborts(js):
    task_id = await start_task(js, deadline_in=0.5)
    result = await outcome(js, task_id)
    assert isinstance(result, TaskAborted)
    assert result.reason == "too_few_results"
    assert result.verdicts == {"a": "timeout", "b": "timeout", "c": "timeout"}
