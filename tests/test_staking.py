"""A node stakes with its own key through the chain-indexer (the embedded chain, in the
indexer's process), and refuses to start when it cannot reach the minimum. It asks on its
own subject, ``rpc.chain.<node id>`` (its lower-case address), and only about itself."""

from __future__ import annotations

import asyncio

import pytest

from stipple_chain_indexer.service import IndexerSettings
from stipple_chain_indexer.service import serve as serve_indexer
from stipple_common.commitment import new_account
from stipple_common.identity import node_id_of
from stipple_common.messages import ChainInfoRequest, FaucetRequest, SendRawTransaction
from stipple_common.service import open_service
from stipple_node.staking import StakeError, ask, ensure_stake

pytestmark = pytest.mark.integration

TOKEN = 10**18


@pytest.fixture
async def indexer(fresh_nats_url):
    settings = IndexerSettings(nats_url=fresh_nats_url, confirmations=0, poll_s=0.1)
    stop = asyncio.Event()
    async with open_service("chain-indexer", settings, stop=stop) as ctx:
        task = asyncio.create_task(serve_indexer(ctx, settings))
        yield ctx.nc, settings
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_a_new_node_stakes_the_minimum_once(indexer):
    nc, settings = indexer
    account = new_account()
    me = node_id_of(account.address)
    staked = await ensure_stake(nc, me, account, 0, wait_s=30)
    assert staked == settings.min_stake
    info = await ask(nc, me, ChainInfoRequest(address=account.address), wait_s=5)
    assert (info.stake, info.leaving, info.min_stake, info.owner) == (settings.min_stake, False, settings.min_stake, "")
    nonce = info.nonce
    assert await ensure_stake(nc, me, account, 0, wait_s=5) == settings.min_stake  # staked already
    again = await ask(nc, me, ChainInfoRequest(address=account.address), wait_s=5)
    assert again.nonce == nonce  # nothing sent the second time


async def test_more_than_the_minimum_is_staked_on_top(indexer):
    nc, settings = indexer
    account = new_account()
    me = node_id_of(account.address)
    await ensure_stake(nc, me, account, settings.min_stake, wait_s=30)
    assert await ensure_stake(nc, me, account, settings.min_stake + 5 * TOKEN, wait_s=5) == (
        settings.min_stake + 5 * TOKEN
    )


async def test_a_stake_below_the_minimum_refuses_to_start_naming_both(indexer):
    nc, settings = indexer
    words = f"STIPPLE_STAKE=5 is below the network's minimum stake of {settings.min_stake}"
    account = new_account()
    with pytest.raises(StakeError, match=words):
        await ensure_stake(nc, node_id_of(account.address), account, 5, wait_s=30)


async def test_the_relay_names_bad_requests(indexer):
    nc, _ = indexer
    account = new_account()
    me = node_id_of(account.address)
    bad = await ask(nc, me, ChainInfoRequest(address="0x12"), wait_s=30)
    assert (bad.ok, bad.error) == (False, "bad_request")
    assert "0x12" in bad.message
    greedy = await ask(nc, me, FaucetRequest(address=account.address, tokens=10**40), wait_s=5)
    assert (greedy.ok, greedy.error) == (False, "bad_request")
    assert "tokens" in greedy.message
    junk = await ask(nc, me, SendRawTransaction(raw="0xdeadbeef"), wait_s=5)
    assert (junk.ok, junk.error) == (False, "bad_request")
    named = await ask(nc, "n4", ChainInfoRequest(address=account.address), wait_s=5)  # not a node id
    assert (named.ok, named.error) == (False, "forbidden")


async def test_without_an_indexer_the_node_says_so(fresh_nats_url):
    async with open_service("node", IndexerSettings(nats_url=fresh_nats_url), stop=asyncio.Event()) as ctx:
        with pytest.raises(StakeError, match="no chain-indexer answered on rpc.chain.n5"):
            await ensure_stake(ctx.nc, "n5", new_account(), 0, wait_s=0.5)
