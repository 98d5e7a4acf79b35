"""The chain, for nodes (and the gateway's reservations): ``rpc.chain.<id>`` requests answered
from the indexer's connection. A node asks what it needs to build its own transactions
(chain id, contracts, its nonce, gas price, balances, stake) and hands in transactions it
signed itself; the indexer sends them and answers with the receipt's outcome. It never
signs for a node. On a development chain (the embedded one) a node may also ask the faucet
for tokens to stake and ether for gas; elsewhere the faucet answers `faucet_unavailable`.

Who asks is the subject's last token, which NATS lets only that node publish on (never a
field of the request):

- ``rpc.chain.gateway`` (`subjects.RESERVE_SUBJECT`): fee reservations, and nothing else.
- ``rpc.chain.<node_id>``: `info` and `faucet` for the node's own address only, and `send`
  only of a transaction that node signed (the sender recovered from the signature) to one
  of our contracts (token, staking, payment). Anything else is ``forbidden``.

Bounded: each node has a token bucket (`RelayLimits.burst` requests at once, then
`per_s` a second) and at most `in_flight_per_node` requests being answered, all nodes
together at most `in_flight`; over it a request gets ``rate_limited`` at once. The
gateway's reservations are not limited (only the gateway can publish on its subject).

A node never holds the chain thread for long: its transaction goes out in one short call,
then its receipt is read with short calls `receipt_poll_s` apart, up to `receipt_wait_s`,
after which the answer is ``pending`` with the transaction's hash. Its calls go on the
chain thread's relay queue, which waits behind the settler's and the follower's calls.
Every request is counted in ``stipple_chain_indexer_relay_requests_total{kind, outcome}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import rlp
import structlog
from eth_account import Account
from eth_account.typed_transactions import TypedTransaction
from eth_tester.exceptions import ValidationError as TesterValidationError
from eth_utils import is_address, to_checksum_address
from hexbytes import HexBytes
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rlp.exceptions import RLPException
from web3.exceptions import TransactionNotFound, Web3Exception

from stipple_common import chain as ch
from stipple_common import subjects
from stipple_common.errors import StippleError
from stipple_common.identity import is_node_id, node_id_of
from stipple_common.messages import (
    ChainInfoRequest,
    ChainReply,
    FaucetRequest,
    ReserveRequest,
    SendRawTransaction,
    chain_request_decoder,
    encode,
)

if TYPE_CHECKING:
    from .metrics import RelayMetrics

log = structlog.get_logger("stipple.chain.relay")

FAUCET_ETHER = 10**18  # wei a node gets for gas
GATEWAY = subjects.RESERVE_SUBJECT.rsplit(".", 1)[1]  # the requester token of the gateway's subject
KINDS: dict[type, str] = {
    ChainInfoRequest: "info",
    SendRawTransaction: "send",
    FaucetRequest: "faucet",
    ReserveRequest: "reserve",
}
MAX_TRACKED = 10_000  # requesters whose buckets are kept before the full ones are dropped


@dataclass(frozen=True)
class RelayLimits:
    """How much of the relay one node may use (IndexerSettings' relay_* settings)."""

    burst: int = 10  # requests a node may make at once (a node's start: info, faucet, approve, stake, info)
    per_s: float = 1.0  # then this many a second
    in_flight: int = 64  # requests being answered at once, all nodes together
    in_flight_per_node: int = 2
    receipt_wait_s: float = 20.0  # then `pending`; below the node agent's 30 s request timeout
    receipt_poll_s: float = 0.25


class TokenBuckets:
    """A token bucket per requester: `burst` tokens, refilled at `per_s` a second."""

    def __init__(self, burst: int, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_s = per_s
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # requester -> (tokens, when counted)

    def take(self, who: str) -> bool:
        """Takes a token of `who`'s bucket; False when it has none left."""
        now = self.clock()
        tokens, at = self._buckets.get(who, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        allowed = tokens >= 1.0
        self._buckets[who] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_TRACKED:
            self._forget_full(now)
        return allowed

    def _forget_full(self, now: float) -> None:
        """Drops the buckets that have refilled: a new bucket of the same requester is the same."""
        for who, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.per_s >= self.burst:
                del self._buckets[who]


def transaction_parties(raw: bytes) -> tuple[str, str]:
    """(sender, to) of a signed transaction, both in node-id form (lower case); `to` is ""
    for a contract creation. Raises ValueError when `raw` is not a signed transaction."""
    try:
        sender = Account.recover_transaction(raw)
        if raw and raw[0] <= 0x7F:  # typed (EIP-2718): access list, dynamic fee, blob
            to = TypedTransaction.from_bytes(HexBytes(raw)).as_dict().get("to") or b""
        else:  # legacy: rlp [nonce, gasPrice, gas, to, value, data, v, r, s]
            to = rlp.decode(raw)[3]
    except ValueError:
        raise
    except Exception as exc:  # rlp and eth_account raise several types for bad bytes; all mean "not a tx"
        raise ValueError(f"not a signed transaction ({type(exc).__name__}: {exc})") from None
    to_text = to if isinstance(to, str) else "0x" + bytes(to).hex()
    return node_id_of(sender), (to_text.lower() if len(to_text) == 42 else "")


def refusal(requester: str, request: Any, contracts: set[str]) -> ChainReply | None:
    """Why `requester` (the subject's last token) may not make `request`, or None when it may.
    `contracts`: the addresses a node may send transactions to, lower case."""
    if requester == GATEWAY:
        if isinstance(request, ReserveRequest):
            return None
        return _forbidden(f"{KINDS[type(request)]} requests come from nodes, not on {subjects.RESERVE_SUBJECT}")
    if not is_node_id(requester):
        return _forbidden(f"requester {requester!r} is not a node id (a lower-case address)")
    if isinstance(request, ReserveRequest):
        return _forbidden(f"fee reservations come only on {subjects.RESERVE_SUBJECT}")
    if isinstance(request, ChainInfoRequest | FaucetRequest):
        if not is_address(request.address):
            return _bad(f"address: not an Ethereum address (got {request.address!r})")
        if request.address.lower() != requester:
            return _forbidden(f"node {requester} may ask only for its own address (asked for {request.address})")
        return None
    assert isinstance(request, SendRawTransaction)
    try:
        sender, to = transaction_parties(_raw_bytes(request.raw))
    except ValueError as exc:
        return _bad(f"transaction refused: {exc}")
    if sender != requester:
        return _forbidden(f"the transaction is signed by {sender}, not by node {requester}")
    if to not in contracts:
        return _forbidden(f"the transaction goes to {to or 'a new contract'}, not to one of the network's contracts")
    return None


def _raw_bytes(raw: str) -> bytes:
    try:
        return bytes.fromhex(raw.removeprefix("0x"))
    except ValueError:
        raise ValueError(f"raw: not hex (got {raw[:20]!r})") from None


def _forbidden(message: str) -> ChainReply:
    return ChainReply(ok=False, error="forbidden", message=message)


def _bad(message: str) -> ChainReply:
    return ChainReply(ok=False, error="bad_request", message=message)


@dataclass
class Relay:
    chain: ch.StippleChain
    call: Callable[[Callable[[], Any]], Awaitable[Any]]  # the chain thread's relay queue (ChainThread.relay)
    sender: ch.Sender
    faucet: bool  # development chains only
    max_faucet_tokens: int
    metrics: RelayMetrics
    reserve: Callable[[str, int], Awaitable[tuple[bool, int]]] | None = None  # the settler's ledger
    limits: RelayLimits = field(default_factory=RelayLimits)

    def __post_init__(self) -> None:
        d = self.chain.deployment
        self.contracts = {str(a).lower() for a in (d.token, d.staking, d.payment)}
        self.buckets = TokenBuckets(self.limits.burst, self.limits.per_s)
        self.in_flight: dict[str, int] = {}  # node id -> its requests being answered
        self.in_flight_total = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, nc: NATS) -> Any:
        return await nc.subscribe(subjects.chain_rpc_subject("*"), queue="chain-indexer", cb=self._on_request)

    async def close(self) -> None:
        """Stops the requests still being answered (their askers get no reply and ask again)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        """Checks a request at once and answers it in a task of its own, so that one slow
        request never holds the subscription (nats-py runs its callbacks one at a time)."""
        requester = msg.subject.rsplit(".", 1)[-1]
        try:
            request: Any = chain_request_decoder.decode(msg.data)
            kind = KINDS[type(request)]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            request, kind = exc, "unknown"
        if requester != GATEWAY and is_node_id(requester) and not self.buckets.take(requester):
            await self._reply(msg, kind, requester, _limited(self.limits))
            return
        if isinstance(request, Exception):
            await self._reply(msg, kind, requester, _bad(str(request)))
            return
        refused = refusal(requester, request, self.contracts)
        if refused is not None:
            await self._reply(msg, kind, requester, refused)
            return
        if requester != GATEWAY:
            mine = self.in_flight.get(requester, 0)
            if mine >= self.limits.in_flight_per_node or self.in_flight_total >= self.limits.in_flight:
                reply = ChainReply(ok=False, error="rate_limited", message="too many requests in flight: ask later")
                await self._reply(msg, kind, requester, reply)
                return
            self.in_flight[requester] = mine + 1
            self.in_flight_total += 1
        task = asyncio.create_task(self._answer(msg, kind, requester, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg, kind: str, requester: str, request: Any) -> None:
        try:
            reply = await self.answer(request)
        except ch.ContractReverted as exc:
            reply = ChainReply(ok=False, error="reverted", message=exc.message)
        except StippleError as exc:
            reply = ChainReply(ok=False, error=exc.code, message=exc.message)
        except Exception as exc:  # the one boundary: a request must get an answer, and the cause is logged once
            log.exception("chain_request_failed", subject=msg.subject, kind=kind)
            reply = ChainReply(ok=False, error="internal", message=f"{type(exc).__name__}: {exc}")
        finally:
            if requester != GATEWAY:
                self.in_flight_total -= 1
                left = self.in_flight.get(requester, 1) - 1
                if left > 0:
                    self.in_flight[requester] = left
                else:
                    self.in_flight.pop(requester, None)
        await self._reply(msg, kind, requester, reply)

    async def _reply(self, msg: Msg, kind: str, requester: str, reply: ChainReply) -> None:
        outcome = reply.error or "ok"
        self.metrics.requests.labels(kind, outcome).inc()
        if outcome == "forbidden":
            log.warning("chain_request_refused", requester=requester, kind=kind, error=reply.message)
        if msg.reply:
            try:
                await msg.respond(encode(reply))
            except nats.errors.Error as exc:  # the connection is closing: the asker will ask again
                log.info("chain_reply_lost", requester=requester, kind=kind, error=str(exc))

    async def answer(self, request: Any) -> ChainReply:
        """Answers a request that `refusal` allowed (the requester's checks are done)."""
        if isinstance(request, SendRawTransaction):
            return await self._send(_raw_bytes(request.raw))
        if isinstance(request, ReserveRequest):
            if self.reserve is None or request.fee <= 0:
                return _bad(f"fee: must be > 0 (got {request.fee})")
            fits, left = await self.reserve(request.task_id, request.fee)
            if fits:
                return ChainReply(ok=True, deposit=left)
            return ChainReply(ok=False, error="insufficient_deposit", deposit=left, message=f"the deposit holds {left}")
        address = _address(request.address)
        if isinstance(request, FaucetRequest):
            if not self.faucet:
                return ChainReply(ok=False, error="faucet_unavailable", message="this chain has no faucet")
            if not 0 < request.tokens <= self.max_faucet_tokens:
                return _bad(f"tokens: must be from 1 to {self.max_faucet_tokens} (got {request.tokens})")
            await self.call(lambda: self._fund(address, request.tokens))
            log.info("faucet_paid", address=address, tokens=request.tokens)
        assert isinstance(request, ChainInfoRequest | FaucetRequest)
        return await self.call(lambda: self._info(address))

    def _info(self, address: str) -> ChainReply:
        w3, c = self.chain.w3, self.chain
        owner = c.owner_of(address)
        return ChainReply(
            ok=True,
            chain_id=int(w3.eth.chain_id),
            token=c.deployment.token,
            staking=c.deployment.staking,
            payment=c.deployment.payment,
            nonce=int(w3.eth.get_transaction_count(address, "pending")),
            gas_price=int(w3.eth.gas_price),
            ether=int(w3.eth.get_balance(address)),
            tokens=c.token_balance(address),
            deposit=c.balance_of(address),
            stake=c.stake_of(address),
            leaving=c.unstake_available_at(address) != 0,
            min_stake=c.minimum_stake(),
            owner="" if owner is None or owner == address else node_id_of(owner),
        )

    async def _send(self, raw: bytes) -> ChainReply:
        """One short call sends the transaction; then short calls read its receipt, with the
        chain thread free between them, until `receipt_wait_s` is over (then `pending`)."""
        sent = await self.call(lambda: self._submit(raw))
        if isinstance(sent, ChainReply):
            return sent
        shown = "0x" + sent.hex()
        deadline = time.monotonic() + self.limits.receipt_wait_s
        while True:
            receipt = await self.call(lambda: self._receipt(sent))
            if receipt is not None:
                ok = receipt["status"] == 1
                return ChainReply(
                    ok=ok,
                    error="" if ok else "reverted",
                    message="" if ok else "the transaction was mined and reverted",
                    tx_hash=shown,
                )
            if time.monotonic() >= deadline:
                return ChainReply(
                    ok=False,
                    error="pending",
                    message=f"sent, not mined within {self.limits.receipt_wait_s:g} s (a nonce too high?); "
                    "its receipt may still come",
                    tx_hash=shown,
                )
            await asyncio.sleep(self.limits.receipt_poll_s)

    def _submit(self, raw: bytes) -> bytes | ChainReply:
        try:
            return bytes(self.chain.w3.eth.send_raw_transaction(raw))
        except (ValueError, Web3Exception, TesterValidationError, RLPException) as exc:  # malformed, bad nonce, no gas
            return _bad(f"transaction refused: {exc}")
        except ch.REVERT_ERRORS as exc:  # the EVM ran it and it reverted (the embedded chain mines at once)
            return ChainReply(ok=False, error="reverted", message=f"transaction reverted: {exc}")
        except OSError as exc:  # requests' connection errors and timeouts
            raise ch.ChainUnavailable(f"sending a node's transaction: the chain node did not answer: {exc}") from exc

    def _receipt(self, tx_hash: bytes) -> Any:
        try:
            return self.chain.w3.eth.get_transaction_receipt(tx_hash)
        except TransactionNotFound:
            return None

    def _fund(self, address: str, tokens: int) -> None:
        """The embedded chain only, which mines each transaction at once: the waits are short."""
        w3 = self.chain.w3
        source = self.sender if isinstance(self.sender, str) else self.sender.address
        if w3.eth.get_balance(address) < FAUCET_ETHER // 2:
            w3.eth.wait_for_transaction_receipt(
                w3.eth.send_transaction({"from": source, "to": address, "value": FAUCET_ETHER})
            )
        self.chain.mint(self.sender, address, tokens)


def _limited(limits: RelayLimits) -> ChainReply:
    message = f"too many requests: at most {limits.burst} at once, then {limits.per_s:g} a second; ask later"
    return ChainReply(ok=False, error="rate_limited", message=message)


def _address(value: str) -> str:
    if not is_address(value):
        raise StippleError(f"address: not an Ethereum address (got {value!r})", code="bad_request")
    return to_checksum_address(value)
