"""The chain-indexer under fire: paid tasks in flight while it is SIGKILLed and restarted,
and while the chain's JSON-RPC node stops answering. Every task still ends once, and on
chain every paid task is escrowed once and then settled or refunded once: the contract
state and its events are read from the chain itself, and the apps' deposit has paid
exactly the fees of the settled tasks.

The real network as processes (LocalNetwork, as `stipple up` runs it, with its dev chain:
the in-process EVM served over JSON-RPC on a thread of this test process). Unreachable is
that server in one of two ways:

- down: its port closed, every connection refused (web3 retries a view five times in two
  seconds, then raises; before the fix, that error ended the settler's loop for good);
- stalled: it stops taking requests but keeps its socket, so the indexer's calls hang until
  their 10 s timeout, retried by web3 for about a minute; requests queued meanwhile are
  answered late, after the indexer gave up on them (a transaction it thought lost is mined).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest

from stipple_chain_indexer.reservations import Ledger
from stipple_cli.devchain import DevChain
from stipple_cli.network import LocalNetwork
from stipple_common import bus, subjects
from stipple_common import chain as ch
from stipple_common.messages import TaskAborted
from stipple_testkit.faults import check_ended_once, outcomes, wait_live

# The network runs as processes (eight interpreters importing torch and the services): its
# start takes up to a minute and more on a cold machine, and each test waits for tasks to
# end and then for the chain to catch up (10 s timeouts while it is away), so this module
# has five minutes a test, and shares the one worker of the process networks (conftest.py).
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.xdist_group("process-networks"),
]

BATCH = 4
FEE = 10**18  # one token of the apps' deposit (the gateway's max_fee is 10)
TERMINAL = (ch.TaskState.SETTLED, ch.TaskState.REFUNDED)


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = LocalNetwork(
        data_dir=tmp_path_factory.mktemp("faults-chain"),
        port=0,
        nodes=3,
        extra_env={
            "STIPPLE_VALIDATION_RATE": "1",  # every task on three nodes
            "STIPPLE_TASK_TIMEOUT_S": "20",
            "STIPPLE_DISPATCH_TIMEOUT_S": "120",  # queued tasks outwait a restart
        },
    )
    net.start(timeout=240)
    yield net
    net.stop()


@dataclass
class ChainView:
    """The chain as any JSON-RPC client reads it (never the EVM object the server uses)."""

    network: LocalNetwork
    chain: ch.StippleChain = field(init=False)
    app: str = field(init=False)  # the custodial account: the apps' deposit

    def __post_init__(self) -> None:
        assert self.network.devchain is not None
        assert self.network.devchain.deployment is not None
        w3 = ch.connect(self.network.chain_url, timeout_s=30)
        self.chain = ch.StippleChain(w3, self.network.devchain.deployment)
        self.app = w3.eth.accounts[0]

    def states(self, task_ids: list[str]) -> dict[str, ch.TaskState]:
        return {task_id: self.chain.task(task_id).state for task_id in task_ids}

    def payment_events(self) -> dict[str, list[bytes]]:
        """TaskPayment's events on chain, by name: the task keys they name, in order."""
        logs = self.chain.w3.eth.get_logs({"address": self.chain.deployment.payment, "fromBlock": 0})
        found: dict[str, list[bytes]] = {}
        for event in self.chain.decode_logs(logs):
            if "taskId" in event.args:
                found.setdefault(event.name, []).append(bytes(event.args["taskId"]))
        return found


def submit(network: LocalNetwork, count: int, *, fee: int = FEE, tag: str = "") -> list[str]:
    task_ids = []
    with httpx.Client(base_url=network.gateway_url, timeout=30) as http:
        for i in range(count):
            response = http.post("/v1/tasks", json=task_body(i, fee=fee, tag=tag))
            assert response.status_code == 202, response.text
            task_ids.append(response.json()["task_id"])
    return task_ids


def task_body(i: int, *, fee: int, tag: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "base_model": "tiny-sd",
        "prompt": f"a lighthouse {tag}, take {i}",
        "task_config": {"image_width": 128, "image_height": 128, "steps": 4, "seed": 200 + i},
    }
    return {**body, "fee": fee} if fee else body


def refused_while_away(network: LocalNetwork) -> None:
    """A paid task the indexer cannot reserve for: 503 with a code, never 500 or a 202."""
    with httpx.Client(base_url=network.gateway_url, timeout=30) as http:
        response = http.post("/v1/tasks", json=task_body(99, fee=FEE, tag="refused"))
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "chain_unavailable"


