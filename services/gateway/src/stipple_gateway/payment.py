"""Custodial payment (like Crynux's bridge): apps never see the chain. The chain-indexer
holds one deposit for the gateway's apps and escrows each paid task's fee from it; the
gateway refuses a task that deposit cannot pay, with 402, what is left and the price.

Before a paid task is accepted, the gateway asks the chain-indexer to reserve its fee
(a ReserveRequest on ``rpc.chain.gateway``, `subjects.RESERVE_SUBJECT`, which no node may
publish on: the relay answers reservations there only). The indexer keeps the ledger of
fees reserved but not yet escrowed, beside the balance on chain, in one place and one at a time, so
concurrent requests (from any number of gateways) cannot spend one balance twice.
Without a chain (no `chain` bucket: no chain-indexer in this network), fees only order
the queue and nothing is charged; with a chain that does not answer, paid tasks get 503.
"""

from __future__ import annotations

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from stipple_common import records, subjects
from stipple_common.messages import ReserveRequest, chain_reply_decoder, encode

from .errors import ApiError

log = structlog.get_logger("stipple.gateway.payment")


class CustodialWallet:
    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self.nc, self.js = nc, js
        self.chain: bool | None = None  # is there a chain-indexer in this network (asked once)

    async def charge(self, task_id: str, fee: int) -> None:
        """Reserve `fee` of the apps' deposit for `task_id`, or refuse the task with 402."""
        if fee <= 0 or not await self._has_chain():
            return
        try:
            msg = await self.nc.request(
                subjects.RESERVE_SUBJECT, encode(ReserveRequest(task_id=task_id, fee=fee)), timeout=5.0
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise ApiError(
                503, "chain_unavailable", f"the chain-indexer did not answer ({type(exc).__name__}); try again"
            ) from None
        reply = chain_reply_decoder.decode(msg.data)
        if reply.ok:
            return
        if reply.error == "insufficient_deposit":
            raise ApiError(
                402,
                "insufficient_deposit",
                f"fee: the deposit that pays for tasks holds {reply.deposit}, this task costs {fee}",
                field="fee",
                value=fee,
                extra={"balance": reply.deposit, "price": fee},
            )
        raise ApiError(503, "chain_unavailable", f"the chain-indexer could not reserve the fee: {reply.message}")

    async def _has_chain(self) -> bool:
        if self.chain is None:
            try:
                await (await self.js.key_value(subjects.CHAIN_BUCKET)).get(records.DEPLOYMENT_KEY)
                self.chain = True
            except (BucketNotFoundError, KeyNotFoundError):
                return False  # not yet, perhaps: ask again next time
        return self.chain
