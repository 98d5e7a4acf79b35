"""Warm models: the share of node runs that find their model already loaded (goal: >= 95 %).

A discrete-event simulation of `--nodes` (1,000) GPU nodes and Poisson task arrivals over
`--models` (200) downloadable models with Zipf(`--zipf` 1.1) popularity, seeded. The
dispatcher is the real one: `NodeIndex` and `TaskQueue` driven as the service drives them
(service.py): `join` with each node's announcement, `heartbeat` every 2 s with what it has
loaded, `submit` (and its `Prefetch` decisions), `pump` after every arrival and every
finished run, `apply` with `started` / `committed` / `succeeded`. Only the nodes and the
apps are simulated, on a simulated clock (no NATS, no processes):

- a node is the node agent's model store and pipeline runner in miniature: a disk of
  `--disk` models (the store: LRU by last use, announced again after a pre-fetch, as
  `NodeAgent.prefetch` does) and `--vram` loaded pipelines (the runner's LRU,
  `pipeline_cache` 2 by default), one task at a time (`node_slots` 1). A run whose model is
  loaded starts at once (warm); on disk, it loads first (`--load-s`, cool); neither, it
  downloads first (`--download-s`, cold). The run itself takes `--task-s` x lognormal(0, 0.3).
- the disks start filled with `--disk` models drawn by popularity without replacement
  (operators keep what is asked for), the VRAM empty; the first `--warmup-s` are not counted.
- arrivals: `--load` x the nodes' capacity (copies counted: the default
  `validation_rate` 0.1 runs a tenth of the tasks on 3 nodes).

Deviations from the service, none of which touches a placement: the VRF draw
(`TaskQueue.draw`, 2 ms of ed25519 per task) is replaced by a seeded Bernoulli at the same
rate; a heartbeat carries `models_loaded` only when it changed (`NodeIndex.heartbeat` with
the same list changes nothing); nodes start at once, so `replace_overdue` has nothing to do.

Policies, each on the same seeded workload:

(a) `stock`: Stipple's weights before issue 16: S·Q/(S+Q) x (2 when every model of the task
    is loaded, else 1 + 0.7·on-disk share + 0.3·loaded share), one weighted draw over every
    eligible node (`STIPPLE_WARM_FIRST=false`).
(b) `crynux`: Crynux's relay as published in crynux-ai/crynux-relay, service/select_nodes.go
    at 0116fcc83300eeb99ee60236b58c5faaa2db6e14 (`selectNodeForInferenceTask`): the same
    S·Q/(S+Q) (service/selecting_prob.go), x2 when the node's in-use models are the task's,
    else x(1 + share of the task's models on disk); its download rule (service/task_status.go,
    `countAvailableNodesWithModelID` / `selectNodesForDownloadTask`): when fewer than 3
    *available* (idle) nodes hold a task's model, up to 10 - count idle nodes without it are
    told to download it, weighted by S·Q/(S+Q), no cool-down (Crynux checks when a task
    starts, `SetTaskStatusStarted`; here when it is submitted, `TaskQueue._prefetch`'s place).
    Crynux also sends a task to a
    node without the model when no node has it; here eligibility stays Stipple's (the model
    on disk), so only the weights and the download rule differ. The later relay
    (crynux-network/crynux-relay at 117f8a9ea7a4998753bf798b841559f50a641a3f) weighs
    1 + 0.7·disk + 0.3·in use: (a)'s boost.
(c) `warm-first`: the same weights, but the eligible nodes that have every model of the
    task loaded come first (a weighted draw among them; the others, weighted, only when too
    few are warm: `STIPPLE_WARM_FIRST=true`, selection.py), no waiting (`WARM_WAIT_S=0`).
(d) `warm-wait`: the dispatcher's defaults now: warm first, and for its first
    `STIPPLE_WARM_WAIT_S` (5 s) a task takes only warm nodes while enough live nodes have its
    models loaded (queue.py `_warm_wait`): it waits for one to free up rather than have a
    node spend `--load-s` loading them.

Reported per policy: where each node run landed (warm / cool / cold), the queue wait
(submitted to assigned) and the start delay (submitted to running on all its nodes: the
wait plus any load or download) p50 / p95, the tasks aborted for want of free nodes
(`no_nodes`), the downloads the pre-fetch rule asked for, the GPU seconds per run spent
loading or downloading instead of diffusing, and the wall time of the run.

    python bench/warm_models.py [--quick] [--load 0.5] [--nodes 1000] [--models 200]
                                [--policies stock,crynux,warm-first,warm-wait] [--progress]
                                [--partitions 1,2,4,8]

`--partitions`: what a dispatcher partitioned by node as well as by task would cost in
locality. Each partition is a dispatcher of its own (its own `NodeIndex` and `TaskQueue`)
over the nodes whose id hashes to it, taking the tasks whose id hashes to it: exact slots
without a shared counter, but each task sees only 1/P of the nodes.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import platform
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stipple_common import __version__
from stipple_common.messages import (
    NodeJoined,
    PrefetchRequest,
    TaskCommitted,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
)
from stipple_common.subjects import partition_for
from stipple_common.taskspec import TaskSpec, parse_task
from stipple_common.vrf import SamplingProof
from stipple_dispatcher.queue import Abort, Assign, Prefetch, TaskQueue
from stipple_dispatcher.selection import NodeIndex, task_models
from stipple_dispatcher.settings import DispatcherSettings

HEARTBEAT_S = 2.0  # the node agent's default `heartbeat_s`
GIB = 1024**3


# ---------------------------------------------------------------------- the policies


class FastDrawQueue(TaskQueue[None]):
    """The real queue; only the VRF draw is a seeded Bernoulli at the same rate (speed)."""

    def __init__(self, index: NodeIndex, settings: DispatcherSettings, rng: np.random.Generator) -> None:
        super().__init__(index, settings, rng)
        self.draws = np.random.default_rng(int(rng.integers(2**32)))

    def draw(self, event: TaskSubmitted) -> tuple[SamplingProof, int]:
        settings = self.settings
        compared = self.draws.random() < settings.validation_rate or event.validation == "full"
        return None, settings.replication if compared else 1  # type: ignore[return-value]


def base_weights(index: NodeIndex, rows: np.ndarray) -> np.ndarray:
    """S·Q/(S+Q) alone (Crynux's CalculateSelectingProb, Stipple's weight before locality)."""
    stake = index.stake[rows]
    top = stake.max() if len(stake) else 0.0
    s = np.sqrt(stake / top) if top > 0 else np.ones(len(rows))
    q = index.qos[rows] / 10.0
    with np.errstate(invalid="ignore", divide="ignore"):
        weight: np.ndarray = np.maximum(np.where(s + q > 0, s * q / (s + q), 0.0), 1e-3)
    return weight


class CrynuxIndex(NodeIndex):
    """Crynux's locality boost (crynux-ai/crynux-relay@0116fcc8, selectNodeForInferenceTask):
    x2 when the models in use are the task's, else x(1 + share on disk)."""

    def weights(self, rows: np.ndarray, models: Sequence[str]) -> np.ndarray:
        on_disk = np.zeros(len(rows))
        loaded = np.zeros(len(rows))
        for model in models:
            if model in self.on_disk:
                on_disk += self.on_disk[model][rows]
            if model in self.loaded:
                loaded += self.loaded[model][rows]
        boost = np.where(loaded >= len(models), 2.0, 1.0 + on_disk / len(models))
        result: np.ndarray = base_weights(self, rows) * boost
        return result


