"""Tasks through NATS server kills, with the partitioned validator's copy watch off and on.

The network of tests/test_cluster_faults.py (a three-server cluster, R3 streams, the
gatekeeper, the dispatcher, two partitioned validators on 4 partitions with 2 s leases,
three real node agents on the built-in tiny model, all in this process) takes
`--cycles` rounds of: 4 tasks submitted, then, after a seeded random 0.1-3 s, the SIGKILL
of a server (the TASKS stream's leader half the time, else any), the 4 outcomes awaited
(up to `--timeout` s each), the server restarted and every stream's replicas caught up.

Each task is timed from its submission (tried again while the cluster elects) to its
outcome; one over 30 s is printed with its events' times (`Network.where_stuck`). Printed per mode: how many ended
and how, p50 / p90 / max seconds, and how many took over 30 s (a stalled copy: nats-server
re-creates a source lost with TASKS's leader after a 30 s wait, then a growing backoff;
copywatch.py). `unwatched` runs the validators with `STIPPLE_COPY_STALL_S=0`, `watched`
with the default; both modes run with the same seed in the same invocation, one network
each, and the ratio of their p90 and max is printed. A task that never ends is printed
with what the streams hold of it (`Network.where_stuck`).

    python bench/cluster_chaos.py                        # 12 kills each way
    python bench/cluster_chaos.py --cycles 25 --modes watched
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from control_plane import machine  # (bench/ is on sys.path)

from stipple_common import bus, subjects
from stipple_common.logs import setup_logging
from stipple_testkit.cluster import NatsCluster, every_replica_current, stream_leader
from stipple_testkit.network import Network, tiny_runner

SLOW_S = 30.0


async def one_mode(mode: str, cycles: int, seed: int, timeout: float, runner) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    stall = {"copy_stall_s": 0.0} if mode == "unwatched" else {}
    timed: list[tuple[float, str]] = []
    with NatsCluster.start(3) as cluster:
        await cluster.wait_ready()
        async with Network.plain(cluster.url) as net:
            js = await net.replicated(runner, partitions=4, **stall)
            seeds = iter(range(10_000))

            async def one() -> tuple[float, str]:
                started = time.monotonic()
                seed = next(seeds)
                while True:
                    try:  # (a submission may meet the election: tried again, as an app would)
                        task_id = await net.submit_task(seed=seed)
                        break
                    except bus.BUS_AWAY_OR_SLOW:
                        await asyncio.sleep(0.5)
                try:
                    outcome = await net.outcome(task_id, timeout=timeout)
                except AssertionError as exc:  # never ended: what the streams hold of it
                    print(f"  {mode}: {exc}", flush=True)
                    return time.monotonic() - started, "never ended"
                took = time.monotonic() - started
                if took > SLOW_S:
                    print(f"  {mode}: {took:.1f} s: {await net.where_stuck(task_id)}", flush=True)
                return took, type(outcome).__name__

            for cycle in range(cycles):
                running = asyncio.gather(*(one() for _ in range(4)))
                await asyncio.sleep(rng.uniform(0.1, 3.0))
                victim = rng.randrange(3)
                if rng.random() < 0.5:
                    victim = int((await stream_leader(js, subjects.TASKS_STREAM)).removeprefix("n"))
                cluster.kill(victim)
                results = await running
                timed.extend(results)
                print(
                    f"  {mode} cycle {cycle}: n{victim} killed; "
                    + ", ".join(f"{s:.1f} s {kind}" for s, kind in results),
                    flush=True,
                )
                cluster.restart(victim)
                await cluster.wait_ready()
                await every_replica_current(js)
    return timed


def summary(mode: str, timed: list[tuple[float, str]]) -> dict[str, float]:
    seconds = sorted(s for s, _ in timed)
    kinds: dict[str, int] = {}
    for _, kind in timed:
        kinds[kind] = kinds.get(kind, 0) + 1
    figures = {
        "p50": statistics.median(seconds),
        "p90": seconds[int(0.9 * (len(seconds) - 1))],
        "max": seconds[-1],
        "slow": sum(1 for s in seconds if s > SLOW_S),
    }
    print(
        f"{mode:>10}: {len(timed)} tasks {kinds}; p50 {figures['p50']:.1f} s, p90 {figures['p90']:.1f} s, "
        f"max {figures['max']:.1f} s; over {SLOW_S:.0f} s: {figures['slow']:.0f}"
    )
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=12, help="server kills per mode (4 tasks each)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds a task may take before 'never ended'")
    parser.add_argument("--modes", default="unwatched,watched")
    args = parser.parse_args()
    setup_logging("bench", level="error")
    logging.getLogger().setLevel(logging.ERROR)
    for line in machine():
        print(line)
    runner = tiny_runner(Path(tempfile.mkdtemp(prefix="stipple-chaos-")))
    figures = {}
    for mode in args.modes.split(","):
        figures[mode] = summary(mode, await one_mode(mode, args.cycles, args.seed, args.timeout, runner))
    if {"unwatched", "watched"} <= figures.keys():
        before, after = figures["unwatched"], figures["watched"]
        print(
            f"watched / unwatched: p90 {after['p90'] / before['p90']:.2f}, max {after['max'] / before['max']:.2f}; "
            f"tasks over {SLOW_S:.0f} s {before['slow']:.0f} -> {after['slow']:.0f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
