"""How wrong the queue's ETAs are (issue 16 goal: median error within 20 %).

A seeded simulation drives the dispatcher's real decisions, `TaskQueue` and `NodeIndex`
(pure, no NATS), on a simulated clock. `--nodes` (24) nodes, each its own operator, in four
speed classes (seconds per step at 512x512: 0.02, 0.04, 0.08, 0.16, as an H100, a 4090, a
3060 and a T4 might be; `CLASSES`), each with its own fixed overhead per task (0.3 to 1.5 s:
pick-up, VAE decode, upload) and lognormal noise on every run (`--noise`, 0.1). Tasks arrive
as a Poisson stream at `--load` (0.85) of the fleet's capacity, with a mix of sizes (512x512
to 1024x1024), steps (10 to 50) and images (1 or 2), and fees (`--fees`: random, so a later
dearer task may pass a waiting one, as in production; or none: first come, first served).
A task runs on one node, or on three when the dispatcher's VRF draws it (`validation_rate`
0.1). A node's `started` comes 0.1 s after its assignment and its `committed` when its run
ends; the outcome comes 0.2 to 0.6 s after the last commitment (the validator). Each event
is handed to `TaskQueue.apply` with its time, as the dispatcher hands it the stream's.

At each submission the bench records the ETA an app can first be told: once the dispatcher
has handled the submission (`submit`, then `pump`, as `Dispatcher.handle` does under its
lock): the queued task's, or, when it was assigned at once, the running task's on its
nodes. At the outcome it records the task's real time from submission. The ETAs:

- old: the estimate before issue 16 (`old_eta`: the GPU-second estimates of the same model's
  tasks ahead, shared by the live nodes over the expected copies, plus its own), with
  `STIPPLE_SECONDS_PER_STEP` at the fleet's mean speed (`--prior`; a fair setting: the
  mean of the classes weighted by their nodes), taken at the same moment but before the
  queue decided (the old code answered nothing for an assigned task; its own estimate
  is what it would have said);
- new: `TaskQueue.status` (queue.py `_forecast`, speed.py), which learns each node's speed
  from the times it sees and counts the running tasks; also shown as asked before the
  queue decided (the node not yet known) and over the tasks that queued.

It prints the median, p90 and mean signed relative error of each, over the tasks after the
first `--warmup` (200: every node has been timed a few times by then) and over the warm-up
alone, for each `--seeds`.

    python bench/eta_error.py                       # 3,000 tasks, seeds 1 2 3
    python bench/eta_error.py --fees none --load 0.7
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import math
import os
import platform
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stipple_common import __version__
from stipple_common.messages import TaskCommitted, TaskStarted, TaskSubmitted, TaskSucceeded
from stipple_common.taskspec import TaskSpec, parse_task
from stipple_common.vrf import SEED_BYTES, VrfKey
from stipple_dispatcher.queue import Abort, Assign, TaskQueue
from stipple_dispatcher.selection import NodeIndex
from stipple_dispatcher.settings import DispatcherSettings
from stipple_dispatcher.speed import work_of
from stipple_testkit.nodes import joined

MODEL = "tiny-sd"
GOAL = 0.20
CLASSES = [(0.02, 0.25), (0.04, 0.35), (0.08, 0.25), (0.16, 0.15)]  # seconds per 512x512 step, share of nodes
SIZES = [(512, 512), (512, 768), (768, 768), (1024, 1024)]
STEPS = [10, 20, 30, 50]
START = 1_000_000.0


@dataclass
class Node:
    node_id: str
    per_step: float  # seconds per step at 512x512
    overhead: float

    def run_s(self, spec: TaskSpec, rng: np.random.Generator, noise: float) -> float:
        mean = self.overhead + self.per_step * work_of(spec) / (512 * 512 / 1e6)
        return float(mean * rng.lognormal(-noise * noise / 2, noise))


@dataclass
class Record:
    submitted: float
    old: float
    before: float  # the new ETA before the queue decided
    new: float = 0.0
    commits: dict[str, float] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)
    done: float | None = None
    assigned: float | None = None
    cost_s: float = 0.0  # of the `status` call that gave `new`


def old_eta(queue: TaskQueue[Any], task_id: str, now: float) -> float:
    """`TaskQueue.status`'s ETA before issue 16, as it was (git history of queue.py)."""
    task = queue.queued[task_id]
    model = task.event.spec.model_name
    ahead = [q for q in sorted(queue.queued.values(), key=lambda q: q.rank) if q.event.spec.model_name == model]
    position = ahead.index(task)
    serving = queue.index.serving_live(model, now, queue.settings.node_ttl_s)
    lanes = max(1.0, serving / queue.expected_copies)
    return sum(q.estimate_s for q in ahead[:position]) / lanes + task.estimate_s


