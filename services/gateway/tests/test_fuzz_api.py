"""Fuzzing every operation of the gateway's OpenAPI document with schemathesis.

Each operation of the document the gateway serves at /openapi.json (the native API, SDCN,
A1111, OpenAI, the AI Horde, the network's JSON and the web pages) gets generated requests:
the document's examples, its coverage cases (boundaries, wrong types, missing fields) and
random ones, valid and invalid. Every answer must not be a server error and must conform to
the document: its status, content type, headers and body schema.

The gateway behind it is real: a TaskService on its own nats-server, with three live nodes
in its directory (so that a valid submission gets past the capacity check and is published)
and no node agent, so nothing finishes: the synchronous APIs answer 504 after
`sync_timeout_s` (0.2 s). It runs under uvicorn in a thread of its own (schemathesis calls
it over a socket, synchronously, while the gateway's event loop goes on), with webhooks on.
The operations on one task also get real task ids; and every operation runs again against
a gateway with API keys on, as the app holding the key.

Some 5xx are honest by design and documented: 502 (the task failed), 503 (no nodes, the
bus or chain unavailable), 504 (the synchronous wait ran out). `honest_or_not_a_server_error`
lets those through only with their documented code; anything else, a 500 always, fails as
schemathesis's `not_a_server_error` does.

Short for CI: STIPPLE_FUZZ_EXAMPLES random examples per operation (default 25; half that with
keys on), besides the coverage cases, derandomized so that every run sends the same requests.
Longer, locally (and with a new seed each run: STIPPLE_FUZZ_SEED)::

    STIPPLE_FUZZ_EXAMPLES=500 .venv/bin/pytest -p no:randomly services/gateway/tests/test_fuzz_api.py
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import nats
import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from stipple_common import bus, subjects
from stipple_common.blobstore import open_blob_store
from stipple_common.identity import dev_node_id
from stipple_common.metrics import Metrics
from stipple_common.natsserver import NatsServer
from stipple_common.nodes import NodeDirectory
from stipple_gateway import openapi
from stipple_gateway.app import create_app
from stipple_gateway.settings import GatewaySettings
from stipple_gateway.tasks import TaskService
from stipple_testkit.nodes import joined

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("STIPPLE_FUZZ_EXAMPLES", "25"))
SEED = os.environ.get("STIPPLE_FUZZ_SEED")  # unset: derandomized (the same requests every run)


def config(examples: int) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "generation": {
                "mode": "all",  # valid and invalid requests
                "max-examples": examples,
                "deterministic": SEED is None,
                "database": "none",  # no .hypothesis/ replays: a run depends on the code and the seed only
            },
            "phases": {"stateful": {"enabled": False}},
            **({"seed": int(SEED)} if SEED is not None else {}),
        }
    )


schema = schemathesis.openapi.from_dict(openapi.build(), config=config(EXAMPLES))
keyed_schema = schemathesis.openapi.from_dict(openapi.build(), config=config(max(1, EXAMPLES // 2)))

# The honest 5xx and the codes each may carry (the document's ERRORS; horde.py's `rc`)
HONEST = {
    502: {"cancelled", "aborted", "image_integrity"},  # a task's outcome reason, or a stored image gone bad
    503: {"no_nodes", "unavailable", "chain_unavailable", "NoValidWorkers"},
    504: {"timeout"},
}
# SDCN errors are `{"msg"}` alone: their messages tell the codes apart
SDCN_HONEST = {
    502: re.compile(r"task [0-9a-f]{32} was (cancelled|aborted)"),
    503: re.compile(r"not enough live nodes|no node serves|the message bus is unavailable|the chain-indexer"),
    504: re.compile(r"task [0-9a-f]{32} did not finish within"),
}


def error_code(body: Any) -> str | None:
    """The error code of any of the gateway's error shapes: native and OpenAI
    ``{"error": {"code"}}``, A1111 ``{"error": code}``, Horde ``{"rc"}``."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        return error.get("code")
    if isinstance(error, str):
        return error
    rc = body.get("rc")
    return rc if isinstance(rc, str) else None


def is_honest(status: int, body: Any) -> bool:
    """A documented 502/503/504: a refusal or a wait that ran out, not a fault."""
    if status not in HONEST:
        return False
    if isinstance(body, dict) and set(body) == {"msg"} and isinstance(body["msg"], str):
        return bool(SDCN_HONEST[status].search(body["msg"]))
    return error_code(body) in HONEST[status]


