"""What every service opens at start, in one AsyncExitStack: tracing, the metrics
server (/metrics, /healthz, /readyz: health.py), NATS and JetStream (streams declared
idempotently), optionally the blob store, and a stop Event set by SIGTERM/SIGINT.
Closing marks the service unready, then drains NATS. `serve_as_leader` runs a stateful
service as the active one of its replicas (a lease: lease.py), when STIPPLE_LEASE_S asks."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from eth_account.signers.local import LocalAccount
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from opentelemetry import trace

from . import bus, subjects, tracing
from .blobstore import BlobStore, open_blob_store
from .health import Health
from .health import serve as serve_metrics_port
from .identity import node_id_of, sign_nonce
from .lease import UNAVAILABLE, Lease, LeaseLost, open_leases
from .metrics import Metrics
from .permissions import node_inbox_prefix
from .pullfeed import SERVICE_HEARTBEAT_S
from .settings import CommonSettings, InvalidSettings

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

    async def consume(
        self,
        stream: str,
        config: ConsumerConfig,
        handler: bus.Handler,
        *,
        batch: int = 16,
        on_rejected: bus.OnRejected | None = None,
        create: bool = True,
        stop: asyncio.Event | None = None,
        heartbeat_s: float | None = SERVICE_HEARTBEAT_S,
        poll_lag: bool = True,
    ) -> None:
        """Run `handler` on a durable consumer until the service is asked to stop (or
        `stop` is set: one consumer of several), under the one supervision policy
        (`bus.supervise`: restarted after a failure, the service ended after repeated ones)."""
        until = stop or self.stop

        async def run() -> None:
            await bus.consume(
                self.js,
                stream=stream,
                config=config,
                handler=handler,
                stop=until,
                metrics=self.metrics,
                tracer=self.tracer,
                batch=batch,
                on_rejected=on_rejected,
                create=create,
                heartbeat_s=heartbeat_s,
                poll_lag=poll_lag,
            )

        await bus.supervise(run, until, name=config.durable_name or stream, metrics=self.metrics)


async def drain(nc: NATS, timeout_s: float = 10.0) -> None:
    """Drain NATS at shutdown, but never wait forever: a client the server no longer lets
    in (a node that lost its right) reconnects in vain and would never drain."""
    try:
        await asyncio.wait_for(nc.drain(), timeout_s)
    except Exception as exc:  # closed, reconnecting, timed out: close it as it is
        log.warning("nats_drain_failed", error=repr(exc))
        await nc.close()


def nats_identity(account: LocalAccount) -> dict[str, Any]:
    """nats-py connect options that join as the node of `account`: its address as the
    token and, when the server sends a nonce, the EIP-191 signature of that nonce (a new
    one at every connection and reconnection); replies on the node's own inbox prefix."""
    node_id = node_id_of(account.address)

    def signature(nonce: str) -> bytes:
        return sign_nonce(account, nonce)

    return {"token": node_id, "signature_cb": signature, "inbox_prefix": node_inbox_prefix(node_id)}


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
    identity: LocalAccount | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[ServiceContext]:
    """Open what a service needs. With `stop` given, the caller owns shutdown (tests run
    services as tasks in one process); otherwise SIGTERM/SIGINT set a new stop Event, and
    the process's start-up heap is frozen (`freeze_startup_heap`). With `identity` (a
    node's key), NATS is joined as that node: the address as the token, the server's
    nonce signed (`nats_identity`), replies on the node's own inbox prefix."""
    async with AsyncExitStack() as stack:
        own_process = stop is None
        if stop is None:
            stop = asyncio.Event()
            install_stop_signals(stop)
        tracer = tracing.setup_tracing(name, settings.otlp_endpoint)
        stack.callback(tracing.flush)  # last: after NATS drained, the spans of its final handlers go out too
        metrics = metrics or Metrics(name)  # given: one that outlives this connection (a node joining again)
        ready = Health()
        ready.watch(stop=stop)
        port = 0
        if settings.metrics_port:  # /metrics, /healthz, /readyz; closed last, after NATS drained
            server = serve_metrics_port(metrics.registry, ready, settings.metrics_port, settings.metrics_host)
            stack.push_async_callback(asyncio.to_thread, server.close)  # shutdown() waits a poll
            port = server.port
        options = nats_identity(identity) if identity is not None else {}
        if settings.nats_inbox_prefix:
            options["inbox_prefix"] = settings.nats_inbox_prefix
        nc = await bus.connect(settings.nats_url, f"stipple-{name}", ca_file=settings.nats_ca_file, **options)
        stack.push_async_callback(drain, nc)
        ready.watch(nc=nc)
        js = nc.jetstream()
        if settings.declare_streams:
            configs = subjects.stream_configs(replicas=settings.stream_replicas, max_bytes=settings.stream_max_bytes)
            await bus.ensure_streams(js, configs)
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
                replicas=settings.stream_replicas,
            )
            stack.push_async_callback(store.close)
        if own_process:
            freeze_startup_heap()
        stack.callback(ready.mark_stopping)  # at shutdown unready first, before anything closes
        ready.mark_ready()
        log.info("service_ready", service=name, nats=settings.nats_url, metrics_port=port)
        yield ServiceContext(name, nc, js, metrics, tracer, stop, store, port, ready)


