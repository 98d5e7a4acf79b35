"""Joining for real, as `stipple up` and production do, and staying joined.

A secured network (authentication on, the gatekeeper's callout) whose nodes get NATS
identities that expire after a few seconds: when one expires, the server closes the
node's connection and nats-py does not reconnect by itself; the node agent joins again
(`keep_joined`), keeps what it committed (a task in flight is revealed on the new
connection), and the network goes on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from stipple_common import bus, subjects
from stipple_common.messages import TaskSubmitted, TaskSucceeded, decode_task_event
from stipple_common.taskspec import parse_task

from .kit import Network, tiny_runner

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = ("node-1", "node-2", "node-3")


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory):
    return tiny_runner(Path(tmp_path_factory.mktemp("tiny")))


async def one_task(net: Network, seed: int) -> TaskSucceeded:
    client = await net.client("gateway")
    task_id = uuid.uuid4().hex
    spec = parse_task(
        {
            "base_model": "tiny-sd",
            "prompt": "a fox",
            "task_config": {"image_width": 64, "image_height": 64, "steps": 2, "seed": seed},
        }
    )
    event = TaskSubmitted(task_id=task_id, spec=spec, submitted_at=time.time())
    await bus.publish(client.js, subjects.task_subject(task_id, "submitted"), event, msg_id=task_id)
    for _ in range(300):
        msgs = await bus.read_messages(client.js, subjects.TASKS_STREAM, subjects.task_events(task_id))
        done = [e for e in (decode_task_event(m.subject, m.data) for m in msgs) if isinstance(e, TaskSucceeded)]
        if done:
            return done[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not succeed")


async def test_a_node_whose_identity_expires_joins_again_and_keeps_working(tmp_path, runner) -> None:
    async with Network.secured(tmp_path / "nats") as net:
        await net.gatekeeper(node_identity_ttl_s=4)
        await net.dispatcher()
        await net.validator(phash_threshold=2)
        for name in NODES:
            await net.node(runner, name)
        await asyncio.sleep(1.0)
        first = await one_task(net, seed=1)
        assert set(first.verdicts.values()) == {"agree"}
        await asyncio.sleep(6.0)  # every identity expired: the server closed every node's connection
        assert all(net.nodes[name].joins >= 2 for name in NODES), {n: h.joins for n, h in net.nodes.items()}
        second = await one_task(net, seed=2)
        assert set(second.verdicts.values()) == {"agree"}
        assert set(second.verdicts) == {net.nodes[name].node_id for name in NODES}
