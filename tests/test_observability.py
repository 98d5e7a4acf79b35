"""One task is one trace through every service, and every log line about it carries its
trace id: the real services as processes (`stipple up`'s launcher: gateway, dispatcher,
validator, three node agents on the tiny model), exporting over OTLP/HTTP to a receiver
in this test process, logging JSON lines to their files.

The receiver decodes each ExportTraceServiceRequest (opentelemetry.proto) and keeps the
spans. The network is stopped (SIGTERM) before the checks, so this also shows that a
service flushes its spans when it shuts down.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import nats
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from stipple_cli.network import LocalNetwork
from stipple_gateway.taskids import new_task_id

# The network runs as processes (eight interpreters importing torch and the services): its
# start takes up to a minute and more on a cold machine, so these modules have five, and
# they share one test worker (xdist_group "process-networks", see conftest.py) instead of starting two at once.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.xdist_group("process-networks"),
]

NODES = ("node-1", "node-2", "node-3")

TASK_ID_SECRET = bytes(range(32))


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, object]


def _value(any_value: object) -> object:
    which = any_value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(any_value, which) if which else None


@dataclass
class Receiver:
    """A minimal OTLP/HTTP traces receiver (protobuf), collecting spans in memory."""

    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            Span(
                                service=str(resource.get("service.name", "")),
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                kind=span.kind,
                                attributes={a.key: _value(a.value) for a in span.attributes},
                            )
                        )


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    collected = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            collected.add(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield collected, f"http://127.0.0.1:{server.server_address[1]}"  # bare: /v1/traces is appended
    server.shutdown()
    server.server_close()


@dataclass(frozen=True)
class Ran:
    task_id: str
    status: str
    logs: dict[str, list[dict[str, object]]]  # service name -> its JSON log lines
    receiver: Receiver
    node_ids: dict[str, str]  # node-1 ... -> its node id (its key's address)


async def _submit_and_wait(net: LocalNetwork, task_id: str, key: str) -> str:
    """POST one native task and wait for its outcome on NATS (no status polling: every
    request to the gateway would be a trace of its own)."""
    nc = await nats.connect(net.admin_url("gateway"))
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_outcome(msg: object) -> None:
        if not done.done():
            done.set_result(msg.subject.split(".")[2])  # type: ignore[attr-defined]

    try:
        for event in ("succeeded", "aborted"):
            await nc.subscribe(f"tasks.{task_id}.{event}", cb=on_outcome)
        task = {
            "base_model": "tiny-sd",
            "prompt": "a lighthouse at dusk",
            "task_config": {"image_width": 64, "image_height": 64, "steps": 2, "cfg": 7, "seed": 5, "num_images": 2},
        }
        async with httpx.AsyncClient(base_url=net.gateway_url, timeout=30) as http:
            accepted = await http.post("/v1/tasks", json=task, headers={"Idempotency-Key": key})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["task_id"] == task_id
        return await asyncio.wait_for(done, 90)
    finally:
        await nc.drain()


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, receiver: tuple[Receiver, str]) -> Ran:
    collected, endpoint = receiver
    data = tmp_path_factory.mktemp("observed")
    # no timed export (10 minutes): the spans arrive only because each service flushes at shutdown
    env = {
        "STIPPLE_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        # nor a full batch (512 spans by default: a service under load, redelivering, can reach it)
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100000",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100000",
        "STIPPLE_VALIDATION_RATE": "1",  # the trace of a task through three nodes
        "STIPPLE_TASK_ID_SECRET": TASK_ID_SECRET.hex(),  # so that this test knows the task id before its POST
    }
    net = LocalNetwork(data_dir=data, port=0, nodes=len(NODES), chain=False, extra_env=env)
    key = uuid.uuid4().hex
    task_id = new_task_id(key, "", TASK_ID_SECRET)
    net.start(timeout=240)
    try:
        node_ids = net.node_ids()
        status = asyncio.run(_submit_and_wait(net, task_id, key))
        time.sleep(1.5)  # the outcome's own handlers (QoS updates, slot releases) finish
        early = sorted({span.name for span in collected.spans})[:10] if collected.spans else []
        assert not collected.spans, f"exported before shutdown (the flush is not what is tested): {early}"
    finally:
        net.stop()  # SIGTERM: each service flushes its spans as it closes
    logs: dict[str, list[dict[str, object]]] = {}
    for path in sorted(Path(data, "logs").glob("*.log")):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.startswith("{")]
        logs[path.stem] = [json.loads(line) for line in lines]
    return Ran(task_id, status, logs, collected, node_ids)


def test_the_task_succeeded_and_spans_were_exported(ran: Ran) -> None:
    assert ran.status == "succeeded"
    assert ran.receiver.requests > 0
    assert ran.receiver.spans


def test_one_task_is_one_trace_through_every_service(ran: Ran) -> None:
    spans = ran.receiver.spans
    tagged = [s for s in spans if s.attributes.get("stipple.task_id") == ran.task_id]
    assert tagged, "no span carries stipple.task_id"
    trace_ids = {s.trace_id for s in tagged}
    assert len(trace_ids) == 1, f"the task's spans are in {len(trace_ids)} traces: {sorted(trace_ids)}"
    (trace_id,) = trace_ids
    in_trace = [s for s in spans if s.trace_id == trace_id]
    services = {s.service for s in in_trace}
    assert {"stipple-gateway", "stipple-dispatcher", "stipple-node-agent", "stipple-validator"} <= services, services

    # one tree: a single root (the gateway's POST), every other span's parent in the trace
    ids = {s.span_id for s in in_trace}
    assert len(ids) == len(in_trace)
    roots = [s for s in in_trace if not s.parent_id]
    assert [(r.service, r.name) for r in roots] == [("stipple-gateway", "POST /v1/tasks")]
    orphans = [(s.service, s.name) for s in in_trace if s.parent_id and s.parent_id not in ids]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"

    # every node ran the task in this trace, stage by stage, and revealed
    by_name: dict[str, list[Span]] = {}
    for s in in_trace:
        by_name.setdefault(s.name, []).append(s)
    for name in ("handle WORK task", "node.generate", "node.upload", "node.commit", "node.reveal"):
        nodes = sorted(str(s.attributes.get("stipple.node_id")) for s in by_name.get(name, []))
        assert nodes == sorted(ran.node_ids.values()), f"{name}: {nodes}"
    assert len(by_name["node.load_model"]) == len(NODES)
    assert len(by_name["node.denoise"]) == 2 * len(NODES)  # two images each
    assert len(by_name["node.encode"]) == len(NODES)
    for name in ("dispatch.assign", "validator.open_reveal", "validator.decide"):
        assert len(by_name.get(name, [])) == 1, name
    assert sorted(str(s.attributes["stipple.node_id"]) for s in by_name["validator.qos"]) == sorted(
        ran.node_ids.values()
    )
    services_of = {name: {s.service for s in group} for name, group in by_name.items()}
    assert {"stipple-dispatcher", "stipple-validator"} <= services_of["handle TASKS submitted"]
    assert "stipple-validator" in services_of["handle TASKS revealed"]

    # the stage spans hang under the node's run, which hangs under the dispatcher's assignment
    parent_of = {s.span_id: s for s in in_trace}
    for denoise in by_name["node.denoise"]:
        chain = []
        span: Span | None = denoise
        while span is not None:
            chain.append(span.name)
            span = parent_of.get(span.parent_id)
        assert chain[:3] == ["node.denoise", "node.generate", "handle WORK task"], chain
        assert "dispatch.assign" in chain, chain
        assert chain[-1] == "POST /v1/tasks", chain


def test_every_log_line_about_the_task_carries_its_trace_id(ran: Ran) -> None:
    tagged = [s for s in ran.receiver.spans if s.attributes.get("stipple.task_id") == ran.task_id]
    trace_id = tagged[0].trace_id
    about: dict[str, list[dict[str, object]]] = {}
    for service, lines in ran.logs.items():
        expected = "node-agent" if service.startswith("node-") else service
        assert all(line.get("service") == expected for line in lines), f"{service}: lines without service"
        about[service] = [line for line in lines if line.get("task_id") == ran.task_id]
        for line in about[service]:
            assert line.get("trace_id") == trace_id, f"{service}: {line}"
            if service.startswith("node-"):
                assert line.get("node_id") == ran.node_ids[service], f"{service}: {line}"
    for service in ("gateway", "dispatcher", "validator", *NODES):
        assert about.get(service), f"{service} wrote no line about the task (files: {sorted(ran.logs)})"
    events = {service: {str(line.get("event")) for line in lines} for service, lines in about.items()}
    assert "task_submitted" in events["gateway"]
    assert "task_assigned" in events["dispatcher"]
    assert "task_decided" in events["validator"]
    assert all("task_committed" in events[node] for node in NODES)
    # every line anywhere that names any task carries a trace id; lines about no task name none
    not_about_a_task = {"service_ready", "node_joined", "node_quit", "nats_disconnected", "nats_error"}
    for service, lines in ran.logs.items():
        for line in lines:
            if line.get("task_id"):
                assert line.get("trace_id"), f"{service}: {line}"
            if line.get("event") in not_about_a_task:
                assert "task_id" not in line, f"{service}: a handler's context leaked: {line}"
                assert "trace_id" not in line, f"{service}: a handler's context leaked: {line}"
    assert any(line.get("event") == "node_quit" for line in ran.logs["node-1"])
