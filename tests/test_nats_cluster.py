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


@pytest.mark.timeout(240)  # as above, and twenty rounds of declarations: about 10 s here
async def test_replicas_that_start_together_on_a_cluster_all_declare_what_they_share(cluster):
    """Replicas started at once declare the same R3 streams, KV buckets, object store and
    partitioned VALIDATION stream at the same moment. On a cluster the loser of a create is
    answered 10058 (in use) and then, for a moment, 404 to the stream's info: that ended a
    validator's start in CI (and, the network's stop being shared in the test kit, the whole
    network's). Every declarer must come through every round (`bus.settling`)."""
    from nats.js.api import KeyValueConfig

    from stipple_common.blobstore.jetstream import JetStreamBlobStore
    from stipple_validator.service import ValidatorSettings, ensure_validation_stream

    conns = [await connect(cluster) for _ in range(3)]
    try:
        contexts = [nc.jetstream(timeout=5) for nc in conns]
        settings = ValidatorSettings(nats_url=cluster.url, partitions=4, stream_replicas=3)
        configs = subjects.stream_configs(replicas=3)

        declarations = (
            lambda js: bus.ensure_streams(js, configs),
            lambda js: bus.key_value(js, KeyValueConfig(bucket=subjects.LEASES_BUCKET, history=1, replicas=3)),
            lambda js: JetStreamBlobStore.open(js, "declared", replicas=3),
            lambda js: ensure_validation_stream(js, settings),
        )
        for _ in range(20):
            for declaration in declarations:  # every replica at the same moment
                results = await asyncio.gather(*(declaration(js) for js in contexts), return_exceptions=True)
                assert [r for r in results if isinstance(r, BaseException)] == []
            first = contexts[0]
            for stream in (
                *(c.name for c in configs),
                subjects.VALIDATION_STREAM,
                f"KV_{subjects.LEASES_BUCKET}",
                "OBJ_declared",
            ):
                assert (await first.stream_info(stream)).config.num_replicas == 3, stream
                await first.delete_stream(stream)
    finally:
        for nc in conns:
            await nc.close()
