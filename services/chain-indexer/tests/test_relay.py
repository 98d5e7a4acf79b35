"""The chain relay (``rpc.chain.<id>``): who asks is the subject's last token. A node is
answered only about itself and only for transactions it signed to our contracts; fee
reservations only on the gateway's subject; every node is rate-limited; and a node's
transaction that is never mined does not hold up settlement (on anvil, where a nonce too
high waits in the pool for ever)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from stipple_chain_indexer.relay import TokenBuckets, refusal, transaction_parties
from stipple_chain_indexer.service import ChainThread, IndexerSettings, serve
from stipple_common import bus, subjects
from stipple_common import chain as ch
from stipple_common.identity import node_id_of
from stipple_common.messages import (
    ChainInfoRequest,
    ChainReply,
    FaucetRequest,
    ReserveRequest,
    SendRawTransaction,
    TaskSubmitted,
    TaskSucceeded,
    chain_reply_decoder,
    encode,
)
from stipple_common.service import ServiceContext, open_service
from stipple_common.taskspec import parse_task
from stipple_testkit.chain import IndexedChain

TOKEN = 10**18
CONTRACTS = {"0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20}
SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})


def signed(account: LocalAccount, to: str, *, nonce: int = 0, typed: bool = False, chain_id: int = 1) -> str:
    tx: dict[str, Any] = {"to": Web3.to_checksum_address(to), "value": 0, "gas": 100_000, "nonce": nonce}
    tx["chainId"] = chain_id
    if typed:
        tx |= {"maxFeePerGas": 10**9, "maxPriorityFeePerGas": 1}
    else:
        tx["gasPrice"] = 10**9
    return "0x" + account.sign_transaction(tx).raw_transaction.hex()


# ---------------------------------------------------------------- without NATS or a chain


def test_the_sender_and_receiver_of_a_signed_transaction() -> None:
    key, to = Account.create(), "0x" + "ab" * 20
    for typed in (False, True):
        raw = bytes.fromhex(signed(key, to, typed=typed)[2:])
        assert transaction_parties(raw) == (node_id_of(key.address), to)
    with pytest.raises(ValueError, match="not a signed transaction"):
        transaction_parties(b"\xde\xad\xbe\xef")


def test_who_may_ask_what() -> None:
    node, other = Account.create(), Account.create()
    me, you = node_id_of(node.address), node_id_of(other.address)
    to = next(iter(CONTRACTS))
    allowed = [
        ("gateway", ReserveRequest(task_id="t", fee=1)),
        (me, ChainInfoRequest(address=node.address)),
        (me, FaucetRequest(address=node.address.lower(), tokens=1)),
        (me, SendRawTransaction(raw=signed(node, to))),
    ]
    for requester, request in allowed:
        assert refusal(requester, request, CONTRACTS) is None, (requester, request)
    refused = [
        (me, ReserveRequest(task_id="t", fee=1), "forbidden", "only on rpc.chain.gateway"),
        ("gateway", ChainInfoRequest(address=node.address), "forbidden", "come from nodes"),
        ("n1", ChainInfoRequest(address=node.address), "forbidden", "not a node id"),
        (me.upper(), ChainInfoRequest(address=node.address), "forbidden", "not a node id"),
        (me, ChainInfoRequest(address=other.address), "forbidden", f"node {me} may ask only for its own"),
        (me, FaucetRequest(address=other.address, tokens=1), "forbidden", "its own address"),
        (me, ChainInfoRequest(address="0x12"), "bad_request", "'0x12'"),
        (me, SendRawTransaction(raw=signed(other, to)), "forbidden", f"signed by {you}, not by node {me}"),
        (me, SendRawTransaction(raw=signed(node, "0x" + "44" * 20)), "forbidden", "not to one of the network's"),
        (me, SendRawTransaction(raw="0xdeadbeef"), "bad_request", "not a signed transaction"),
        (me, SendRawTransaction(raw="zz"), "bad_request", "not hex"),
    ]
    for requester, request, error, words in refused:
        reply = refusal(requester, request, CONTRACTS)
        assert reply is not None, (requester, request)
        assert (reply.ok, reply.error) == (False, error), (requester, request, reply)
        assert words in reply.message, reply.message


def test_a_token_bucket_allows_a_burst_then_its_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(burst=3, per_s=2.0, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b")  # another requester has its own bucket
    now[0] += 0.5  # one token back
    assert [buckets.take("a") for _ in range(2)] == [True, False]
    now[0] += 100
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]  # never more than the burst


async def test_control_plane_calls_go_before_waiting_relay_calls() -> None:
    call = ChainThread()
    gate, order = threading.Event(), []
    running = asyncio.ensure_future(call.relay(lambda: gate.wait(5)))
    await asyncio.sleep(0.05)
    relays = [asyncio.ensure_future(call.relay(lambda i=i: order.append(f"relay {i}"))) for i in range(3)]
    await asyncio.sleep(0.05)
    control = asyncio.ensure_future(call(lambda: order.append("settle")))
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(running, *relays, control)
    assert order == ["settle", "relay 0", "relay 1", "relay 2"]
    with pytest.raises(ZeroDivisionError):  # a call's exception reaches its caller
        await call(lambda: 1 / 0)
    call.close()
    with pytest.raises(RuntimeError, match="closed"):
        await call(lambda: 1)


# ---------------------------------------------------------------- the relay on the embedded chain


async def ask(nc: Any, requester: str, request: Any) -> ChainReply:
    msg = await nc.request(subjects.chain_rpc_subject(requester), encode(request), timeout=30)
    return chain_reply_decoder.decode(msg.data)


async def relay_up(nc: Any, indexer: asyncio.Task[None], timeout: float = 30.0) -> None:
    """Waits until the indexer (deploying or connecting first) answers on the relay."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await nc.request(subjects.RESERVE_SUBJECT, encode(ReserveRequest(task_id="warm-up", fee=1)), timeout=1)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline or indexer.done():
                raise
            await asyncio.sleep(0.1)


