"""Task ids from Idempotency-Keys: the same at every gateway of a network, unpredictable to
the app (they decide the validator partition; stipple_gateway.taskids)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time

import httpx
import nats
import pytest

from stipple_common import bus, subjects
from stipple_common.blobstore import open_blob_store
from stipple_common.identity import dev_node_id
from stipple_common.messages import task_event_decoder
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_common.settings import InvalidSettings
from stipple_gateway import taskids
from stipple_gateway.app import create_app
from stipple_gateway.settings import GatewaySettings
from stipple_gateway.tasks import TaskService
from stipple_testkit.nodes import joined

TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}


async def gateway(url: str, **settings: str) -> TaskService:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await bus.ensure_streams(js, subjects.stream_configs())
    blobs = await open_blob_store(backend="jetstream", js=js, bucket="ids")
    gw = TaskService(nc, js, blobs, NodeDirectory(ttl_s=10), GatewaySettings(**settings), Metrics("gateway"))
    for name in ("node-a", "node-b", "node-c"):  # live nodes, or a task is refused (422)
        gw.directory.apply(joined(dev_node_id(name)), seen_at=time.time())
    return gw


async def test_every_gateway_of_a_network_derives_the_same_id_and_the_app_cannot(fresh_nats_url: str) -> None:
    replicas = [await gateway(fresh_nats_url) for _ in range(3)]
    other_network = await gateway(fresh_nats_url, task_id_secret="ab" * 32)
    try:
        with pytest.raises(RuntimeError, match="start"):  # no id before the secret is known
            replicas[0].new_task_id("k1")
        await asyncio.gather(*(gw.start() for gw in replicas))  # started together: one secret wins
        await other_network.start()
        ids = {gw.new_task_id("k1", "app") for gw in replicas}
        assert len(ids) == 1
        (task_id,) = ids
        assert len(task_id) == 32
        assert int(task_id, 16) >= 0
        # what an app could compute from what it knows (the derivation before the secret)
        assert task_id != hashlib.sha256(b"app\nk1").hexdigest()[:32]
        assert replicas[0].new_task_id("k1", "another app") != task_id  # two apps' keys never meet
        assert replicas[0].new_task_id("k2", "app") != task_id
        assert other_network.new_task_id("k1", "app") not in (task_id, None)
        expected = hmac.new(bytes.fromhex("ab" * 32), b"app\nk1", hashlib.sha256).hexdigest()[:32]
        assert other_network.new_task_id("k1", "app") == expected  # the operator's secret, when set
        fresh = {replicas[0].new_task_id(None, "app") for _ in range(3)}
        assert len(fresh) == 3  # no key: random
        # the secret is kept: a gateway started later (or restarted) derives the same ids
        late = await gateway(fresh_nats_url)
        await late.start()
        assert late.new_task_id("k1", "app") == task_id
        replicas.append(late)
    finally:
        for gw in [*replicas, other_network]:
            await gw.stop()
            await gw.nc.close()


async def test_a_retry_at_another_gateway_is_the_same_task(fresh_nats_url: str) -> None:
    first, second = await gateway(fresh_nats_url), await gateway(fresh_nats_url)
    try:
        await first.start()
        await second.start()
        answers = []
        for gw in (first, second):
            transport = httpx.ASGITransport(app=create_app(gw))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
                answers.append(await http.post("/v1/tasks", json=TASK, headers={"Idempotency-Key": "retry-1"}))
        assert [a.status_code for a in answers] == [202, 202], answers[0].text
        task_id = answers[0].json()["task_id"]
        assert answers[1].json()["task_id"] == task_id
        assert answers[1].json()["seed"] == answers[0].json()["seed"]
        events = await bus.read_subject(first.js, subjects.TASKS_STREAM, f"tasks.{task_id}.>", task_event_decoder)
        assert len(events) == 1  # one task submitted, not two
    finally:
        for gw in (first, second):
            await gw.stop()
            await gw.nc.close()


@pytest.mark.parametrize("value", ["12", "zz" * 32, "ab" * 31, "ab" * 33])
def test_a_malformed_secret_is_refused_at_start(value: str) -> None:
    with pytest.raises(InvalidSettings, match="STIPPLE_TASK_ID_SECRET") as refused:
        taskids.parse_secret(value)
    assert value.removeprefix("0x")[:8] not in str(refused.value)  # a secret's characters are not echoed
    assert taskids.parse_secret("") is None
    assert taskids.parse_secret("0x" + "cd" * 32) == bytes.fromhex("cd" * 32)
