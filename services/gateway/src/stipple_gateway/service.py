"""Gateway wiring: NATS, blob store and node directory in one exit stack, the task
service (tasks.py) over them, then uvicorn serving its HTTP app (app.py) until
SIGTERM/SIGINT or until a background worker of the task service gives up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import FrameType

import structlog
import uvicorn

from stipple_common.blobstore import set_ttl
from stipple_common.errors import StippleError
from stipple_common.logs import setup_logging
from stipple_common.nodes import NodeDirectory
from stipple_common.service import ServiceContext, open_service

from .app import create_app
from .metrics import GatewayMetrics
from .settings import GatewaySettings
from .tasks import TaskService

log = structlog.get_logger("stipple.gateway")

STORE_TTL_GRACE_S = 3600.0
"""The store keeps blobs this much longer than STIPPLE_RESULT_TTL_S: its clock starts at
the upload, a little before the outcome, and the gateway already answers 410 on time."""


class Server(uvicorn.Server):
    """uvicorn, telling the gateway when it starts to shut down (on SIGTERM/SIGINT it
    catches itself), so that open events streams end instead of holding the shutdown."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self.loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.loop.call_soon_threadsafe(self.on_exit)  # safe from a signal handler
        super().handle_exit(sig, frame)


async def run(settings: GatewaySettings) -> None:
    setup_logging("gateway", level=settings.log_level, fmt=settings.log_format)
    async with open_service("gateway", settings, blobs=True) as ctx:
        await serve(ctx, settings)


async def apply_result_ttl(ctx: ServiceContext, settings: GatewaySettings) -> None:
    """Make the blob store delete results after the TTL (JetStream bucket max_age, or an
    S3 lifecycle rule). A store that refuses (permissions) is logged: the gateway still
    answers 410 for expired results, the bytes just stay."""
    if settings.result_ttl_s <= 0 or ctx.blobs is None:
        return
    try:
        await set_ttl(ctx.blobs, settings.result_ttl_s + STORE_TTL_GRACE_S)
    except StippleError as exc:
        log.warning("result_ttl_not_applied_to_store", error=exc.message, ttl_s=settings.result_ttl_s)


async def serve(ctx: ServiceContext, settings: GatewaySettings) -> None:
    assert ctx.blobs is not None
    directory = NodeDirectory(ttl_s=settings.node_ttl_s)
    stakes = await directory.follow_stakes(ctx.js, settings.stream_replicas)
    sub = await directory.follow(ctx.js)
    gateway_metrics = GatewayMetrics(ctx.metrics.registry, webhooks=bool(settings.webhook_secret))
    tasks = TaskService(ctx.nc, ctx.js, ctx.blobs, directory, settings, ctx.metrics, gateway_metrics=gateway_metrics)
    await apply_result_ttl(ctx, settings)
    await tasks.start()
    config = uvicorn.Config(
        create_app(tasks),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="off",
        # h11, named so that an httptools installed beside it is not picked instead: httptools
        # parses faster (7 % of the gateway's CPU per task, bench/RESULTS.md) but takes a header
        # of any size (20 MB were accepted), where h11 keeps at most 16 KiB past one read of
        # an unfinished header and answers 400 (tests/test_http_server.py, beside this package)
        http="h11",
        proxy_headers=False,  # the client IP is the socket peer; STIPPLE_TRUSTED_PROXIES decides (auth.client_ip)
    )
    server = Server(config, on_exit=tasks.closing.set)

    async def stop_when_asked() -> None:
        stopped = asyncio.create_task(ctx.stop.wait())
        fatal = asyncio.create_task(tasks.fatal.wait())  # a worker gave up (bus.supervise)
        await asyncio.wait({stopped, fatal}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        fatal.cancel()
        tasks.closing.set()  # events streams end, so uvicorn's shutdown does not wait on them
        server.should_exit = True

    watcher = asyncio.create_task(stop_when_asked())
    log.info("gateway_listening", url=f"http://{settings.host}:{settings.port}", api_keys=len(tasks.keys.keys))
    try:
        await server.serve()
    finally:
        watcher.cancel()
        stakes.cancel()
        await tasks.stop()
        await sub.unsubscribe()  # type: ignore[attr-defined]
