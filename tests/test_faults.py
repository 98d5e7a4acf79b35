"""Nothing is lost: services are SIGKILLed in the middle of tasks and restarted, and
every task still ends, exactly once, with the right outcome.

The real network as processes (LocalNetwork, as `stipple up` runs it). Each test
submits a batch over HTTP, kills one service while the batch is in flight, restarts it,
and then checks every task's events in the stream: one outcome each, `succeeded`, and
no honest node judged wrong.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from stipple_cli.network import LocalNetwork
from stipple_common import bus, subjects
from stipple_common.messages import TaskAborted, TaskCancelled, TaskSucceeded, decode_task_event

# The network runs as processes (eight interpreters importing torch and the services): its
# start takes up to a minute and more on a cold machine, so these modules have five, and
# they share one test worker (xdist_group "process-networks", see conftest.py) instead of starting two at once.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.xdist_group("process-networks"),
]

BATCH = 6


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = LocalNetwork(
        data_dir=tmp_path_factory.mktemp("faults"),
        port=0,
        nodes=3,
        extra_env={
            "STIPPLE_VALIDATION_RATE": "1",  # every task on three nodes: a killed one leaves two
            "STIPPLE_TASK_TIMEOUT_S": "20",  # a killed node's commitment is given up after this
            "STIPPLE_DISPATCH_TIMEOUT_S": "120",  # queued tasks outwait a restart
        },
    )
    net.start(timeout=240)
    yield net
    net.stop()


def submit_batch(network: LocalNetwork, steps: int = 6) -> list[str]:
    task_ids = []
    with httpx.Client(base_url=network.gateway_url, timeout=30) as http:
        for i in range(BATCH):
            body = {
                "base_model": "tiny-sd",
                "prompt": f"a lighthouse, take {i}",
                "task_config": {"image_width": 128, "image_height": 128, "steps": steps, "seed": 100 + i},
            }
            response = http.post("/v1/tasks", json=body)
            assert response.status_code == 202, response.text
            task_ids.append(response.json()["task_id"])
    return task_ids


async def outcomes(nats_url: str, task_ids: list[str], timeout: float = 150.0) -> dict[str, list]:
    """Every outcome event of every task, once all have one (or the time is up)."""
    nc = await bus.connect(nats_url, "fault-test")
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while True:
            found = {}
            for task_id in task_ids:
                msgs = await bus.read_messages(js, subjects.TASKS_STREAM, subjects.task_events(task_id))
                events = [decode_task_event(m.subject, m.data) for m in msgs]
                found[task_id] = [e for e in events if isinstance(e, (TaskSucceeded, TaskAborted, TaskCancelled))]
            if all(found.values()) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)
    finally:
        await nc.drain()


def check_all_succeeded_once(found: dict[str, list], honest: set[str]) -> None:
    missing = [task_id for task_id, events in found.items() if not events]
    assert not missing, f"tasks that never ended: {missing}"
    for task_id, events in found.items():
        assert len(events) == 1, f"task {task_id} ended {len(events)} times: {events}"
        (outcome,) = events
        assert isinstance(outcome, TaskSucceeded), f"task {task_id}: {outcome}"
        for node, verdict in outcome.verdicts.items():
            if node in honest:
                assert verdict in ("agree", "timeout"), f"task {task_id}: honest {node} judged {verdict}"


def wait_live(network: LocalNetwork, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = network.health()
        if health and health.get("live_nodes", 0) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"only {network.health()} after {timeout} s")


@pytest.mark.parametrize("victim", ["dispatcher", "validator"])
async def test_a_control_service_killed_mid_batch_loses_nothing(network: LocalNetwork, victim: str) -> None:
    task_ids = submit_batch(network)
    await asyncio.sleep(0.5)  # some tasks assigned, some queued, some committed
    network.kill(victim)
    await asyncio.sleep(2.0)
    network.restart(victim)
    found = await outcomes(network.admin_url(), task_ids)
    check_all_succeeded_once(found, honest=set(network.node_ids().values()))


async def test_a_node_killed_mid_task_is_timed_out_and_the_tasks_still_end(network: LocalNetwork) -> None:
    wait_live(network, 3)
    task_ids = submit_batch(network, steps=20)
    ids = network.node_ids()
    victim_task = await computing(network.admin_url(), task_ids, ids["node-2"])
    network.kill("node-2")
    # the task goes on without it: at the commit deadline the two others decide it
    first = await outcomes(network.admin_url(), [victim_task], timeout=60)
    assert first[victim_task], "the task of the killed node never ended"
    network.restart("node-2")  # back with a new process; the queued tasks need it
    found = await outcomes(network.admin_url(), task_ids, timeout=240)
    check_all_succeeded_once(found, honest=set(ids.values()))
    assert found[victim_task][0].verdicts == {ids["node-1"]: "agree", ids["node-2"]: "timeout", ids["node-3"]: "agree"}
    assert found[victim_task][0].qos[ids["node-2"]] == 0


async def computing(nats_url: str, task_ids: list[str], node: str, timeout: float = 60.0) -> str:
    """A task `node` has started and not yet committed (the moment to kill it)."""
    nc = await bus.connect(nats_url, "fault-test-watch")
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for task_id in task_ids:
                msgs = await bus.read_messages(js, subjects.TASKS_STREAM, subjects.task_events(task_id))
                events = [decode_task_event(m.subject, m.data) for m in msgs]
                mine = {type(e).__name__ for e in events if getattr(e, "node_id", None) == node}
                if mine == {"TaskStarted"}:
                    return task_id
            await asyncio.sleep(0.02)
    finally:
        await nc.drain()
    raise AssertionError(f"{node} never started a task")
