"""Stipple's streams on a real three-server NATS cluster (R3), as production runs them:
replication is never lowered by a default, and what JetStream acknowledged survives the
SIGKILL of the stream's leader."""

from __future__ import annotations

import asyncio

import nats
import pytest

from stipple_common import bus, subjects
from stipple_testkit.cluster import NatsCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def cluster():
    with NatsCluster.start(3) as started:
        await started.wait_ready()
        yield started


async def connect(cluster: NatsCluster) -> nats.NATS:
    return await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)


@pytest.mark.timeout(120)  # three servers start and elect a meta leader: 5-10 s here, longer beside another worker
async def test_a_process_with_the_default_replicas_does_not_turn_r3_streams_into_r1(cluster):
    nc = await connect(cluster)
    try:
        js = nc.jetstream(timeout=10)
        await bus.ensure_streams(js, subjects.stream_configs(replicas=3))
        assert (await js.stream_info(subjects.TASKS_STREAM)).config.num_replicas == 3

        await bus.ensure_streams(js, subjects.stream_configs(replicas=1))  # a pod without STIPPLE_STREAM_REPLICAS
        for config in subjects.stream_configs():
            assert (await js.stream_info(config.name)).config.num_replicas == 3, config.name
    finally:
        await nc.close()


@pytest.mark.timeout(180)  # as above, and a new stream leader is elected after the kill
async def test_what_was_acknowledged_survives_the_sigkill_of_the_stream_leader(cluster):
    nc = await connect(cluster)
    try:
        js = nc.jetstream(timeout=5)
        await bus.ensure_streams(js, subjects.stream_configs(replicas=3))
        acked: list[str] = []

        async def publish(i: int) -> None:
            subject = subjects.task_subject(f"{i:032x}", "submitted")
            for _ in range(100):  # while the cluster elects a new leader, publishes fail: retry (same msg id)
                try:
                    await js.publish(subject, b"{}", headers={"Nats-Msg-Id": f"m{i}"}, timeout=2)
                    acked.append(subject)
                    return
                except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                    await asyncio.sleep(0.1)
            raise AssertionError(f"message {i} was never acknowledged")

        for i in range(50):
            await publish(i)
        leader = (await js.stream_info(subjects.TASKS_STREAM)).cluster.leader
        index = int(leader.removeprefix("n"))
        cluster.kill(index)
        for i in range(50, 100):
            await publish(i)

        info = await js.stream_info(subjects.TASKS_STREAM)
        assert info.cluster.leader != leader
        assert info.state.messages == 100  # every acknowledged message, once (the retries deduplicated)
        assert len(set(acked)) == 100

        cluster.restart(index)  # the old leader comes back and catches up
        for _ in range(100):
            info = await js.stream_info(subjects.TASKS_STREAM)
            replicas = info.cluster.replicas or []
            if len(replicas) == 2 and all(r.current for r in replicas):
                break
            await asyncio.sleep(0.2)
        assert all(r.current for r in info.cluster.replicas or []), info.cluster
    finally:
        await nc.close()
