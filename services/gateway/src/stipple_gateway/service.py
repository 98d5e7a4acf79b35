"""Gateway wiring: NATS, blob store and node directory in one exit stack, then uvicorn
serving the Starlette app until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

import structlog
import uvicorn

from stipple_common.logs import setup_logging
from stipple_common.nodes import NodeDirectory
from stipple_common.service import ServiceContext, open_service

from .app import Gateway, GatewaySettings, create_app

log = structlog.get_logger("stipple.gateway")


async def run(settings: GatewaySettings) -> None:
    setup_logging("gateway", level=settings.log_level, fmt=settings.log_format)
    async with open_service("gateway", settings, blobs=True) as ctx:
        await serve(ctx, settings)


async def serve(ctx: ServiceContext, settings: GatewaySettings) -> None:
    assert ctx.blobs is not None
    directory = NodeDirectory(ttl_s=settings.node_ttl_s)
    sub = await directory.follow(ctx.js)
    gateway = Gateway(ctx.nc, ctx.js, ctx.blobs, directory, settings, ctx.metrics)
    config = uvicorn.Config(
        create_app(gateway),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)

    async def stop_when_asked() -> None:
        await ctx.stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(stop_when_asked())
    log.info("gateway_listening", url=f"http://{settings.host}:{settings.port}")
    try:
        await server.serve()
    finally:
        watcher.cancel()
        await sub.unsubscribe()  # type: ignore[attr-defined]
