"""What the fault tests (tests/test_faults*.py) build on: the network as processes
(`stipple_cli.network.LocalNetwork`) is given work over HTTP, a part of it fails, and
every task's events are read back from the TASKS stream to check that each ended once,
with the right outcome, and that no honest node was judged wrong.

Besides the batch helpers (every tests/test_faults*.py uses them), two loopback servers a
fault test needs:

- `TcpProxy`, a TCP proxy that can be cut (connections dropped, new ones refused) and
  restored on the same port: a store or service that becomes unreachable for a while,
  without touching the server behind it;
- `WebhookReceiver`, an HTTP server that records every POST (an app's webhook endpoint).

Both run in threads of their own, so blocking calls of the test (httpx, LocalNetwork's
restarts) do not stall them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import httpx

from stipple_common import bus, subjects
from stipple_common.messages import (
    SLASHABLE,
    TaskAborted,
    TaskCancelled,
    TaskEvent,
    TaskSucceeded,
    decode_task_event,
)

if TYPE_CHECKING:
    from stipple_cli.network import LocalNetwork

Outcome: TypeAlias = TaskSucceeded | TaskAborted | TaskCancelled


# --------------------------------------------------------------------------- batches and outcomes


def task_body(i: int, steps: int = 6, **extra: Any) -> dict[str, Any]:
    """A small tiny-sd task (128x128, seed 100 + i) for `POST /v1/tasks`."""
    return {
        "base_model": "tiny-sd",
        "prompt": f"a lighthouse, take {i}",
        "task_config": {"image_width": 128, "image_height": 128, "steps": steps, "seed": 100 + i},
        **extra,
    }


def submit_batch(gateway_url: str, count: int, steps: int = 6, **extra: Any) -> list[str]:
    """Submit `count` tasks over HTTP (each 202); their ids."""
    task_ids = []
    with httpx.Client(base_url=gateway_url, timeout=30) as http:
        for i in range(count):
            response = http.post("/v1/tasks", json=task_body(i, steps, **extra))
            assert response.status_code == 202, response.text
            task_ids.append(response.json()["task_id"])
    return task_ids


async def task_events(js: Any, task_id: str) -> list[TaskEvent]:
    """Every event of a task, in stream order."""
    msgs = await bus.read_messages(js, subjects.TASKS_STREAM, subjects.task_events(task_id))
    return [decode_task_event(m.subject, m.data) for m in msgs]


async def events_of(nats_url: str, task_id: str) -> list[TaskEvent]:
    nc = await bus.connect(nats_url, "fault-test-events")
    try:
        return await task_events(nc.jetstream(), task_id)
    finally:
        await nc.drain()


async def submitted_ids(nats_url: str) -> list[str]:
    """The task id of every `submitted` event in the TASKS stream, in stream order (a task
    submitted twice would be there twice, if the stream's deduplication ever let it)."""
    nc = await bus.connect(nats_url, "fault-test-submitted")
    try:
        msgs = await bus.read_messages(nc.jetstream(), subjects.TASKS_STREAM, "tasks.*.submitted")
        return [decode_task_event(m.subject, m.data).task_id for m in msgs]
    finally:
        await nc.drain()


async def outcomes(nats_url: str, task_ids: Iterable[str], timeout: float = 150.0) -> dict[str, list[Outcome]]:
    """Every outcome event of every task, once all have one (or the time is up)."""
    ids = list(task_ids)
    nc = await bus.connect(nats_url, "fault-test")
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while True:
            found: dict[str, list[Outcome]] = {}
            for task_id in ids:
                events = await task_events(js, task_id)
                found[task_id] = [e for e in events if isinstance(e, (TaskSucceeded, TaskAborted, TaskCancelled))]
            if all(found.values()) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)
    finally:
        await nc.drain()


async def ended(nats_url: str, task_ids: Iterable[str]) -> set[str]:
    """The tasks that have an outcome now."""
    found = await outcomes(nats_url, task_ids, timeout=0)
    return {task_id for task_id, events in found.items() if events}


async def wait_ended(nats_url: str, task_ids: Iterable[str], count: int, timeout: float = 120.0) -> set[str]:
    """The tasks that have an outcome, once `count` of them have (or the time is up)."""
    ids = list(task_ids)
    deadline = time.monotonic() + timeout
    while True:
        done = await ended(nats_url, ids)
        if len(done) >= count or time.monotonic() > deadline:
            return done
        await asyncio.sleep(0.5)