class CrynuxQueue(FastDrawQueue):
    """Crynux's download rule in place of Stipple's pre-fetch: fewer than 3 idle holders of a
    task's model: up to 10 - count idle nodes without it download it (no cool-down)."""

    round = 0

    def _prefetch(self, spec: TaskSpec, now: float) -> list[Prefetch]:
        index, ttl = self.index, self.settings.node_ttl_s
        out: list[Prefetch] = []
        for ref, kind in task_models(spec).items():
            live = index.live(now, ttl) & index.version_ok[: index.size]
            idle = live & (index.inflight[: index.size] == 0)
            column = index.on_disk.get(ref)
            has = column[: index.size] if column is not None else np.zeros(index.size, dtype=bool)
            count = int(np.count_nonzero(idle & has))
            if count >= 3:
                continue
            candidates = np.flatnonzero(idle & ~has)
            if not len(candidates):
                continue
            weights = base_weights(index, candidates)
            take = min(10 - count, len(candidates))
            keys = self.rng.random(len(candidates)) ** (1.0 / weights)
            rows = candidates[np.argsort(-keys)[:take]]
            self.round += 1
            out.append(
                Prefetch(
                    request=PrefetchRequest(ref=ref, kind=kind),
                    nodes=[index.ids[row] for row in rows],
                    round_id=self.round,
                    holders=count,
                )
            )
        return out


