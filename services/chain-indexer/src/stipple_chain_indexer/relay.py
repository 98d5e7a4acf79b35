"""The chain, for nodes (and the gateway's reservations): ``rpc.chain.<id>`` requests answered from the indexer's
connection. A node asks what it needs to build its own transactions (chain id,
contracts, its nonce, gas price, balances, stake) and hands in transactions it signed
itself; the indexer sends them and answers with the receipt's outcome. It never signs
for a node. On a development chain (the embedded one) a node may also ask the faucet
for tokens to stake and ether for gas; elsewhere the faucet answers
`faucet_unavailable`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from eth_tester.exceptions import ValidationError as TesterValidationError
from eth_utils import is_address, to_checksum_address
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rlp.exceptions import RLPException
from web3.exceptions import Web3Exception

from stipple_common import chain as ch
from stipple_common import subjects
from stipple_common.errors import StippleError
from stipple_common.messages import (
    ChainInfoRequest,
    ChainReply,
    FaucetRequest,
    ReserveRequest,
    SendRawTransaction,
    chain_request_decoder,
    encode,
)

log = structlog.get_logger("stipple.chain.relay")

FAUCET_ETHER = 10**18  # wei a node gets for gas


@dataclass
class Relay:
    chain: ch.StippleChain
    call: Callable[[Callable[[], Any]], Awaitable[Any]]
    sender: ch.Sender
    faucet: bool  # development chains only
    max_faucet_tokens: int
    reserve: Callable[[str, int], Awaitable[tuple[bool, int]]] | None = None  # the settler's ledger

    async def serve(self, nc: NATS) -> Any:
        return await nc.subscribe(subjects.chain_rpc_subject("*"), queue="chain-indexer", cb=self._on_request)

    async def _on_request(self, msg: Msg) -> None:
        try:
            request = chain_request_decoder.decode(msg.data)
            reply = await self.answer(request)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            reply = ChainReply(ok=False, error="bad_request", message=str(exc))
        except ch.ContractReverted as exc:
            reply = ChainReply(ok=False, error="reverted", message=exc.message)
        except StippleError as exc:
            reply = ChainReply(ok=False, error=exc.code, message=exc.message)
        except Exception as exc:  # the one boundary: a request must get an answer, and the cause is logged once
            log.exception("chain_request_failed", subject=msg.subject)
            reply = ChainReply(ok=False, error="internal", message=f"{type(exc).__name__}: {exc}")
        if msg.reply:
            await msg.respond(encode(reply))

    async def answer(self, request: Any) -> ChainReply:
        if isinstance(request, SendRawTransaction):
            return await self.call(lambda: self._send(request.raw))
        if isinstance(request, ReserveRequest):
            if self.reserve is None or request.fee <= 0:
                return ChainReply(ok=False, error="bad_request", message=f"fee: must be > 0 (got {request.fee})")
            fits, left = await self.reserve(request.task_id, request.fee)
            if fits:
                return ChainReply(ok=True, deposit=left)
            return ChainReply(ok=False, error="insufficient_deposit", deposit=left, message=f"the deposit holds {left}")
        address = _address(request.address)
        if isinstance(request, FaucetRequest):
            if not self.faucet:
                return ChainReply(ok=False, error="faucet_unavailable", message="this chain has no faucet")
            if not 0 < request.tokens <= self.max_faucet_tokens:
                return ChainReply(
                    ok=False,
                    error="bad_request",
                    message=f"tokens: must be from 1 to {self.max_faucet_tokens} (got {request.tokens})",
                )
            await self.call(lambda: self._fund(address, request.tokens))
            log.info("faucet_paid", address=address, tokens=request.tokens)
        assert isinstance(request, ChainInfoRequest | FaucetRequest)
        return await self.call(lambda: self._info(address))

    def _info(self, address: str) -> ChainReply:
        w3, c = self.chain.w3, self.chain
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
        )

    def _send(self, raw: str) -> ChainReply:
        w3 = self.chain.w3
        try:
            tx_hash = w3.eth.send_raw_transaction(bytes.fromhex(raw.removeprefix("0x")))
        except (ValueError, Web3Exception, TesterValidationError, RLPException) as exc:  # malformed, bad nonce, no gas
            return ChainReply(ok=False, error="bad_request", message=f"transaction refused: {exc}")
        except ch.REVERT_ERRORS as exc:  # the EVM ran it and it reverted
            return ChainReply(ok=False, error="reverted", message=f"transaction reverted: {exc}")
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
        ok = receipt["status"] == 1
        return ChainReply(
            ok=ok,
            error="" if ok else "reverted",
            message="" if ok else "the transaction was mined and reverted",
            tx_hash="0x" + bytes(tx_hash).hex(),
        )

    def _fund(self, address: str, tokens: int) -> None:
        w3 = self.chain.w3
        source = self.sender if isinstance(self.sender, str) else self.sender.address
        if w3.eth.get_balance(address) < FAUCET_ETHER // 2:
            w3.eth.wait_for_transaction_receipt(
                w3.eth.send_transaction({"from": source, "to": address, "value": FAUCET_ETHER})
            )
        self.chain.mint(self.sender, address, tokens)


def _address(value: str) -> str:
    if not is_address(value):
        raise StippleError(f"address: not an Ethereum address (got {value!r})", code="bad_request")
    return to_checksum_address(value)
