"""A node whose images the intake refuses for good (before it committed) says so: an
`errored` event with the refusal's code, so the task goes on without it at once. Given up
in silence, as a refused retry once was (`exists` after a lost answer, in a CI run), the
node kept its slot and the task waited for it until its deadline."""

from __future__ import annotations

import asyncio

import pytest

from stipple_common import bus, subjects
from stipple_common.messages import NodeErrored, TaskAborted, decode_task_event
from stipple_node.pipeline import PipelineRunner
from stipple_node.service import NodeAgent
from stipple_testkit.network import Network

pytestmark = pytest.mark.integration


async def test_a_node_whose_upload_is_refused_for_good_says_so_and_the_task_ends(
    fresh_nats_url: str, runner: PipelineRunner
) -> None:
    async with Network.plain(fresh_nats_url) as net:
        await net.gatekeeper(max_blob_bytes=200)  # every image is larger: `too_large`, for good
        await net.dispatcher()
        await net.validator(phash_threshold=2)
        for name in ("node-1", "node-2", "node-3"):
            await net.node(runner, name, NodeAgent)
        await asyncio.sleep(1.0)  # nodes announce themselves
        outcome = await net.run_task(timeout=50)  # (the task's deadline is later: no waiting it out)
        assert isinstance(outcome, TaskAborted), outcome
        assert outcome.reason == "too_few_results", outcome
        assert set(outcome.verdicts.values()) == {"error"}, outcome.verdicts  # honest: nobody slashed or paused
        js = (await net.client()).js
        events = [
            decode_task_event(m.subject, m.data)
            for m in await bus.read_messages(js, subjects.TASKS_STREAM, subjects.task_events(outcome.task_id))
        ]
        errors = [e for e in events if isinstance(e, NodeErrored)]
        assert sorted(e.node_id for e in errors) == sorted(outcome.verdicts)
        assert {e.code for e in errors} == {"upload_refused"}
        assert all("too_large" in e.message for e in errors), errors