def counted(ctx: ServiceContext, kind: str, outcome: str) -> float:
    labels = {"kind": kind, "outcome": outcome}
    return ctx.metrics.registry.get_sample_value("stipple_chain_indexer_relay_requests_total", labels) or 0.0


@pytest.fixture
async def indexer(fresh_nats_url: str) -> AsyncIterator[ServiceContext]:
    settings = IndexerSettings(nats_url=fresh_nats_url, confirmations=0, poll_s=0.1, relay_burst=6, relay_per_s=0.01)
    stop = asyncio.Event()
    async with open_service("chain-indexer", settings, stop=stop) as ctx:
        task = asyncio.create_task(serve(ctx, settings))
        await relay_up(ctx.nc, task)
        yield ctx
        stop.set()
        await asyncio.wait_for(task, 20)


@pytest.mark.integration
async def test_a_node_is_answered_only_about_itself(indexer: ServiceContext) -> None:
    nc, node, other = indexer.nc, Account.create(), Account.create()
    me = node_id_of(node.address)
    funded = await ask(nc, me, FaucetRequest(address=node.address, tokens=200 * TOKEN))
    assert funded.ok, funded
    assert (funded.tokens, funded.owner) == (200 * TOKEN, "")

    stolen = await ask(nc, me, FaucetRequest(address=other.address, tokens=1))
    assert (stolen.ok, stolen.error) == (False, "forbidden")
    spied = await ask(nc, me, ChainInfoRequest(address=other.address))
    assert (spied.ok, spied.error, spied.chain_id) == (False, "forbidden", 0)
    reserved = await ask(nc, me, ReserveRequest(task_id="mine", fee=1))
    assert (reserved.ok, reserved.error) == (False, "forbidden")
    foreign = await ask(nc, me, SendRawTransaction(raw=signed(node, other.address, chain_id=funded.chain_id)))
    assert (foreign.ok, foreign.error) == (False, "forbidden")
    assert "not to one of the network's contracts" in foreign.message
    by_another = await ask(nc, me, SendRawTransaction(raw=signed(other, funded.token, chain_id=funded.chain_id)))
    assert (by_another.ok, by_another.error) == (False, "forbidden")
    assert "signed by" in by_another.message

    gateway = await nc.request(subjects.RESERVE_SUBJECT, encode(ReserveRequest(task_id="paid", fee=5)), timeout=10)
    assert chain_reply_decoder.decode(gateway.data).ok  # the gateway's own subject
    assert counted(indexer, "faucet", "forbidden") == 1
    assert counted(indexer, "info", "forbidden") == 1
    assert counted(indexer, "reserve", "forbidden") == 1
    assert counted(indexer, "send", "forbidden") == 2
    assert counted(indexer, "faucet", "ok") == 1
    assert counted(indexer, "reserve", "ok") >= 1


@pytest.mark.integration
async def test_the_deployment_record_names_the_minimum_stake(indexer: ServiceContext) -> None:
    kv = await indexer.js.key_value(subjects.CHAIN_BUCKET)
    record = json.loads((await kv.get("deployment")).value or b"{}")
    assert record["min_stake"] == IndexerSettings().min_stake  # what the gatekeeper admits nodes by
    assert {"chain_id", "token", "staking", "payment"} <= set(record)


