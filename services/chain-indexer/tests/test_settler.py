"""The chain-indexer service on the in-process EVM and its own nats-server, driven
through the protocol: a paid task is escrowed at submission and, on its outcome, paid
to the agreeing nodes by QoS share, refunded when aborted, and a node with a wrong
result is slashed; none of it twice, whatever is redelivered or restarted."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import pytest

from stipple_chain_indexer.service import serve
from stipple_common import bus, subjects
from stipple_common import chain as ch
from stipple_common.messages import (
    TaskAborted,
    TaskSubmitted,
    TaskSucceeded,
)
from stipple_common.service import open_service
from stipple_common.settings import InvalidSettings
from stipple_common.taskspec import parse_task
from stipple_testkit.chain import IndexedChain

pytestmark = pytest.mark.integration

MIN_STAKE = 1_000
SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})


@pytest.fixture
async def network(fresh_nats_url):
    """The in-process chain (nodes a, b, c staked) and the indexer running on it."""
    net = IndexedChain(fresh_nats_url)
    await net.setup()
    await net.start()
    await asyncio.sleep(0.5)
    yield net
    await net.close()


def submitted(task_id: str, fee: int) -> TaskSubmitted:
    return TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time(), fee=fee)


async def test_a_task_is_escrowed_paid_by_share_and_the_cheat_slashed_once(network: IndexedChain):
    task_id = uuid.uuid4().hex
    await network.publish(submitted(task_id, 1_500), "submitted")
    await network.wait_state(task_id, ch.TaskState.ESCROWED)
    assert await network.on_chain(lambda c: c.balance_of(network.admin)) == 100_000 - 1_500
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
    assert await network.on_chain(lambda c: c.balance_of(nodes["a"])) == 1_000  # 10/15 of 1,500
    assert await network.on_chain(lambda c: c.balance_of(nodes["b"])) == 500
    assert await network.on_chain(lambda c: c.balance_of(nodes["c"])) == 0
    (slashed,) = await network.chain_logs("chain.NodeStaking.Slashed", 1)
    assert slashed.args["node"] == nodes["c"]
    assert await network.on_chain(lambda c: c.stake_of(nodes["c"])) == 0  # the minimum stake, all it had
    assert await network.on_chain(lambda c: c.stake_of(nodes["a"])) == MIN_STAKE

    # the same outcome again (another message id: a second validator, say), then a restart
    await network.publish(outcome, "succeeded", msg_id=f"{task_id}:again")
    await asyncio.sleep(0.5)
    await network.halt()
    await network.start()
    await asyncio.sleep(0.5)
    assert await network.on_chain(lambda c: c.balance_of(nodes["a"])) == 1_000  # paid once
    settled = await network.chain_logs("chain.TaskPayment.Settled", 2, timeout=1.0)  # a second would show
    assert len(settled) == 1
    assert settled[0].args["taskId"] == "0x" + ch.task_key(task_id).hex()
    assert settled[0].args["nodes"] == [nodes["a"], nodes["b"]]
    assert settled[0].args["amounts"] == [1_000, 500]
    assert len(await network.chain_logs("chain.NodeStaking.Slashed", 2, timeout=1.0)) == 1


async def test_aborted_tasks_are_refunded_in_one_batch_and_free_tasks_touch_nothing(network: IndexedChain):
    paid = [uuid.uuid4().hex for _ in range(5)]
    free = uuid.uuid4().hex
    for task_id in paid:
        await network.publish(submitted(task_id, 100), "submitted")
    await network.publish(submitted(free, 0), "submitted")
    for task_id in [*paid, free]:
        await network.publish(TaskAborted(task_id=task_id, reason="no_agreement"), "aborted")
    for task_id in paid:
        await network.wait_state(task_id, ch.TaskState.REFUNDED)
    assert await network.on_chain(lambda c: c.balance_of(network.admin)) == 100_000
    assert (await network.on_chain(lambda c: c.task(free))).state == ch.TaskState.NONE
    refunds = await network.chain_logs("chain.TaskPayment.Refunded", 5)
    assert len(refunds) == 5
    assert len({r.tx_hash for r in refunds}) < 5  # batched: fewer transactions than tasks
    escrows = await network.chain_logs("chain.TaskPayment.Escrowed", 5)
    assert len(escrows) == 5
    assert len({e.tx_hash for e in escrows}) < 5  # escrows are batched too


async def test_an_outcome_without_its_submission_nearby_still_settles(network: IndexedChain):
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
        assert await network.on_chain(lambda c, n=node: c.balance_of(network.nodes[n])) == 100


async def test_the_indexer_refuses_to_start_when_cheating_pays(fresh_nats_url):
    net = IndexedChain(fresh_nats_url)
    await net.setup()
    # the default sampling rate (a task compared one time in ten) and a fee far above the 1,000 slash
    settings = msgspec.structs.replace(net.settings, max_fee=10**6, validation_rate=0.1)
    async with open_service("chain-indexer", settings, stop=asyncio.Event()) as ctx:
        with pytest.raises(InvalidSettings, match=r"cheating pays.*r=0.1 .*STIPPLE_MAX_FEE below 110\b"):
            await serve(ctx, settings, w3=net.w3, call=net.call)
    await net.close()