@schemathesis.check
def honest_or_not_a_server_error(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """schemathesis's `not_a_server_error`, except for a documented 502/503/504."""
    if response.status_code >= 500:
        try:
            body = response.json()
        except ValueError:
            body = None
        if is_honest(response.status_code, body):
            return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    honest_or_not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


class GatewayThread:
    """A gateway (TaskService and its app under uvicorn) on an event loop in a thread of its own."""

    def __init__(self, nats_url: str, **settings: Any) -> None:
        self.nats_url = nats_url
        self.settings = settings
        self.url = ""
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="fuzzed-gateway", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start() or stop()
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        nc = await nats.connect(self.nats_url)
        js = nc.jetstream()
        await bus.ensure_streams(js, subjects.stream_configs())
        blobs = await open_blob_store(backend="jetstream", js=js, bucket=f"fuzz-{uuid.uuid4().hex[:8]}")
        settings = GatewaySettings(
            sync_timeout_s=0.2,
            max_body_bytes=100_000,
            webhook_secret="fuzz-webhook-secret",
            anon_rate_per_minute=0,  # one client sends everything here: rate limits are tested elsewhere
            **self.settings,
        )
        gw = TaskService(nc, js, blobs, NodeDirectory(ttl_s=3600), settings, Metrics("gateway"))
        for name in ("node-a", "node-b", "node-c"):  # three operators: submissions get past capacity
            gw.directory.apply(joined(dev_node_id(name)), seen_at=time.time())
        await gw.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(create_app(gw), log_config=None, access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if serving.done():
                    serving.result()
                await asyncio.sleep(0.01)
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            self.ready.set()
            await self.stopping.wait()
        finally:
            gw.closing.set()  # open events streams end
            server.should_exit = True
            await serving
            await gw.stop()
            await blobs.close()
            await nc.drain()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(30), "the gateway did not start within 30 s"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.loop is not None and self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)
        if self.error is not None:
            raise self.error


# Ids of real tasks (a pending one, a cancelled one) and of a real Horde request, filled in by
# `gateway_url`: test_known_tasks_... sends them where the main test sends random ids
KNOWN: dict[str, list[str]] = {"task_id": [], "cancelled": [], "id": []}
TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64}}


def submit_known_tasks(url: str) -> None:
    pending, cancelled = (requests.post(f"{url}/v1/tasks", json=TASK, timeout=10).json()["task_id"] for _ in "ab")
    assert requests.delete(f"{url}/v1/tasks/{cancelled}", timeout=10).status_code == 202
    horde = requests.post(f"{url}/api/v2/generate/async", json={"prompt": "a fox", "models": ["tiny-sd"]}, timeout=10)
    assert horde.status_code == 202, horde.text
    KNOWN.update(task_id=[pending, cancelled], cancelled=[cancelled], id=[horde.json()["id"]])


@pytest.fixture(scope="module")
def nats_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = NatsServer.start(tmp_path_factory.mktemp("fuzz-nats"))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def gateway_url(nats_server_url: str) -> Iterator[str]:
    gateway = GatewayThread(nats_server_url)
    gateway.start()
    try:
        submit_known_tasks(gateway.url)
        yield gateway.url
    finally:
        gateway.stop()


API_KEY = "fuzz-api-key-secret-0123456789"


@pytest.fixture(scope="module")
def keyed_gateway_url(nats_server_url: str) -> Iterator[str]:
    """A gateway with API keys on (one key, a rate no fuzzing reaches)."""
    gateway = GatewayThread(nats_server_url, api_keys=f"fuzz:{API_KEY}:100000:100000")
    gateway.start()
    try:
        yield gateway.url
    finally:
        gateway.stop()


@schema.parametrize()
def test_no_server_error_and_answers_as_documented(case: schemathesis.Case, gateway_url: str) -> None:
    case.call_and_validate(base_url=gateway_url, checks=CHECKS, timeout=10)


@schema.include(path_regex=r"\{(task_id|id)\}").parametrize()
@schema.given(data=st.data())
def test_known_tasks_no_server_error_and_answers_as_documented(
    case: schemathesis.Case, data: st.DataObject, gateway_url: str
) -> None:
    """The operations on one task or Horde request, on real ones: a pending task, a
    cancelled one (the only one whose events stream ends), a Horde request."""
    for name in ("task_id", "id"):
        if name in (case.path_parameters or {}):
            known = KNOWN["cancelled" if case.path.endswith("/events") else name]
            case.path_parameters[name] = data.draw(st.sampled_from(known), label=name)
    case.call_and_validate(base_url=gateway_url, checks=CHECKS, timeout=10)


@keyed_schema.parametrize()
def test_with_api_keys_no_server_error_and_answers_as_documented(
    case: schemathesis.Case, keyed_gateway_url: str
) -> None:
    """The same with API keys on, as the app holding the key (Horde: its `apikey` header)."""
    headers = {"Authorization": f"Bearer {API_KEY}", "apikey": API_KEY}
    case.call_and_validate(base_url=keyed_gateway_url, headers=headers, checks=CHECKS, timeout=10)
