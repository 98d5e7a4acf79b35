"""Latency of a sampled task against an unsampled one (issue 13 goal: p50 within 10 %).

Starts the network of bench/control_plane.py, every service its own process (nats-server,
``python -m stipple_gateway``, ``stipple_dispatcher``, ``stipple_validator``,
``stipple_gatekeeper`` for the blob intake), with `STIPPLE_VALIDATION_RATE` at `--rate`
(0.5) for every service, so that the dispatcher's VRF puts about half the tasks on one node
and the rest on three, in the same run. The nodes (`--nodes`, each its own key and so its
own operator) are bench/fixed_image_node.py: the real node agent returning a fixed image
after `--compute-s` seconds of "compute" (an asyncio sleep, times N(1, `--jitter`)), so
that three copies on two cores do not contend for the CPU as real diffusion would, and
what shows is the protocol's cost.

`--tasks` tasks (after `--warmup` more) are submitted by `--concurrency` closed-loop
submitters (1: one after another), each timed from its POST to its outcome reaching a core
NATS subscription opened before the first POST. Afterwards every event of the measured
tasks is read back from the TASKS stream: the `assigned` event says whether the VRF
selected the task (`sampling.selected`) and on how many nodes it ran; the outcome carries
the same proof. Split by that, it prints p50 / p90 of POST -> outcome and of `submitted`
-> outcome by the server's timestamps, the ratio sampled / unsampled p50 against the goal
(<= 1.10), and each kind's time per stage ("last" is the last of the task's nodes: the only
one for an unsampled task, the slowest of three for a sampled one).

    python bench/sampling_latency.py                       # 150 sequential tasks, 0.5 s compute
    python bench/sampling_latency.py --compute-s 0         # the protocol alone
    python bench/sampling_latency.py --jitter 0.1          # copies that take different times
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
from control_plane import MODEL, BenchNetwork, Outcomes, Sample, machine, pct, submit_one  # bench/ is on sys.path
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from stipple_common import subjects
from stipple_common.messages import OUTCOME_EVENTS, RevealRequest, control_decoder
from stipple_common.process import ManagedProcess
from stipple_common.vrf import SamplingProof

HERE = Path(__file__).resolve().parent
GOAL_RATIO = 1.10


# ------------------------------------------------------------------ the network


@dataclass
class SamplingNetwork(BenchNetwork):
    """BenchNetwork whose nodes are bench/fixed_image_node.py processes with a "compute" time."""

    compute_s: float = 0.5
    jitter: float = 0.0
    diagnose: bool = False

    def start(self, timeout: float = 120.0) -> None:
        wanted, self.nodes = self.nodes, 0
        super().start(timeout)  # the control plane, no nodes
        self.nodes = wanted
        assert self.nats is not None
        env = {
            **os.environ,
            "STIPPLE_NATS_URL": self.nats.url,
            "STIPPLE_LOG_FORMAT": "json",
            "HF_HUB_OFFLINE": "1",
            **self.service_env,
            "STIPPLE_MODELS": f"{MODEL}=fixed",
            "BENCH_COMPUTE_S": str(self.compute_s),
            "BENCH_COMPUTE_JITTER": str(self.jitter),
            **({"BENCH_DIAGNOSE": "1"} if self.diagnose else {}),
        }
        logs = self.data_dir / "logs"
        try:
            for i in range(1, self.nodes + 1):
                # its key (node.key, made at first start) is there: its id and its operator
                node_env = {**env, "STIPPLE_MODEL_CACHE": str(self.data_dir / "nodes" / f"node-{i}")}
                cmd = [sys.executable, str(HERE / "fixed_image_node.py")]
                proc = ManagedProcess(f"node-{i}", cmd, node_env, logs / f"node-{i}.log")
                self.procs.append(proc)
                proc.start()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise


# ------------------------------------------------------------------ reading the events back


class _Event(msgspec.Struct):
    node_id: str = ""
    nodes: list[str] = []
    sampling: SamplingProof | None = None


_event = msgspec.json.Decoder(_Event)


@dataclass
class TaskRecord:
    """One task's events as stored: the server's timestamp of each (per node), what the
    `assigned` event and the outcome say about its sampling."""

    stamps: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    nodes: int = 0
    selected: bool | None = None  # from `assigned`
    outcome_selected: bool | None = None  # from the outcome


async def read_tasks(js: Any, task_ids: set[str]) -> dict[str, TaskRecord]:
    """Every stored event of `task_ids` (one ephemeral consumer over the TASKS stream)."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        filter_subject="tasks.>",
        inactive_threshold=30.0,
        mem_storage=True,
    )
    sub = await js.pull_subscribe("tasks.>", stream=subjects.TASKS_STREAM, config=config)
    out: dict[str, TaskRecord] = defaultdict(TaskRecord)
    try:
        remaining = (await sub.consumer_info()).num_pending
        while remaining > 0:
            msgs = await sub.fetch(min(remaining, 1000), timeout=10.0)
            remaining -= len(msgs)
            for msg in msgs:
                task_id, name = subjects.subject_token(msg.subject, 1), subjects.subject_token(msg.subject, 2)
                if task_id not in task_ids:
                    continue
                event = _event.decode(msg.data)
                record = out[task_id]
                name = "outcome" if name in OUTCOME_EVENTS else name
                record.stamps[name][event.node_id] = msg.metadata.timestamp.timestamp()
                if name == "assigned":
                    record.nodes = len(event.nodes)
                    record.selected = event.sampling.selected if event.sampling else None
                elif name == "outcome":
                    record.outcome_selected = event.sampling.selected if event.sampling else None
    finally:
        await sub.unsubscribe()
    return out


