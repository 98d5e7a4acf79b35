"""Turn task events into transactions: escrow at submission, then pay, refund or slash
on the outcome, in batches, each task at most once.

The settler reads ``tasks.*.submitted`` and the outcomes from its own durable consumer
and holds each message until its transaction is mined:

- `submitted` with a fee: the fee is escrowed from the app's account (custodial mode:
  the wallet this indexer holds for the gateway's apps), many tasks to a transaction.
- `succeeded`: the fee goes to the nodes that agreed, at their addresses (a node id is
  one), in proportion to this task's QoS scores (10/5/2 by commit order; equal shares
  when all are 0: the rule is stipple_common.settlement's), in one `settle` transaction
  for up to `batch_max` tasks. A node judged `mismatch` or `bad_commitment` is slashed
  `slash_amount` (never more than it holds).
- `aborted` and `cancelled`: the fee is refunded, batched the same way.

"At most once" rests on the chain itself: before sending, the settler reads each task's
state (escrowed, settled, refunded) and whether a node was slashed for it, and the
contracts refuse a second settlement, refund or slash. A batch that reverts because one
of its tasks was settled meanwhile is read again and sent without it. Messages are acked
only after the receipt; a chain that does not answer gets them redelivered later.
Transactions go out one at a time from one account, in order, on one thread: the nonce
is the account's pending count, which no one else moves.

Before that, the gateway reserved each paid task's fee here (`reserve`, asked through the
relay), so that the deposit is never promised twice. The reservations live in NATS KV
(reservations.py: one entry per custodial account, changed by compare-and-set), so a
restart between a reservation and its escrow forgets none; a reservation ends when its
escrow is seen on chain, or after RESERVATION_TTL_S.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats
import structlog
from eth_utils import to_checksum_address
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from stipple_common import bus, settlement, subjects, tracing
from stipple_common.chain import ChainUnavailable, ContractReverted, Sender, Settlement, StippleChain, TaskState
from stipple_common.errors import StippleError
from stipple_common.identity import is_node_id
from stipple_common.messages import (
    SLASHABLE,
    TaskAborted,
    TaskCancelled,
    TaskSubmitted,
    TaskSucceeded,
    decode_task_event,
    task_event_decoder,
)

from .reservations import Reservation, ReservationBook

if TYPE_CHECKING:
    from .metrics import SettlerMetrics

log = structlog.get_logger("stipple.chain.settler")

RESERVATION_TTL_S = 600.0
Outcome = TaskSucceeded | TaskAborted | TaskCancelled


@dataclass
class _Held:
    msg: Msg
    event: TaskSubmitted | Outcome
    since: float = field(default_factory=time.monotonic)


@dataclass
class Settler:
    chain: StippleChain
    call: Callable[[Callable[[], Any]], Awaitable[Any]]
    js: JetStreamContext
    sender: Sender  # GATEWAY_ROLE (escrow), SETTLER_ROLE (settle, refund), VALIDATOR_ROLE (slash)
    app: str  # the custodial account apps' fees are escrowed from
    metrics: SettlerMetrics
    book: ReservationBook  # the app's fees reserved and not yet escrowed, in KV (reservations.py)
    batch_max: int = 50
    slash_amount: int = 0  # 0: the minimum stake
    held: list[_Held] = field(default_factory=list)
    # their messages, unacknowledged until the batch is on chain (kept alive within the 30 s ack wait)
    messages: bus.HeldMessages = field(default_factory=lambda: bus.HeldMessages(keepalive_s=10.0, name="settler"))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ledger: asyncio.Lock = field(default_factory=asyncio.Lock)  # reservations and escrows, one at a time

    async def handle(self, msg: Msg) -> bus.Hold | None:
        event = decode_task_event(msg.subject, msg.data)
        if isinstance(event, TaskSubmitted) and event.fee <= 0:
            return None  # a free task: nothing to hold
        if not isinstance(event, TaskSubmitted | TaskSucceeded | TaskAborted | TaskCancelled):
            return None
        self.held.append(_Held(msg, event))
        self.metrics.backlog.set(len(self.held))
        if len(self.held) >= self.batch_max:
            self.wake.set()
        return self.messages.hold(msg)

    async def run(self, stop: asyncio.Event, wait_s: float) -> None:
        """Flush the held events every `wait_s` (or as soon as a batch is full)."""
        touching = asyncio.create_task(self.messages.keep_alive(stop))
        try:
            while not stop.is_set():
                if len(self.held) < self.batch_max:  # a full batch goes at once
                    try:
                        await asyncio.wait_for(self.wake.wait(), wait_s)
                    except TimeoutError:
                        pass
                self.wake.clear()
                if self.held:
                    await self.flush()
        finally:
            touching.cancel()
            await asyncio.gather(touching, return_exceptions=True)

    async def flush(self) -> None:
        batch, self.held = self.held[: self.batch_max * 2], self.held[self.batch_max * 2 :]
        self.metrics.backlog.set(len(self.held))
        try:
            with tracing.batch_span("chain.settle", [h.msg.headers for h in batch], events=len(batch)):
                await self._settle(batch)
        except ChainUnavailable as exc:  # the chain node is away: everything again, later
            log.warning("settlement_postponed", error=exc.message, tasks=len(batch))
            await self._nak(batch, 5.0)
            return
        except (nats.errors.Error, TimeoutError) as exc:  # NATS away (a leader election): the same
            log.warning("settlement_postponed", error=repr(exc), tasks=len(batch))
            await self._nak(batch, 5.0)
            return
        except ContractReverted as exc:  # a refusal nobody expected (a missing role, say): loud, and later
            log.error("settlement_refused", error=exc.error, args=exc.args_by_name, tasks=len(batch))
            await self._nak(batch, 60.0)
            return
        for held in batch:
            await self.messages.settle(held.msg)
            if not isinstance(held.event, TaskSubmitted):
                self.metrics.latency.observe(time.monotonic() - held.since)

    async def _nak(self, batch: list[_Held], delay: float) -> None:
        for held in batch:
            await self.messages.redeliver(held.msg, delay)

    async def _settle(self, batch: list[_Held]) -> None:
        submitted = {h.event.task_id: h.event for h in batch if isinstance(h.event, TaskSubmitted)}
        outcomes = [h.event for h in batch if not isinstance(h.event, TaskSubmitted)]
        # an outcome may come without its submission in the batch (earlier, or a restart)
        for outcome in outcomes:
            if outcome.task_id not in submitted:
                found = await self._submission(outcome.task_id)
                if found is not None and found.fee > 0:
                    submitted[outcome.task_id] = found
        states = {task_id: await self._state(task_id) for task_id in submitted}
        # escrowed by an earlier attempt whose end was not seen (a receipt that timed out, a restart)
        async with self.ledger:
            await self._release([t for t, state in states.items() if state != TaskState.NONE])
        for task_id in await self._escrow([e for t, e in submitted.items() if states[t] == TaskState.NONE]):
            states[task_id] = TaskState.ESCROWED
        pay = [o for o in outcomes if isinstance(o, TaskSucceeded) and states.get(o.task_id) == TaskState.ESCROWED]
        back = [o for o in outcomes if not isinstance(o, TaskSucceeded) and states.get(o.task_id) == TaskState.ESCROWED]
        settlements = [s for s in (settlement.settlement_of(o) for o in pay) if s is not None]
        back_ids = [o.task_id for o in back] + [o.task_id for o in pay if settlement.settlement_of(o) is None]
        await self._send_batch("settle", settlements, lambda items: self.chain.settle(self.sender, items))
        await self._send_batch("refund", back_ids, lambda items: self.chain.refund(self.sender, items))
        skipped = len(outcomes) - len(settlements) - len(back_ids)
        if skipped:
            self.metrics.tasks.labels("nothing_escrowed_or_done").inc(skipped)
        carriers = {h.event.task_id: h.msg.headers for h in batch}
        for outcome in outcomes:
            if not isinstance(outcome, TaskCancelled):
                with tracing.task_logs(outcome.task_id, carriers.get(outcome.task_id)):
                    await self._slash(outcome)

    async def _send_batch(self, kind: str, items: list[Any], send: Callable[[list[Any]], Any]) -> None:
        """Send `items` in batches of `batch_max`; a batch that reverts because a task in it
        is done already is read again and sent without the tasks that are done."""
        for start in range(0, len(items), self.batch_max):
            chunk = items[start : start + self.batch_max]
            for _attempt in range(3):
                if not chunk:
                    break
                try:
                    await self.call(lambda c=chunk: send(c))
                except ContractReverted as exc:
                    if exc.error not in ("TaskAlreadySettled", "TaskAlreadyRefunded", "TaskNotEscrowed"):
                        raise
                    still = []
                    for item in chunk:
                        task_id = item.task_id if isinstance(item, Settlement) else item
                        if await self._state(task_id) == TaskState.ESCROWED:
                            still.append(item)
                    log.info("settlement_batch_trimmed", kind=kind, error=exc.error, kept=len(still), of=len(chunk))
                    chunk = still
                    continue
                self.metrics.sent.labels(kind).inc()
                self.metrics.tasks.labels("settled" if kind == "settle" else "refunded").inc(len(chunk))
                log.info("settlement_sent", kind=kind, tasks=len(chunk))
                break

    async def reserve(self, task_id: str, fee: int) -> tuple[bool, int]:
        """Custodial mode: hold `fee` of the apps' deposit for a task about to be accepted.
        Returns whether it fits and what the deposit has left beside the held fees. The
        reservation is stored (`book`, in KV) before the answer, so a restart keeps it; it
        ends when the settler escrows the task (the chain has it then), or after
        RESERVATION_TTL_S (the task was accepted and never submitted)."""
        async with self.ledger:
            balance = 0

            async def read_balance() -> None:  # after the reservations it is weighed against (another writer's escrow)
                nonlocal balance
                balance = await self.call(lambda: self.chain.balance_of(self.app))

            def decide(entries: dict[str, Reservation]) -> tuple[bool, int]:
                available = balance - sum(r.fee for task, r in entries.items() if task != task_id)
                if task_id in entries or fee <= available:
                    entries[task_id] = Reservation(fee=fee, at=time.time())
                    return True, available - fee
                return False, available

            await read_balance()
            if task_id not in self.book.reserved and (await self.call(lambda: self.chain.task(task_id))).state:
                return True, balance - self.book.total()  # escrowed already: a retried request for the same task
            try:
                fits, left = await self.book.change(decide, refresh=read_balance)
                if not fits:  # refused by this copy of the book: another indexer may have released fees since
                    await self.book.load()
                    await read_balance()
                    fits, left = await self.book.change(decide, refresh=read_balance)
            except (nats.errors.Error, TimeoutError) as exc:  # not stored: not reserved (the gateway answers 503)
                raise StippleError(
                    f"the reservation could not be stored ({exc!r}); try again",
                    code="reservations_unavailable",
                    retryable=True,
                ) from None
            return fits, left

    async def _escrow(self, events: list[TaskSubmitted]) -> list[str]:
        """Escrow the fees of `events`, `batch_max` to a transaction; a batch that one task
        spoils (escrowed meanwhile, or more than the deposit holds) goes again task by task.
        Returns the tasks escrowed now or before."""
        done: list[str] = []
        for start in range(0, len(events), self.batch_max):
            chunk = events[start : start + self.batch_max]
            async with self.ledger:
                try:
                    escrows = [(e.task_id, self.app, e.fee) for e in chunk]
                    await self.call(lambda items=escrows: self.chain.escrow_many(self.sender, items))
                    self.metrics.sent.labels("escrow").inc()
                    done += [e.task_id for e in chunk]
                except ContractReverted:
                    done += [e.task_id for e in chunk if await self._escrow_one(e)]
                # escrowed, or refused for good: the reservation ends. A chain that did not answer
                # raised past this: the reservations stay until the escrow is seen on chain.
                await self._release([e.task_id for e in chunk])
        return done

    async def _release(self, tasks: list[str]) -> None:
        """End the reservations of `tasks` (under `ledger`). A write NATS refused now goes
        with the next one (the book keeps it): settlement does not wait for it."""
        try:
            await self.book.release(tasks)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("reservations_release_postponed", error=repr(exc), tasks=len(tasks))

    async def _escrow_one(self, event: TaskSubmitted) -> bool:
        try:
            await self.call(lambda: self.chain.escrow(self.sender, event.task_id, self.app, event.fee))
        except ContractReverted as exc:
            if exc.error == "TaskAlreadyEscrowed":
                return True
            log.error("escrow_refused", task_id=event.task_id, error=exc.error, args=exc.args_by_name)
            self.metrics.tasks.labels("escrow_refused").inc()
            return False
        self.metrics.sent.labels("escrow").inc()
        return True

    async def _slash(self, outcome: TaskSucceeded | TaskAborted) -> None:
        for node_id, verdict in outcome.verdicts.items():
            if verdict not in SLASHABLE or not is_node_id(node_id):
                continue
            address = to_checksum_address(node_id)  # a node id is its address in lower case
            if await self.call(lambda a=address: self.chain.slashed_for(a, outcome.task_id)):
                continue
            staked = await self.call(lambda a=address: self.chain.stake_of(a))
            amount = min(self.slash_amount or await self.call(self.chain.minimum_stake), staked)
            if amount <= 0:
                log.warning("slash_without_stake", node_id=node_id, task_id=outcome.task_id, verdict=verdict)
                continue
            try:
                await self.call(lambda a=address, m=amount: self.chain.slash(self.sender, a, m, outcome.task_id))
            except ContractReverted as exc:
                if exc.error != "AlreadySlashed":
                    raise
                continue
            self.metrics.sent.labels("slash").inc()
            self.metrics.slashes.labels(verdict).inc()
            self.metrics.slashed_tokens.inc(amount / 1e18)
            log.warning("node_slashed", node_id=node_id, task_id=outcome.task_id, amount=amount, verdict=verdict)

    async def _state(self, task_id: str) -> TaskState:
        record = await self.call(lambda: self.chain.task(task_id))
        return record.state

    async def _submission(self, task_id: str) -> TaskSubmitted | None:
        try:
            raw = await self.js.get_last_msg(subjects.TASKS_STREAM, subjects.task_subject(task_id, "submitted"))
        except NotFoundError:
            return None
        event = task_event_decoder.decode(raw.data)
        return event if isinstance(event, TaskSubmitted) else None
