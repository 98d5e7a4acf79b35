"""A node that misses two of its last three tasks is paused, and comes back only by
passing the validator's check (a probe task answered in time).

The real dispatcher, validator and three real node agents (one process, their own
nats-server, the tiny model). The suspect is the real node agent that ignores its
first two assignments (a stuck GPU, say) but keeps its control consumer: the first two
tasks end with it timed out, which pauses it; with only three operators no task can be
dispatched until the check lifts the pause, and the third task then runs on all three.
"""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.msg import Msg

from stipple_common import bus, subjects
from stipple_common.identity import dev_node_id
from stipple_common.messages import NodeQos, TaskSucceeded, decode_node_event
from stipple_node.pipeline import PipelineRunner
from stipple_node.service import NodeAgent
from stipple_testkit.network import Network
from stipple_testkit.waits import until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HONEST = ("honest-1", "honest-2")
SUSPECT = "suspect"
COMMIT_TIMEOUT_S = 2.0


class StuckTwice(NodeAgent):
    """Takes its first two assignments and does nothing with them; honest afterwards."""

    ignored = 0

    async def handle(self, msg: Msg) -> bus.Redeliver | None:
        if type(self).ignored < 2:
            type(self).ignored += 1
            return None
        return await super().handle(msg)


async def test_a_paused_node_works_again_only_after_passing_the_check(
    fresh_nats_url: str, runner: PipelineRunner
) -> None:
    qos_events: list[NodeQos] = []
    suspect, honest = dev_node_id(SUSPECT), [dev_node_id(name) for name in HONEST]
    async with Network.plain(fresh_nats_url) as net:
        agents = [(HONEST[0], NodeAgent), (SUSPECT, StuckTwice), (HONEST[1], NodeAgent)]
        await net.control_plane_and_nodes(
            runner,
            agents,
            dispatcher={"task_timeout_s": COMMIT_TIMEOUT_S},
            validator={"phash_threshold": 2, "deadline_grace_s": 0.1, "probe_every_s": 0.3},
        )
        app = await net.client()

        async def on_qos(msg: Msg) -> None:
            event = decode_node_event(msg.subject, msg.data)
            if isinstance(event, NodeQos) and event.node_id == suspect:
                qos_events.append(event)

        await app.nc.subscribe(subjects.node_subject(suspect, "qos"), cb=on_qos)
        await asyncio.sleep(1.0)  # nodes announce themselves

        for seed in (1, 2):
            outcome = await net.run_task(seed=seed, steps=2, prompt="a lighthouse", timeout=30)
            assert isinstance(outcome, TaskSucceeded), outcome
            assert outcome.verdicts[suspect] == "timeout"
        third = await net.run_task(seed=3, steps=2, prompt="a lighthouse", timeout=30)

        # the validator scores the third task when it folds the outcome, after the outcome is
        # out: wait for that QoS update before the network stops (a loaded machine lost it)
        async def third_scored() -> bool:
            return any(e.task_id == third.task_id for e in qos_events)

        await until("the third task's QoS update", third_scored, timeout=15)

    assert isinstance(third, TaskSucceeded), third
    assert third.verdicts == {honest[0]: "agree", suspect: "agree", honest[1]: "agree"}
    # paused after the second timeout, cleared by a probe, then scored on the third task
    paused = next(i for i, e in enumerate(qos_events) if e.recent_timeouts >= 2)
    cleared = next(i for i, e in enumerate(qos_events) if e.task_id.startswith("probe:"))
    assert any(e.task_id == third.task_id for e in qos_events), "the third task was never scored"
    scored = next(i for i, e in enumerate(qos_events) if e.task_id == third.task_id)
    assert paused < cleared < scored
    assert qos_events[cleared].recent_timeouts == 0
    assert qos_events[scored].recent_timeouts == 0
