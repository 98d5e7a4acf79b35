"""Compute per task under secret sampled validation (issue 13 goal: <= 1.2 at the default rate).

A task runs on one node, or on `replication` (3) nodes of distinct operators when the
dispatcher's VRF selects it (probability `validation_rate`, `CommonSettings`' default 0.1).
Every copy runs the same work, so the node-seconds a task costs over its single-node time
is its number of node runs: the expected ratio is 1 + r * (3 - 1) = 1.2 at r = 0.1, against
3.0 when every task runs on three nodes (the protocol before sampling).

This drives the dispatcher's real decisions, `TaskQueue` (pure, no I/O), with a real VRF
key (`VrfKey`, RFC 9381 proofs by `SamplingProof.make`) over `--tasks` task ids made as
the gateway makes them (uuid4 hex, from a seeded generator), at the default rate and at
`--rates`. The nodes (`--nodes`, each its own operator) are a `NodeIndex` as the dispatcher
fills it. Time is simulated: tasks arrive as a Poisson stream at `--load` of the nodes'
capacity; each node run takes the task's estimate (`estimate_seconds`: 1 s for the 20-step
512x512 task used) times a normal jitter (`--jitter`, GPUs differ); a node's `committed`
frees its slot, and the task's `succeeded` comes when its last copy committed. Per rate it
prints node runs per task, the observed selection rate with its Wilson 95 % interval, and
(simulated, not measured) the queue wait and completion time of sampled and unsampled
tasks. Every task carries the same fee per node-second it is charged for (`--fee`, as the
gateway charges a `sampled` task for one node), so the queue's order by fee per
GPU-second applies as in production.

It also times, in the same run, what the VRF adds to each dispatch decision:
`SamplingProof.make` for a task id (called on its own, interleaved with the decisions),
against the rest of the decision as the dispatcher runs it: `TaskQueue.submit` (which
includes one proof) and the `pump` step that yields the task's `Assign` (queue order,
eligibility, weights, the pick), and against `NodeIndex.pick` over `--index-nodes`
(10,000) registered nodes as bench/dispatch_decision.py builds them.

    python bench/sampling_cost.py                          # 1,000 tasks at r = default, 0.05, 0.1, 0.2
    python bench/sampling_cost.py --tasks 1000,10000       # also 10,000
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import os
import platform
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dispatch_decision import build, cpu_name  # bench/ is on sys.path when run as a script

from stipple_common import __version__
from stipple_common.messages import TaskCommitted, TaskStarted, TaskSubmitted, TaskSucceeded
from stipple_common.settings import CommonSettings
from stipple_common.taskspec import TaskSpec, parse_task
from stipple_common.vrf import SamplingProof, VrfKey
from stipple_dispatcher.queue import Abort, Assign, TaskQueue, estimate_seconds
from stipple_dispatcher.selection import NodeIndex, Requirements
from stipple_dispatcher.settings import DispatcherSettings
from stipple_testkit.nodes import joined

MODEL = "tiny-sd"
GOAL_RATIO = 1.2
ALL_THREE = 3.0


def task_spec() -> TaskSpec:
    """A 20-step 512x512 task: 1 GPU-second by the dispatcher's default estimate."""
    return parse_task(
        {
            "base_model": MODEL,
            "prompt": "a lighthouse at dusk",
            "task_config": {"steps": 20, "seed": 7, "num_images": 1},
        }
    )


def task_ids(n: int, seed: int) -> list[str]:
    """`n` ids as the gateway makes them (uuid4().hex), from a seeded generator."""
    rng = random.Random(seed)
    return [uuid.UUID(int=rng.getrandbits(128), version=4).hex for _ in range(n)]


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95 % interval of a binomial proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5))) - 1]


# ------------------------------------------------------------------ the simulation


