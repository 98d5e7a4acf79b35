"""The chain-indexer service on the in-process EVM and its own nats-server, driven
through the protocol: a paid task is escrowed at submission and, on its outcome, paid
to the agreeing nodes by QoS share, refunded when aborted, and a node with a wrong
result is slashed; none of it twice, whatever is redelivered or restarted."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec
import pytest

from stipple_chain_indexer.service import ChainThread, IndexerSettings, serve
from stipple_common import bus, subjects
from stipple_common import chain as ch
from stipple_common.identity import node_id_of
from stipple_common.messages import (
    ChainLog,
    NodeJoined,
    TaskAborted,
    TaskSubmitted,
    TaskSucceeded,
    chain_decoder,
)
from stipple_common.service import open_service
from stipple_common.settings import InvalidSettings
from stipple_common.taskspec import parse_task

pytestmark = pytest.mark.integration

MIN_STAKE = 1_000
SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})


class Network:
    """The in-process chain (used only from `call`'s thread) and a running indexer."""

    def __init__(self, nats_url: str) -> None:
        self.call = ChainThread()
        self.nats_url = nats_url

    async def setup(self) -> None:
        def build() -> None:
            w3 = ch.connect(ch.EMBEDDED_URL)
            self.w3 = w3
            self.admin, treasury = w3.eth.accounts[0], w3.eth.accounts[1]
            self.nodes = dict(zip("abc", w3.eth.accounts[2:5], strict=True))
            self.ids = {name: node_id_of(address) for name, address in self.nodes.items()}
            self.deployment = ch.deploy_all(
                w3,
                self.admin,
                min_stake=MIN_STAKE,
                cooldown_s=60,
                treasury=treasury,
                validator=self.admin,
                gateway=self.admin,
                settler=self.admin,
            )
            self.chain = ch.StippleChain(w3, self.deployment)
            self.chain.mint(self.admin, self.admin, 100_000)
            self.chain.deposit(self.admin, 100_000)
            for address in self.nodes.values():
                self.chain.mint(self.admin, address, MIN_STAKE)
                self.chain.stake(address, MIN_STAKE)

        await self.call(build)
        d = self.deployment
        self.settings = IndexerSettings(
            nats_url=self.nats_url,
            deployment=f"token={d.token},staking={d.staking},payment={d.payment}",
            account=self.admin,
            confirmations=0,
            poll_s=0.05,
            settle_wait_s=0.1,
            max_fee=5_000,  # a slash of MIN_STAKE must outweigh it (economics.py)
        )

    async def start(self) -> None:
        self.stop = asyncio.Event()
        self.ctx_cm = open_service("chain-indexer", self.settings, stop=self.stop)
        self.ctx = await self.ctx_cm.__aenter__()
        for address in self.nodes.values():
            node = node_id_of(address)
            joined = NodeJoined(
                node_id=node,
                device="cpu",
                memory_bytes=1,
                models=["tiny-sd"],
                version="0",
                started_at=1.0,
                address=address,
            )
            await bus.publish(self.ctx.js, subjects.node_subject(node, "joined"), joined, msg_id=f"{node}:joined")
        self.task = asyncio.create_task(serve(self.ctx, self.settings, w3=self.w3, call=self.call))
        await asyncio.sleep(0.5)

    async def halt(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 20)
        await self.ctx_cm.__aexit__(None, None, None)

    async def publish(self, event: Any, name: str, msg_id: str | None = None) -> None:
        subject = subjects.task_subject(event.task_id, name)
        await bus.publish(self.ctx.js, subject, event, msg_id=msg_id or f"{event.task_id}:{name}")

    async def wait_state(self, task_id: str, state: ch.TaskState, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await self.call(lambda: self.chain.task(task_id))).state == state:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"task {task_id} never became {state.name}")

    async def view(self, fn: Any) -> Any:
        return await self.call(lambda: fn(self.chain))

    async def chain_logs(self, subject: str, at_least: int, timeout: float = 10.0) -> list[ChainLog]:
        """The CHAIN stream's events on `subject`, once the follower has published `at_least`."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = await bus.read_messages(self.ctx.js, subjects.CHAIN_STREAM, subject)
            events = [chain_decoder.decode(m.data) for m in msgs]
            if len(events) >= at_least or time.monotonic() > deadline:
                return [e for e in events if isinstance(e, ChainLog)]
            await asyncio.sleep(0.05)


@pytest.fixture
async def network(fresh_nats_url):
    net = Network(fresh_nats_url)
    await net.setup()
    await net.start()
    yield net
    if not net.task.done():
        await net.halt()
    net.call.close()


def submitted(task_id: str, fee: int) -> TaskSubmitted:
    return TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time(), fee=fee)


async def test_a_task_is_escrowed_paid_by_share_and_the_cheat_slashed_once(network: Network):
    task_id = uuid.uuid4().hex
    await network.publish(submitted(task_id, 1_500), "submitted")
    await network.wait_state(task_id, ch.TaskState.ESCROWED)
    assert await network.view(lambda c: c.balance_of(network.admin)) == 100_000 - 1_500
    a, b, c = (network.ids[n] for n in "abc")
    outcome = TaskSucceeded(
        task_id=task_id,
        reason="majority",
        images=[],
        verdicts={a: "agree", b: "agree", c: "mismatch"},
        qos={a: 10, b: 5, c: 0},
    )
    await network.publish(outcome, "succeeded")
    await network.wait_state(task_id, ch.TaskState.SETTLED)
    nodes = network.nodes
    assert await network.view(lambda c: c.balance_of(nodes["a"])) == 1_000  # 10/15 of 1,500
    assert await network.view(lambda c: c.balance_of(nodes["b"])) == 500
    assert await network.view(lambda c: c.balance_of(nodes["c"])) == 0
    (slashed,) = await network.chain_logs("chain.NodeStaking.Slashed", 1)
    assert slashed.args["node"] == nodes["c"]
    assert await network.view(lambda c: c.stake_of(nodes["c"])) == 0  # the minimum stake, all it had
    assert await network.view(lambda c: c.stake_of(nodes["a"])) == MIN_STAKE

    # the same outcome again (another message id: a second validator, say), then a restart
    await network.publish(outcome, "succeeded", msg_id=f"{task_id}:again")
    await asyncio.sleep(0.5)
    await network.halt()
    await network.start()
    await asyncio.sleep(0.5)
    assert await network.view(lambda c: c.balance_of(nodes["a"])) == 1_000  # paid once
    settled = await network.chain_logs("chain.TaskPayment.Settled", 2, timeout=1.0)  # a second would show
    assert len(settled) == 1
    assert settled[0].args["taskId"] == "0x" + ch.task_key(task_id).hex()
    assert settled[0].args["nodes"] == [nodes["a"], nodes["b"]]
    assert settled[0].args["amounts"] == [1_000, 500]
    assert len(await network.chain_logs("chain.NodeStaking.Slashed", 2, timeout=1.0)) == 1


async def test_aborted_tasks_are_refunded_in_one_batch_and_free_tasks_touch_nothing(network: Network):
    paid = [uuid.uuid4().hex for _ in range(5)]
    free = uuid.uuid4().hex
    for task_id in paid:
        await network.publish(submitted(task_id, 100), "submitted")
    await network.publish(submitted(free, 0), "submitted")
    for task_id in [*paid, free]:
        await network.publish(TaskAborted(task_id=task_id, reason="no_agreement"), "aborted")
    for task_id in paid:
        await network.wait_state(task_id, ch.TaskState.REFUNDED)
    assert await network.view(lambda c: c.balance_of(network.admin)) == 100_000
    assert (await network.view(lambda c: c.task(free))).state == ch.TaskState.NONE
    refunds = await network.chain_logs("chain.TaskPayment.Refunded", 5)
    assert len(refunds) == 5
    assert len({r.tx_hash for r in refunds}) < 5  # batched: fewer transactions than tasks
    escrows = await network.chain_logs("chain.TaskPayment.Escrowed", 5)
    assert len(escrows) == 5
    assert len({e.tx_hash for e in escrows}) < 5  # escrows are batched too


async def test_an_outcome_without_its_submission_nearby_still_settles(network: Network):
    """The submission's escrow and the outcome can be far apart (a restart between them):
    the settler finds the fee in the TASKS stream and escrows first."""
    task_id = uuid.uuid4().hex
    await network.halt()
    network.stop = asyncio.Event()
    async with open_service("app", network.settings, stop=network.stop) as app:
        await bus.publish(app.js, subjects.task_subject(task_id, "submitted"), submitted(task_id, 300), msg_id="s")
        outcome = TaskSucceeded(
            task_id=task_id,
            reason="unanimous",
            images=[],
            verdicts=dict.fromkeys(network.ids.values(), "agree"),
            qos={},
        )
        await bus.publish(app.js, subjects.task_subject(task_id, "succeeded"), outcome, msg_id="o")
    await network.start()
    await network.wait_state(task_id, ch.TaskState.SETTLED)
    for node in "abc":  # all QoS 0: equal shares
        assert await network.view(lambda c, n=node: c.balance_of(network.nodes[n])) == 100


async def test_the_indexer_refuses_to_start_when_cheating_pays(fresh_nats_url):
    net = Network(fresh_nats_url)
    await net.setup()
    settings = msgspec.structs.replace(net.settings, max_fee=10**6)  # a fee far above the 1,000 slash
    async with open_service("chain-indexer", settings, stop=asyncio.Event()) as ctx:
        with pytest.raises(InvalidSettings, match=r"cheating pays.*STIPPLE_MAX_FEE below 9000"):
            await serve(ctx, settings, w3=net.w3, call=net.call)
    net.call.close()
