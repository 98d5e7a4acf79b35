"""Gatekeeper wiring: three NATS connections and three jobs.

- APP (``STIPPLE_NATS_URL``, the gatekeeper's own user): the registry of stakes and bans
  (KV watches), the node consumers it creates, ``rpc.join.<id>`` answers, and the blob
  intake (``rpc.blobs.<id>``) with the blob store.
- AUTH (``STIPPLE_CALLOUT_SEED``): the auth callout, ``$SYS.REQ.USER.AUTH``; its answers
  and the users' JWTs are signed with ``STIPPLE_ISSUER_SEED``, the account key the server
  configuration names as the callout's issuer.
- SYS (``STIPPLE_SYSTEM_URL``): closing the connections of nodes that lost their right.

Every job is stateless or rebuilt from KV at start, so any number of gatekeepers can run
side by side (queue groups); while none runs, no node can connect (the server refuses
after its callout timeout) and connected ones carry on.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from urllib.parse import urlsplit, urlunsplit

import nkeys
import structlog

from stipple_common import bus
from stipple_common.blobstore.intake import MAX_BLOB_BYTES
from stipple_common.logs import setup_logging
from stipple_common.service import ServiceContext, open_service
from stipple_common.settings import CommonSettings, InvalidSettings

from .admission import Registry
from .callout import Callout
from .enforcer import Enforcer
from .intake import Intake, expire_loop
from .metrics import CalloutMetrics, EnforcerMetrics, IntakeMetrics

log = structlog.get_logger("stipple.gatekeeper")


class GatekeeperSettings(CommonSettings, frozen=True, kw_only=True):
    callout: bool = True  # answer the server's auth callout (off: a server without authentication)
    callout_seed: str = ""  # SU...: the user nkey of the AUTH account it answers from
    issuer_seed: str = ""  # SA...: the account key the server's auth_callout block names as issuer
    auth_url: str = ""  # where to connect with callout_seed; empty: STIPPLE_NATS_URL without its user and password
    system_url: str = ""  # a SYS account user's URL, to close banned nodes' connections; empty: nobody is closed
    min_stake: int = 0  # the minimum until the chain-indexer's deployment record names it
    node_identity_ttl_s: float = 24 * 3600.0  # a node's NATS identity expires after this (it reconnects)
    applicant_identity_ttl_s: float = 600.0
    reconcile_s: float = 30.0  # how often every connected node is checked against the registry
    intake: bool = True  # take the nodes' uploads
    max_blob_bytes: int = MAX_BLOB_BYTES
    check_assignment: bool = True  # a node uploads only for tasks it is assigned to


def without_credentials(url: str) -> str:
    """`url` (one or several, comma-separated) with no user or password."""
    out = []
    for part in url.split(","):
        parts = urlsplit(part.strip())
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        out.append(urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)))
    return ",".join(out)


def _keypair(seed: str, name: str, prefix: str) -> nkeys.KeyPair:
    if not seed.startswith(prefix):
        raise InvalidSettings(
            f"{name}: expected an nkey seed starting with {prefix!r} (python -m stipple_gatekeeper keys)"
        )
    try:
        return nkeys.from_seed(seed.encode())
    except Exception as exc:
        raise InvalidSettings(f"{name}: not a valid nkey seed ({type(exc).__name__})") from None


async def run(settings: GatekeeperSettings) -> None:
    setup_logging("gatekeeper", level=settings.log_level, fmt=settings.log_format)
    async with open_service("gatekeeper", settings, blobs=settings.intake) as ctx:
        await serve(ctx, settings)


async def serve(ctx: ServiceContext, settings: GatekeeperSettings) -> None:
    issuer = None
    if settings.callout:
        issuer = _keypair(settings.issuer_seed, "STIPPLE_ISSUER_SEED", "SA")
        _keypair(settings.callout_seed, "STIPPLE_CALLOUT_SEED", "SU")
    registry = Registry(settings.min_stake)
    await registry.follow(ctx.js, settings.stream_replicas)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(registry.close)
        subs: list[object] = []
        background: list[asyncio.Task[None]] = []
        if settings.intake:
            assert ctx.blobs is not None
            intake = Intake(
                nc=ctx.nc,
                js=ctx.js,
                blobs=ctx.blobs,
                metrics=IntakeMetrics(ctx.metrics.registry),
                max_blob_bytes=settings.max_blob_bytes,
                check_assignment=settings.check_assignment,
            )
            subs += await intake.serve()
            background.append(asyncio.create_task(expire_loop(intake, ctx.stop)))
        if issuer is not None:
            auth_nc = await bus.connect(
                settings.auth_url or without_credentials(settings.nats_url),
                "stipple-gatekeeper-callout",
                ca_file=settings.nats_ca_file,
                nkeys_seed_str=settings.callout_seed,
            )
            stack.push_async_callback(auth_nc.drain)
            callout = Callout(
                js=ctx.js,
                registry=registry,
                issuer=issuer,
                metrics=CalloutMetrics(ctx.metrics.registry),
                node_ttl_s=settings.node_identity_ttl_s,
                applicant_ttl_s=settings.applicant_identity_ttl_s,
            )
            subs += await callout.serve(auth_nc, ctx.nc)
        if settings.system_url:
            sys_nc = await bus.connect(settings.system_url, "stipple-gatekeeper-system", ca_file=settings.nats_ca_file)
            stack.push_async_callback(sys_nc.drain)
            enforcer = Enforcer(sys_nc, registry, EnforcerMetrics(ctx.metrics.registry))
            background.append(asyncio.create_task(enforcer.run(ctx.stop, settings.reconcile_s)))
        log.info(
            "gatekeeper_started",
            callout=issuer is not None,
            intake=settings.intake,
            enforcer=bool(settings.system_url),
            min_stake=registry.min_stake,
        )
        try:
            await ctx.stop.wait()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for sub in subs:
                await sub.unsubscribe()  # type: ignore[attr-defined]
