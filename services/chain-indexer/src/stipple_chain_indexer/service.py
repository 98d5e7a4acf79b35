"""chain-indexer wiring: the chain, followed into the CHAIN stream, and the settler.

- The chain: any JSON-RPC endpoint, or (`STIPPLE_CHAIN_URL=eth-tester://`, the embedded
  default) an EVM inside this process with the contracts deployed at start, an empty
  block mined every `embedded_block_s` so that blocks gain confirmations as on a real
  chain, and the custodial account funded. The deployment (addresses, chain id) is put
  in the `chain` KV bucket for the other services.
- follower.py: contract events from confirmed blocks to ``chain.<contract>.<event>``,
  reorgs survived; the `stakes` KV bucket (node id -> `IndexedStake`: stake, leaving,
  owner) is kept from the staking events as they pass.
- settler.py: escrow, settle, refund and slash transactions from the task events; the
  fees the gateway reserved before escrow, in the `reservations` KV bucket (reservations.py).
- relay.py: nodes reach the chain through the indexer (``rpc.chain.<node_id>``): what
  they need to sign their own transactions, the transactions they signed, and on the
  embedded chain a faucet; each node only for itself, and rate-limited.
- At start it refuses to run when the slash, the largest fee and the validation rate
  would let cheating pay (stipple_common.economics), naming the number to change.

web3.py is synchronous, and the in-process EVM is not thread-safe: every chain call runs
on one worker thread (which is also what keeps the nonces in order). The settler's and
the follower's calls go first; the relay's wait behind them (`ChainThread`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import structlog
from eth_account import Account
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from stipple_common import bus, records, subjects
from stipple_common import chain as ch
from stipple_common.economics import Economics
from stipple_common.economics import check as check_economics
from stipple_common.identity import node_id_of
from stipple_common.logs import setup_logging
from stipple_common.messages import ChainLog
from stipple_common.records import IndexedStake
from stipple_common.service import ServiceContext, open_service, serve_as_leader
from stipple_common.settings import CommonSettings, InvalidSettings

from .follower import ChainFollower
from .metrics import FollowerMetrics, RelayMetrics, SettlerMetrics
from .relay import Relay, RelayLimits
from .reservations import ReservationBook
from .settler import RESERVATION_TTL_S, Settler

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
    # the embedded chain's deployment
    min_stake: int = 100 * TOKEN
    unstake_cooldown_s: int = 7 * 24 * 3600
    embedded_deposit: int = 1_000_000 * TOKEN  # what the custodial account deposits at start
    faucet_max_tokens: int = 10_000 * TOKEN  # the most one faucet request gives (embedded chain only)
    # the relay (rpc.chain.<node_id>): per node, a token bucket and a cap on requests being answered
    relay_burst: Annotated[int, msgspec.Meta(ge=1)] = 10  # requests a node may make at once
    relay_per_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0  # then this many a second
    relay_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 64  # requests answered at once, all nodes
    relay_in_flight_per_node: Annotated[int, msgspec.Meta(ge=1)] = 2
    relay_receipt_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 20.0  # then `pending` (nodes ask with 30 s)
    relay_receipt_poll_s: Annotated[float, msgspec.Meta(gt=0)] = 0.25

    def relay_limits(self) -> RelayLimits:
        return RelayLimits(
            burst=self.relay_burst,
            per_s=self.relay_per_s,
            in_flight=self.relay_in_flight,
            in_flight_per_node=self.relay_in_flight_per_node,
            receipt_wait_s=self.relay_receipt_wait_s,
            receipt_poll_s=self.relay_receipt_poll_s,
        )


class ChainThread:
    """Runs blocking web3 calls on one thread, from two queues: the control plane's
    (`await call(fn)`: the settler, the follower, block mining) always before the relay's
    (`await call.relay(fn)`: nodes' requests), each in the order asked. A settlement waits
    at most for the one relay call running, never behind a queue of nodes' requests; relay
    calls must therefore be short (no waiting for receipts inside them).

    An OSError (a JSON-RPC node that refuses or times out: web3 lets requests' errors through
    its views, where transactions raise `ChainUnavailable`) comes back as `ChainUnavailable`,
    which the settler and the follower wait out; before, it ended the settler's loop."""

    def __init__(self) -> None:
        self._queues: tuple[deque[tuple[Callable[[], Any], Future[Any]]], ...] = (deque(), deque())
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="chain", daemon=True)
        self._thread.start()

    async def __call__(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the chain thread before any waiting relay call."""
        return await self._submit(0, fn)

    async def relay(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the chain thread once no control-plane call waits."""
        return await self._submit(1, fn)

    async def _submit(self, queue: int, fn: Callable[[], T]) -> T:
        future: Future[T] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the chain thread is closed")
            self._queues[queue].append((fn, future))
            self._ready.notify()
        return await asyncio.wrap_future(future)

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._closed and not any(self._queues):
                    self._ready.wait()
                if self._closed:
                    return
                fn, future = (self._queues[0] or self._queues[1]).popleft()
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up waiting
            try:
                result = fn()
            except OSError as exc:  # web3's views raise requests' errors (OSErrors) when the node is away
                future.set_exception(ch.ChainUnavailable(f"the chain node did not answer: {exc}"))
            except BaseException as exc:  # handed to the caller, as an executor does
                future.set_exception(exc)
            else:
                future.set_result(result)

    def close(self) -> None:
        """Cancels the calls still waiting and waits for the running one."""
        with self._ready:
            self._closed = True
            waiting = [future for queue in self._queues for _, future in queue]
            for queue in self._queues:
                queue.clear()
            self._ready.notify()
        for future in waiting:
            future.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join()


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
        await serve_as_leader(ctx, "chain-indexer", settings, serve)  # STIPPLE_LEASE_S > 0: active/standby


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
        kv = await bus.key_value(
            ctx.js, KeyValueConfig(bucket=subjects.CHAIN_BUCKET, history=1, replicas=settings.stream_replicas)
        )
        stakes = await bus.key_value(
            ctx.js, KeyValueConfig(bucket=subjects.STAKES_BUCKET, history=1, replicas=settings.stream_replicas)
        )
        custodial = settings.custodial_account or address
        min_stake = await call(chain.minimum_stake)
        record = records.ChainDeployment(
            chain_id=chain_id,
            url=settings.chain_url,
            account=address,
            custodial=custodial,
            min_stake=min_stake,  # the gatekeeper admits nodes by it
            **deployment.to_dict(),
        )
        await records.put(kv, records.DEPLOYMENT_KEY, record)
        follower = ChainFollower(
            chain=chain,
            call=call,
            js=ctx.js,
            kv=kv,
            confirmations=settings.confirmations,
            metrics=FollowerMetrics(ctx.metrics.registry),
            on_log=StakeProjection(stakes).apply,
        )
        await follower.load()
        reservations = await bus.key_value(
            ctx.js, KeyValueConfig(bucket=subjects.RESERVATIONS_BUCKET, history=1, replicas=settings.stream_replicas)
        )
        book = ReservationBook(reservations, key=custodial.lower(), ttl_s=RESERVATION_TTL_S)
        await book.load()  # what was reserved before a restart still counts against the deposit
        log.info("reservations_loaded", account=custodial, tasks=len(book.reserved), fees=book.total())
        settler = Settler(
            chain=chain,
            call=call,
            js=ctx.js,
            sender=sender,
            app=custodial,
            metrics=SettlerMetrics(ctx.metrics.registry),
            book=book,
            batch_max=settings.settle_batch,
            slash_amount=settings.slash_amount,
        )
        relay = Relay(
            chain=chain,
            call=call.relay,
            sender=sender,
            faucet=ch.is_embedded(w3),
            max_faucet_tokens=settings.faucet_max_tokens,
            metrics=RelayMetrics(ctx.metrics.registry),
            reserve=settler.reserve,
            limits=settings.relay_limits(),
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
            await ctx.consume(subjects.TASKS_STREAM, subjects.settler_consumer(), settler.handle)
        finally:
            ctx.stop.set()
            await asyncio.gather(*background)
            await relay_sub.unsubscribe()
            await relay.close()
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


class StakeProjection:
    """The `stakes` bucket: each node's `IndexedStake` under its node id (the lower-case
    address), as the staking events leave it (they carry the new totals and the owner, so
    the last one seen is the state). `owner` is the stake's owner in node-id form when an
    operator staked for the node, and "" when the node staked for itself (it is its own
    operator) or nobody holds a stake for it any more (withdrawn)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def apply(self, event: ChainLog) -> None:
        if event.contract != "NodeStaking" or event.event not in ("Staked", "UnstakeRequested", "Withdrawn", "Slashed"):
            return
        node = node_id_of(str(event.args["node"]))
        current = await self.get(node) or IndexedStake()
        block = event.block_number
        if event.event == "Staked":
            owner = _owner(node, event)
            new = IndexedStake(stake=int(str(event.args["total"])), leaving=False, owner=owner, block=block)
        elif event.event == "UnstakeRequested":
            new = IndexedStake(stake=current.stake, leaving=True, owner=_owner(node, event), block=block)
        elif event.event == "Withdrawn":
            new = IndexedStake(stake=0, leaving=False, owner="", block=block)
        else:
            remaining = int(str(event.args["remaining"]))
            new = IndexedStake(stake=remaining, leaving=current.leaving, owner=current.owner, block=block)
        await records.put(self.kv, node, new)

    async def get(self, node: str) -> IndexedStake | None:
        """The entry of `node` (a node id or an address in any case); None when there is none."""
        return await records.get(self.kv, node_id_of(node), records.indexed_stake_decoder)


def _owner(node: str, event: ChainLog) -> str:
    """The event's `owner` in node-id form, "" when the node owns its own stake."""
    owner = node_id_of(str(event.args["owner"]))
    return "" if owner == node else owner
