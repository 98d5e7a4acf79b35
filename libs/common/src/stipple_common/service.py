"""What every service opens at start, in one AsyncExitStack: tracing, the metrics
server (/metrics, /healthz, /readyz: health.py), NATS and JetStream (streams declared
idempotently), optionally the blob store, and a stop Event set by SIGTERM/SIGINT.
Closing marks the service unready, then drains NATS."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from opentelemetry import trace

from . import bus, subjects, tracing
from .blobstore import BlobStore, open_blob_store
from .health import Health
from .health import serve as serve_metrics_port
from .metrics import Metrics
from .settings import CommonSettings

log = structlog.get_logger("stipple.service")


@dataclass
class ServiceContext:
    name: str
    nc: NATS
    js: JetStreamContext
    metrics: Metrics
    tracer: trace.Tracer
    stop: asyncio.Event
    blobs: BlobStore | None = None
    metrics_port: int = 0
    health: Health | None = None  # what /readyz on the metrics port answers from

    async def consume(self, stream: str, config: ConsumerConfig, handler: bus.Handler, *, batch: int = 16) -> None:
        """Run `handler` on a durable consumer until the service is asked to stop."""
        await bus.consume(
            self.js,
            stream=stream,
            config=config,
            handler=handler,
            stop=self.stop,
            metrics=self.metrics,
            tracer=self.tracer,
            batch=batch,
        )


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests run services as tasks)
            pass


def freeze_startup_heap() -> None:
    """Move every object alive now (the imported libraries: torch, diffusers, web3, ...,
    and a node's loaded models) into the collector's permanent generation. Without this, a
    full collection walks that whole heap every few seconds under load: on the node agent
    it stalled the event loop for 0.25 to 0.64 s (bench/RESULTS.md, control plane)."""
    gc.collect()
    gc.freeze()


@asynccontextmanager
async def open_service(
    name: str,
    settings: CommonSettings,
    *,
    blobs: bool = False,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[ServiceContext]:
    """Open what a service needs. With `stop` given, the caller owns shutdown (tests run
    services as tasks in one process); otherwise SIGTERM/SIGINT set a new stop Event, and
    the process's start-up heap is frozen (`freeze_startup_heap`)."""
    async with AsyncExitStack() as stack:
        own_process = stop is None
        if stop is None:
            stop = asyncio.Event()
            install_stop_signals(stop)
        tracer = tracing.setup_tracing(name, settings.otlp_endpoint)
        stack.callback(tracing.flush)  # last: after NATS drained, the spans of its final handlers go out too
        metrics = Metrics(name)
        ready = Health()
        ready.watch(stop=stop)
        port = 0
        if settings.metrics_port:  # /metrics, /healthz, /readyz; closed last, after NATS drained
            server = serve_metrics_port(metrics.registry, ready, settings.metrics_port, settings.metrics_host)
            stack.push_async_callback(asyncio.to_thread, server.close)  # shutdown() waits a poll
            port = server.port
        options = {"inbox_prefix": settings.nats_inbox_prefix} if settings.nats_inbox_prefix else {}
        nc = await bus.connect(settings.nats_url, f"stipple-{name}", ca_file=settings.nats_ca_file, **options)
        stack.push_async_callback(nc.drain)
        ready.watch(nc=nc)
        js = nc.jetstream()
        if settings.declare_streams:
            await bus.ensure_streams(js, subjects.stream_configs(replicas=settings.stream_replicas))
        store = None
        if blobs:
            store = await open_blob_store(
                backend=settings.blob_backend,
                js=js,
                bucket=settings.blob_bucket,
                s3_endpoint=settings.s3_endpoint,
                s3_access_key=settings.s3_access_key,
                s3_secret_key=settings.s3_secret_key,
                s3_secure=settings.s3_secure,
                s3_region=settings.s3_region,
            )
            stack.push_async_callback(store.close)
        if own_process:
            freeze_startup_heap()
        stack.callback(ready.mark_stopping)  # at shutdown unready first, before anything closes
        ready.mark_ready()
        log.info("service_ready", service=name, nats=settings.nats_url, metrics_port=port)
        yield ServiceContext(name, nc, js, metrics, tracer, stop, store, port, ready)
