"""The gateway under load: 1,000 open events streams (SSE) and a steady rate of submissions.

Starts control_plane.py's network (`BenchNetwork`: nats-server, and the gateway,
dispatcher, validator and gatekeeper each its own process; the gateway is uvicorn on a
loopback port, so every watcher is a real socket) with `fixed_image_node.py` nodes:
`--fast-nodes` (2) serving ``tiny-sd`` that "compute" `--compute-s` (0.5 s, an asyncio
sleep), and one serving ``held-sd`` that never finishes (a day's sleep), so that tasks of
that model stay running or queued until the bench cancels them. The gateway's caps are
raised for the bench (every caller here is 127.0.0.1): ``STIPPLE_MAX_SSE_PER_CLIENT=0``,
``STIPPLE_ANON_RATE_PER_MINUTE=0``, ``STIPPLE_MAX_SSE_STREAMS`` at 4 x `--watchers`. Also
``STIPPLE_VALIDATION_RATE=0`` and ``STIPPLE_REPLICATION=1`` (every task on one node: the
point is the gateway, and the gateway takes a task only while `replication` nodes serve its
model), and ``STIPPLE_DISPATCH_TIMEOUT_S=3600`` (queued ``held-sd`` tasks are not aborted
while watched). The file-descriptor limit is raised (inherited by every service) if it is
below 8 per watcher.

Each round, against a target:

1. `--held-tasks` (10) ``held-sd`` tasks (never finished: queued, or assigned to the one
   ``held-sd`` node, which sleeps through a cancelled task) and
   `--finished-tasks` (10) ``tiny-sd`` tasks run to their outcome;
2. `--watchers` (1,000) watchers, opened `--open-concurrency` (50) at a time:
   `--finished-watchers` (100) loop over the finished tasks (open, read to the outcome,
   close, pause `--finished-pause` s, again) and the rest hold a stream on a held task
   (spread evenly); a watcher is open once its first frame arrived;
3. for `--duration` (60 s), `--rate` (2) POST /v1/tasks per second (open loop: each POST
   at its time, whatever the last one took), each new task watched by `--task-watchers`
   (2) more streams until its outcome;
4. `--drop` (20 %) of each held task's watchers close their connection without a word:
   how soon the server's count of open streams falls to the watchers still open;
5. the held tasks are cancelled one after another (DELETE /v1/tasks/<id>), each once the
   last one's watchers all ended: the fan-out of one outcome to each task's watchers;
6. every watcher has ended; after `--settle` (5 s), how many streams the gateway still
   counts open (its ``stipple_gateway_sse_streams`` gauge) and how many TCP connections
   it still holds.

The figures: POST latency (p50/p95/p99), the time from each outcome (when it reached a
core NATS subscription of the bench, opened before any POST) to each watcher's outcome
frame, and from each cancel's DELETE being sent to the last watcher's outcome; errors by
kind (HTTP status, the exception's class, a stream that ended without an outcome); the
gateway process's RSS (sampled every 0.1 s by a thread, so a busy event loop does not
skip samples) before the watchers open, at the peak and after they closed, and its CPU
seconds. `--rounds` (3) rounds show whether memory returns or grows round after round.

The baseline, in the same run, with the same client code and the same load shape: a
minimal Starlette app served by uvicorn as the gateway is (one process, `uvicorn.Config`
with access log and lifespan off), whose POST answers 202 with a new id at once and whose
events stream sends a frame, keep-alives at the gateway's interval, and an outcome frame
(timestamped by the server) when the id "finishes": `--compute-s` after its POST, or, for
a held one, on a POST /tasks/<id>/finish. It costs what the HTTP stack
alone costs: the ratios gateway / baseline are what the gateway's own work adds.

The client is plain asyncio with httpx (installed, and what the project's client and tests
use), in this process. Locust is not installed, needs gevent (which monkey-patches the
process) and has no SSE client of its own; 1,000 long-lived streams are what asyncio is
for. Watchers share an `httpx.AsyncClient` per 50 (httpcore's pool scans its connections
on every request, so one pool of 1,000 costs more client CPU than twenty of 50).

    python bench/gateway_load.py                 # 1,000 watchers, 60 s, 3 rounds
    python bench/gateway_load.py --quick         # 100 watchers, 10 s, 2 rounds (~3 min here, most of it start-up)
    python bench/gateway_load.py --watchers 2000 --rate 5 --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import psutil
from control_plane import MODEL, BenchNetwork, Outcomes, machine, pct, task_body  # bench/ is on sys.path

from stipple_common.messages import OUTCOME_EVENTS
from stipple_common.process import ManagedProcess, free_port

HERE = Path(__file__).resolve().parent
HELD_MODEL = "held-sd"
HOLD_FOREVER_S = 86_400.0  # the held-sd node's "compute": it never finishes a task by itself
CLIENTS_PER = 50  # watchers per httpx.AsyncClient
OUTCOMES = set(OUTCOME_EVENTS)


# ------------------------------------------------------------------ the network


@dataclass
class LoadNetwork(BenchNetwork):
    """BenchNetwork with `fast` nodes for tiny-sd (a set compute time) and one held-sd node that never finishes."""

    fast: int = 2
    compute_s: float = 0.5

    def start(self, timeout: float = 120.0) -> None:
        self.nodes = 0
        super().start(timeout)  # the control plane, no nodes
        assert self.nats is not None
        env = {
            **os.environ,
            "STIPPLE_NATS_URL": self.nats.url,
            "STIPPLE_LOG_FORMAT": "json",
            "HF_HUB_OFFLINE": "1",
            **self.service_env,
        }
        logs = self.data_dir / "logs"
        kinds = [(MODEL, self.compute_s)] * self.fast + [(HELD_MODEL, HOLD_FOREVER_S)]
        try:
            for i, (model, compute_s) in enumerate(kinds, start=1):
                node_env = {
                    **env,
                    "STIPPLE_MODELS": f"{model}=fixed",
                    "BENCH_COMPUTE_S": str(compute_s),
                    "STIPPLE_MODEL_CACHE": str(self.data_dir / "nodes" / f"node-{i}"),
                }
                cmd = [sys.executable, str(HERE / "fixed_image_node.py")]
                proc = ManagedProcess(f"node-{i}", cmd, node_env, logs / f"node-{i}.log")
                self.procs.append(proc)
                proc.start()
            self.nodes = len(kinds)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise


# ------------------------------------------------------------------ the baseline: Starlette + uvicorn alone


def serve_baseline(port: int, keepalive_s: float) -> None:
    """A minimal SSE server in the shape of the gateway's task routes (run in its own process)."""
    import secrets

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from stipple_gateway.events import KEEPALIVE, frame

    done: dict[str, asyncio.Event] = {}
    outcome: dict[str, tuple[str, float]] = {}
    streams = 0

    def finish(task_id: str, name: str) -> None:
        if task_id in done and not done[task_id].is_set():
            outcome[task_id] = (name, time.time())
            done[task_id].set()

    async def post_task(request: Request) -> Response:
        await request.body()
        task_id = secrets.token_hex(16)
        done[task_id] = asyncio.Event()
        delay = float(request.query_params.get("delay", "0"))
        if delay >= 0:
            asyncio.get_running_loop().call_later(delay, finish, task_id, "succeeded")
        return JSONResponse({"task_id": task_id, "status": "queued"}, status_code=202)

    async def finish_task(request: Request) -> Response:
        finish(request.path_params["task_id"], "cancelled")
        return JSONResponse({"task_id": request.path_params["task_id"]}, status_code=202)

    async def events(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        if task_id not in done:
            return JSONResponse({"error": "not_found"}, status_code=404)

        async def frames() -> Any:
            nonlocal streams
            streams += 1
            try:
                yield frame("submitted", {"task_id": task_id}, f"{task_id}:submitted")
                while not done[task_id].is_set():
                    try:
                        await asyncio.wait_for(done[task_id].wait(), keepalive_s)
                    except TimeoutError:
                        yield KEEPALIVE
                name, at = outcome[task_id]
                yield frame(name, {"task_id": task_id, "at": at}, f"{task_id}:{name}")
            finally:
                streams -= 1

        return StreamingResponse(frames(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def stats(request: Request) -> Response:
        return JSONResponse({"streams": streams})

    app = Starlette(
        routes=[
            Route("/tasks", post_task, methods=["POST"]),
            Route("/tasks/{task_id}/finish", finish_task, methods=["POST"]),
            Route("/tasks/{task_id}/events", events, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
        ]
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off")
    uvicorn.Server(config).run()


# ------------------------------------------------------------------ targets


class Target:
    """What the load needs from a server: submit, the events path, finish a held task, when an outcome happened."""

    name = ""
    base_url = ""
    pid = 0

    async def submit(self, client: httpx.AsyncClient, seed: int, held: bool = False) -> tuple[str, float]:
        raise NotImplementedError

    def events_path(self, task_id: str) -> str:
        raise NotImplementedError

    async def finish(self, client: httpx.AsyncClient, task_id: str) -> None:
        raise NotImplementedError

    def outcome_at(self, task_id: str, data: str) -> float | None:
        raise NotImplementedError

    async def wait_finished(self, task_id: str) -> None:
        raise NotImplementedError

    async def open_streams(self, client: httpx.AsyncClient) -> float:
        raise NotImplementedError


class GatewayTarget(Target):
    name = "gateway"

    def __init__(self, network: LoadNetwork, outcomes: Outcomes) -> None:
        self.base_url = network.gateway_url
        self.pid = network.pids()["gateway"]
        self.outcomes = outcomes

    async def submit(self, client: httpx.AsyncClient, seed: int, held: bool = False) -> tuple[str, float]:
        body = task_body(seed)
        if held:
            body["base_model"] = HELD_MODEL
        started = time.perf_counter()
        response = await client.post("/v1/tasks", json=body)
        took = time.perf_counter() - started
        if response.status_code != 202:
            raise HttpStatus(response.status_code, response.text[:300])
        return response.json()["task_id"], took

    def events_path(self, task_id: str) -> str:
        return f"/v1/tasks/{task_id}/events"

    async def finish(self, client: httpx.AsyncClient, task_id: str) -> None:
        response = await client.delete(f"/v1/tasks/{task_id}")
        if response.status_code != 202:
            raise HttpStatus(response.status_code, response.text[:300])

    def outcome_at(self, task_id: str, data: str) -> float | None:
        seen = self.outcomes.seen.get(task_id)
        return seen[1] if seen else None

    async def wait_finished(self, task_id: str) -> None:
        await self.outcomes.wait(task_id, 60.0)

    async def open_streams(self, client: httpx.AsyncClient) -> float:
        text = (await client.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith("stipple_gateway_sse_streams "):
                return float(line.split()[1])
        return float("nan")


class BaselineTarget(Target):
    name = "baseline"

    def __init__(self, port: int, pid: int, compute_s: float) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.pid = pid
        self.compute_s = compute_s

    async def submit(self, client: httpx.AsyncClient, seed: int, held: bool = False) -> tuple[str, float]:
        started = time.perf_counter()
        delay = -1 if held else self.compute_s
        response = await client.post(f"/tasks?delay={delay}", json=task_body(seed))
        took = time.perf_counter() - started
        if response.status_code != 202:
            raise HttpStatus(response.status_code, response.text[:300])
        return response.json()["task_id"], took

    def events_path(self, task_id: str) -> str:
        return f"/tasks/{task_id}/events"

    async def finish(self, client: httpx.AsyncClient, task_id: str) -> None:
        response = await client.post(f"/tasks/{task_id}/finish")
        if response.status_code != 202:
            raise HttpStatus(response.status_code, response.text[:300])

    def outcome_at(self, task_id: str, data: str) -> float | None:
        return float(json.loads(data)["at"])

    async def wait_finished(self, task_id: str) -> None:
        await asyncio.sleep(self.compute_s + 0.05)

    async def open_streams(self, client: httpx.AsyncClient) -> float:
        return float((await client.get("/stats")).json()["streams"])


class HttpStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, HttpStatus):
        return f"HTTP {exc.status}"
    return type(exc).__name__


# ------------------------------------------------------------------ measuring


class RssSampler(threading.Thread):
    """A process's RSS every `every` seconds, from a thread (a busy event loop skips no sample)."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.samples.append((time.perf_counter(), self.process.memory_info().rss))
            except psutil.Error:
                return
            self.halt.wait(self.every)

    def now(self) -> int:
        return int(self.process.memory_info().rss)

    def peak(self, since: float, until: float) -> int:
        return max((rss for t, rss in self.samples if since <= t <= until), default=0)


@dataclass
class Watch:
    kind: str  # held, task (a POSTed task), finished
    task_id: str
    started: float = 0.0
    first_frame: float | None = None  # perf_counter
    frames: int = 0
    keepalives: int = 0
    outcome: str | None = None
    outcome_wall: float | None = None  # time.time() when the outcome frame arrived
    outcome_data: str = ""
    error: str | None = None
    ended: float = 0.0
    dropped: bool = False  # closed by the client before the outcome, on purpose
    detail: str = ""  # the error's message


async def watch(client: httpx.AsyncClient, target: Target, w: Watch, opened: asyncio.Event | None = None) -> Watch:
    """Read one events stream to its end, noting when each kind of frame arrived."""
    w.started = time.perf_counter()
    try:
        async with client.stream("GET", target.events_path(w.task_id), headers={"Accept": "text/event-stream"}) as r:
            if r.status_code != 200:
                await r.aread()
                w.error = f"HTTP {r.status_code}"
                return w
            event, data = "", ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line.startswith(":"):
                    w.keepalives += 1
                elif not line and event:
                    w.frames += 1
                    if w.first_frame is None:
                        w.first_frame = time.perf_counter()
                        if opened is not None:
                            opened.set()
                    if event in OUTCOMES:
                        w.outcome, w.outcome_wall, w.outcome_data = event, time.time(), data
                    event = ""
        if w.outcome is None:
            w.error = "ended without an outcome"
    except (httpx.HTTPError, OSError) as exc:
        w.error = error_kind(exc) + (" before any frame" if w.first_frame is None else " mid-stream")
        w.detail = str(exc)[:200]
    finally:
        w.ended = time.perf_counter()
        if opened is not None:
            opened.set()  # a failed open does not hold up the ramp
    return w


@dataclass
class Round:
    target: str
    index: int
    rss_before: int = 0
    rss_peak: int = 0
    rss_closed: int = 0  # just after every watcher ended
    rss_end: int = 0  # after the settle
    cpu_s: float = 0.0
    ramp_s: float = 0.0  # opening the held watchers
    posts: list[float] = field(default_factory=list)
    submit_errors: Counter[str] = field(default_factory=Counter)
    watches: list[Watch] = field(default_factory=list)
    finished_loops: int = 0
    cancels: list[tuple[float, float | None, float]] = field(default_factory=list)  # per held task: see below
    streams_after: float = float("nan")
    conns_after: int = 0
    conns_peak: int = 0
    dropped: int = 0  # held watchers the client closed on purpose
    streams_expected: int = 0  # held watchers still open then
    streams_after_drop: float = float("nan")  # what the server counted open
    drop_s: float = 0.0  # how long until it did
    client_cpu_s: float = 0.0  # this process's CPU seconds in the round
    client_lag: list[float] = field(default_factory=list)  # how late this process's event loop woke a 50 ms sleep

    def errors(self) -> Counter[str]:
        out = Counter(f"{w.kind} watcher: {w.error}" for w in self.watches if w.error)
        out.update({f"submit: {k}": v for k, v in self.submit_errors.items()})
        return out


def fanout(watches: list[Watch], target: Target) -> list[float]:
    """Per watcher that got an outcome: seconds from the outcome (as the target dates it) to its frame."""
    out = []
    for w in watches:
        if w.outcome_wall is None:
            continue
        at = target.outcome_at(w.task_id, w.outcome_data)
        if at is not None:
            out.append(w.outcome_wall - at)
    return out


def connections(pid: int, port: int) -> int:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return -1
    return sum(1 for c in conns if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


async def run_round(target: Target, args: argparse.Namespace, index: int, sampler: RssSampler) -> Round:
    rnd = Round(target.name, index)
    port = int(target.base_url.rsplit(":", 1)[1])
    seeds = iter(range(10**6 * (index + 1) + (0 if target.name == "gateway" else 5 * 10**5), 10**9))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=CLIENTS_PER)
    timeout = httpx.Timeout(connect=30.0, read=120.0, write=30.0, pool=30.0)
    n_clients = max(1, -(-args.watchers // CLIENTS_PER)) + 2
    clients = [httpx.AsyncClient(base_url=target.base_url, limits=limits, timeout=timeout) for _ in range(n_clients)]
    control = httpx.AsyncClient(base_url=target.base_url, timeout=timeout)
    tasks: list[asyncio.Task[Any]] = []  # the held and new-task watchers' asyncio tasks
    task_watches: list[Watch] = []  # what each of them is watching
    lag_probe: asyncio.Task[None] | None = None
    try:
        # 1. the tasks watched
        held = [(await target.submit(control, next(seeds), held=True))[0] for _ in range(args.held_tasks)]
        finished = [(await target.submit(control, next(seeds)))[0] for _ in range(args.finished_tasks)]
        for task_id in finished:
            await target.wait_finished(task_id)
        await asyncio.sleep(1.0)
        cpu0 = psutil.Process(target.pid).cpu_times()
        own0 = psutil.Process().cpu_times()
        rnd.rss_before = sampler.now()
        t_start = time.perf_counter()
        lag_probe = asyncio.create_task(probe_lag(rnd.client_lag))

        # 2. the watchers: the held ones (a slot each in the ramp), then the finished-task loopers
        n_finished = min(args.finished_watchers, args.watchers)
        n_held = args.watchers - n_finished
        gate = asyncio.Semaphore(args.open_concurrency)
        held_watches: dict[str, list[Watch]] = {t: [] for t in held}
        held_tasks: dict[str, list[asyncio.Task[Watch]]] = {t: [] for t in held}

        async def open_held(i: int) -> None:
            w = Watch("held", held[i % len(held)])
            held_watches[w.task_id].append(w)
            rnd.watches.append(w)
            opened = asyncio.Event()
            async with gate:
                task = asyncio.create_task(watch(clients[i // CLIENTS_PER], target, w, opened))
                tasks.append(task)
                task_watches.append(w)
                held_tasks[w.task_id].append(task)
                await opened.wait()

        await asyncio.gather(*(open_held(i) for i in range(n_held)))
        rnd.ramp_s = time.perf_counter() - t_start
        rnd.conns_peak = connections(target.pid, port)
        print(
            f"  {n_held} held watchers open in {rnd.ramp_s:.1f} s "
            f"({sum(1 for w in rnd.watches if w.error)} failed); RSS {sampler.now() / 2**20:.0f} MiB"
        )
        stop = asyncio.Event()

        async def looper(i: int) -> None:
            client = clients[(n_held + i) // CLIENTS_PER]
            while not stop.is_set():
                w = await watch(client, target, Watch("finished", random.choice(finished)))
                rnd.watches.append(w)
                rnd.finished_loops += 1
                try:
                    await asyncio.wait_for(stop.wait(), args.finished_pause)
                except TimeoutError:
                    pass

        loopers = [asyncio.create_task(looper(i)) for i in range(n_finished)]

        # 3. steady submissions, each new task watched
        async def submit_and_watch(i: int) -> None:
            try:
                task_id, took = await target.submit(control, next(seeds))
            except (HttpStatus, httpx.HTTPError, OSError) as exc:
                rnd.submit_errors[error_kind(exc)] += 1
                return
            rnd.posts.append(took)
            for j in range(args.task_watchers):
                w = Watch("task", task_id)
                rnd.watches.append(w)
                task_watches.append(w)
                tasks.append(asyncio.create_task(watch(clients[-1 - (i + j) % 2], target, w)))

        submitters = []
        t0 = time.perf_counter()
        total = int(args.duration * args.rate)
        for i in range(total):
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))
            submitters.append(asyncio.create_task(submit_and_watch(i)))
            if i % max(1, int(args.rate * 10)) == 0:
                rnd.conns_peak = max(rnd.conns_peak, connections(target.pid, port))
        await asyncio.sleep(max(0.0, t0 + args.duration - time.perf_counter()))
        await asyncio.gather(*submitters)
        stop.set()
        await asyncio.gather(*loopers)
        print(
            f"  {len(rnd.posts)} submissions in {args.duration:g} s, {rnd.finished_loops} finished-task streams; "
            f"RSS {sampler.now() / 2**20:.0f} MiB"
        )

        # 4. some held watchers go away without a word (the client closes the connection): the
        # server must close their streams (and give back their slots and subscriptions) at once
        await wait_ended([t for t, w in zip(tasks, task_watches, strict=True) if w.kind == "task"], 60.0)
        hung_up = []
        for task_id in held:
            ws, ts = held_watches[task_id], held_tasks[task_id]
            for w, t in list(zip(ws, ts, strict=True))[: int(len(ws) * args.drop)]:
                w.dropped = True
                t.cancel()
                hung_up.append(t)
        await asyncio.gather(*hung_up, return_exceptions=True)
        expected = sum(1 for w in rnd.watches if w.kind == "held" and not w.dropped and not w.error)
        rnd.dropped = sum(1 for w in rnd.watches if w.dropped)
        dropped_at = time.perf_counter()
        while True:
            rnd.streams_after_drop = await target.open_streams(control)
            rnd.drop_s = time.perf_counter() - dropped_at
            if rnd.streams_after_drop <= expected or rnd.drop_s > args.keepalive_s + 5:
                break
            await asyncio.sleep(0.05)
        rnd.streams_expected = expected
        print(
            f"  {rnd.dropped} held watchers dropped: the server counts {rnd.streams_after_drop:g} streams open "
            f"after {rnd.drop_s:.2f} s (held still open: {expected})"
        )

        # 5. the held tasks end, one after another
        for task_id in held:
            sent = time.perf_counter()
            sent_wall = time.time()
            await target.finish(control, task_id)
            ws = held_watches[task_id]
            await wait_ended(held_tasks[task_id], 60.0)
            got = [w for w in ws if w.outcome_wall is not None]
            if got:
                last = max(w.outcome_wall or 0.0 for w in got)
                outcome = target.outcome_at(task_id, got[0].outcome_data)
                rnd.cancels.append((last - sent_wall, last - outcome if outcome else None, time.perf_counter() - sent))
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120.0)
        t_closed = time.perf_counter()
        cpu1 = psutil.Process(target.pid).cpu_times()
        own1 = psutil.Process().cpu_times()
        rnd.cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        rnd.client_cpu_s = (own1.user + own1.system) - (own0.user + own0.system)
        rnd.rss_closed = sampler.now()
        rnd.rss_peak = sampler.peak(t_start, t_closed)
    finally:
        if lag_probe is not None:
            lag_probe.cancel()
        for task in tasks:
            task.cancel()
        for client in clients:
            await client.aclose()
    # 6. what is left open
    await asyncio.sleep(args.settle)
    rnd.streams_after = await target.open_streams(control)
    await control.aclose()
    rnd.conns_after = connections(target.pid, port)
    rnd.rss_end = sampler.now()
    return rnd


async def probe_lag(out: list[float], every: float = 0.05) -> None:
    """How late this process's event loop wakes a sleep: the client's own share of every latency here."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(every)
        out.append(time.perf_counter() - started - every)


async def wait_ended(watchers: list[asyncio.Task[Watch]], timeout: float) -> None:
    if watchers:
        await asyncio.wait(watchers, timeout=timeout)


# ------------------------------------------------------------------ reporting


def mib(n: float) -> str:
    return f"{n / 2**20:7.1f} MiB"


def ms_row(label: str, values: list[float]) -> str:
    if not values:
        return f"{label:<52} (none)"
    return (
        f"{label:<52} {pct(values, 50) * 1000:8.1f} {pct(values, 95) * 1000:8.1f} {pct(values, 99) * 1000:8.1f} "
        f"{max(values) * 1000:8.1f}  n={len(values)}"
    )


def round_lines(rnd: Round, target: Target, args: argparse.Namespace) -> list[str]:
    held = [w for w in rnd.watches if w.kind == "held"]
    task = [w for w in rnd.watches if w.kind == "task"]
    fin = [w for w in rnd.watches if w.kind == "finished"]
    opened = [w.first_frame - w.started for w in held if w.first_frame is not None]
    lines = [
        f"{target.name}, round {rnd.index + 1}",
        f"{'(ms)':<52} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}",
        ms_row("POST -> 202", rnd.posts),
        ms_row("held watcher: GET -> first frame", opened),
        ms_row("outcome -> a held watcher's outcome frame", fanout(held, target)),
        ms_row("cancel sent -> the task's last held watcher", [c[0] for c in rnd.cancels]),
        ms_row("outcome -> a new task's watcher's outcome frame", fanout(task, target)),
        ms_row("finished task: GET -> stream ended", [w.ended - w.started for w in fin if not w.error]),
        f"held watchers {len(held)} opened in {rnd.ramp_s:.2f} s; {len(task)} new-task watchers; "
        f"{len(fin)} finished-task streams; {len(rnd.posts)} submissions",
        f"errors: {dict(rnd.errors()) or 'none'}",
        *(f"  {w.kind} watcher of {w.task_id}: {w.error}: {w.detail}" for w in [x for x in rnd.watches if x.error][:5]),
        ms_row("the bench client's event loop: lag of a 50 ms sleep", rnd.client_lag),
        f"the bench client's CPU seconds in the round: {rnd.client_cpu_s:.1f}",
        f"RSS: before {mib(rnd.rss_before)}, peak {mib(rnd.rss_peak)}, all closed {mib(rnd.rss_closed)}, "
        f"after {args.settle:g} s {mib(rnd.rss_end)}; peak - before per held watcher "
        f"{(rnd.rss_peak - rnd.rss_before) / max(1, len(held)) / 1024:.1f} KiB",
        f"CPU seconds (the server process) in the round: {rnd.cpu_s:.1f}; TCP connections to it: "
        f"peak {rnd.conns_peak}, after close {rnd.conns_after}; streams it counts open after close: "
        f"{rnd.streams_after:g}",
        f"{rnd.dropped} held watchers hung up early: the server counted {rnd.streams_after_drop:g} streams open "
        f"{rnd.drop_s:.2f} s later ({rnd.streams_expected} held watchers were still open)",
    ]
    return lines


def summary_lines(rounds: dict[str, list[Round]], targets: dict[str, Target]) -> list[str]:
    def fig(name: str, what: str) -> list[float]:
        out: list[float] = []
        for rnd in rounds[name]:
            if what == "posts":
                out += rnd.posts
            elif what == "held":
                out += fanout([w for w in rnd.watches if w.kind == "held"], targets[name])
            elif what == "task":
                out += fanout([w for w in rnd.watches if w.kind == "task"], targets[name])
            elif what == "cancel":
                out += [c[0] for c in rnd.cancels]
            elif what == "lag":
                out += rnd.client_lag
        return out

    lines = ["", "summary (all rounds)", f"{'':<44} {'gateway':>10} {'baseline':>10} {'ratio':>8}"]
    for label, what, q in (
        ("POST -> 202 p50 (ms)", "posts", 50),
        ("POST -> 202 p95 (ms)", "posts", 95),
        ("POST -> 202 p99 (ms)", "posts", 99),
        ("outcome -> held watcher p50 (ms)", "held", 50),
        ("outcome -> held watcher p99 (ms)", "held", 99),
        ("cancel sent -> last held watcher p50 (ms)", "cancel", 50),
        ("outcome -> new-task watcher p50 (ms)", "task", 50),
        ("outcome -> new-task watcher p99 (ms)", "task", 99),
        ("bench client's loop lag p50 (ms)", "lag", 50),
        ("bench client's loop lag p99 (ms)", "lag", 99),
    ):
        g, b = fig("gateway", what), fig("baseline", what)
        if g and b:
            gv, bv = pct(g, q) * 1000, pct(b, q) * 1000
            lines.append(f"{label:<44} {gv:10.1f} {bv:10.1f} {gv / bv if bv else float('inf'):8.1f}")
    for label, key in (
        ("ramp: open the held watchers (s)", "ramp_s"),
        ("server CPU seconds per round", "cpu_s"),
        ("bench client CPU seconds per round", "client_cpu_s"),
    ):
        gs = max(float(getattr(r, key)) for r in rounds["gateway"])
        bs = max(float(getattr(r, key)) for r in rounds["baseline"])
        lines.append(f"{label:<44} {gs:10.2f} {bs:10.2f} {gs / bs if bs else float('inf'):8.1f}")
    gm = max((r.rss_peak - r.rss_before) for r in rounds["gateway"]) / 2**20
    bm = max((r.rss_peak - r.rss_before) for r in rounds["baseline"]) / 2**20
    lines.append(f"{'RSS peak - before, the worst round (MiB)':<44} {gm:10.1f} {bm:10.1f} {gm / bm if bm else 0:8.1f}")
    for name in ("gateway", "baseline"):
        errors = sum((r.errors() for r in rounds[name]), Counter())
        lines.append(f"{name} errors, all rounds: {dict(errors) or 'none'}")
    for name in ("gateway", "baseline"):
        rs = rounds[name]
        first = rs[0].rss_before
        lines.append(
            f"{name} RSS over the rounds: before {mib(first).strip()}; "
            + "; ".join(
                f"round {r.index + 1} peak {mib(r.rss_peak).strip()}, end {mib(r.rss_end).strip()}"
                f" ({(r.rss_end - first) / 2**20:+.1f})"
                for r in rs
            )
        )
    return lines


# ------------------------------------------------------------------ main


def start_baseline(port: int, keepalive_s: float, log: Path, timeout: float = 60.0) -> ManagedProcess:
    """This script with --serve-baseline, once it answers."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-baseline",
        str(port),
        "--keepalive-s",
        str(keepalive_s),
    ]
    baseline = ManagedProcess("baseline", cmd, {**os.environ}, log).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/stats", timeout=2).raise_for_status()
            return baseline
        except httpx.HTTPError:
            if baseline.returncode is not None or time.monotonic() > deadline:
                baseline.stop()
                raise RuntimeError(f"the baseline server did not start:\n{baseline.tail()}") from None
            time.sleep(0.2)


def raise_fd_limit(needed: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return f"file descriptors: soft limit {soft} (inherited by every service)"


async def run(args: argparse.Namespace) -> int:
    lines = machine()
    lines.append(raise_fd_limit(8 * args.watchers + 1024))
    for line in lines:
        print(line)
    report: dict[str, Any] = {"machine": lines, "args": vars(args)}
    data_dir = Path(tempfile.mkdtemp(prefix="stipple-gateway-load-"))
    service_env = {
        "STIPPLE_MAX_SSE_STREAMS": str(4 * args.watchers),
        "STIPPLE_MAX_SSE_PER_CLIENT": "0",
        "STIPPLE_ANON_RATE_PER_MINUTE": "0",
        "STIPPLE_VALIDATION_RATE": "0",
        "STIPPLE_REPLICATION": "1",
        "STIPPLE_DISPATCH_TIMEOUT_S": "3600",
        "STIPPLE_SSE_KEEPALIVE_S": str(args.keepalive_s),
        **dict(item.split("=", 1) for item in args.service_env),
    }
    rounds: dict[str, list[Round]] = {"gateway": [], "baseline": []}
    targets: dict[str, Target] = {}
    failed = False
    # the baseline first, while the network is not started: the same machine, the same client
    port = free_port()
    baseline = start_baseline(port, args.keepalive_s, data_dir / "logs" / "baseline.log")
    try:
        assert baseline.pid is not None
        target: Target = BaselineTarget(port, baseline.pid, args.compute_s)
        targets["baseline"] = target
        sampler = RssSampler(target.pid)
        sampler.start()
        for i in range(args.rounds):
            print(f"\n[baseline] round {i + 1}: Starlette + uvicorn alone ...")
            rnd = await run_round(target, args, i, sampler)
            rounds["baseline"].append(rnd)
            for line in round_lines(rnd, target, args):
                print(line)
        sampler.halt.set()
    finally:
        baseline.stop()

    network = LoadNetwork(data_dir, service_env=service_env, fast=args.fast_nodes, compute_s=args.compute_s)
    print(f"\nstarting the network ({args.fast_nodes} tiny-sd nodes, 1 held-sd node; {data_dir}) ...")
    started = time.perf_counter()
    network.start()
    print(f"network ready in {time.perf_counter() - started:.1f} s; service env {service_env}")
    try:
        assert network.nats is not None
        nc = await nats.connect(network.nats.url, name="stipple-bench")
        outcomes = Outcomes()
        subs = await outcomes.subscribe(nc)
        target = GatewayTarget(network, outcomes)
        targets["gateway"] = target
        # warm-up: a few tasks and streams, so that imports and first-use caches are not counted
        async with httpx.AsyncClient(base_url=target.base_url, timeout=60) as client:
            for seed in range(5):
                task_id, _ = await target.submit(client, seed)
                await target.wait_finished(task_id)
                await watch(client, target, Watch("warm-up", task_id))
        sampler = RssSampler(target.pid)
        sampler.start()
        for i in range(args.rounds):
            print(f"\n[gateway] round {i + 1} ...")
            rnd = await run_round(target, args, i, sampler)
            network.check_alive()
            rounds["gateway"].append(rnd)
            for line in round_lines(rnd, target, args):
                print(line)
            failed |= bool(rnd.errors()) or rnd.streams_after != 0
        sampler.halt.set()
        for sub in subs:
            await sub.unsubscribe()
        await nc.drain()
    finally:
        network.stop()
        if args.keep:
            print(f"logs and data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    summary = summary_lines(rounds, targets)
    summary.append(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for line in summary:
        print(line)
    report["rounds"] = {
        name: [round_lines(r, targets[name], args) for r in rs] for name, rs in rounds.items() if name in targets
    }
    report["summary"] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if failed:
        print("FAILED: the gateway had errors or left streams open (see above)", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=1000, help="events streams open at once")
    parser.add_argument("--finished-watchers", type=int, default=100, help="of them, looping over finished tasks")
    parser.add_argument("--finished-pause", type=float, default=1.0, help="a finished-task watcher's pause (s)")
    parser.add_argument("--held-tasks", type=int, default=10, help="tasks the other watchers hold streams on")
    parser.add_argument("--finished-tasks", type=int, default=10)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of steady submissions")
    parser.add_argument("--rate", type=float, default=2.0, help="POST /v1/tasks per second")
    parser.add_argument("--task-watchers", type=int, default=2, help="streams opened on each new task")
    parser.add_argument("--open-concurrency", type=int, default=50, help="watchers opening at once in the ramp")
    parser.add_argument("--drop", type=float, default=0.2, help="share of held watchers that hang up early")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after the last watcher, before RSS 'after'")
    parser.add_argument("--fast-nodes", type=int, default=2)
    parser.add_argument("--compute-s", type=float, default=0.5, help="a tiny-sd task's compute time (asyncio sleep)")
    parser.add_argument("--keepalive-s", type=float, default=15.0, help="STIPPLE_SSE_KEEPALIVE_S, and the baseline's")
    parser.add_argument("--service-env", action="append", default=[], metavar="STIPPLE_X=V")
    parser.add_argument("--quick", action="store_true", help="100 watchers, 10 s, 2 rounds")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, args.keepalive_s)
        return
    if args.quick:
        args.watchers, args.finished_watchers, args.duration, args.held_tasks = 100, 10, 10.0, 4
        args.finished_tasks, args.settle, args.rounds = 4, 2.0, 2
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
