"""Dispatch decision time with many registered nodes (goal: <= 1 ms at 10,000).

One decision = eligibility (live, unpaused, stake, memory, version, free slot, serves
the model) + weights (stake, QoS, locality) + a weighted pick of 3 nodes of distinct
operators, exactly as the dispatcher runs it (`NodeIndex.pick`). The baseline, measured
in the same run, is the simplest thing that could work: a pure-Python pass over the
node list that filters the live nodes serving the model and takes 3 operators at random
(no weights), i.e. what the walking skeleton did.

    python bench/dispatch_decision.py [--nodes 10000] [--decisions 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import numpy as np

from stipple_common import __version__
from stipple_common.messages import NodeJoined, NodeQos
from stipple_common.taskspec import parse_task
from stipple_dispatcher.selection import NodeIndex, Requirements
from stipple_testkit.nodes import joined

MODELS = ["sd15", "sdxl", "sd21", "tiny-sd"]


def address(kind: int, i: int) -> str:
    """A node id (kind 0) or an operator (kind 1) in the form of an address, without the
    cost of deriving 10,000 keys."""
    return f"0x{kind:x}{i:039x}"


def build(n: int, rng: random.Random, now: float) -> tuple[NodeIndex, list[NodeJoined], dict[str, str]]:
    """`n` nodes, three to an operator; stakes and operators as the chain says (`set_stake`)."""
    index = NodeIndex()
    nodes = []
    operators = {}
    for i in range(n):
        models = rng.sample(MODELS, rng.randint(1, 3))
        memory = rng.choice([8, 16, 24, 80]) * 1024**3
        node = joined(address(0, i), device="gpu", memory_bytes=memory, models=models, models_loaded=models[:1])
        nodes.append(node)
        operators[node.node_id] = address(1, i % (n // 3 or 1))
        index.set_stake(node.node_id, rng.randint(0, 10_000), operators[node.node_id])
        index.join(node, now - rng.random() * 5, __version__)
        if rng.random() < 0.8:
            index.score(NodeQos(node_id=node.node_id, qos=rng.random() * 10, samples=50, recent_timeouts=0))
    return index, nodes, operators


def naive_pick(
    nodes: list[NodeJoined], operators: dict[str, str], live: set[str], model: str, rng: random.Random
) -> list[str]:
    candidates = [n for n in nodes if n.node_id in live and model in n.models]
    rng.shuffle(candidates)
    chosen: dict[str, str] = {}
    for node in candidates:
        chosen.setdefault(operators[node.node_id], node.node_id)
        if len(chosen) == 3:
            break
    return list(chosen.values())


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):  # noqa: SIM115
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--decisions", type=int, default=2_000)
    args = parser.parse_args()

    now = time.time()
    rng = random.Random(1)
    index, nodes, operators = build(args.nodes, rng, now)
    live = {n.node_id for n in nodes}
    spec = parse_task({"base_model": "sdxl", "prompt": "p", "loras": [{"model": "sd15", "weight": 0.5}]})
    req = Requirements(min_stake=100, memory_bytes=12 * 1024**3, version=__version__)
    np_rng = np.random.default_rng(2)

    ours, naive = [], []
    for _ in range(args.decisions):  # interleaved, so both see the same machine noise
        started = time.perf_counter()
        chosen = index.pick(spec, 3, np_rng, now=now, ttl_s=10.0, req=req)
        ours.append(time.perf_counter() - started)
        assert len(chosen) == 3
        started = time.perf_counter()
        naive_pick(nodes, operators, live, "sdxl", rng)
        naive.append(time.perf_counter() - started)

    def ms(samples: list[float], q: float) -> float:
        return statistics.quantiles(samples, n=100)[int(q) - 1] * 1000 if q < 100 else max(samples) * 1000

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"{args.nodes} registered nodes, {args.decisions} decisions (sdxl + a LoRA, stake and memory limits)")
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(f"{'NodeIndex.pick (weighted)':28} {ms(ours, 50):8.3f} {ms(ours, 99):8.3f} {ms(ours, 100):8.3f}")
    print(f"{'naive list pass (baseline)':28} {ms(naive, 50):8.3f} {ms(naive, 99):8.3f} {ms(naive, 100):8.3f}")
    print(f"ratio (p50 ours / baseline): {statistics.median(ours) / statistics.median(naive):.3f}")
    print(f"goal p50 <= 1 ms: {'met' if statistics.median(ours) <= 1e-3 else 'MISSED'}")


if __name__ == "__main__":
    main()
