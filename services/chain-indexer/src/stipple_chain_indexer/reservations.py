"""The fees reserved and not yet escrowed, kept in NATS KV so that a restart forgets none.

The gateway reserves a paid task's fee before it accepts the task (relay.py, settler.py's
`reserve`), and the settler escrows it a moment later. Between the two the fee exists only
as a reservation: were the reservations in memory alone, a chain-indexer restarted in that
window would count the deposit as free again and accept tasks it cannot pay for.

One KV entry per custodial account (`subjects.RESERVATIONS_BUCKET`, key: the account in
lower case) holds all of its reservations, task id -> (fee, when), and every change is a
compare-and-set on the entry's revision (`ReservationBook.change`). Why one entry and not
one per task:

- the check "fee <= balance - everything reserved" and the write that reserves must be one
  step for every chain-indexer that may answer (an active and a standby, or two by
  mistake): a CAS on the entry that holds the total makes it one, with nothing to sum;
- with one indexer, which this book's copy is always current for, a reservation is one
  write (the CAS never fails); another indexer's write makes it re-read and decide again.

The entry is small: a reservation lives from a task's acceptance to its escrow (the next
settle batch, about a second), so it holds about one batch. A chain that stays away keeps
the escrows from happening, but it also keeps new reservations from being made (the
balance cannot be read). If the entry ever grew past NATS's message size (over 10,000 fees
waiting), the write would fail and the gateway would answer 503 until escrows catch up.

`when` is wall-clock time, so that a reservation's age survives a restart; reservations
older than `ttl_s` (the gateway accepted the task and never published it) are dropped by the
next change. Releases that could not be written (NATS away) are kept in memory and go with
the next change; after a crash they would end only with the TTL (a fee counted twice for a
while: too careful, never too generous).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from stipple_common.errors import StippleError

log = structlog.get_logger("stipple.chain.reservations")

T = TypeVar("T")
CAS_ATTEMPTS = 20  # another indexer's writes in between; more than this is not contention but a fault


class Reservation(msgspec.Struct, frozen=True, array_like=True):
    fee: int
    at: float  # Unix time it was made (wall clock: its age must survive a restart)


class Ledger(msgspec.Struct, kw_only=True):
    """The KV entry: a custodial account's fees reserved and not yet escrowed, by task."""

    reserved: dict[str, Reservation] = {}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Ledger)


class ReservationConflict(StippleError):
    """The entry kept changing under this indexer's writes (CAS_ATTEMPTS in a row)."""

    code = "reservation_conflict"
    retryable = True


@dataclass
class ReservationBook:
    """One custodial account's reservations: a copy in memory, the truth in `kv` under `key`.
    Not safe for concurrent use by itself: the settler calls it under its ledger lock."""

    kv: KeyValue
    key: str
    ttl_s: float
    clock: Callable[[], float] = time.time
    reserved: dict[str, Reservation] = field(default_factory=dict)
    revision: int | None = None  # of the entry this copy was read from or written as; None: there is none
    releasing: set[str] = field(default_factory=set)  # escrowed tasks whose release is not yet written

    async def load(self) -> None:
        """Read the entry (at start, and after another indexer wrote it)."""
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:  # never written, or deleted (KeyDeletedError is one)
            self.reserved, self.revision = {}, None
            return
        self.reserved = dict(_decoder.decode(entry.value).reserved) if entry.value else {}
        self.revision = entry.revision

    def total(self, but: str = "") -> int:
        """The fees reserved, except `but`'s."""
        return sum(r.fee for task, r in self.reserved.items() if task != but)

    async def change(
        self, decide: Callable[[dict[str, Reservation]], T], refresh: Callable[[], Awaitable[object]] | None = None
    ) -> T:
        """Apply `decide` to a copy of the reservations (expired ones and pending releases
        already dropped) and store what it leaves, by compare-and-set on the revision this
        copy has. When another writer got there first, the entry is read again, `refresh` is
        awaited (the caller re-reads what it decides by: the balance) and `decide` runs again.
        Returns what `decide` returned. NATS errors are raised as they are."""
        for attempt in range(CAS_ATTEMPTS):
            entries = self._current()
            result = decide(entries)
            if entries == self.reserved:  # nothing to write (a refusal, or releases already stored)
                self.releasing.clear()
                return result
            value = _encoder.encode(Ledger(reserved=entries))
            try:
                if self.revision is None:
                    revision = await self.kv.create(self.key, value)
                else:
                    revision = await self.kv.update(self.key, value, last=self.revision)
            except KeyWrongLastSequenceError:
                log.info("reservations_changed_elsewhere", key=self.key, attempt=attempt)
                await self.load()
                if refresh is not None:
                    await refresh()
                continue
            self.reserved, self.revision = entries, revision
            self.releasing.clear()
            return result
        raise ReservationConflict(f"the reservations of {self.key} changed under {CAS_ATTEMPTS} writes in a row")

    async def release(self, tasks: Iterable[str]) -> None:
        """The tasks are escrowed (or will never be): their fees are the chain's to count now.
        When the write fails, they stay pending and go with the next change."""
        self.releasing.update(t for t in tasks if t in self.reserved)
        if self.releasing:
            await self.change(lambda entries: None)

    def _current(self) -> dict[str, Reservation]:
        """The reservations less the expired and the released."""
        oldest = self.clock() - self.ttl_s
        return {t: r for t, r in self.reserved.items() if r.at >= oldest and t not in self.releasing}