# ------------------------------------------------------------------ measuring


async def submit_all(client: httpx.AsyncClient, outcomes: Outcomes, tasks: int, concurrency: int) -> list[Sample]:
    """`tasks` tasks by `concurrency` closed-loop submitters (seeds from 1)."""
    seeds = iter(range(1, tasks + 1))
    done: list[Sample] = []

    async def submitter() -> None:
        for seed in seeds:
            done.append(await submit_one(client, outcomes, seed))

    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return done


STAGES = [
    ("submitted -> assigned (dispatcher)", "submitted", "assigned"),
    ("assigned -> last started (work to nodes)", "assigned", "started"),
    ("last started -> last committed (compute, upload)", "started", "committed"),
    ("last committed -> reveal (validator)", "committed", "reveal"),
    ("reveal -> last revealed (nodes)", "reveal", "revealed"),
    ("last revealed -> outcome (validator decides)", "revealed", "outcome"),
    ("first -> last committed (the slowest copy)", "committed", "committed"),
]


class RevealRequests:
    """A core NATS subscription to every node's control subject (``work.*.control``): when
    each reveal request was published (it is a JetStream message, seen here as the stream
    stores it), so that a slow reveal can be put on the validator or on the node."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}  # (task id, node id) -> epoch s

    async def subscribe(self, nc: Any) -> Any:
        async def on_msg(msg: Any) -> None:
            at = time.time()
            try:
                message = control_decoder.decode(msg.data)
            except msgspec.DecodeError:
                return
            if isinstance(message, RevealRequest):
                self.seen.setdefault((message.task_id, subjects.subject_token(msg.subject, 1)), at)

        return await nc.subscribe("work.*.control", cb=on_msg)


def reveal_lines(records: dict[str, TaskRecord], requests: RevealRequests, slow_s: float = 0.1) -> list[str]:
    """Each (task, node) reveal, from the `reveal` event to that node's `revealed`: how many
    took over `slow_s`, and whether the time went before the node's reveal request was
    published (the validator) or after (the node fetching it and answering)."""
    total = 0
    slow: list[tuple[float, float]] = []  # (reveal event -> request, request -> revealed), seconds
    for task_id, record in records.items():
        opened = record.stamps.get("reveal", {}).get("")
        if opened is None:
            continue
        for node, at in record.stamps.get("revealed", {}).items():
            total += 1
            request = requests.seen.get((task_id, node))
            if at - opened > slow_s and request is not None:
                slow.append((request - opened, at - request))
    lines = [f"node reveals over {slow_s * 1000:.0f} ms after the reveal opened: {len(slow)} of {total}"]
    if slow:
        before = statistics.median(b for b, _ in slow) * 1000
        after = statistics.median(a for _, a in slow) * 1000
        lines.append(
            f"  of their time, median: reveal opened -> request published {before:.1f} ms, "
            f"request -> node's revealed {after:.1f} ms"
        )
    return lines


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def report(samples: list[Sample], records: dict[str, TaskRecord]) -> tuple[list[str], dict[str, Any]]:
    """The figures: latency by kind, the ratio against the goal, time per stage by kind."""
    kinds: dict[str, list[tuple[Sample, TaskRecord]]] = {"unsampled": [], "sampled": []}
    unknown = mismatched = 0
    for sample in samples:
        record = records.get(sample.task_id)
        if record is None or record.selected is None:
            unknown += 1
            continue
        mismatched += record.outcome_selected is not None and record.outcome_selected != record.selected
        kinds["sampled" if record.selected else "unsampled"].append((sample, record))
    lines = [
        f"{'latency (ms)':<44} {'n':>5} {'nodes':>6} {'p50':>9} {'p90':>9} {'mean':>9} {'max':>9}",
    ]
    p50s: dict[tuple[str, str], float] = {}
    for measure in ("POST -> outcome at subscriber", "submitted -> outcome (stream)"):
        for kind, pairs in kinds.items():
            if not pairs:
                continue
            if measure.startswith("POST"):
                values = [s.total_s for s, _ in pairs]
            else:
                values = [
                    r.stamps["outcome"][""] - r.stamps["submitted"][""]
                    for _, r in pairs
                    if "outcome" in r.stamps and "submitted" in r.stamps
                ]
            nodes = sorted({r.nodes for _, r in pairs})
            p50s[(measure, kind)] = pct(values, 50)
            lines.append(
                f"{measure + ', ' + kind:<44} {len(values):5d} {'/'.join(map(str, nodes)):>6} "
                f"{ms(pct(values, 50))} {ms(pct(values, 90))} {ms(statistics.fmean(values))} {ms(max(values))}"
            )
    figures: dict[str, Any] = {"n": {k: len(v) for k, v in kinds.items()}, "tasks": []}
    for kind, pairs in kinds.items():
        for s, r in pairs:  # each task's stamps relative to its `submitted`, for a closer look (--json)
            t0 = r.stamps.get("submitted", {}).get("", s.sent_wall)
            stamps = {
                name: {node[:10]: round((at - t0) * 1000, 2) for node, at in by.items()}
                for name, by in r.stamps.items()
            }
            figures["tasks"].append(
                {"task_id": s.task_id, "kind": kind, "total_ms": s.total_s * 1000, "stamps": stamps}
            )
    for measure in ("POST -> outcome at subscriber", "submitted -> outcome (stream)"):
        if (measure, "sampled") in p50s and (measure, "unsampled") in p50s:
            ratio = p50s[(measure, "sampled")] / p50s[(measure, "unsampled")]
            figures[measure] = {
                "unsampled_p50_ms": p50s[(measure, "unsampled")] * 1000,
                "sampled_p50_ms": p50s[(measure, "sampled")] * 1000,
                "ratio": ratio,
            }
            verdict = "met" if ratio <= GOAL_RATIO else "MISSED"
            lines.append(f"ratio sampled / unsampled p50, {measure}: {ratio:.3f} (goal <= {GOAL_RATIO:.2f}: {verdict})")
    lines.append(
        f"tasks whose sampling could not be read: {unknown}; "
        f"outcome's sampling.selected differing from the assignment's: {mismatched}"
    )
    lines += [
        "",
        f"{'stage (server timestamps, ms)':<52} {'unsampled p50':>13} {'sampled p50':>11} {'diff':>7}"
        f" {'unsampled p90':>13} {'sampled p90':>11}",
    ]
    for label, a, b in STAGES:
        row = []
        for pairs in kinds.values():
            values = []
            for _, r in pairs:
                if a not in r.stamps or b not in r.stamps:
                    continue
                if a == b:
                    values.append(max(r.stamps[b].values()) - min(r.stamps[a].values()))
                else:
                    values.append(max(r.stamps[b].values()) - max(r.stamps[a].values()))
            row += [pct(values, 50) * 1000, pct(values, 90) * 1000] if values else [float("nan")] * 2
        lines.append(f"{label:<52} {row[0]:13.1f} {row[2]:11.1f} {row[2] - row[0]:7.1f} {row[1]:13.1f} {row[3]:11.1f}")
    return lines, figures


async def run(args: argparse.Namespace) -> int:
    lines = machine()
    for line in lines:
        print(line)
    data_dir = Path(tempfile.mkdtemp(prefix="stipple-sampling-latency-"))
    service_env = {"STIPPLE_VALIDATION_RATE": str(args.rate)}
    service_env.update(dict(item.split("=", 1) for item in args.service_env))
    network = SamplingNetwork(
        data_dir,
        nodes=args.nodes,
        service_env=service_env,
        compute_s=args.compute_s,
        jitter=args.jitter,
        diagnose=args.diagnose,
    )
    print(
        f"starting nats-server, gateway, dispatcher, validator, gatekeeper and {args.nodes} fixed-image nodes "
        f"(compute {args.compute_s:g} s x N(1, {args.jitter:g})), service env {service_env} ({data_dir}) ..."
    )
    started = time.perf_counter()
    network.start()
    print(f"network ready in {time.perf_counter() - started:.1f} s")
    failed = False
    try:
        assert network.nats is not None
        nc = await nats.connect(network.nats.url, name="stipple-bench")
        js = nc.jetstream()
        outcomes = Outcomes()
        subs = await outcomes.subscribe(nc)
        requests = RevealRequests()
        subs.append(await requests.subscribe(nc))
        limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
        async with httpx.AsyncClient(base_url=network.gateway_url, timeout=60.0, limits=limits) as client:
            print(f"\n{args.warmup} warm-up tasks, then {args.tasks} measured, {args.concurrency} submitter(s) ...")
            await submit_all(client, outcomes, args.warmup, args.concurrency)
            started = time.perf_counter()
            samples = await submit_all(client, outcomes, args.tasks, args.concurrency)
            took = time.perf_counter() - started
        network.check_alive()
        records = await read_tasks(js, {s.task_id for s in samples})
        for sub in subs:
            await sub.unsubscribe()
        await nc.drain()
        bad = [s for s in samples if s.outcome != "succeeded"]
        print(f"{len(samples)} tasks in {took:.1f} s; outcomes other than succeeded: {len(bad)}\n")
        out, figures = report(samples, records)
        out += ["", *reveal_lines(records, requests)]
        for line in out:
            print(line)
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        failed = bool(bad)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": lines, "args": vars(args), "report": out, **figures}))
    finally:
        network.stop()
        if args.keep:
            print(f"logs and data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    if failed:
        print("FAILED: some tasks did not succeed", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=0.5, help="STIPPLE_VALIDATION_RATE for every service")
    parser.add_argument("--nodes", type=int, default=3, help="fixed-image node processes (distinct operators)")
    parser.add_argument("--tasks", type=int, default=150, help="tasks measured")
    parser.add_argument("--warmup", type=int, default=10, help="tasks before the measured ones")
    parser.add_argument("--concurrency", type=int, default=1, help="closed-loop submitters (1: sequential)")
    parser.add_argument("--compute-s", type=float, default=0.5, help="each node's 'compute' per task, seconds")
    parser.add_argument("--jitter", type=float, default=0.0, help="relative std dev of the compute time")
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="STIPPLE_X=V", help="extra setting for every service"
    )
    parser.add_argument(
        "--diagnose", action="store_true", help="nodes log GC pauses and event-loop stalls (BENCH_DIAGNOSE=1)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_args()
    if not 0.0 <= args.rate <= 1.0:
        parser.error(f"--rate: a rate is in [0, 1], not {args.rate}")
    if args.concurrency < 1 or args.tasks < 1:
        parser.error("--concurrency and --tasks must be at least 1")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