SettingsT = TypeVar("SettingsT", bound=CommonSettings)


async def serve_as_leader(
    ctx: ServiceContext,
    name: str,
    settings: SettingsT,
    serve: Callable[[ServiceContext, SettingsT], Coroutine[Any, Any, None]],
) -> None:
    """`serve(ctx, settings)`, as the active replica of service `name` (lease.py).

    With ``lease_s`` 0 (the default) it serves at once, as a single replica does. With
    ``lease_s`` > 0 the replica is a standby until it holds the lease (no consumers; the
    metrics port answers), then serves while it renews the lease. A graceful stop gives
    the lease back, so a standby takes over at once; a lost lease (taken, or not renewed
    in time) sets `ctx.stop` and raises `LeaseLost`, so the process exits non-zero and
    comes back as a standby. Cancelled (as by a SIGKILL), it neither serves nor releases:
    the lease expires after its ttl."""
    if settings.lease_s < 0:  # a Struct built in code is not validated as the environment is
        raise InvalidSettings(f"STIPPLE_LEASE_S={settings.lease_s!r}: Expected `float` >= 0.0")
    if settings.lease_s == 0:
        await serve(ctx, settings)
        return
    instance = settings.instance or socket.gethostname()
    log.info("lease_waiting", service=name, instance=instance, ttl_s=settings.lease_s)
    while True:
        try:
            kv = await open_leases(ctx.js, replicas=settings.stream_replicas)
            break
        except UNAVAILABLE as exc:
            log.warning("lease_kv_unavailable", lease=name, error=repr(exc))
            try:
                await asyncio.wait_for(ctx.stop.wait(), settings.lease_s / 3)
                return
            except TimeoutError:
                pass
    lease = Lease(kv, name, instance, ttl_s=settings.lease_s)
    if not await lease.acquire(ctx.stop):
        return  # stopped while a standby
    keeper = asyncio.create_task(lease.keep(), name=f"lease-{name}")
    server = asyncio.create_task(serve(ctx, settings), name=f"serve-{name}")
    try:
        await asyncio.wait({keeper, server}, return_when=asyncio.FIRST_COMPLETED)
        if server.done():  # stopped (or failed): hand over at once
            keeper.cancel()
            await lease.release()
            server.result()
            return
        lost = keeper.exception()
        log.error("lease_lost", service=name, instance=instance, error=str(lost))
        ctx.stop.set()
        try:  # let it stop its consumers; in-flight work is redelivered to the next holder
            await asyncio.wait_for(asyncio.shield(server), max(1.0, min(10.0, settings.lease_s)))
        except TimeoutError:
            log.warning("serve_not_stopped_after_lease_lost", service=name)
        except Exception as exc:
            log.warning("serve_failed_after_lease_lost", service=name, error=repr(exc))
        raise lost if isinstance(lost, LeaseLost) else LeaseLost(f"lease {name!r} lost: {lost!r}")
    finally:
        for task in (keeper, server):
            task.cancel()
        await asyncio.gather(keeper, server, return_exceptions=True)
