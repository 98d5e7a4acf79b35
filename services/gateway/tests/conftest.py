"""Gateway test fixtures: real gateways (started, so they follow progress and deliver
webhooks) over a real nats-server, called through httpx (in process, or over a real
socket for the streaming tests)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import nats.errors
import pytest
import uvicorn

from stipple_common import bus, subjects
from stipple_common.blobstore import open_blob_store
from stipple_common.identity import dev_node_id
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_gateway.app import create_app
from stipple_gateway.settings import GatewaySettings
from stipple_gateway.tasks import TaskService
from stipple_testkit.nodes import joined

MakeGateway = Callable[..., Awaitable[TaskService]]


@pytest.fixture
async def make_gateway(nc: Any) -> AsyncIterator[MakeGateway]:
    """Builds started gateways with three live nodes (`dev_node_id("node-a")`, ...: three
    operators, each staked for itself as far as the directory knows); `client=` another
    NATS connection, other keywords are GatewaySettings. Stopped at the end of the test.
    The gateways of one test share a rate-limits bucket of their own (replicas of one
    deployment), deleted at the end: no test sees another's buckets."""
    made: list[TaskService] = []
    limits_bucket = f"test-limits-{uuid.uuid4().hex[:8]}"

    async def make(client: Any = None, **overrides: Any) -> TaskService:
        client = client or nc
        js = client.jetstream()
        await bus.ensure_streams(js, subjects.stream_configs())
        blobs = await open_blob_store(backend="jetstream", js=js, bucket=f"test-{uuid.uuid4().hex[:8]}")
        settings = GatewaySettings(
            **{"max_body_bytes": 4000, "sync_timeout_s": 0.5, "limits_bucket": limits_bucket, **overrides}
        )
        gw = TaskService(client, js, blobs, NodeDirectory(ttl_s=60), settings, Metrics("gateway"))
        for name in ("node-a", "node-b", "node-c"):
            gw.directory.apply(joined(dev_node_id(name)), seen_at=time.time())
        await gw.start()
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.stop()
        await gw.blobs.close()
    if made:
        with contextlib.suppress(nats.errors.Error):  # not made (shared limits off), or its server gone
            await made[0].js.delete_key_value(limits_bucket)


@pytest.fixture
def asgi_client() -> Callable[..., httpx.AsyncClient]:
    """An httpx client calling the gateway's app in process."""

    def client(gw: TaskService, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw", **kwargs)

    return client


@pytest.fixture
async def serve_http() -> AsyncIterator[Callable[[TaskService], Awaitable[str]]]:
    """Serves a gateway with uvicorn on a free local port (for streamed answers, which
    httpx's in-process transport would buffer whole); returns its base URL."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def serve(gw: TaskService) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(create_app(gw), log_config=None, access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        servers.append((server, task))
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start within 10 s"
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield serve
    for server, task in servers:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