@pytest.mark.integration
async def test_a_node_over_its_rate_is_refused_at_once(indexer: ServiceContext) -> None:
    nc, node, other = indexer.nc, Account.create(), Account.create()
    me = node_id_of(node.address)
    replies = [await ask(nc, me, ChainInfoRequest(address=node.address)) for _ in range(6)]
    assert all(r.ok for r in replies)
    started = time.monotonic()
    limited = await ask(nc, me, ChainInfoRequest(address=node.address))
    assert (limited.ok, limited.error) == (False, "rate_limited")
    assert time.monotonic() - started < 1.0
    assert "at most 6 at once" in limited.message
    assert (await ask(nc, node_id_of(other.address), ChainInfoRequest(address=other.address))).ok  # its own bucket
    for i in range(10):  # the gateway is not limited
        reply = await nc.request(subjects.RESERVE_SUBJECT, encode(ReserveRequest(task_id=f"r{i}", fee=1)), timeout=10)
        assert chain_reply_decoder.decode(reply.data).ok
    assert counted(indexer, "info", "rate_limited") == 1
    assert counted(indexer, "reserve", "rate_limited") == 0


# ---------------------------------------------------------------- a transaction never mined (anvil)


@pytest.mark.integration
async def test_a_transaction_never_mined_does_not_hold_up_settlement(fresh_nats_url: str, anvil: ch.Anvil) -> None:
    # the indexer shares the test's chain thread: a control-plane call's wait is measured on it
    overrides = {"relay_receipt_wait_s": 6.0, "relay_in_flight_per_node": 1}
    net = IndexedChain(fresh_nats_url, anvil.url, share_chain=True, overrides=overrides)
    await net.setup()
    node = Account.create()
    await net.call(lambda: net.w3.eth.send_transaction({"from": net.admin, "to": node.address, "value": 10**18}))
    ctx = await net.start()
    call, chain, nodes = net.call, net.chain, list(net.nodes.values())
    try:
        await relay_up(ctx.nc, net.task)
        me = node_id_of(node.address)
        info = await ask(ctx.nc, me, ChainInfoRequest(address=node.address))
        assert info.ok, info
        token = Web3().eth.contract(address=Web3.to_checksum_address(info.token), abi=chain.token.abi)
        tx = {
            "to": token.address,
            "data": token.encode_abi("approve", args=[info.staking, 1]),
            "value": 0,
            "gas": 100_000,
            "gasPrice": info.gas_price,
            "nonce": info.nonce + 5,  # a gap: anvil keeps it in its pool, never mined
            "chainId": info.chain_id,
        }
        raw = "0x" + node.sign_transaction(tx).raw_transaction.hex()
        sent_at = time.monotonic()
        stuck = asyncio.create_task(ask(ctx.nc, me, SendRawTransaction(raw=raw)))
        await asyncio.sleep(0.5)
        assert not stuck.done()

        slowest = 0.0
        for _ in range(10):  # the settler's and the follower's calls meanwhile
            started = time.monotonic()
            await call(chain.minimum_stake)
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.5, f"a control-plane call waited {slowest:.2f} s behind the node's request"
        busy = await ask(ctx.nc, me, ChainInfoRequest(address=node.address))  # its one request in flight
        assert (busy.ok, busy.error) == (False, "rate_limited")

        task_id = uuid.uuid4().hex
        submitted = TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time(), fee=300)
        await bus.publish(ctx.js, subjects.task_subject(task_id, "submitted"), submitted, msg_id="s")
        outcome = TaskSucceeded(
            task_id=task_id,
            reason="unanimous",
            images=[],
            verdicts={node_id_of(a): "agree" for a in nodes},
            qos={},
        )
        await bus.publish(ctx.js, subjects.task_subject(task_id, "succeeded"), outcome, msg_id="o")
        deadline = time.monotonic() + 5
        while (await call(lambda: chain.task(task_id))).state != ch.TaskState.SETTLED:
            assert time.monotonic() < deadline, "the task was not settled while the node's request waited"
            await asyncio.sleep(0.05)
        assert not stuck.done()  # settled while the node's transaction still waits

        reply = await stuck
        waited = time.monotonic() - sent_at
        assert (reply.ok, reply.error) == (False, "pending"), reply
        assert reply.tx_hash.startswith("0x")
        assert len(reply.tx_hash) == 66
        assert 6.0 <= waited < 12.0
        assert counted(ctx, "send", "pending") == 1
    finally:
        await net.close()
