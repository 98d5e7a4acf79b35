"""Two dispatchers on one nats-server, active/standby by the lease (STIPPLE_LEASE_S):
while both run only the holder consumes, and when it dies without a word (cancelled, its
connection closed, its lease not released: as a SIGKILL) the standby takes the lease
after its ttl and assigns the tasks submitted afterwards."""

import asyncio
import time
import uuid

import pytest
from nats.js.api import KeyValueConfig

from stipple_common import bus, subjects
from stipple_common.identity import dev_node_id
from stipple_common.messages import (
    IndexedStake,
    NodeHeartbeat,
    TaskAssigned,
    TaskSubmitted,
    encode,
    task_event_decoder,
)
from stipple_common.service import open_service, serve_as_leader
from stipple_common.taskspec import parse_task
from stipple_dispatcher.service import DispatcherSettings, serve
from stipple_testkit.nodes import joined

pytestmark = pytest.mark.integration


async def announce(js, name):
    """Node `name`, staked by an operator of its own, joins and beats once."""
    node_id = dev_node_id(name)
    stakes = await js.create_key_value(KeyValueConfig(bucket=subjects.STAKES_BUCKET, history=1))
    await stakes.put(node_id, encode(IndexedStake(stake=1000, owner=dev_node_id(f"op-{name}"))))
    await bus.publish(js, subjects.node_subject(node_id, "joined"), joined(node_id, models=("tiny-sd",)), msg_id=name)
    beat = NodeHeartbeat(node_id=node_id, at=time.time())
    await bus.publish(js, subjects.node_subject(node_id, "heartbeat"), beat, msg_id=f"{name}:hb")


async def submit(js):
    spec = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})
    event = TaskSubmitted(task_id=uuid.uuid4().hex, spec=spec, submitted_at=time.time())
    await bus.publish(js, subjects.task_subject(event.task_id, "submitted"), event, msg_id=event.task_id)
    return event.task_id


async def assigned(js, task_id, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await bus.read_subject(js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)
        found = [e for e in events if isinstance(e, TaskAssigned)]
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{task_id} was never assigned")


async def test_the_standby_dispatcher_takes_over_a_killed_active_one(fresh_nats_url):
    served: list[str] = []  # which instance started serving (consuming), in order

    def recorded(instance):
        async def serving(ctx, settings):
            served.append(instance)
            await serve(ctx, settings)

        return serving

    def settings_of(instance):
        return DispatcherSettings(
            nats_url=fresh_nats_url,
            lease_s=2.0,  # renewed every 2/3 s: room for a loaded machine's stalls
            instance=instance,
            validation_rate=1.0,  # three nodes a task, always
            dispatch_timeout_s=10.0,
            task_timeout_s=60,
            node_ttl_s=120,  # the nodes beat once: live for the whole test
        )

    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    a_service = open_service("dispatcher", settings_of("d0"), stop=stop_a)
    a = await a_service.__aenter__()
    for i in range(6):  # enough free nodes for two tasks, whoever knows of the first
        await announce(a.js, f"n{i}")
    a_runs = asyncio.create_task(serve_as_leader(a, "dispatcher", settings_of("d0"), recorded("d0")))
    async with open_service("dispatcher", settings_of("d1"), stop=stop_b) as b:
        b_runs = asyncio.create_task(serve_as_leader(b, "dispatcher", settings_of("d1"), recorded("d1")))
        try:
            first = await submit(b.js)
            await assigned(b.js, first)
            assert served == ["d0"]  # the standby never consumed: the task was the holder's alone

            await a.nc.close()  # as a SIGKILL: the connection gone, the lease not released
            a_runs.cancel()
            stop_a.set()  # only so that its cancelled serve() can finish its own clean-up (its clock task)
            await asyncio.gather(a_runs, return_exceptions=True)
            await a_service.__aexit__(None, None, None)
            assert not b_runs.done()

            second = await submit(b.js)
            (assignment,) = await assigned(b.js, second)
            assert len(assignment.nodes) == 3
            assert served == ["d0", "d1"]  # the standby, once it held the lease after its ttl
        finally:
            stop_b.set()
            await asyncio.wait_for(b_runs, 10)
