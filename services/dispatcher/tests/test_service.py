"""The dispatcher service itself, on its own nats-server: assignment, idempotent
redelivery, and giving up (never hanging) when no node can take a task."""

import asyncio
import time
import uuid

import pytest

from stipple_common import bus, subjects
from stipple_common.messages import (
    NodeHeartbeat,
    NodeJoined,
    TaskAborted,
    TaskAssigned,
    TaskSubmitted,
    assignment_decoder,
    task_event_decoder,
)
from stipple_common.service import open_service
from stipple_common.taskspec import parse_task
from stipple_dispatcher.service import DispatcherSettings, serve

pytestmark = pytest.mark.integration


async def announce(js, node_id, operator, models=("tiny-sd",)):
    joined = NodeJoined(
        node_id=node_id, operator=operator, device="cpu", memory_bytes=1, models=list(models), version="0", started_at=0
    )
    await bus.publish(js, subjects.node_subject(node_id, "joined"), joined, msg_id=f"{node_id}:j")
    beat = NodeHeartbeat(node_id=node_id, at=time.time())
    await bus.publish(js, subjects.node_subject(node_id, "heartbeat"), beat, msg_id=f"{node_id}:hb")


async def events_of(js, task_id):
    return await bus.read_subject(js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)


async def wait_for_event(js, task_id, kind, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in await events_of(js, task_id) if isinstance(e, kind)]
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind.__name__} for {task_id}: {await events_of(js, task_id)}")


async def work_counts(js):
    """Messages waiting per work subject (the WORK stream is a work queue: it can't be browsed)."""
    info = await js.stream_info(subjects.WORK_STREAM, subjects_filter="work.>")
    return dict(info.state.subjects or {})


@pytest.fixture
async def dispatcher(fresh_nats_url):
    settings = DispatcherSettings(nats_url=fresh_nats_url, dispatch_timeout_s=1.0, task_timeout_s=60)
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        for i in range(4):
            await announce(ctx.js, f"n{i}", f"op{i % 3}")  # n0 and n3 share an operator
        runner = asyncio.create_task(serve(ctx, settings))
        yield ctx.js
        stop.set()
        await asyncio.wait_for(runner, 10)


def submitted(model="tiny-sd"):
    spec = parse_task({"base_model": model, "prompt": "p", "task_config": {"seed": 1}})
    return TaskSubmitted(task_id=uuid.uuid4().hex, spec=spec, submitted_at=time.time())


async def test_assigns_three_nodes_of_distinct_operators_and_sends_their_work(dispatcher):
    js = dispatcher
    event = submitted()
    await bus.publish(js, subjects.task_subject(event.task_id, "submitted"), event, msg_id="a")
    (assigned,) = await wait_for_event(js, event.task_id, TaskAssigned)
    assert len(set(assigned.nodes)) == 3
    assert not {"n0", "n3"} <= set(assigned.nodes)
    assert assigned.deadline > time.time() + 50
    assert await work_counts(js) == {subjects.work_subject(n): 1 for n in assigned.nodes}
    for node_id in assigned.nodes:
        raw = await js.get_last_msg(subjects.WORK_STREAM, subjects.work_subject(node_id))
        work = assignment_decoder.decode(raw.data)
        assert work.task_id == event.task_id
        assert work.spec == event.spec
        assert work.deadline == assigned.deadline

    # A redelivered submission (say the dispatcher died before its ack) re-sends the same work, once.
    await bus.publish(js, subjects.task_subject(event.task_id, "submitted"), event, msg_id="b")
    await asyncio.sleep(0.5)
    assert len([e for e in await events_of(js, event.task_id) if isinstance(e, TaskAssigned)]) == 1
    assert await work_counts(js) == {subjects.work_subject(n): 1 for n in assigned.nodes}


async def test_a_task_no_node_can_serve_is_aborted_not_left_waiting(dispatcher):
    js = dispatcher
    event = submitted(model="sdxl")
    await bus.publish(js, subjects.task_subject(event.task_id, "submitted"), event, msg_id="c")
    (aborted,) = await wait_for_event(js, event.task_id, TaskAborted)
    assert aborted.reason == "no_nodes"
    assert "serving model 'sdxl'" in aborted.detail