def make_spec(rng: np.random.Generator) -> TaskSpec:
    width, height = SIZES[rng.integers(len(SIZES))]
    config = {
        "steps": int(STEPS[rng.integers(len(STEPS))]),
        "seed": int(rng.integers(1 << 31)),
        "image_width": width,
        "image_height": height,
        "num_images": int(rng.choice([1, 1, 1, 2])),
    }
    return parse_task({"base_model": MODEL, "prompt": "p", "task_config": config})


def simulate(args: argparse.Namespace, seed: int) -> list[Record]:
    rng = np.random.default_rng(seed)
    index = NodeIndex()
    nodes: dict[str, Node] = {}
    counts = np.round(np.array([share for _, share in CLASSES]) * args.nodes).astype(int)
    for (per_step, _), count in zip(CLASSES, counts, strict=True):
        for _ in range(count):
            node = Node(f"n{len(nodes):03d}", per_step, float(rng.uniform(0.3, 1.5)))
            nodes[node.node_id] = node
            index.join(joined(node.node_id, models=(MODEL,)), START, __version__)
    prior = sum(n.per_step for n in nodes.values()) / len(nodes) if args.prior is None else args.prior
    settings = DispatcherSettings(
        node_ttl_s=1e12,
        seconds_per_step=prior,
        dispatch_timeout_s=1e12,
        task_timeout_s=600.0,
        accept_timeout_s=60.0,
        validation_rate=args.rate,
        eta_alpha=args.alpha,
    )
    key = VrfKey(hashlib.sha256(f"eta_error {seed}".encode()).digest()[:SEED_BYTES])  # the same draws every run
    queue: TaskQueue[str] = TaskQueue(index, settings, np.random.default_rng(seed), key=key)
    queue.ETA_CHEAP_S = math.inf  # a fresh forecast whenever anything changed, however long it took: repeatable
    # capacity in tasks per second: every node's rate on the mean task, over the expected copies
    specs = [make_spec(rng) for _ in range(400)]
    capacity = sum(
        1 / statistics.fmean(n.overhead + n.per_step * work_of(s) / 0.262144 for s in specs) for n in nodes.values()
    )
    rate = args.load * capacity / queue.expected_copies

    events: list[tuple[float, int, str, Any]] = []  # (time, order, kind, payload)
    order = itertools.count()
    t = START
    for i in range(args.tasks):
        t += float(rng.exponential(1 / rate))
        heapq.heappush(events, (t, next(order), "submit", i))
    records: dict[str, Record] = {}
    ids = [uuid.UUID(int=int(rng.integers(1 << 62)) << 64 | i).hex for i in range(args.tasks)]

    def carry_out(decisions: Any, now: float) -> None:
        for decision in decisions:
            if isinstance(decision, Abort):
                raise SystemExit(f"aborted: {decision.aborted}")
            if not isinstance(decision, Assign):
                continue
            task_id = decision.assigned.task_id
            records[task_id].waiting = set(decision.assigned.nodes)
            records[task_id].assigned = now
            for node_id in decision.assigned.nodes:
                run_s = nodes[node_id].run_s(decision.work.spec, rng, args.noise)
                heapq.heappush(events, (now + 0.1, next(order), "started", (task_id, node_id)))
                heapq.heappush(events, (now + run_s, next(order), "committed", (task_id, node_id)))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "submit":
            task_id = ids[payload]
            fee = int(rng.integers(1, 100)) if args.fees == "random" else 0
            event = TaskSubmitted(task_id=task_id, spec=make_spec(rng), submitted_at=now, fee=fee)
            carry_out(queue.submit(event, f"msg-{task_id}", {}, now), now)
            records[task_id] = Record(
                submitted=now, old=old_eta(queue, task_id, now), before=queue.status(task_id, now).eta_s
            )
            carry_out(queue.pump(now), now)
            asked = time.perf_counter()
            records[task_id].new = queue.status(task_id, now).eta_s  # queued, or running on its nodes
            records[task_id].cost_s = time.perf_counter() - asked
            continue
        elif kind == "started":
            task_id, node_id = payload
            carry_out(queue.apply(TaskStarted(task_id=task_id, node_id=node_id), at=now), now)
        elif kind == "committed":
            task_id, node_id = payload
            committed = TaskCommitted(
                task_id=task_id, node_id=node_id, commitment="0x", signature="0x", elapsed_s=0.001
            )  # a node's claim, which nothing reads
            carry_out(queue.apply(committed, at=now), now)
            record = records[task_id]
            record.waiting.discard(node_id)
            if not record.waiting:
                heapq.heappush(events, (now + float(rng.uniform(0.2, 0.6)), next(order), "outcome", task_id))
        else:
            succeeded = TaskSucceeded(task_id=payload, reason="unanimous", images=[], verdicts={})
            carry_out(queue.apply(succeeded, at=now), now)
            records[payload].done = now
        carry_out(queue.pump(now), now)
    return [records[task_id] for task_id in ids]