POLICIES: dict[str, tuple[type[NodeIndex], type[FastDrawQueue], dict[str, object]]] = {
    "stock": (NodeIndex, FastDrawQueue, {"warm_first": False}),
    "crynux": (CrynuxIndex, CrynuxQueue, {"warm_first": False}),
    "warm-first": (NodeIndex, FastDrawQueue, {"warm_first": True, "warm_wait_s": 0.0}),
    "warm-wait": (NodeIndex, FastDrawQueue, {}),  # the dispatcher's defaults now
}


# ---------------------------------------------------------------------- the nodes


@dataclass
class SimNode:
    node_id: str
    disk: OrderedDict[str, None]  # the store: least recently used first
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)  # the runner's LRU
    beat_loaded: tuple[str, ...] = ()  # what the last heartbeat said
    downloading: set[str] = field(default_factory=set)

    def announcement(self) -> NodeJoined:
        return NodeJoined(
            node_id=self.node_id,
            device="NVIDIA GeForce RTX 4090",
            memory_bytes=24 * GIB,
            models=[],
            version=__version__,
            started_at=0.0,
            models_on_disk=list(reversed(self.disk))[:2048],  # most recently used first
            models_loaded=sorted(self.loaded),
        )


@dataclass
class Config:
    nodes: int
    models: int
    disk: int
    vram: int
    zipf: float
    load: float
    task_s: float
    load_s: float
    download_s: float
    warmup_s: float
    measure_s: float
    seed: int


@dataclass
class Outcome:
    warm: int = 0
    cool: int = 0
    cold: int = 0
    waits: list[float] = field(default_factory=list)  # submitted to assigned
    starts: list[float] = field(default_factory=list)  # submitted to running on every node (loads too)
    aborted: int = 0
    tasks: int = 0
    downloads: int = 0
    wall_s: float = 0.0

    @property
    def runs(self) -> int:
        return self.warm + self.cool + self.cold

    def share(self, n: int) -> float:
        return n / self.runs if self.runs else 0.0