@dataclass
class Run:
    """What one rate's run counted and timed."""

    rate: float
    tasks: int
    selected: int = 0
    node_runs: int = 0
    aborted: int = 0
    copies_seen: set[int] = field(default_factory=set)
    wait_s: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})  # by selected
    done_s: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    make_s: list[float] = field(default_factory=list)  # SamplingProof.make alone
    submit_s: list[float] = field(default_factory=list)  # TaskQueue.submit (one proof inside)
    assign_s: list[float] = field(default_factory=list)  # the pump step that yields an Assign

    @property
    def per_task(self) -> float:
        return self.node_runs / self.tasks


def node_index(n: int, now: float) -> NodeIndex:
    """`n` live nodes serving MODEL, each staked for itself (so each its own operator)."""
    index = NodeIndex()
    for i in range(n):
        node_id = f"0x{i + 1:040x}"
        index.join(joined(node_id, models=(MODEL,)), now, __version__)
    return index


def simulate(args: argparse.Namespace, rate: float, n: int, key: VrfKey) -> Run:
    """Feed `n` tasks through a TaskQueue at `rate` (see the module) and count node runs."""
    settings = DispatcherSettings(validation_rate=rate, node_ttl_s=1e12, dispatch_timeout_s=1e12)
    index = node_index(args.nodes, 0.0)
    queue: TaskQueue[str] = TaskQueue(index, settings, np.random.default_rng(args.seed), key)
    spec = task_spec()
    run_s = estimate_seconds(spec, settings.seconds_per_step)
    arrivals_per_s = args.load * args.nodes / (queue.expected_copies * run_s)
    rng = random.Random(args.seed + 1)
    ids = task_ids(n, args.seed)
    out = Run(rate=rate, tasks=n)

    # events: (time, order, kind, payload); kind "arrive" | "commit" (a node's copy is done)
    heap: list[tuple[float, int, str, Any]] = []
    order = 0
    t = 0.0
    for task_id in ids:
        t += rng.expovariate(arrivals_per_s)
        heap.append((t, order, "arrive", task_id))
        order += 1
    heapq.heapify(heap)
    arrived: dict[str, float] = {}
    remaining: dict[str, int] = {}  # task id -> copies not yet committed
    selected: dict[str, bool] = {}
    last_commit: dict[str, float] = {}

    def pump(now: float) -> None:
        nonlocal order
        steps = queue.pump(now)
        while True:
            started = time.perf_counter()
            decision = next(steps, None)
            took = time.perf_counter() - started
            if decision is None:
                return
            if isinstance(decision, Abort):
                out.aborted += 1
            if not isinstance(decision, Assign):
                continue
            out.assign_s.append(took)
            assigned = decision.assigned
            copies = len(assigned.nodes)
            out.copies_seen.add(copies)
            out.node_runs += copies
            remaining[assigned.task_id] = copies
            out.wait_s[selected[assigned.task_id]].append(now - arrived[assigned.task_id])
            for node in assigned.nodes:
                queue.apply(TaskStarted(task_id=assigned.task_id, node_id=node))
                duration = run_s * max(0.1, 1 + args.jitter * rng.gauss(0, 1))
                heapq.heappush(heap, (now + duration, order, "commit", (assigned.task_id, node)))
                order += 1

    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == "arrive":
            task_id = payload
            arrived[task_id] = now
            fee = args.fee  # a sampled task is charged for one node, like an unsampled one
            event = TaskSubmitted(task_id=task_id, spec=spec, submitted_at=now, fee=fee)
            started = time.perf_counter()
            SamplingProof.make(key, task_id, rate)  # the VRF alone, on the same id (deterministic)
            made = time.perf_counter()
            decisions = queue.submit(event, f"msg-{task_id}", {}, now)
            out.make_s.append(made - started)
            out.submit_s.append(time.perf_counter() - made)
            assert not decisions, decisions  # nothing to pre-fetch for a bare model name
            queued = queue.queued[task_id]
            assert queued.sampling is not None
            selected[task_id] = queued.sampling.selected
            out.selected += queued.sampling.selected
        else:
            task_id, node = payload
            signed = TaskCommitted(task_id=task_id, node_id=node, commitment="0x", signature="0x")
            queue.apply(signed)  # frees the node's slot
            remaining[task_id] -= 1
            last_commit[task_id] = now
            if remaining[task_id] == 0:  # the validator's outcome: the task leaves the queue
                queue.apply(TaskSucceeded(task_id=task_id, reason="unanimous", images=[], verdicts={}))
                out.done_s[selected[task_id]].append(now - arrived[task_id])
        pump(now)
    assert not queue.queued, "every task must be assigned"
    assert not queue.running, "every task must be finished"
    return out