def errors(records: list[Record], which: str) -> list[float]:
    """Signed relative error of each finished task's ETA `which` against its real time."""
    return [(getattr(r, which) - (r.done - r.submitted)) / (r.done - r.submitted) for r in records if r.done]


def summary(values: list[float]) -> str:
    """median / p90 of the absolute relative error, and the mean signed error (bias)."""
    if not values:
        return "-"
    absolute = sorted(abs(v) for v in values)
    return (
        f"{statistics.median(absolute):.1%} / {float(np.quantile(absolute, 0.9)):.1%} / {statistics.fmean(values):+.1%}"
    )


def median_error(records: list[Record], which: str) -> float:
    return statistics.median(abs(v) for v in errors(records, which))


def status_cost(n_nodes: int, n_queued: int) -> None:
    """What one `status` costs at scale: `n_nodes` live nodes, each running a task, and the
    asked task last of `n_queued` queued; the old estimate's cost in the same state."""
    rng = np.random.default_rng(0)
    index = NodeIndex(capacity=n_nodes)
    for i in range(n_nodes):
        index.join(joined(f"n{i:05d}", models=(MODEL,)), START, __version__)
    settings = DispatcherSettings(node_ttl_s=1e12, dispatch_timeout_s=1e12, validation_rate=0.0)
    queue: TaskQueue[str] = TaskQueue(index, settings, rng)
    for i in range(n_nodes):  # every node busy with one task of its own, timed a few times
        task_id = f"r{i}"
        queue.submit(TaskSubmitted(task_id=task_id, spec=make_spec(rng), submitted_at=START, fee=0), "m", {}, START)
        for decision in queue.pump(START):
            if isinstance(decision, Assign):
                (node,) = decision.assigned.nodes
                for k in range(3):
                    queue.speed.observe(node, make_spec(rng), 1.0 + k)
    for i in range(n_queued):
        task_id = f"q{i}"
        queue.submit(TaskSubmitted(task_id=task_id, spec=make_spec(rng), submitted_at=START, fee=0), "m", {}, START)
    last = f"q{n_queued - 1}"
    timings: dict[str, list[float]] = {"pass": [], "reused": [], "old": []}
    for _ in range(5):
        queue._forecasts.clear()  # a fresh pass over every queued task of the model
        for which, call in (
            ("pass", lambda: queue.status(last, START + 1)),
            ("reused", lambda: queue.status(last, START + 1)),  # the pass is reused up to ETA_REUSE_S
            ("old", lambda: old_eta(queue, last, START + 1)),
        ):
            started = time.perf_counter()
            call()
            timings[which].append(time.perf_counter() - started)
    full, reused, old = (statistics.median(timings[k]) * 1e3 for k in ("pass", "reused", "old"))
    print(
        f"# one `status` with {n_nodes:,} busy nodes, the task last of {n_queued:,} queued (median of 5): "
        f"{full:.1f} ms with a fresh forecast of them all, {reused:.1f} ms reusing it; the old estimate {old:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=24)
    parser.add_argument("--load", type=float, default=0.85)
    parser.add_argument("--noise", type=float, default=0.1, help="lognormal sigma of each run")
    parser.add_argument("--fees", choices=["random", "none"], default="random")
    parser.add_argument("--prior", type=float, default=None, help="STIPPLE_SECONDS_PER_STEP (default: fleet mean)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--big-nodes", type=int, default=10_000, help="nodes for the cost of one `status` (0: skip)")
    parser.add_argument("--big-queue", type=int, default=2_000, help="queued tasks ahead for that cost")
    parser.add_argument("--alpha", type=float, default=0.2, help="STIPPLE_ETA_ALPHA")
    parser.add_argument("--rate", type=float, default=0.1, help="STIPPLE_VALIDATION_RATE: tasks run on three nodes")
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"# eta_error: {machine}, Python {platform.python_version()}")
    print(
        f"# {args.tasks} tasks, {args.nodes} nodes in {len(CLASSES)} speed classes, load {args.load}, "
        f"noise {args.noise}, fees {args.fees}, validation rate {args.rate}, warm-up {args.warmup}"
    )
    print("# relative error of the ETA against the real time: median / p90 of |error| / mean signed")
    print(
        "| seed | tasks | queued | median time | old | new | new, queued ones | new, before deciding | warm-up: new |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    medians = []
    for seed in args.seeds:
        records = simulate(args, seed)
        warm, cold = records[args.warmup :], records[: args.warmup]
        queued = [r for r in warm if r.assigned is not None and r.assigned > r.submitted]
        took = statistics.median(r.done - r.submitted for r in warm if r.done)
        medians.append((median_error(warm, "old"), median_error(warm, "new")))
        print(
            f"| {seed} | {len(warm)} | {len(queued) / len(warm):.0%} | {took:.1f} s | {summary(errors(warm, 'old'))} "
            f"| {summary(errors(warm, 'new'))} | {summary(errors(queued, 'new'))} "
            f"| {summary(errors(warm, 'before'))} | {summary(errors(cold, 'new'))} |"
        )
        costs = sorted(r.cost_s for r in warm)
        print(
            f"#   seed {seed}: `status` after each submission, p50 {costs[len(costs) // 2] * 1e6:.0f} us, "
            f"p99 {costs[int(len(costs) * 0.99)] * 1e6:.0f} us"
        )
    old_m = statistics.median(m[0] for m in medians)
    new_m = statistics.median(m[1] for m in medians)
    verdict = "met" if new_m <= GOAL else "NOT met"
    print(f"median of the seeds' median errors: old {old_m:.1%}, new {new_m:.1%} (goal {GOAL:.0%}: {verdict})")
    if args.big_nodes:
        status_cost(args.big_nodes, args.big_queue)


if __name__ == "__main__":
    main()
