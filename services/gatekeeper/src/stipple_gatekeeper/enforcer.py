"""Closing the connections of nodes that lost their right to be nodes.

A node admitted as a node keeps its connection until its identity expires; when the
chain says its stake fell below the minimum (slashed), it asked to unstake, or the
sentinel banned it, the enforcer closes its connections at once through the system
account (``$SYS.REQ.SERVER.<server>.KICK``, on every server of the cluster that holds
one). The node's client reconnects and the callout admits it again, now as an applicant.
Besides reacting to each change, it compares every connected node with the registry
every `reconcile_s` (a change missed while this gatekeeper was down is caught there).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from stipple_common.permissions import APP_ACCOUNT

from .admission import Registry
from .callout import parse_connection_name
from .metrics import EnforcerMetrics

log = structlog.get_logger("stipple.gatekeeper.enforcer")

CONNZ = "$SYS.REQ.SERVER.PING.CONNZ"


@dataclass(frozen=True)
class Connection:
    server_id: str
    cid: int
    node_id: str
    level: str  # node | applicant


class Enforcer:
    def __init__(self, sys_nc: NATS, registry: Registry, metrics: EnforcerMetrics, *, gather_s: float = 0.3) -> None:
        self.nc = sys_nc
        self.registry = registry
        self.gather_s = gather_s
        self.metrics = metrics

    async def connections(self, node_id: str = "") -> list[Connection]:
        """The APP account's connections admitted by the callout, from every server
        (each answers the PING request; answers are gathered for `gather_s`)."""
        inbox = self.nc.new_inbox()
        replies: list[bytes] = []

        async def gather(msg: Msg) -> None:
            replies.append(msg.data)

        sub = await self.nc.subscribe(inbox, cb=gather)
        query: dict[str, object] = {"acc": APP_ACCOUNT, "auth": True, "limit": 100_000}
        if node_id:
            query["user"] = node_id
        try:
            await self.nc.publish(CONNZ, json.dumps(query).encode(), reply=inbox)
            await asyncio.sleep(self.gather_s)
        finally:
            await sub.unsubscribe()
        out = []
        for raw in replies:
            answer = json.loads(raw)
            server = (answer.get("server") or {}).get("id", "")
            for conn in (answer.get("data") or {}).get("connections") or []:
                parsed = parse_connection_name(str(conn.get("authorized_user") or ""))
                if parsed is not None and server:
                    out.append(Connection(server, int(conn["cid"]), *parsed))
        return out

    async def enforce(self, node_id: str | None = None) -> int:
        """Close the node-level connections whose key is no longer admitted as a node
        (of `node_id`, or of everyone); returns how many."""
        closed = 0
        for conn in await self.connections(node_id or ""):
            if conn.level != "node" or (node_id and conn.node_id != node_id):
                continue
            status = self.registry.status(conn.node_id)
            if status.level == "node":
                continue
            try:
                await self.nc.request(
                    f"$SYS.REQ.SERVER.{conn.server_id}.KICK", json.dumps({"cid": conn.cid}).encode(), timeout=2.0
                )
            except Exception as exc:  # the next reconcile tries again
                log.warning("kick_failed", node_id=conn.node_id, error=str(exc))
                continue
            closed += 1
            self.metrics.kicks.labels(status.reason).inc()
            log.warning("node_connection_closed", node_id=conn.node_id, reason=status.reason, detail=status.detail)
        return closed

    async def run(self, stop: asyncio.Event, reconcile_s: float) -> None:
        """React to every registry change, and reconcile everything every `reconcile_s`."""
        loop = asyncio.get_running_loop()
        next_reconcile = loop.time() + reconcile_s
        while not stop.is_set():
            timeout = max(0.0, next_reconcile - loop.time())
            try:
                changed = await asyncio.wait_for(self.registry.changed.get(), timeout)
            except TimeoutError:
                changed = None
            try:
                if changed is None:
                    next_reconcile = loop.time() + reconcile_s
                    await self.enforce()
                elif self.registry.status(changed).level != "node":
                    await self.enforce(changed)
            except Exception as exc:  # the system account away: the next round tries again
                log.warning("enforce_failed", error=str(exc))
