"""The whole network on a real three-server NATS cluster with R3 streams, as production runs
it: the SIGKILL of the TASKS stream's leader while tasks run, and, once it is back, of
another server, and then of the JetStream meta leader (found through a server's /jsz).
Every task still ends exactly once (`Network.outcome` checks that), with the outcome
honest nodes earn: succeeded, and no node judged slashable. Once with one validator, once
with two partitioned ones (STIPPLE_PARTITIONS: the VALIDATION copy and the partition
leases through the same elections)."""

from __future__ import annotations

import asyncio

import pytest

from stipple_common import subjects
from stipple_common.messages import SLASHABLE
from stipple_node.pipeline import PipelineRunner
from stipple_testkit.cluster import NatsCluster, every_replica_current, stream_leader
from stipple_testkit.network import Network

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # 4 of 10 runs passed before handlers waited out an away bus in place (bus.patiently)
    # and the validator's reveal deadline moved by the time the bus was away. One clean-clone
    # CI run then had a task stuck with its commitments stored and no reveal opened; since the
    # validator's sweep (Validator.sweep_once), 10 of 10 runs passed here, 6 of them beside
    # another test process loading both cores. A third failed in the partitioned case, a task
    # not ended in 120 s: the server's copy into VALIDATION stalls after a kill (30 s or
    # more); the validator now restarts it (copywatch.py; bench/cluster_chaos.py measures it).
]


@pytest.mark.timeout(400)  # a cluster, the network, 16 tasks and three leader elections: 40 to 85 s here
@pytest.mark.parametrize("partitions", [1, 4], ids=["one-validator", "two-partitioned-validators"])
async def test_every_task_ends_once_through_the_sigkill_of_the_stream_leader_and_then_another_server(
    runner: PipelineRunner, partitions: int
) -> None:
    with NatsCluster.start(3) as cluster:
        await cluster.wait_ready()
        async with Network.plain(cluster.url) as net:
            js = await net.replicated(runner, partitions=partitions)

            async def batch(seeds: range) -> list[str]:
                outcomes = await asyncio.gather(*(net.run_task(seed=s, timeout=120) for s in seeds))
                verdicts = {v for outcome in outcomes for v in getattr(outcome, "verdicts", {}).values()}
                slashed = verdicts & set(SLASHABLE)
                assert not slashed, f"honest nodes judged {slashed} through a server's loss"
                return [type(outcome).__name__ for outcome in outcomes]

            assert await batch(range(0, 2)) == ["TaskSucceeded"] * 2  # the network works on the cluster

            leader = await stream_leader(js, subjects.TASKS_STREAM)
            running = asyncio.create_task(batch(range(10, 16)))
            await asyncio.sleep(0.5)  # tasks under way
            killed = int(leader.removeprefix("n"))
            cluster.kill(killed)
            assert await running == ["TaskSucceeded"] * 6
            assert await stream_leader(js, subjects.TASKS_STREAM) != leader

            cluster.restart(killed)
            await cluster.wait_ready()
            await every_replica_current(js)  # as a PodDisruptionBudget waits before the next server goes
            other = (killed + 1) % 3
            running = asyncio.create_task(batch(range(20, 24)))
            await asyncio.sleep(0.5)
            cluster.kill(other)
            assert await running == ["TaskSucceeded"] * 4

            cluster.restart(other)
            await cluster.wait_ready()
            await every_replica_current(js)
            meta = await cluster.meta_leader()  # the server that places streams and consumers
            running = asyncio.create_task(batch(range(30, 34)))
            await asyncio.sleep(0.5)
            cluster.kill(meta)
            assert await running == ["TaskSucceeded"] * 4
            assert await cluster.meta_leader() != meta
