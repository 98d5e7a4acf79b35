"""Chains for tests: anvil, and a fresh deployment with the chain-indexer run in this process.

`running_anvil()` starts anvil from contracts/node_modules (installed with npm ci when
missing: no npm is a failure, never a skip). `IndexedChain` is one harness for both
backends, the in-process EVM (eth-tester, `ch.EMBEDDED_URL`) and a JSON-RPC node (anvil):

    chain = IndexedChain(nats_url)                 # or IndexedChain(nats_url, anvil.url)
    await chain.setup()                            # deploy, fund, stake; the nodes announce themselves
    await chain.start()                            # the real chain-indexer, as a task of this process
    await chain.publish(submitted, "submitted")    # task events, as the gateway and validator publish them
    await chain.wait_state(task_id, ch.TaskState.SETTLED)
    await chain.halt(); await chain.start()        # a restart
    await chain.close()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats

from stipple_chain_indexer.service import ChainThread, IndexerSettings, serve
from stipple_common import bus, subjects
from stipple_common import chain as ch
from stipple_common.identity import node_id_of
from stipple_common.messages import ChainLog, chain_decoder
from stipple_common.service import ServiceContext, open_service

from .nodes import joined, publish_joined

T = TypeVar("T")


@contextmanager
def running_anvil(extra_args: Sequence[str] = ()) -> Iterator[ch.Anvil]:
    """anvil from the npm package the project pins, on a port it picked; stopped at the end."""
    ch.install_node_modules()
    with ch.Anvil.start(extra_args=extra_args) as node:
        yield node


@dataclass
class IndexedChain:
    """A fresh deployment of the three contracts and the chain-indexer against it.

    Accounts: 0 is the admin (every role; `deposit` tokens deposited for its apps), 1 the
    treasury, then one per node named in `nodes_named` (each minted `min_stake` tokens; those in
    `staked` staked them for themselves), then `operator` (minted `min_stake`, to stake
    for a node). Every node has announced itself before the indexer starts. The
    in-process EVM is used only from `call`'s thread, and the indexer shares it (and
    `w3`); on a JSON-RPC node the indexer connects itself unless `share_chain`.
    `overrides`: the indexer's settings that differ."""

    nats_url: str
    chain_url: str = ch.EMBEDDED_URL
    nodes_named: str = "abc"
    staked: str = "abc"
    min_stake: int = 1_000
    deposit: int = 100_000
    share_chain: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    call: ChainThread = field(default_factory=ChainThread)
    task: asyncio.Task[None] | None = None
    ctx: ServiceContext | None = None  # the running indexer's

    def __post_init__(self) -> None:
        self.share_chain = self.share_chain or self.chain_url == ch.EMBEDDED_URL

    async def setup(self) -> None:
        """Deploy, fund and stake; connect to NATS; the nodes announce themselves."""

        def build() -> None:
            w3 = ch.connect(self.chain_url)
            accounts = w3.eth.accounts
            self.w3 = w3
            self.admin, treasury = accounts[0], accounts[1]
            self.nodes = dict(zip(self.nodes_named, accounts[2 : 2 + len(self.nodes_named)], strict=True))
            self.ids = {name: node_id_of(address) for name, address in self.nodes.items()}
            self.operator = accounts[2 + len(self.nodes_named)]
            self.deployment = ch.deploy_all(
                w3,
                self.admin,
                min_stake=self.min_stake,
                cooldown_s=60,
                treasury=treasury,
                validator=self.admin,
                gateway=self.admin,
                settler=self.admin,
            )
            self.chain = ch.StippleChain(w3, self.deployment)
            self.chain.mint(self.admin, self.admin, self.deposit)
            self.chain.deposit(self.admin, self.deposit)
            for address in [*self.nodes.values(), self.operator]:
                self.chain.mint(self.admin, address, self.min_stake)
            for name in self.staked:
                self.chain.stake(self.nodes[name], self.min_stake)

        await self.call(build)
        d = self.deployment
        self.settings = IndexerSettings(
            **{
                "nats_url": self.nats_url,
                "chain_url": self.chain_url,
                "deployment": f"token={d.token},staking={d.staking},payment={d.payment}",
                "account": self.admin,
                "confirmations": 0,
                "poll_s": 0.05,
                "settle_wait_s": 0.1,
                "max_fee": 5_000,  # a slash of the minimum stake must outweigh it (economics.py)
                "validation_rate": 1.0,  # every task compared, as the test network's dispatcher does
                **self.overrides,
            }
        )
        self.nc = await nats.connect(self.nats_url)
        self.js = self.nc.jetstream()
        await bus.ensure_streams(self.js, subjects.stream_configs())
        await publish_joined(self.js, *(joined(node_id_of(a), address=a, started_at=1.0) for a in self.nodes.values()))

    async def start(self) -> ServiceContext:
        """The chain-indexer's `serve`, as a task of this process (again after `halt`); its context."""
        self.stop = asyncio.Event()
        self._service = open_service("chain-indexer", self.settings, stop=self.stop)
        self.ctx = ctx = await self._service.__aenter__()
        shared = {"w3": self.w3, "call": self.call} if self.share_chain else {}
        self.task = asyncio.create_task(serve(ctx, self.settings, **shared))
        return ctx

    async def halt(self) -> None:
        """Stop the indexer as SIGTERM would, and wait for it."""
        assert self.task is not None
        self.stop.set()
        await asyncio.wait_for(self.task, 20)
        await self._service.__aexit__(None, None, None)

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            await self.halt()
        if hasattr(self, "nc"):
            await self.nc.close()
        self.call.close()

    async def on_chain(self, fn: Callable[[ch.StippleChain], T]) -> T:
        """`fn(chain)` on the chain's thread (views and transactions of the test itself)."""
        return await self.call(lambda: fn(self.chain))

    async def publish(self, event: Any, name: str, msg_id: str | None = None) -> None:
        """A task event on its subject (``tasks.<id>.<name>``), by default once per task and name."""
        subject = subjects.task_subject(event.task_id, name)
        await bus.publish(self.js, subject, event, msg_id=msg_id or f"{event.task_id}:{name}")

    async def state(self, task_id: str) -> ch.TaskState:
        return (await self.on_chain(lambda c: c.task(task_id))).state

    async def wait_state(self, task_id: str, state: ch.TaskState, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.state(task_id) == state:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"task {task_id} never became {state.name}")

    async def until(self, what: str, check: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> None:
        """Wait until `check()` is true; the indexer's own error if it stopped meanwhile."""
        deadline = time.monotonic() + timeout
        while not await check():
            if self.task is not None and self.task.done():  # the indexer stopped: its error, not a timeout
                self.task.result()
                raise AssertionError(f"{what}: the chain-indexer stopped")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s")
            await asyncio.sleep(0.05)

    async def chain_logs(self, subject: str, at_least: int, timeout: float = 10.0) -> list[ChainLog]:
        """The CHAIN stream's events on `subject`, once the follower has published `at_least`."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = await bus.read_messages(self.js, subjects.CHAIN_STREAM, subject)
            events = [chain_decoder.decode(m.data) for m in msgs]
            if len(events) >= at_least or time.monotonic() > deadline:
                return [e for e in events if isinstance(e, ChainLog)]
            await asyncio.sleep(0.05)
