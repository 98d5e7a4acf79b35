"""Secret sampled validation through the real services (in one process, the tiny model):
a task the sample does not draw runs on one node and succeeds on its result; `full`
validation runs on three; every outcome carries the VRF proof that the dispatcher's
published key verifies, as `stipple audit` checks."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from nats.js.api import KeyValueConfig

from stipple_common import bus, records, subjects
from stipple_common.messages import TaskAssigned, TaskSubmitted, TaskSucceeded, Validation, decode_task_event
from stipple_common.taskspec import parse_task
from stipple_node.pipeline import PipelineRunner
from stipple_node.service import NodeAgent
from stipple_testkit.network import Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = [("node-1", NodeAgent), ("node-2", NodeAgent), ("node-3", NodeAgent)]


async def submit(net: Network, validation: Validation = "sampled") -> str:
    app = await net.client("gateway")
    task_id = uuid.uuid4().hex
    config = {"image_width": 64, "image_height": 64, "steps": 4, "seed": 7}
    spec = parse_task({"base_model": "tiny-sd", "prompt": "a red fox", "task_config": config})
    event = TaskSubmitted(task_id=task_id, spec=spec, submitted_at=time.time(), validation=validation)
    await bus.publish_event(app.js, event)
    return task_id


async def assigned(net: Network, task_id: str) -> TaskAssigned:
    app = await net.client("gateway")
    msgs = await bus.read_messages(app.js, subjects.TASKS_STREAM, subjects.task_subject(task_id, "assigned"))
    event = decode_task_event(msgs[0].subject, msgs[0].data)
    assert isinstance(event, TaskAssigned)
    return event


async def test_an_undrawn_task_runs_on_one_node_and_a_full_one_on_three_with_proofs_the_published_key_verifies(
    fresh_nats_url: str, runner: PipelineRunner
) -> None:
    async with Network.plain(fresh_nats_url) as net:
        await net.control_plane_and_nodes(
            runner, NODES, dispatcher={"validation_rate": 0.0}, validator={"phash_threshold": 2}
        )
        await asyncio.sleep(1.0)  # nodes announce themselves
        alone = await submit(net)
        outcome = await net.outcome(alone)
        assert isinstance(outcome, TaskSucceeded), outcome
        assert outcome.reason == "unanimous"
        assert len(outcome.verdicts) == 1
        assert list(outcome.verdicts.values()) == ["agree"]
        assert len((await assigned(net, alone)).nodes) == 1

        full = await submit(net, "full")
        compared = await net.outcome(full)
        assert isinstance(compared, TaskSucceeded), compared
        assert set(compared.verdicts.values()) == {"agree"}
        assert len(compared.verdicts) == 3

        app = await net.client("gateway")
        kv = await app.js.create_key_value(KeyValueConfig(bucket=subjects.SAMPLING_BUCKET, history=1))
        (public,) = await records.keys(kv)
        published = await records.get(kv, public, records.sampling_key_decoder)
        assert published is not None
        assert published.rate == 0.0
        for task_id, result in ((alone, outcome), (full, compared)):
            proof = result.sampling
            assert proof is not None
            assert proof == (await assigned(net, task_id)).sampling
            assert proof.check(task_id, bytes.fromhex(published.public_key))
            assert not proof.selected  # rate 0: `full` is the app's choice, not the sample's
