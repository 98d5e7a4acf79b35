"""chain-indexer wiring: the chain, followed into the CHAIN stream, and the settler.

- The chain: any JSON-RPC endpoint, or (`STIPPLE_CHAIN_URL=eth-tester://`, the embedded
  default) an EVM inside this process with the contracts deployed at start, an empty
  block mined every `embedded_block_s` so that blocks gain confirmations as on a real
  chain, and the custodial account funded. The deployment (addresses, chain id) is put
  in the `chain` KV bucket for the other services.
- follower.py: contract events from confirmed blocks to ``chain.<contract>.<event>``,
  reorgs survived; the `stakes` KV bucket (node address -> indexed stake) is kept from
  the staking events as they pass.
- settler.py: escrow, settle, refund and slash transactions from the task events.
- relay.py: nodes reach the chain through the indexer (``rpc.chain.<node_id>``): what
  they need to sign their own transactions, the transactions they signed, and on the
  embedded chain a faucet.
- At start it refuses to run when the slash, the largest fee and the validation rate
  would let cheating pay (stipple_common.economics), naming the number to change.

web3.py is synchronous, and the in-process EVM is not thread-safe: every chain call runs
on one worker thread, in order (which is also what keeps the nonces in order).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog
from eth_account import Account
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from stipple_common import chain as ch
from stipple_common import subjects
from stipple_common.economics import Economics
from stipple_common.economics import check as check_economics
from stipple_common.logs import setup_logging
from stipple_common.messages import ChainLog
from stipple_common.nodes import NodeDirectory
from stipple_common.service import ServiceContext, open_service
from stipple_common.settings import CommonSettings, InvalidSettings

from .follower import ChainFollower
from .relay import Relay
from .settler import Settler, consumer_config

log = structlog.get_logger("stipple.chain")

T = TypeVar("T")
TOKEN = 10**18  # the token's decimals


class IndexerSettings(CommonSettings, frozen=True, kw_only=True):
    chain_url: str = ch.EMBEDDED_URL  # http(s)://... JSON-RPC, or the in-process EVM
    deployment: str = ""  # token=0x..,staking=0x..,payment=0x.. (empty with the embedded chain: deploy)
    account: str = ""  # an address the node keeps unlocked (anvil, a dev node) ...
    key_file: str = ""  # ... or the file of this indexer's private key (hex). Embedded: the chain's account 0
    custodial_account: str = ""  # whose deposit pays apps' fees (custodial mode); empty: this indexer's account
    confirmations: int = 2  # blocks on top of a block before its events are published
    poll_s: float = 0.5
    embedded_block_s: float = 1.0  # the in-process chain mines a block this often
    settle_batch: int = 50  # tasks per settle or refund transaction
    settle_wait_s: float = 1.0  # how long task events wait for a batch to fill
    slash_amount: int = 0  # tokens a wrong result costs (smallest unit); 0: the minimum stake
    node_ttl_s: float = 10.0
    # the embedded chain's deployment
    min_stake: int = 100 * TOKEN
    unstake_cooldown_s: int = 7 * 24 * 3600
    embedded_deposit: int = 1_000_000 * TOKEN  # what the custodial account deposits at start
    faucet_max_tokens: int = 10_000 * TOKEN  # the most one faucet request gives (embedded chain only)


class ChainThread:
    """Runs blocking web3 calls on one thread, in the order they are asked for."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chain")

    async def __call__(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def parse_deployment(spec: str) -> ch.Deployment:
    try:
        raw = dict(item.strip().split("=", 1) for item in spec.split(",") if item.strip())
        return ch.Deployment.from_dict(raw)
    except (ValueError, KeyError) as exc:
        raise InvalidSettings(
            f"STIPPLE_DEPLOYMENT={spec!r}: expected token=0x...,staking=0x...,payment=0x... ({exc})"
        ) from None


def sender_of(w3: Any, settings: IndexerSettings) -> ch.Sender:
    if settings.key_file:
        path = Path(settings.key_file).expanduser()
        try:
            return Account.from_key(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise InvalidSettings(f"STIPPLE_KEY_FILE={settings.key_file!r}: not a readable hex key ({exc})") from None
    if settings.account:
        return settings.account
    if ch.is_embedded(w3):
        return w3.eth.accounts[0]
    raise InvalidSettings("STIPPLE_ACCOUNT or STIPPLE_KEY_FILE: the chain-indexer needs an account on a real chain")


def embedded_setup(w3: Any, sender: str, settings: IndexerSettings) -> ch.Deployment:
    """Deploy the contracts on the in-process chain and fund the custodial account."""
    deployment = ch.deploy_all(
        w3,
        sender,
        min_stake=settings.min_stake,
        cooldown_s=settings.unstake_cooldown_s,
        treasury=w3.eth.accounts[1],
        validator=sender,
        gateway=sender,
        settler=sender,
    )
    chain = ch.StippleChain(w3, deployment)
    chain.mint(sender, sender, settings.embedded_deposit)
    chain.deposit(sender, settings.embedded_deposit)
    return deployment


async def run(settings: IndexerSettings) -> None:
    setup_logging("chain-indexer", level=settings.log_level, fmt=settings.log_format)
    async with open_service("chain-indexer", settings) as ctx:
        await serve(ctx, settings)


async def serve(
    ctx: ServiceContext, settings: IndexerSettings, *, w3: Any = None, call: ChainThread | None = None
) -> None:
    """Run until `ctx.stop`. Tests pass the `w3` of a chain they set up, and the `call`
    thread they use for it too (the in-process EVM must be used from one thread)."""
    own_thread = call is None
    call = call or ChainThread()
    try:
        if w3 is None:
            w3 = await call(lambda: ch.connect(settings.chain_url))
        sender = await call(lambda: sender_of(w3, settings))
        address = sender if isinstance(sender, str) else sender.address
        if settings.deployment:
            deployment = parse_deployment(settings.deployment)
        elif ch.is_embedded(w3):
            deployment = await call(lambda: embedded_setup(w3, address, settings))
        else:
            raise InvalidSettings("STIPPLE_DEPLOYMENT: the contracts' addresses are needed on a real chain")
        chain = ch.StippleChain(w3, deployment)
        slash = settings.slash_amount or await call(chain.minimum_stake)
        check_economics(
            Economics(
                max_fee=settings.max_fee,
                slash=slash,
                validation_rate=settings.validation_rate,
                undetected_rate=settings.undetected_rate,
            )
        )
        chain_id = await call(lambda: int(w3.eth.chain_id))
        kv = await ctx.js.create_key_value(
            KeyValueConfig(bucket=subjects.CHAIN_BUCKET, history=1, replicas=settings.stream_replicas)
        )
        stakes = await ctx.js.create_key_value(
            KeyValueConfig(bucket=subjects.STAKES_BUCKET, history=1, replicas=settings.stream_replicas)
        )
        custodial = settings.custodial_account or address
        info = {
            "chain_id": chain_id,
            "url": settings.chain_url,
            "account": address,
            "custodial": custodial,
            **deployment.to_dict(),
        }
        await kv.put("deployment", json.dumps(info).encode())
        directory = NodeDirectory(ttl_s=settings.node_ttl_s)
        nodes_sub = await directory.follow(ctx.js)
        follower = ChainFollower(
            chain=chain,
            call=call,
            js=ctx.js,
            kv=kv,
            confirmations=settings.confirmations,
            metrics=ctx.metrics,
            on_log=StakeProjection(stakes).apply,
        )
        await follower.load()
        settler = Settler(
            chain=chain,
            call=call,
            js=ctx.js,
            directory=directory,
            sender=sender,
            app=custodial,
            metrics=ctx.metrics,
            batch_max=settings.settle_batch,
            slash_amount=settings.slash_amount,
        )
        relay = Relay(
            chain=chain,
            call=call,
            sender=sender,
            faucet=ch.is_embedded(w3),
            max_faucet_tokens=settings.faucet_max_tokens,
            reserve=settler.reserve,
        )
        relay_sub = await relay.serve(ctx.nc)
        log.info("chain_indexer_started", chain_id=chain_id, url=settings.chain_url, **deployment.to_dict())
        background = [
            asyncio.create_task(follower.run(ctx.stop, settings.poll_s)),
            asyncio.create_task(settler.run(ctx.stop, settings.settle_wait_s)),
        ]
        if ch.is_embedded(w3):
            background.append(asyncio.create_task(mine_blocks(w3, call, ctx.stop, settings.embedded_block_s)))
        try:
            await ctx.consume(subjects.TASKS_STREAM, consumer_config(), settler.handle)
        finally:
            ctx.stop.set()
            await asyncio.gather(*background)
            await nodes_sub.unsubscribe()  # type: ignore[attr-defined]
            await relay_sub.unsubscribe()
    finally:
        if own_thread:
            call.close()


async def mine_blocks(w3: Any, call: ChainThread, stop: asyncio.Event, every_s: float) -> None:
    """The in-process chain mines only when a transaction comes; a real chain does not wait."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            await call(lambda: w3.provider.ethereum_tester.mine_blocks(1))


class Stake(msgspec.Struct):
    stake: int = 0  # tokens staked (still counted while leaving)
    leaving: bool = False  # asked to unstake: no longer active
    block: int = 0  # the block of the event that set it


_stake_decoder = msgspec.json.Decoder(Stake)


class StakeProjection:
    """The `stakes` bucket: each node's stake as the staking events leave it (the events
    carry the new totals, so the last one seen is the state)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def apply(self, event: ChainLog) -> None:
        if event.contract != "NodeStaking" or event.event not in ("Staked", "UnstakeRequested", "Withdrawn", "Slashed"):
            return
        node = str(event.args["node"])
        current = await self.get(node) or Stake()
        if event.event == "Staked":
            new = Stake(stake=int(str(event.args["total"])), leaving=False, block=event.block_number)
        elif event.event == "UnstakeRequested":
            new = Stake(stake=current.stake, leaving=True, block=event.block_number)
        elif event.event == "Withdrawn":
            new = Stake(stake=0, leaving=False, block=event.block_number)
        else:
            new = Stake(stake=int(str(event.args["remaining"])), leaving=current.leaving, block=event.block_number)
        await self.kv.put(node, msgspec.json.encode(new))

    async def get(self, node: str) -> Stake | None:
        try:
            entry = await self.kv.get(node)
        except KeyNotFoundError:
            return None
        return _stake_decoder.decode(entry.value or b"{}")