# ------------------------------------------------------------------ the big index


def time_big_pick(args: argparse.Namespace, key: VrfKey, rate: float) -> tuple[list[float], list[float]]:
    """NodeIndex.pick of 3 over `--index-nodes` nodes (as bench/dispatch_decision.py builds
    them), interleaved with SamplingProof.make, `--decisions` of each."""
    now = time.time()
    index, _nodes, _operators = build(args.index_nodes, random.Random(1), now)
    spec = parse_task({"base_model": "sdxl", "prompt": "p", "loras": [{"model": "sd15", "weight": 0.5}]})
    req = Requirements(min_stake=100, memory_bytes=12 * 1024**3, version=__version__)
    np_rng = np.random.default_rng(2)
    picks, makes = [], []
    for task_id in task_ids(args.decisions, args.seed + 2):
        started = time.perf_counter()
        index.pick(spec, 3, np_rng, now=now, ttl_s=10.0, req=req)
        picked = time.perf_counter()
        SamplingProof.make(key, task_id, rate)
        makes.append(time.perf_counter() - picked)
        picks.append(picked - started)
    return picks, makes


# ------------------------------------------------------------------ reporting


def us(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f}"


def rates_of(text: str, default: float) -> list[float]:
    """'default,0.05,...' as floats, in order, each once."""
    out: list[float] = []
    for item in text.split(","):
        value = default if item.strip() == "default" else float(item)
        if not 0.0 <= value <= 1.0:
            raise SystemExit(f"--rates: a rate is in [0, 1], not {value}")
        if value not in out:
            out.append(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="1000", help="tasks per rate; a comma-separated list runs each")
    parser.add_argument("--rates", default="default,0.05,0.1,0.2", help="'default' is CommonSettings().validation_rate")
    parser.add_argument("--nodes", type=int, default=12, help="nodes in the simulated network, one operator each")
    parser.add_argument("--load", type=float, default=0.7, help="arrivals as a share of the nodes' capacity")
    parser.add_argument("--jitter", type=float, default=0.1, help="relative std dev of one node run's duration")
    parser.add_argument("--fee", type=int, default=10**15, help="every task's fee (orders the queue)")
    parser.add_argument("--seed", type=int, default=13, help="task ids, arrivals, durations and the VRF key")
    parser.add_argument("--index-nodes", type=int, default=10_000, help="nodes for the big-index pick timing (0: skip)")
    parser.add_argument("--decisions", type=int, default=2_000, help="picks and proofs timed on the big index")
    args = parser.parse_args()
    sizes = [int(x) for x in args.tasks.split(",")]
    default_rate = CommonSettings().validation_rate
    rates = rates_of(args.rates, default_rate)
    replication = DispatcherSettings().replication
    key = VrfKey(hashlib.sha256(f"stipple bench sampling key {args.seed}".encode()).digest())

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(
        f"{args.nodes} nodes (distinct operators), replication {replication}, default validation_rate "
        f"{default_rate:g}; VRF public key {key.public.hex()}"
    )
    print(
        f"simulated time: Poisson arrivals at load {args.load:g}, node run {task_spec().task_config.steps} steps "
        f"512x512 = 1 GPU-s x N(1, {args.jitter:g}), fee {args.fee} per task"
    )
    print()
    header = (
        f"{'r':>5} {'tasks':>6} {'selected':>8} {'observed rate [95% CI]':>24} {'r in CI':>7} {'node runs/task':>14} "
        f"{'expected':>8} {'goal <=1.2':>10} {'/ all-3':>7} {'aborted':>7}"
    )
    print(header)
    runs: list[Run] = []
    for n in sizes:
        for rate in rates:
            run = simulate(args, rate, n, key)
            runs.append(run)
            low, high = wilson(run.selected, n)
            expected = 1 + rate * (replication - 1)
            label = f"{rate:g}" + ("*" if rate == default_rate else "")
            goal = "met" if expected <= GOAL_RATIO + 1e-12 else "MISSED"
            consistent = "yes" if low <= rate <= high else "NO"
            print(
                f"{label:>5} {n:6d} {run.selected:8d} {run.selected / n:8.4f} [{low:.4f}, {high:.4f}] {consistent:>7} "
                f"{run.per_task:14.4f} {expected:8.3f} {goal:>10} {run.per_task / ALL_THREE:7.3f} {run.aborted:7d}"
            )
            assert run.copies_seen <= {1, replication}, run.copies_seen
    print(
        "(* the default rate; node runs/task = node-seconds / single-node time, observed; expected = 1 + r(R - 1),\n"
        " which the goal is judged on: the observed figure scatters around it by the binomial draw; "
        "'/ all-3' = observed / 3.0)"
    )
    for run in runs:
        if run.rate == default_rate:
            low, high = wilson(run.selected, run.tasks)
            expected = 1 + run.rate * (replication - 1)
            print(
                f"at the default rate over {run.tasks} tasks: {run.per_task:.4f} node runs per task observed "
                f"(95 % interval from the selection rate: {1 + low * (replication - 1):.3f} to "
                f"{1 + high * (replication - 1):.3f}), {expected:.3f} expected; goal <= {GOAL_RATIO}: "
                f"{'met' if expected <= GOAL_RATIO + 1e-12 else 'MISSED'} (in expectation); all three: {ALL_THREE}"
            )

    print("\nsimulated queue wait and completion (arrival to last copy committed), seconds, by kind:")
    print(f"{'r':>5} {'tasks':>6} {'kind':>9} {'n':>6} {'wait p50':>9} {'wait p90':>9} {'done p50':>9} {'done p90':>9}")
    for run in runs:
        for kind, is_sel in (("unsampled", False), ("sampled", True)):
            w, d = run.wait_s[is_sel], run.done_s[is_sel]
            print(
                f"{run.rate:5g} {run.tasks:6d} {kind:>9} {len(d):6d} {pct(w, 50):9.3f} {pct(w, 90):9.3f} "
                f"{pct(d, 50):9.3f} {pct(d, 90):9.3f}"
            )

    makes = [s for run in runs for s in run.make_s]
    submits = [s for run in runs for s in run.submit_s]
    assigns = [s for run in runs for s in run.assign_s]
    make50, submit50, assign50 = (statistics.median(x) for x in (makes, submits, assigns))
    print(f"\nthe VRF in a dispatch decision ({len(makes)} tasks, {args.nodes} nodes), microseconds:")
    print(f"{'':52} {'p50':>9} {'p99':>9}")
    rows = [
        ("SamplingProof.make (prove + proof_to_hash)", makes),
        ("TaskQueue.submit (includes one proof)", submits),
        ("pump step to the task's Assign (order, pick)", assigns),
    ]
    for label, values in rows:
        print(f"{label:52} {us(pct(values, 50))} {us(pct(values, 99))}")
    rest = max(submit50 - make50, 0.0) + assign50
    print(
        f"ratio VRF / rest of the decision (p50, submit - proof + pump step): {make50 / rest:.2f}; "
        f"VRF share of the whole decision: {make50 / (submit50 + assign50):.0%}"
    )
    if args.index_nodes:
        picks, big_makes = time_big_pick(args, key, default_rate)
        print(f"\nagainst NodeIndex.pick of 3 over {args.index_nodes} nodes ({args.decisions} of each, interleaved):")
        print(f"{'SamplingProof.make':52} {us(pct(big_makes, 50))} {us(pct(big_makes, 99))}")
        print(f"{'NodeIndex.pick (bench/dispatch_decision.py)':52} {us(pct(picks, 50))} {us(pct(picks, 99))}")
        print(f"ratio VRF / pick (p50): {statistics.median(big_makes) / statistics.median(picks):.2f}")


if __name__ == "__main__":
    main()