def simulate(cfg: Config, policy: str, progress: bool = False, partitions: int = 1) -> Outcome:
    """`partitions` > 1: the dispatcher split by node as well as by task, each partition a
    dispatcher of its own over its own nodes (a node's id hashes to its partition, a task's
    id to its own: `subjects.partition_for`), as a partitioned dispatcher without shared
    slots would run. Every partition sees only its share of the nodes and of the tasks."""
    started_wall = time.perf_counter()
    index_cls, queue_cls, overrides = POLICIES[policy]
    rng = np.random.default_rng(cfg.seed)  # the workload: the same for every policy
    settings = DispatcherSettings(**overrides)  # type: ignore[arg-type]
    indexes = [index_cls() for _ in range(partitions)]
    queues = [queue_cls(index, settings, np.random.default_rng(cfg.seed + 1 + k)) for k, index in enumerate(indexes)]

    refs = [f"sim-org/model-{i:03d}" for i in range(cfg.models)]
    popularity = 1.0 / np.arange(1, cfg.models + 1) ** cfg.zipf
    popularity /= popularity.sum()
    specs = [parse_task({"base_model": ref, "prompt": "p", "task_config": {"steps": 30, "seed": 1}}) for ref in refs]

    nodes: dict[str, SimNode] = {}
    for i in range(cfg.nodes):
        held = rng.choice(cfg.models, size=min(cfg.disk, cfg.models), replace=False, p=popularity)
        node = SimNode(node_id=f"0x{i:040x}", disk=OrderedDict((refs[m], None) for m in held))
        nodes[node.node_id] = node
        indexes[partition_for(node.node_id, partitions)].join(node.announcement(), 0.0, __version__)

    copies = queues[0].expected_copies  # (the same settings in every partition)
    rate = cfg.load * cfg.nodes / (cfg.task_s * copies)  # tasks per second
    end = cfg.warmup_s + cfg.measure_s
    count = int(rate * end * 1.2) + 100
    gaps = rng.exponential(1.0 / rate, count)
    picks = rng.choice(cfg.models, size=count, p=popularity)
    durations = cfg.task_s * rng.lognormal(-0.045, 0.3, size=count * 4)  # mean ~ task_s
    out = Outcome()

    events: list[tuple[float, int, str, Any]] = []
    seq = itertools.count()

    def at(t: float, kind: str, payload: Any) -> None:
        heapq.heappush(events, (t, next(seq), kind, payload))

    arrival_t = float(gaps[0])
    at(arrival_t, "arrive", 0)
    at(HEARTBEAT_S, "beat", None)
    run_n = itertools.count()
    pending_copies: dict[str, int] = {}
    measured: set[str] = set()

    def start(node: SimNode, model: str, now: float, counted: bool) -> tuple[float, float]:
        """The node takes a run of `model` now: how long until it runs, when it will have committed."""
        delay = 0.0
        if model in node.loaded:
            where = "warm"
            node.loaded.move_to_end(model)
        else:
            if model in node.disk:
                where = "cool"
            else:
                where = "cold"
                delay += cfg.download_s
                node.disk[model] = None
                while len(node.disk) > cfg.disk:
                    node.disk.popitem(last=False)
            delay += cfg.load_s
            node.loaded[model] = None
            while len(node.loaded) > cfg.vram:
                node.loaded.popitem(last=False)
        node.disk.move_to_end(model)
        if counted:
            setattr(out, where, getattr(out, where) + 1)
        return delay, now + delay + float(durations[next(run_n) % len(durations)])

    def pump(now: float, queue: TaskQueue[None]) -> None:
        for decision in queue.pump(now):
            if isinstance(decision, Assign):
                task_id = decision.assigned.task_id
                counted = task_id in measured
                if counted:
                    out.waits.append(decision.waited_s)
                model = decision.work.spec.model_name
                pending_copies[task_id] = len(decision.assigned.nodes)
                slowest = 0.0
                for node_id in decision.assigned.nodes:
                    queue.apply(TaskStarted(task_id=task_id, node_id=node_id))
                    delay, done = start(nodes[node_id], model, now, counted)
                    slowest = max(slowest, delay)
                    at(done, "commit", (task_id, node_id))
                if counted:
                    out.starts.append(decision.waited_s + slowest)
            elif isinstance(decision, Abort) and decision.aborted.task_id in measured:
                out.aborted += 1

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            i = int(payload)
            task_id = f"t{i}"
            queue = queues[partition_for(task_id, partitions)]
            if now >= cfg.warmup_s:
                measured.add(task_id)
                out.tasks += 1
            event = TaskSubmitted(task_id=task_id, spec=specs[int(picks[i])], submitted_at=now, fee=1)
            for decision in queue.submit(event, None, {}, now):
                if isinstance(decision, Prefetch):
                    for node_id in decision.nodes:
                        node = nodes[node_id]
                        if decision.request.ref not in node.downloading:  # the agent's `prefetching`
                            node.downloading.add(decision.request.ref)
                            out.downloads += 1
                            at(now + cfg.download_s, "fetched", (node_id, decision.request.ref))
            pump(now, queue)
            if i + 1 < count and now + gaps[i + 1] < end:
                at(now + float(gaps[i + 1]), "arrive", i + 1)
        elif kind == "commit":
            task_id, node_id = payload
            queue = queues[partition_for(task_id, partitions)]
            queue.apply(TaskCommitted(task_id=task_id, node_id=node_id, commitment="0x", signature="0x"))
            pending_copies[task_id] -= 1
            if pending_copies[task_id] == 0:  # the validator's outcome
                del pending_copies[task_id]
                queue.apply(TaskSucceeded(task_id=task_id, reason="unanimous", images=[], verdicts={}))
            pump(now, queue)
        elif kind == "fetched":
            node_id, ref = payload
            node = nodes[node_id]
            node.downloading.discard(ref)
            node.disk[ref] = None
            node.disk.move_to_end(ref)
            while len(node.disk) > cfg.disk:
                node.disk.popitem(last=False)
            k = partition_for(node_id, partitions)
            indexes[k].join(node.announcement(), now, __version__)  # `NodeAgent.prefetch` announces again
            pump(now, queues[k])
        elif kind == "beat":
            if progress and int(now) % 60 == 0 and now - int(now) < HEARTBEAT_S / 2:
                print(
                    f"  [{policy}] t={now:.0f}s queued={sum(len(q.queued) for q in queues)} "
                    f"running={sum(len(q.running) for q in queues)} "
                    f"wall={time.perf_counter() - started_wall:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
            for node in nodes.values():
                loaded = tuple(node.loaded)
                changed = loaded != node.beat_loaded
                node.beat_loaded = loaded
                indexes[partition_for(node.node_id, partitions)].heartbeat(
                    node.node_id, now, sorted(loaded) if changed else None
                )
            if now + HEARTBEAT_S < end + 600:
                at(now + HEARTBEAT_S, "beat", None)
            for each in queues:
                pump(now, each)  # the dispatcher's timer: tasks past dispatch_timeout_s are aborted
        if now > end and not any(q.queued for q in queues) and not pending_copies:
            break
    out.wall_s = time.perf_counter() - started_wall
    return out


# ---------------------------------------------------------------------- the report


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):  # noqa: SIM115
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> dict[str, Outcome]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 nodes, 20 models, shorter (a smoke run)")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--disk", type=int, default=20, help="models a node's store holds")
    parser.add_argument("--vram", type=int, default=2, help="pipelines a node keeps loaded (pipeline_cache)")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--load", type=float, default=0.5, help="offered load, a share of the GPUs' capacity")
    parser.add_argument("--task-s", type=float, default=10.0, help="mean GPU seconds of one run")
    parser.add_argument("--load-s", type=float, default=8.0, help="disk to VRAM")
    parser.add_argument("--download-s", type=float, default=120.0)
    parser.add_argument("--warmup-s", type=float, default=600.0)
    parser.add_argument("--measure-s", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--progress", action="store_true", help="the queue every simulated minute, on stderr")
    parser.add_argument(
        "--partitions",
        default="1",
        help="dispatcher partitions split by node and by task, a comma-separated list run each (e.g. 1,2,4,8)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.models, args.disk, args.warmup_s, args.measure_s = 100, 20, 5, 300.0, 300.0
    cfg = Config(
        nodes=args.nodes,
        models=args.models,
        disk=args.disk,
        vram=args.vram,
        zipf=args.zipf,
        load=args.load,
        task_s=args.task_s,
        load_s=args.load_s,
        download_s=args.download_s,
        warmup_s=args.warmup_s,
        measure_s=args.measure_s,
        seed=args.seed,
    )
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(
        f"{cfg.nodes} nodes (disk {cfg.disk} models, VRAM {cfg.vram}), {cfg.models} models Zipf({cfg.zipf}), "
        f"load {cfg.load:.0%}, run {cfg.task_s:g} s, load {cfg.load_s:g} s, download {cfg.download_s:g} s, "
        f"warm-up {cfg.warmup_s:g} s + {cfg.measure_s:g} s measured, seed {cfg.seed}"
    )
    print(
        f"{'policy':12} {'P':>2} {'tasks':>7} {'runs':>7} {'warm':>7} {'cool':>7} {'cold':>6} "
        f"{'wait p50':>9} {'wait p95':>9} {'start p50':>9} {'start p95':>9} {'aborted':>8} {'downloads':>9} "
        f"{'load s/run':>10} {'wall s':>6}"
    )
    results: dict[str, Outcome] = {}
    runs = [(p, policy) for p in (int(x) for x in args.partitions.split(",")) for policy in args.policies.split(",")]
    for partitions, policy in runs:
        out = simulate(cfg, policy, progress=args.progress, partitions=partitions)
        if partitions == 1:
            results[policy] = out
        waits = np.array(out.waits) if out.waits else np.zeros(1)
        starts = np.array(out.starts) if out.starts else np.zeros(1)
        loading = out.cool * cfg.load_s + out.cold * (cfg.download_s + cfg.load_s)  # GPU time not diffusing
        print(
            f"{policy:12} {partitions:2d} {out.tasks:7d} {out.runs:7d} {out.share(out.warm):7.2%} "
            f"{out.share(out.cool):7.2%} {out.share(out.cold):6.2%} "
            f"{np.percentile(waits, 50):8.2f}s {np.percentile(waits, 95):8.2f}s "
            f"{np.percentile(starts, 50):8.2f}s {np.percentile(starts, 95):8.2f}s {out.aborted:8d} "
            f"{out.downloads:9d} {loading / max(out.runs, 1):10.2f} {out.wall_s:6.1f}",
            flush=True,
        )
    best = results.get("warm-wait")
    if best is not None:
        line = f"warm share (warm-wait, the dispatcher's defaults): {best.share(best.warm):.2%}"
        for other in ("stock", "crynux", "warm-first"):
            if other in results and results[other].share(results[other].warm):
                ratio = best.share(best.warm) / results[other].share(results[other].warm)
                line += f"; ratio to {other} {ratio:.2f}x"
        print(line)
        print(f"goal warm >= 95 %: {'met' if best.share(best.warm) >= 0.95 else 'MISSED'}")
    return results


if __name__ == "__main__":
    main()
