"""The follower on a real EVM and a real nats-server: contract events from confirmed
blocks reach the CHAIN stream once each, across restarts; a reorg (made on anvil with
snapshot and revert) voids what it orphaned and the new chain's events follow."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from nats.js.api import KeyValueConfig

from stipple_chain_indexer.follower import ChainFollower
from stipple_chain_indexer.metrics import FollowerMetrics
from stipple_chain_indexer.service import ChainThread, StakeProjection
from stipple_common import bus, records, subjects
from stipple_common import chain as ch
from stipple_common.identity import node_id_of
from stipple_common.messages import ChainLog, ChainReorg, IndexedStake, chain_decoder, indexed_stake_decoder
from stipple_common.metrics import Metrics
from stipple_common.records import ChainCursor
from stipple_testkit.chain import running_anvil

pytestmark = pytest.mark.integration

MIN_STAKE = 100


@dataclass
class Env:
    w3: Any
    chain: ch.StippleChain
    admin: str
    node: str


def deploy(w3: Any) -> Env:
    admin, treasury, node = w3.eth.accounts[0], w3.eth.accounts[1], w3.eth.accounts[2]
    deployment = ch.deploy_all(w3, admin, min_stake=MIN_STAKE, cooldown_s=60, treasury=treasury, validator=admin)
    chain = ch.StippleChain(w3, deployment)
    chain.mint(admin, node, 10_000)
    return Env(w3, chain, admin, node)


@pytest.fixture
def embedded() -> Env:
    return deploy(ch.connect(ch.EMBEDDED_URL))


@pytest.fixture
def anvil() -> Iterator[Env]:
    """An anvil of this test's own: a reorg here must not rewrite another test's chain."""
    with running_anvil() as node:
        yield deploy(ch.connect(node.url))


@pytest.fixture
def js(fresh_js):
    return fresh_js


async def follower(js, env: Env, confirmations: int) -> tuple[ChainFollower, ChainThread]:
    kv = await js.create_key_value(KeyValueConfig(bucket=subjects.CHAIN_BUCKET))
    stakes = await js.create_key_value(KeyValueConfig(bucket=subjects.STAKES_BUCKET))
    call = ChainThread()
    f = ChainFollower(
        chain=env.chain,
        call=call,
        js=js,
        kv=kv,
        confirmations=confirmations,
        metrics=FollowerMetrics(Metrics("chain-indexer-test").registry),
        on_log=StakeProjection(stakes).apply,
    )
    await f.load()
    return f, call


async def chain_messages(js) -> list[tuple[str, ChainLog | ChainReorg, str]]:
    msgs = await bus.read_messages(js, subjects.CHAIN_STREAM, "chain.>")
    return [(m.subject, chain_decoder.decode(m.data), m.headers.get("Nats-Msg-Id", "")) for m in msgs]


async def test_events_of_confirmed_blocks_are_published_once_across_restarts(js, embedded: Env):
    f, call = await follower(js, embedded, confirmations=2)
    receipt = await call(lambda: embedded.chain.stake(embedded.node, 150))  # approve + stake: two blocks
    await f.step()
    assert not [e for _, e, _ in await chain_messages(js) if e.event == "Staked"]  # 0 confirmations yet
    await call(lambda: embedded.w3.provider.ethereum_tester.mine_blocks(2))
    await f.step()
    published = await chain_messages(js)
    staked = [(s, e, i) for s, e, i in published if isinstance(e, ChainLog) and e.event == "Staked"]
    assert len(staked) == 1
    subject, event, msg_id = staked[0]
    assert subject == "chain.NodeStaking.Staked"
    assert event.args == {"node": embedded.node, "owner": embedded.node, "amount": 150, "total": 150}
    assert event.block_hash == "0x" + bytes(receipt["blockHash"]).hex()
    assert msg_id == f"{event.block_hash}:{event.log_index}"
    stakes = StakeProjection(await js.key_value(subjects.STAKES_BUCKET))
    assert (await stakes.get(embedded.node)).stake == 150
    assert await records.keys(stakes.kv) == [node_id_of(embedded.node)]  # keyed by node id

    # a restarted follower goes on from its cursor; an older cursor re-publishes nothing new
    again, _ = await follower(js, embedded, confirmations=2)
    assert again.cursor.number == f.cursor.number
    number = again.cursor.number - 3  # as if it crashed before saving its cursor
    again.cursor = ChainCursor(number=number, hashes={n: h for n, h in again.cursor.hashes.items() if n <= number})
    await again.step()
    assert len(await chain_messages(js)) == len(published)  # deduplicated by message id
    call.close()


async def test_the_stakes_projection_keys_nodes_by_id_and_names_the_operator(js, embedded: Env):
    """An operator stakes for a node; another node stakes for itself. The `stakes` bucket holds
    each under its node id with the owner (node-id form; "" when the node is its own), and
    follows unstaking, slashing and withdrawing."""
    w3, c = embedded.w3, embedded.chain
    operator, own = w3.eth.accounts[3], w3.eth.accounts[4]
    f, call = await follower(js, embedded, confirmations=0)

    def setup() -> None:
        c.mint(embedded.admin, operator, 1_000)
        c.mint(embedded.admin, own, 1_000)
        c.stake_for(operator, embedded.node, 300)
        c.stake(own, 200)

    await call(setup)
    await f.step()
    kv = await js.key_value(subjects.STAKES_BUCKET)
    node, own_id = node_id_of(embedded.node), node_id_of(own)
    assert sorted(await records.keys(kv)) == sorted([node, own_id])

    async def entry(key: str) -> IndexedStake:
        return indexed_stake_decoder.decode((await kv.get(key)).value or b"")

    run = (await entry(node)).block
    assert await entry(node) == IndexedStake(stake=300, leaving=False, owner=node_id_of(operator), block=run)
    assert (await entry(own_id)).owner == ""  # its own operator

    await call(lambda: c.request_unstake(operator, embedded.node))
    await call(lambda: c.slash(embedded.admin, embedded.node, 100, "t-1"))
    await f.step()
    left = await entry(node)
    assert (left.stake, left.leaving, left.owner) == (200, True, node_id_of(operator))
    await call(lambda: ch.increase_time(w3, 61))
    await call(lambda: c.withdraw_stake(operator, embedded.node))
    await f.step()
    gone = await entry(node)
    assert (gone.stake, gone.leaving, gone.owner) == (0, False, "")
    assert await call(lambda: c.token_balance(operator)) == 1_000 - 100  # the rest came back to the operator
    call.close()


async def test_a_reorg_voids_the_orphaned_events_and_follows_the_new_chain(js, anvil: Env):
    f, call = await follower(js, anvil, confirmations=0)
    await call(lambda: anvil.chain.approve(anvil.node, anvil.chain.deployment.staking, 10_000))
    await f.step()
    before = await call(lambda: ch.snapshot(anvil.w3))
    await call(lambda: anvil.chain.stake(anvil.node, 150, approve=False))
    await f.step()
    orphan = [e for _, e, _ in await chain_messages(js) if isinstance(e, ChainLog) and e.event == "Staked"]
    assert [e.args["amount"] for e in orphan] == [150]

    await call(lambda: ch.revert(anvil.w3, before))  # the block with the 150 is gone ...
    await call(lambda: anvil.chain.stake(anvil.node, 300, approve=False))  # ... another takes its place
    await f.step()  # sees the fork
    await f.step()  # follows the new chain
    messages = await chain_messages(js)
    reorgs = [e for _, e, _ in messages if isinstance(e, ChainReorg)]
    assert len(reorgs) == 1
    assert reorgs[0].orphaned == [orphan[0].block_hash]
    assert reorgs[0].from_block == orphan[0].block_number
    staked = [e for _, e, _ in messages if isinstance(e, ChainLog) and e.event == "Staked"]
    assert [e.args["amount"] for e in staked] == [150, 300]
    assert staked[1].block_number == orphan[0].block_number
    assert staked[1].block_hash != orphan[0].block_hash
    stakes = StakeProjection(await js.key_value(subjects.STAKES_BUCKET))
    assert (await stakes.get(anvil.node)).stake == 300
    call.close()


async def test_with_enough_confirmations_a_reorg_never_shows(js, anvil: Env):
    f, call = await follower(js, anvil, confirmations=2)
    await call(lambda: anvil.chain.approve(anvil.node, anvil.chain.deployment.staking, 10_000))
    before = await call(lambda: ch.snapshot(anvil.w3))
    await call(lambda: anvil.chain.stake(anvil.node, 150, approve=False))
    await f.step()
    await call(lambda: ch.revert(anvil.w3, before))
    await call(lambda: anvil.chain.stake(anvil.node, 300, approve=False))
    await call(lambda: [ch._rpc(anvil.w3, "evm_mine", []) for _ in range(2)])
    await f.step()
    messages = await chain_messages(js)
    assert not [e for _, e, _ in messages if isinstance(e, ChainReorg)]
    assert [e.args["amount"] for _, e, _ in messages if isinstance(e, ChainLog) and e.event == "Staked"] == [300]
    call.close()


async def test_a_reorg_deeper_than_the_kept_hashes_is_a_typed_error_and_the_loop_goes_on(js, embedded: Env):
    f, call = await follower(js, embedded, confirmations=0)
    await f.step()
    hashes = {n + 10_000: h for n, h in f.cursor.hashes.items()}  # blocks this chain never had
    f.cursor = ChainCursor(number=f.cursor.number + 10_000, hashes=hashes)
    with pytest.raises(ch.ChainError, match="reorg deeper than"):
        await f.step()
    stop = asyncio.Event()
    runner = asyncio.create_task(f.run(stop, 0.05))
    await asyncio.sleep(0.3)
    assert not runner.done()  # logged and tried again: the loop lives
    stop.set()
    await runner
    call.close()
