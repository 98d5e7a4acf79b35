"""Follow the chain into the CHAIN stream: every event of Stipple's contracts, once, from
blocks with `confirmations` blocks on top of them.

The cursor (the last block whose events are published, and the hashes of the blocks
before it) lives in the `chain` KV bucket, so a restarted indexer goes on where it
stopped; an event published again after a crash between the publish and the cursor
update is dropped by JetStream, because its message id is ``<block_hash>:<log_index>``.

Reorgs: each step first checks that the cursor's block is still on the chain, and each
new block that its parent is the cursor's block. When not, the indexer walks back
through the hashes it kept to the last block both chains share, publishes
``chain.reorg`` naming the orphaned blocks (their events are void), and follows the new
chain from there; the replacing blocks' events get their own message ids. With enough
confirmations this never happens; with too few it is survived rather than hidden.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import nats
import structlog
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from web3.exceptions import BlockNotFound

from stipple_common import bus, ids, records, subjects
from stipple_common.chain import ChainError, ChainEvent, StippleChain
from stipple_common.messages import ChainLog, ChainReorg
from stipple_common.records import ChainCursor

if TYPE_CHECKING:
    from .metrics import FollowerMetrics

log = structlog.get_logger("stipple.chain.follower")

T = TypeVar("T")
CallChain = Callable[[Callable[[], T]], Awaitable[T]]  # runs a blocking web3 call on the chain thread

KEEP_HASHES = 128  # how deep a reorg can be survived
MAX_BLOCKS_PER_STEP = 256


def json_value(value: Any) -> object:
    """An event argument as JSON: bytes as 0x hex, addresses checksummed, lists element-wise."""
    if isinstance(value, bytes | bytearray | HexBytes):
        return "0x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, str) and value.startswith("0x") and len(value) == 42:
        return to_checksum_address(value)
    return value


def chain_log(event: ChainEvent) -> ChainLog:
    return ChainLog(
        contract=event.contract,
        event=event.name,
        args={name: json_value(value) for name, value in event.args.items()},
        block_number=event.block_number,
        block_hash="0x" + event.block_hash.hex(),
        log_index=event.log_index,
        tx_hash="0x" + event.tx_hash.hex(),
    )


@dataclass
class ChainFollower:
    chain: StippleChain
    call: CallChain[Any]
    js: JetStreamContext
    kv: KeyValue
    confirmations: int
    metrics: FollowerMetrics
    on_log: Callable[[ChainLog], Awaitable[None]] | None = None  # projections (stakes)
    start_block: int = 0
    cursor: ChainCursor = field(default_factory=ChainCursor)

    def __post_init__(self) -> None:
        self.addresses = [self.chain.deployment.token, self.chain.deployment.staking, self.chain.deployment.payment]

    async def load(self) -> None:
        cursor = await records.get(self.kv, records.CURSOR_KEY, records.cursor_decoder)
        self.cursor = cursor if cursor is not None else ChainCursor(number=self.start_block - 1)
        log.info("chain_cursor_loaded", block=self.cursor.number)

    async def run(self, stop: asyncio.Event, poll_s: float) -> None:
        while not stop.is_set():
            try:
                done = await self.step()
            except ChainError as exc:  # the node is away, or a reorg too deep: say so, try again
                self.metrics.step_errors.labels(exc.code).inc()
                log.warning("chain_step_failed", code=exc.code, error=exc.message)
                done = 0
            except (nats.errors.Error, TimeoutError) as exc:  # NATS away (a leader election): try again
                self.metrics.step_errors.labels("nats").inc()
                log.warning("chain_step_failed", code="nats", error=repr(exc))
                done = 0
            if not done:
                try:
                    await asyncio.wait_for(stop.wait(), poll_s)
                except TimeoutError:
                    pass

    async def step(self) -> int:
        """Publish the events of the confirmed blocks not published yet; returns how many
        blocks were taken (0 when there is nothing new, or after a reorg was handled)."""
        w3 = self.chain.w3
        head = await self.call(lambda: int(w3.eth.block_number))
        self.metrics.head.set(head)
        if self.cursor.number >= 0:
            number = self.cursor.number
            on_chain = await self.call(lambda: _hash_of(w3, number))
            if on_chain != self.cursor.hash:
                await self._reorg()
                return 0
        target = head - self.confirmations
        taken = 0
        while self.cursor.number < target and taken < MAX_BLOCKS_PER_STEP:
            number = self.cursor.number + 1
            block = await self.call(lambda n=number: w3.eth.get_block(n))
            block_hash = "0x" + bytes(block["hash"]).hex()
            if self.cursor.number >= 0 and "0x" + bytes(block["parentHash"]).hex() != self.cursor.hash:
                await self._reorg()
                break
            logs = await self.call(
                lambda n=number: w3.eth.get_logs({"fromBlock": n, "toBlock": n, "address": self.addresses})
            )
            if any("0x" + bytes(entry["blockHash"]).hex() != block_hash for entry in logs):
                break  # the block changed under us: the next step sees the reorg
            events = [chain_log(event) for event in self.chain.decode_logs(logs)]
            await asyncio.gather(*(self._publish(event) for event in events))
            if self.on_log is not None:
                for event in events:
                    await self.on_log(event)
            kept = {n: h for n, h in self.cursor.hashes.items() if n > number - KEEP_HASHES}
            self.cursor = ChainCursor(number=number, hashes={**kept, number: block_hash})
            taken += 1
        if taken:
            await records.put(self.kv, records.CURSOR_KEY, self.cursor)
        self.metrics.lag.set(max(0, head - self.cursor.number))
        self.metrics.indexed.set(self.cursor.number)
        self.metrics.last_step.set(time.time())
        return taken

    async def _publish(self, event: ChainLog) -> None:
        await bus.publish(
            self.js,
            subjects.chain_subject(event.contract, event.event),
            event,
            msg_id=ids.chain_log(event),
        )
        self.metrics.published.labels(event.contract, event.event).inc()

    async def _reorg(self) -> None:
        """Walk back to the last block both chains share and void what came after it."""
        w3 = self.chain.w3
        kept = sorted(self.cursor.hashes, reverse=True)
        fork = None
        for number in kept:
            if await self.call(lambda n=number: _hash_of(w3, n)) == self.cursor.hashes[number]:
                fork = number
                break
        if fork is None:
            raise ChainError(
                f"reorg deeper than the {len(kept)} blocks kept (from block {kept[-1] if kept else '?'}): "
                "the CHAIN stream needs a rebuild from an earlier block",
                code="reorg_too_deep",
            )
        orphaned = [self.cursor.hashes[n] for n in sorted(self.cursor.hashes) if n > fork]
        event = ChainReorg(from_block=fork + 1, orphaned=orphaned, at=time.time())
        await bus.publish(self.js, subjects.CHAIN_REORG, event, msg_id=ids.chain_reorg(event))
        self.cursor = ChainCursor(number=fork, hashes={n: h for n, h in self.cursor.hashes.items() if n <= fork})
        await records.put(self.kv, records.CURSOR_KEY, self.cursor)
        self.metrics.reorgs.inc()
        log.warning("chain_reorg", from_block=fork + 1, orphaned=len(orphaned))


def _hash_of(w3: Any, number: int) -> str:
    """The hash of block `number` on the chain now; "" when the chain is shorter (a revert)."""
    try:
        block = w3.eth.get_block(number)
    except BlockNotFound:
        return ""
    return "0x" + bytes(block["hash"]).hex()
