"""A node stakes with its own key when it joins (issue 5), through the chain-indexer.

The node never holds a chain connection: it asks the indexer (``rpc.chain.<node_id>``,
relay.py there) for its nonce, the gas price and the contracts, signs `approve` and
`stake` itself, and hands the signed transactions over. On the embedded development
chain the faucet gives it tokens and gas money first. A node whose stake stays below
the network's minimum refuses to start, saying how much it has, how much is needed and
at which address.
"""

from __future__ import annotations

import asyncio
import time

import nats.errors
import structlog
from eth_account.signers.local import LocalAccount
from nats.aio.client import Client as NATS
from web3 import Web3

from stipple_common import chain as ch
from stipple_common import subjects
from stipple_common.messages import (
    ChainInfoRequest,
    ChainReply,
    ChainRequest,
    FaucetRequest,
    SendRawTransaction,
    chain_reply_decoder,
    encode,
)
from stipple_common.settings import InvalidSettings

log = structlog.get_logger("stipple.node.staking")

GAS = {"approve": 100_000, "stake": 250_000}


class StakeError(InvalidSettings):
    """The node cannot stake what it must: it does not start."""


async def ask(nc: NATS, node_id: str, request: ChainRequest, *, wait_s: float) -> ChainReply:
    """One request to the chain-indexer; waits up to `wait_s` for an indexer to answer
    (at start the indexer may still be deploying)."""
    deadline = time.monotonic() + wait_s
    delay = 0.2
    while True:
        try:
            msg = await nc.request(subjects.chain_rpc_subject(node_id), encode(request), timeout=30)
            return chain_reply_decoder.decode(msg.data)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise StakeError(
                    f"STIPPLE_STAKE: no chain-indexer answered on {subjects.chain_rpc_subject(node_id)} "
                    f"within {wait_s:g} s ({type(exc).__name__}); is the chain-indexer running?"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def ensure_stake(nc: NATS, node_id: str, account: LocalAccount, want: int, *, wait_s: float = 60.0) -> int:
    """Make the node's stake on chain at least `want` (0: the network's minimum); returns it."""
    address = account.address
    info = await ask(nc, node_id, ChainInfoRequest(address=address), wait_s=wait_s)
    _check(info, "reading the node's stake")
    want = want or info.min_stake
    if want < info.min_stake:
        raise StakeError(
            f"STIPPLE_STAKE={want} is below the network's minimum stake of {info.min_stake}: "
            f"set STIPPLE_STAKE to {info.min_stake} or more"
        )
    if info.leaving:
        raise StakeError(f"the node's address {address} has asked to unstake: withdraw, then stake again")
    if info.stake >= want:
        log.info("stake_found", address=address, stake=info.stake, minimum=info.min_stake)
        return info.stake
    missing = want - info.stake
    if info.tokens < missing or info.ether == 0:
        funded = await ask(
            nc, node_id, FaucetRequest(address=address, tokens=max(1, missing - info.tokens)), wait_s=wait_s
        )
        if not funded.ok and funded.error != "faucet_unavailable":
            _check(funded, "asking the faucet")
        if funded.ok:
            info = funded
        if info.tokens < missing or info.ether == 0:
            raise StakeError(
                f"STIPPLE_STAKE={want}: the node's address {address} holds {info.tokens} tokens and "
                f"{info.ether} wei; staking {missing} more needs that many tokens and ether for gas there"
            )
    artifacts = ch.load_artifacts()
    token = Web3().eth.contract(address=Web3.to_checksum_address(info.token), abi=artifacts["StippleToken"].abi)
    staking = Web3().eth.contract(address=Web3.to_checksum_address(info.staking), abi=artifacts["NodeStaking"].abi)
    calls = [
        ("approve", token.address, token.encode_abi("approve", args=[staking.address, missing])),
        ("stake", staking.address, staking.encode_abi("stake", args=[missing])),
    ]
    for offset, (name, to, data) in enumerate(calls):
        tx = {
            "to": to,
            "data": data,
            "value": 0,
            "gas": GAS[name],
            "gasPrice": info.gas_price,
            "nonce": info.nonce + offset,
            "chainId": info.chain_id,
        }
        signed = account.sign_transaction(tx)
        sent = await ask(nc, node_id, SendRawTransaction(raw="0x" + signed.raw_transaction.hex()), wait_s=wait_s)
        if sent.error != "pending":  # pending: sent, not mined yet (the relay stops waiting for it)
            _check(sent, f"sending {name}")
    deadline = time.monotonic() + wait_s
    while True:
        after = await ask(nc, node_id, ChainInfoRequest(address=address), wait_s=wait_s)
        _check(after, "reading the stake back")
        if after.stake >= max(want, after.min_stake) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if after.stake < after.min_stake:
        raise StakeError(f"the node staked, yet holds {after.stake} of the minimum {after.min_stake}")
    if after.owner and after.owner.lower() != address.lower():
        log.info("stake_owned_by_operator", address=address, owner=after.owner)
    log.info("staked", address=address, stake=after.stake, added=missing)
    return after.stake


def _check(reply: ChainReply, doing: str) -> None:
    if reply.ok:
        return
    if "NotStakeOwner" in reply.message:
        raise StakeError(
            f"staking: {doing} failed: the stake of this node's address is owned by another address (an operator "
            f"staked for it with stakeFor): the operator tops it up, or stake with another key ({reply.message})"
        )
    raise StakeError(f"staking: {doing} failed: {reply.error}: {reply.message}")