async def settled_on_chain(view: ChainView, task_ids: list[str], timeout: float = 150.0) -> dict[str, ch.TaskState]:
    """Each task's state once every one is settled or refunded (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        states = await asyncio.to_thread(view.states, task_ids)
        if all(s in TERMINAL for s in states.values()) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.5)


async def check_paid_once(
    view: ChainView, found: dict[str, list[Any]], paid: list[str], balance_before: int, escrowed_before: int
) -> None:
    """On chain: each paid task escrowed once, then settled or refunded once (refunded if it
    was aborted); the deposit paid exactly the settled fees; nothing left in escrow."""
    states = await settled_on_chain(view, paid)
    assert all(s in TERMINAL for s in states.values()), f"not settled or refunded: {states}"
    events = await asyncio.to_thread(view.payment_events)
    for task_id in paid:
        key = ch.task_key(task_id)
        counts = {name: events.get(name, []).count(key) for name in ("Escrowed", "Settled", "Refunded")}
        assert counts["Escrowed"] == 1, f"task {task_id}: {counts}"
        assert counts["Settled"] + counts["Refunded"] == 1, f"task {task_id}: {counts}"
        if isinstance(found[task_id][0], TaskAborted):
            assert states[task_id] == ch.TaskState.REFUNDED, f"aborted task {task_id} was {states[task_id].name}"
    settled = sum(1 for s in states.values() if s == ch.TaskState.SETTLED)
    balance = await asyncio.to_thread(view.chain.balance_of, view.app)
    assert balance == balance_before - settled * FEE  # a refund gives back once, a settlement takes once
    assert await asyncio.to_thread(view.chain.total_escrowed) == escrowed_before


async def reservations_left(network: LocalNetwork, app: str) -> set[str]:
    """The tasks whose fee the indexer still holds reserved (KV, reservations.py)."""
    nc = await bus.connect(network.admin_url(), "fault-test-kv")
    try:
        kv = await nc.jetstream().key_value(subjects.RESERVATIONS_BUCKET)
        entry = await kv.get(app.lower())
        return set(msgspec.json.decode(entry.value or b'{"reserved": {}}', type=Ledger).reserved)
    finally:
        await nc.drain()


@contextmanager
def chain_away(devchain: DevChain, how: str) -> Iterator[None]:
    """The chain's JSON-RPC server stops serving (and mining) until the block ends. `down`:
    its port is closed (connections refused), and opened again on the same port; `stalled`:
    it keeps its socket, so connections wait in its backlog (or time out)."""
    server, thread = devchain._server, devchain._thread
    assert server is not None
    assert thread is not None
    server.shutdown()  # serve_forever returns between two requests
    thread.join()
    if how == "down":
        server.socket.close()
    try:
        yield
    finally:
        if how == "down":  # the same address again (HTTPServer binds with SO_REUSEADDR)
            server.socket = socket.socket(server.address_family, server.socket_type)
            server.server_bind()
            server.server_activate()
        devchain._thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="devchain", daemon=True)
        devchain._thread.start()


async def chain_errors(network: LocalNetwork) -> float:
    """The indexer's failed reads of the chain so far (its follower's counter)."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(network.metrics_urls()["chain-indexer"])).text
    found = re.search(r'^stipple_chain_indexer_step_errors_total\{code="chain_unavailable"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def until_chain_errors(network: LocalNetwork, more_than: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while await chain_errors(network) <= more_than:
        assert time.monotonic() < deadline, "the chain-indexer never found the chain away"
        await asyncio.sleep(0.5)


async def test_the_chain_indexer_killed_with_paid_tasks_in_flight_pays_each_once(network: LocalNetwork) -> None:
    wait_live(network, 3)
    view = await asyncio.to_thread(ChainView, network)
    before = await asyncio.to_thread(view.chain.balance_of, view.app)
    escrowed = await asyncio.to_thread(view.chain.total_escrowed)
    paid = submit(network, BATCH, tag="killed")
    await asyncio.sleep(0.5)  # some fees escrowed, some only reserved
    network.kill("chain-indexer")
    refused_while_away(network)  # nobody to reserve the fee: refused, not accepted unpaid
    await asyncio.sleep(2.0)
    network.restart("chain-indexer")
    found = await outcomes(network.admin_url(), paid)
    check_ended_once(found)
    await check_paid_once(view, found, paid, before, escrowed)
    assert not await reservations_left(network, view.app) & set(paid)  # every reservation ended with its escrow


@pytest.mark.parametrize("how", ["down", "stalled"])
async def test_tasks_end_while_the_chain_is_unreachable_and_settlement_catches_up(
    network: LocalNetwork, how: str
) -> None:
    wait_live(network, 3)
    view = await asyncio.to_thread(ChainView, network)
    before = await asyncio.to_thread(view.chain.balance_of, view.app)
    escrowed = await asyncio.to_thread(view.chain.total_escrowed)
    errors = await chain_errors(network)
    paid = submit(network, BATCH, tag="away")  # reserved while the chain answered
    assert network.devchain is not None
    with chain_away(network.devchain, how):
        free = submit(network, 2, fee=0, tag="free")  # free tasks need no chain
        refused_while_away(network)  # the balance cannot be read: refused, not accepted unpaid
        found = await outcomes(network.admin_url(), paid + free)
        check_ended_once(found)  # every task ended while the chain was away
        if how == "down":  # the indexer saw it away (a stalled node's first error takes web3's minute of retries)
            await until_chain_errors(network, more_than=errors)
        assert await asyncio.to_thread(lambda: network.service("chain-indexer").process.running)  # type: ignore[union-attr]
    await check_paid_once(view, found, paid, before, escrowed)
    assert set((await asyncio.to_thread(view.states, free)).values()) == {ch.TaskState.NONE}
