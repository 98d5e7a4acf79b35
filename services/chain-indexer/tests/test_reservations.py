"""Fee reservations survive the chain-indexer: a fee reserved before a restart still counts
against the deposit after it, until the task is escrowed; two indexers writing the same
book never promise one balance twice (compare-and-set); old reservations expire; and a
chain node that does not answer is `ChainUnavailable`, never an error that ends a loop."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import nats
import nats.errors
import pytest
import requests

from stipple_chain_indexer.reservations import Ledger, Reservation, ReservationBook
from stipple_chain_indexer.service import ChainThread
from stipple_common import chain as ch
from stipple_common import subjects
from stipple_common.messages import ChainReply, ReserveRequest, TaskSubmitted, chain_reply_decoder, encode
from stipple_common.taskspec import parse_task
from stipple_testkit.chain import IndexedChain

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})


async def reserve(net: IndexedChain, task_id: str, fee: int) -> ChainReply:
    """What the gateway asks before it accepts a paid task (payment.py); asked again while
    the indexer that was just started has not subscribed yet."""
    deadline = time.monotonic() + 20
    while True:
        try:
            request = encode(ReserveRequest(task_id=task_id, fee=fee))
            msg = await net.nc.request(subjects.RESERVE_SUBJECT, request, timeout=10)
        except nats.errors.NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        return chain_reply_decoder.decode(msg.data)


async def stored(net: IndexedChain) -> dict[str, Reservation]:
    kv = await net.js.key_value(subjects.RESERVATIONS_BUCKET)
    entry = await kv.get(net.admin.lower())
    assert entry.value is not None
    return msgspec.json.decode(entry.value, type=Ledger).reserved


@pytest.mark.integration
async def test_a_reservation_made_before_a_restart_still_counts_against_the_deposit(fresh_nats_url):
    net = IndexedChain(fresh_nats_url)  # the admin's deposit: 100,000
    await net.setup()
    await net.start()
    try:
        first, second = uuid.uuid4().hex, uuid.uuid4().hex
        reply = await reserve(net, first, 60_000)
        assert (reply.ok, reply.deposit) == (True, 40_000)
        assert await stored(net) == {first: Reservation(fee=60_000, at=(await stored(net))[first].at)}

        await net.halt()  # the indexer goes between the reservation and the escrow
        await net.start()  # a new settler, over the same NATS and the same chain

        refused = await reserve(net, second, 60_000)  # in memory alone, the deposit looked whole again
        assert (refused.ok, refused.error, refused.deposit) == (False, "insufficient_deposit", 40_000)
        again = await reserve(net, first, 60_000)  # the gateway's retry of the same task: still its own
        assert (again.ok, again.deposit) == (True, 40_000)

        # the task is submitted and escrowed: the chain holds the fee, the reservation ends
        submitted = TaskSubmitted(task_id=first, spec=SPEC, submitted_at=time.time(), fee=60_000)
        await net.publish(submitted, "submitted")
        await net.wait_state(first, ch.TaskState.ESCROWED)
        await net.until("the reservation released", lambda: _released(net, first))
        assert await net.on_chain(lambda c: c.balance_of(net.admin)) == 40_000
        fits = await reserve(net, second, 40_000)  # all that is left, counted once (not 40,000 - 60,000)
        assert (fits.ok, fits.deposit) == (True, 0)
        over = await reserve(net, uuid.uuid4().hex, 1)
        assert (over.ok, over.error, over.deposit) == (False, "insufficient_deposit", 0)
        bad = await reserve(net, uuid.uuid4().hex, 0)
        assert (bad.ok, bad.error) == (False, "bad_request")
        assert "fee: must be > 0 (got 0)" in bad.message
    finally:
        await net.close()


async def _released(net: IndexedChain, task_id: str) -> bool:
    return task_id not in await stored(net)


@pytest.mark.integration
async def test_two_indexers_writing_one_book_never_promise_a_balance_twice(fresh_nats_url):
    """Each decides against its own copy; the compare-and-set makes the second read the
    first's reservation and decide again."""
    nc = await nats.connect(fresh_nats_url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket=subjects.RESERVATIONS_BUCKET, history=1)
        one, two = ReservationBook(kv, "0xapp", ttl_s=600), ReservationBook(kv, "0xapp", ttl_s=600)
        await one.load()
        await two.load()  # both copies empty
        balance = 100

        def take(task_id: str, fee: int):
            def decide(entries: dict[str, Reservation]) -> bool:
                if fee <= balance - sum(r.fee for r in entries.values()):
                    entries[task_id] = Reservation(fee=fee, at=time.time())
                    return True
                return False

            return decide

        assert await one.change(take("a", 70))
        assert not await two.change(take("b", 70))  # its copy said 100 free; the entry says 30
        assert two.reserved.keys() == {"a"}
        assert await two.change(take("c", 30))
        await one.release(["a"])  # escrowed by the first
        assert set(one.reserved) == {"c"}
        fresh = ReservationBook(kv, "0xapp", ttl_s=600)
        await fresh.load()
        assert set(fresh.reserved) == {"c"}
        assert fresh.total() == 30
    finally:
        await nc.close()


@pytest.mark.integration
async def test_a_reservation_older_than_its_ttl_is_dropped_after_a_restart_too(fresh_nats_url):
    nc = await nats.connect(fresh_nats_url)
    try:
        kv = await nc.jetstream().create_key_value(bucket=subjects.RESERVATIONS_BUCKET, history=1)
        now = [1_000.0]
        book = ReservationBook(kv, "0xapp", ttl_s=600, clock=lambda: now[0])
        await book.change(lambda entries: entries.update(old=Reservation(fee=5, at=now[0])))
        now[0] += 300
        await book.change(lambda entries: entries.update(new=Reservation(fee=7, at=now[0])))
        now[0] += 301  # "old" is 601 s old, "new" 301 s
        later = ReservationBook(kv, "0xapp", ttl_s=600, clock=lambda: now[0])  # after a restart
        await later.load()
        assert set(later.reserved) == {"old", "new"}  # stored until the next change drops it
        assert await later.change(lambda entries: sorted(entries)) == ["new"]
        await later.load()
        assert later.reserved == {"new": Reservation(fee=7, at=1_300.0)}
    finally:
        await nc.close()


async def test_a_chain_node_that_does_not_answer_is_chain_unavailable():
    """web3's views let requests' errors through (a refused connection, a read timeout);
    before, one ended the settler's loop and settlement stopped until a restart."""
    call = ChainThread()
    try:

        def refused() -> int:
            raise requests.exceptions.ConnectionError("Connection refused")

        with pytest.raises(ch.ChainUnavailable, match="did not answer: Connection refused"):
            await call(refused)
        with pytest.raises(ZeroDivisionError):  # anything else is the caller's, as it was
            await call(lambda: 1 // 0)
        assert await asyncio.wait_for(call(lambda: 42), 10) == 42
    finally:
        call.close()
