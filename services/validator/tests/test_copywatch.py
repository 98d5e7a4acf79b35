"""The watch on the server's copy of TASKS into VALIDATION (copywatch.py): what counts as a
stall, and, on a real three-server cluster, that a copy keeping up is never stepped down
while one that stopped is, by the replica holding partition 0 only."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from stipple_common import bus, subjects
from stipple_testkit.cluster import NatsCluster
from stipple_validator.copywatch import CopyProgress, watch_copy
from stipple_validator.service import ValidatorSettings, ensure_validation_stream


def test_a_copy_that_moves_is_never_stalled():
    progress = CopyProgress(stall_s=5.0)
    for second in range(60):  # TASKS grows every second, and so does the copy
        assert not progress.observe(validation_seq=second, tasks_seq=second + 3, now=float(second))


def test_a_quiet_network_is_never_stalled_however_long_nothing_is_copied():
    progress = CopyProgress(stall_s=5.0)
    progress.observe(validation_seq=10, tasks_seq=40, now=0.0)
    assert not any(progress.observe(validation_seq=10, tasks_seq=40, now=float(t)) for t in range(1, 600))


def test_tasks_ahead_of_a_copy_that_stands_still_is_a_stall_after_stall_s():
    progress = CopyProgress(stall_s=5.0)
    progress.observe(validation_seq=10, tasks_seq=40, now=0.0)
    assert not progress.observe(validation_seq=10, tasks_seq=41, now=1.0)  # behind since 1.0
    assert not progress.observe(validation_seq=10, tasks_seq=45, now=5.9)
    assert progress.observe(validation_seq=10, tasks_seq=45, now=6.0)


def test_a_message_stored_between_the_two_reads_is_not_a_stall_once_copied():
    progress = CopyProgress(stall_s=5.0)
    progress.observe(validation_seq=10, tasks_seq=41, now=0.0)  # 41 stored after VALIDATION was read
    assert not progress.observe(validation_seq=11, tasks_seq=41, now=1.0)  # and copied: moving again
    assert not any(progress.observe(validation_seq=11, tasks_seq=41, now=float(t)) for t in range(2, 60))


def test_each_restart_that_did_not_help_doubles_the_wait_for_the_next_until_the_copy_moves():
    progress = CopyProgress(stall_s=5.0, most_s=30.0)
    progress.observe(validation_seq=10, tasks_seq=40, now=0.0)
    progress.observe(validation_seq=10, tasks_seq=42, now=1.0)
    assert progress.observe(validation_seq=10, tasks_seq=42, now=6.0)
    waits = []
    now = 6.0
    for _ in range(5):  # TASKS without a leader, say: stepping down again and again would not help
        progress.restarted(now=now)
        wait = progress.patience_s
        assert not progress.observe(validation_seq=10, tasks_seq=43, now=now + wait - 0.1)
        assert progress.observe(validation_seq=10, tasks_seq=43, now=now + wait)
        waits.append(wait)
        now += wait
    assert waits == [10.0, 20.0, 30.0, 30.0, 30.0]
    assert not progress.observe(validation_seq=12, tasks_seq=43, now=now + 1)  # the copy moves again
    assert progress.patience_s == 5.0


@pytest.fixture
async def cluster_js():
    with NatsCluster.start(3) as cluster:
        await cluster.wait_ready()
        nc = await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream(timeout=5)
            await bus.ensure_streams(js, subjects.stream_configs(replicas=3))
            settings = ValidatorSettings(nats_url=cluster.url, partitions=2, stream_replicas=3)
            await ensure_validation_stream(js, settings)
            yield js
        finally:
            await nc.close()


async def leader(js) -> str:
    return (await js.stream_info(subjects.VALIDATION_STREAM)).cluster.leader


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)  # three servers start and elect a meta leader; two streams at R3
async def test_on_a_cluster_a_copy_that_keeps_up_is_left_alone_and_one_that_stopped_is_stepped_down(cluster_js):
    js = cluster_js
    stop = asyncio.Event()
    restarts: list[str] = []
    holds_partition_0 = asyncio.Event()
    watching = asyncio.create_task(
        watch_copy(
            js, stop, holds_partition_0.is_set, stall_s=1.0, every_s=0.2, on_restart=lambda: restarts.append("x")
        )
    )

    async def traffic(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await js.publish(subjects.task_subject(uuid.uuid4().hex, "submitted"), b"{}")
            await asyncio.sleep(0.05)

    try:
        holds_partition_0.set()
        first = await leader(js)
        await traffic(4.0)  # the copy keeps up: 80 messages, none stepped down for
        assert restarts == []
        assert await leader(js) == first

        # The copy stops (its source removed, as when the server's source consumer is lost):
        # TASKS goes on, VALIDATION stands still.
        info = await js.stream_info(subjects.VALIDATION_STREAM)
        info.config.sources = []
        await js.update_stream(info.config)
        holds_partition_0.clear()  # another replica holds partition 0: this one does nothing
        await traffic(2.5)
        assert restarts == []
        assert await leader(js) == first

        holds_partition_0.set()
        await traffic(2.5)
        assert restarts, "a stalled copy was not stepped down"
        for _ in range(50):  # the election that follows
            try:
                now = await leader(js)
            except (nats.errors.Error, TimeoutError):
                now = ""
            if now and now != first:
                break
            await asyncio.sleep(0.2)
        assert now not in ("", first), f"VALIDATION still led by {first}"
    finally:
        stop.set()
        await watching
