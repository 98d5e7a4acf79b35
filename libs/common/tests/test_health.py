"""The metrics port of a service opened with open_service, against a real nats-server:
/metrics, /healthz, /readyz (following the NATS connection and shutdown) and 404s."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from stipple_common import bus
from stipple_common.health import Health
from stipple_common.messages import TaskStarted
from stipple_common.natsserver import NatsServer
from stipple_common.service import open_service
from stipple_common.settings import CommonSettings

pytestmark = pytest.mark.integration


async def wait_for(client: httpx.AsyncClient, path: str, status: int, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(path)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.05)


async def test_metrics_port_serves_probes_and_follows_nats(tmp_path: Path) -> None:
    server = NatsServer.start(tmp_path / "nats")
    restarted: NatsServer | None = None
    stop = asyncio.Event()
    settings = CommonSettings(nats_url=server.url, metrics_port=-1)
    try:
        async with open_service("health-probe", settings, stop=stop) as ctx:
            assert ctx.metrics_port > 0
            assert ctx.health is not None
            # one message through the service's consumer loop, so /metrics has a sample to show
            await bus.ensure_streams(ctx.js, [StreamConfig(name="HEALTHT", subjects=["healtht.>"])])
            handled = asyncio.Event()

            async def handler(msg: object) -> None:
                handled.set()

            config = ConsumerConfig(durable_name="health-probe", ack_policy=AckPolicy.EXPLICIT)
            consumer = asyncio.create_task(ctx.consume("HEALTHT", config, handler))
            await bus.publish(ctx.js, "healtht.t.started", TaskStarted(task_id="t", node_id="a"), msg_id="m1")
            await asyncio.wait_for(handled.wait(), 10)

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ctx.metrics_port}", timeout=5) as client:
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.text
                assert ready.json() == {"status": "ready"}
                live = await client.get("/healthz")
                assert live.status_code == 200
                assert live.json() == {"status": "ok"}

                metrics = await wait_for(client, "/metrics", 200)
                assert metrics.headers["content-type"].startswith("text/plain")
                assert "# TYPE stipple_health_probe_messages_total counter" in metrics.text
                deadline = time.monotonic() + 5
                sample = 'stipple_health_probe_messages_total{outcome="ack",stream="HEALTHT"} 1.0'
                while sample not in metrics.text and time.monotonic() < deadline:  # counted after the ack
                    await asyncio.sleep(0.05)
                    metrics = await client.get("/metrics")
                assert sample in metrics.text
                openmetrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
                assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")

                for path in ("/", "/metricsx", "/readyz/extra", "/favicon.ico"):
                    assert (await client.get(path)).status_code == 404, path
                assert (await client.post("/readyz")).status_code == 405

                # NATS goes away: unready (the process is still alive), and ready again on its return
                server.stop()
                unready = await wait_for(client, "/readyz", 503)
                assert unready.status_code == 503
                assert unready.json() == {"status": "unready", "reason": "nats_reconnecting"}
                assert (await client.get("/healthz")).status_code == 200
                assert (await client.get("/metrics")).status_code == 200

                # the stopped server again, on its port (a client reconnects only to the one it knew)
                # and with its JetStream store
                restarted = NatsServer.start(server.store_dir, host=server.host, port=server.port)
                back = await wait_for(client, "/readyz", 200, timeout=20)
                assert back.status_code == 200, back.text

                # asked to stop: unready at once, while the service is still winding down
                stop.set()
                stopping = await client.get("/readyz")
                assert stopping.status_code == 503
                assert stopping.json()["reason"] == "shutting_down"
                await asyncio.wait_for(consumer, 10)
            metrics_port = ctx.metrics_port
        # closed with the service: the port no longer answers
        async with httpx.AsyncClient(timeout=2) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{metrics_port}/healthz")
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()


async def test_no_metrics_port_means_no_server_but_health_still_tracks(nats_url: str) -> None:
    stop = asyncio.Event()
    async with open_service("health-off", CommonSettings(nats_url=nats_url, metrics_port=0), stop=stop) as ctx:
        assert ctx.metrics_port == 0
        assert ctx.health is not None
        assert ctx.health.readiness() == (True, "ready")
    assert ctx.health.readiness() == (False, "shutting_down")


def test_readiness_before_start_up_and_without_nats() -> None:
    health = Health()
    assert health.readiness() == (False, "starting")
    health.mark_ready()
    assert health.readiness() == (False, "nats_not_connected")
    stop = asyncio.Event()
    health.watch(stop=stop)
    stop.set()
    assert health.readiness() == (False, "shutting_down")