def check_ended_once(found: Mapping[str, list[Outcome]]) -> dict[str, Outcome]:
    """Every task ended, and exactly once: its one outcome per task."""
    missing = [task_id for task_id, events in found.items() if not events]
    assert not missing, f"tasks that never ended: {missing}"
    for task_id, events in found.items():
        assert len(events) == 1, f"task {task_id} ended {len(events)} times: {events}"
    return {task_id: events[0] for task_id, events in found.items()}


def check_not_slashed(outcome: Outcome, honest: Iterable[str], allowed: Iterable[str] = ("agree", "timeout")) -> None:
    """No honest node got a verdict outside `allowed` (and never a slashable one)."""
    verdicts = getattr(outcome, "verdicts", {})
    for node in honest:
        verdict = verdicts.get(node)
        if verdict is None:
            continue
        assert verdict not in SLASHABLE, f"task {outcome.task_id}: honest {node} judged {verdict}: {outcome}"
        assert verdict in allowed, f"task {outcome.task_id}: honest {node} judged {verdict}: {outcome}"


def check_all_succeeded_once(found: Mapping[str, list[Outcome]], honest: Iterable[str]) -> None:
    """Every task ended once, succeeded, and no honest node was judged but agree or timeout."""
    honest = set(honest)
    for task_id, outcome in check_ended_once(found).items():
        assert isinstance(outcome, TaskSucceeded), f"task {task_id}: {outcome}"
        check_not_slashed(outcome, honest)


def wait_live(network: LocalNetwork, count: int, timeout: float = 120.0) -> None:
    """Until the gateway answers and counts `count` live nodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = network.health()
        if health and health.get("live_nodes", 0) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"only {network.health()} after {timeout} s")


async def computing(nats_url: str, task_ids: list[str], node: str, timeout: float = 60.0) -> str:
    """A task `node` has started and not yet committed (the moment to kill or freeze it)."""
    nc = await bus.connect(nats_url, "fault-test-watch")
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for task_id in task_ids:
                events = await task_events(js, task_id)
                mine = {type(e).__name__ for e in events if getattr(e, "node_id", None) == node}
                if mine == {"TaskStarted"}:
                    return task_id
            await asyncio.sleep(0.02)
    finally:
        await nc.drain()
    raise AssertionError(f"{node} never started a task")


# --------------------------------------------------------------------------- a TCP proxy that can be cut


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target` (host, port). `cut()` closes the listening
    socket and every open connection (new ones are refused: the target is unreachable);
    `restore()` listens on the same port again."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0  # accepted since the start (tests check that traffic went through)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="tcp-proxy-accept", daemon=True).start()
        return self

    def cut(self) -> None:
        """Unreachable from now on: the listener closed, open connections reset."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def restore(self) -> None:
        """Reachable again, on the same port."""
        if self._listener is None:
            self.start()

    def stop(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.connections += 1
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="tcp-proxy-pump", daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(source)
                self._conns.discard(sink)
            source.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- an app's webhook endpoint


@dataclass(frozen=True)
class Delivery:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    received_at: float  # time.monotonic()

    @property
    def task_id(self) -> str:
        return self.headers.get("x-stipple-task", "")


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that answers every POST 204 and records it."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.deliveries: list[Delivery] = []
        lock = threading.Lock()
        self._lock = lock
        deliveries = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with lock:
                    deliveries.append(Delivery(self.path, headers, body, time.monotonic()))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    def by_task(self) -> dict[str, list[Delivery]]:
        out: dict[str, list[Delivery]] = {}
        with self._lock:
            for delivery in self.deliveries:
                out.setdefault(delivery.task_id, []).append(delivery)
        return out

    def wait_for(self, task_ids: Iterable[str], timeout: float = 60.0) -> dict[str, list[Delivery]]:
        """The deliveries by task once every one of `task_ids` has one (or the time is up)."""
        ids = set(task_ids)
        deadline = time.monotonic() + timeout
        while True:
            got = self.by_task()
            if ids <= set(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.shutdown()
        self.server.server_close()
