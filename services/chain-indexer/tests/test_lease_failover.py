"""Two chain-indexers on one nats-server and one chain (anvil, over JSON-RPC: both replicas
see the same blocks), active/standby by the lease (STIPPLE_LEASE_S): while both run only
the holder follows the chain, answers reservations and sends transactions; when it dies
without a word (its connection closed, cancelled, its lease not released: as a SIGKILL)
the standby takes the lease after its ttl and goes on from what the other left in NATS:
the settler's durable (the outcomes published meanwhile), the reservations (a fee the
dead one promised still counts against the deposit) and the follower's cursor (no
contract event published twice). Every task is escrowed once and settled or refunded
once, as the chain itself records it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec
import nats.errors
import pytest

from stipple_chain_indexer.service import IndexerSettings, serve
from stipple_common import bus, records, subjects
from stipple_common import chain as ch
from stipple_common.messages import (
    ChainLog,
    ReserveRequest,
    TaskAborted,
    TaskCancelled,
    TaskSubmitted,
    TaskSucceeded,
    chain_decoder,
    chain_reply_decoder,
    encode,
)
from stipple_common.service import ServiceContext, open_service, serve_as_leader
from stipple_common.taskspec import parse_task
from stipple_testkit.chain import IndexedChain

pytestmark = pytest.mark.integration

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})
TERMINAL = (ch.TaskState.SETTLED, ch.TaskState.REFUNDED)


async def reserve(net: IndexedChain, task_id: str, fee: int) -> tuple[bool, str, int]:
    """What the gateway asks before it accepts a paid task (through the relay, which only
    the active indexer serves); asked again while nobody answers (the failover)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            request = encode(ReserveRequest(task_id=task_id, fee=fee))
            msg = await net.nc.request(subjects.RESERVE_SUBJECT, request, timeout=5)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            assert time.monotonic() < deadline, f"no indexer answered the reservation of {task_id}"
            await asyncio.sleep(0.1)
            continue
        reply = chain_reply_decoder.decode(msg.data)
        return reply.ok, reply.error, reply.deposit


async def submit(net: IndexedChain, fee: int) -> str:
    """A paid task as the gateway accepts it: reserved, then submitted."""
    task_id = uuid.uuid4().hex
    ok, error, _ = await reserve(net, task_id, fee)
    assert (ok, error) == (True, ""), (task_id, error)
    await net.publish(TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time(), fee=fee), "submitted")
    return task_id


def succeeded(net: IndexedChain, task_id: str) -> TaskSucceeded:
    verdicts = dict.fromkeys(net.ids.values(), "agree")
    return TaskSucceeded(task_id=task_id, reason="unanimous", images=[], verdicts=verdicts, qos={})  # equal shares


def sample(ctx: ServiceContext, name: str) -> float:
    """The sum of a counter's series in one replica's registry (0 when it never served)."""
    return float(
        sum(s.value for metric in ctx.metrics.registry.collect() for s in metric.samples if s.name == f"{name}_total")
    )


async def idle(net: IndexedChain) -> None:
    """Nothing in flight: every settler message acked, and the cursor at the chain's head."""
    kv = await net.js.key_value(subjects.CHAIN_BUCKET)

    async def settled_and_followed() -> bool:
        info = await net.js.consumer_info(subjects.TASKS_STREAM, subjects.SETTLER_DURABLE)
        cursor = await records.get(kv, records.CURSOR_KEY, records.cursor_decoder)
        head = await net.call(lambda: int(net.w3.eth.block_number))
        return info.num_ack_pending == 0 and info.num_pending == 0 and cursor is not None and cursor.number == head

    await net.until("the indexer idle", settled_and_followed)


def payment_events(net: IndexedChain) -> list[ch.ChainEvent]:
    """TaskPayment's events as the chain records them (the deployment is this test's own)."""
    logs = net.w3.eth.get_logs({"fromBlock": 0, "toBlock": "latest", "address": net.deployment.payment})
    return net.chain.decode_logs(logs)


def our_events(net: IndexedChain) -> list[ch.ChainEvent]:
    """Every event of the deployment's three contracts, as the chain records them."""
    addresses = [net.deployment.token, net.deployment.staking, net.deployment.payment]
    return net.chain.decode_logs(net.w3.eth.get_logs({"fromBlock": 0, "toBlock": "latest", "address": addresses}))


async def test_the_standby_indexer_takes_over_a_killed_active_one_and_settles_each_task_once(
    fresh_nats_url: str, anvil: ch.Anvil
) -> None:
    net = IndexedChain(fresh_nats_url, anvil.url, deposit=10_000)  # each replica connects to anvil itself
    await net.setup()
    served: list[str] = []  # which instance started serving, in order

    def recorded(instance: str) -> Any:
        async def serving(ctx: ServiceContext, settings: IndexerSettings) -> None:
            served.append(instance)
            await serve(ctx, settings)

        return serving

    def settings_of(instance: str) -> IndexerSettings:
        # renewed every 2/3 s: room for a loaded machine's stalls
        return msgspec.structs.replace(net.settings, lease_s=2.0, instance=instance)

    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    a_service = open_service("chain-indexer", settings_of("i0"), stop=stop_a)
    a = await a_service.__aenter__()
    a_runs = asyncio.create_task(serve_as_leader(a, "chain-indexer", settings_of("i0"), recorded("i0")))
    a_alive = True
    b_service = open_service("chain-indexer", settings_of("i1"), stop=stop_b)
    b = await b_service.__aenter__()
    b_runs: asyncio.Task[None] | None = None
    try:
        await net.until("i0 serving", lambda: asyncio.sleep(0, served == ["i0"]))  # i0 holds the lease
        b_runs = asyncio.create_task(serve_as_leader(b, "chain-indexer", settings_of("i1"), recorded("i1")))
        # i0 active: four tasks reserved and escrowed, two of them settled and refunded
        t1, t2, t3, t4 = [await submit(net, fee) for fee in (1_200, 1_000, 1_200, 1_000)]
        for task_id in (t1, t2, t3, t4):
            await net.wait_state(task_id, ch.TaskState.ESCROWED, timeout=30)
        await net.publish(succeeded(net, t1), "succeeded")
        await net.publish(TaskAborted(task_id=t2, reason="no_agreement"), "aborted")
        await net.wait_state(t1, ch.TaskState.SETTLED, timeout=30)
        await net.wait_state(t2, ch.TaskState.REFUNDED, timeout=30)
        t5 = uuid.uuid4().hex  # reserved by i0, submitted after it died
        assert await reserve(net, t5, 3_000) == (True, "", 10_000 - 1_200 - 1_200 - 1_000 - 3_000)
        await idle(net)
        assert served == ["i0"]  # the standby never served: no relay, no follower, no transaction of its own
        assert sample(b, "stipple_chain_indexer_transactions") == 0
        sent_by_a = sample(a, "stipple_chain_indexer_transactions")
        assert sent_by_a >= 3  # escrow(s), a settle, a refund
        published_by_a = sample(a, "stipple_chain_indexer_events")
        assert published_by_a > 0

        await a.nc.close()  # as a SIGKILL: the connection gone, the lease not released
        a_runs.cancel()
        stop_a.set()  # only so that its cancelled serve() can finish its own clean-up
        await asyncio.gather(a_runs, return_exceptions=True)
        await a_service.__aexit__(None, None, None)
        a_alive = False
        assert not b_runs.done()

        # outcomes while nobody serves: they wait in the settler's durable for the new holder
        await net.publish(succeeded(net, t3), "succeeded")
        await net.publish(TaskCancelled(task_id=t4), "cancelled")
        await net.wait_state(t3, ch.TaskState.SETTLED, timeout=30)
        await net.wait_state(t4, ch.TaskState.REFUNDED, timeout=30)
        assert served == ["i0", "i1"]  # the standby, once it held the lease after its ttl
        # i0's reservation of t5 still counts: 7,600 on deposit, 3,000 of it promised
        assert await reserve(net, uuid.uuid4().hex, 4_601) == (False, "insufficient_deposit", 4_600)
        t6 = await submit(net, 1_000)
        await net.publish(TaskSubmitted(task_id=t5, spec=SPEC, submitted_at=time.time(), fee=3_000), "submitted")
        await net.publish(succeeded(net, t5), "succeeded")
        await net.publish(TaskAborted(task_id=t6, reason="timeout"), "aborted")
        await net.wait_state(t5, ch.TaskState.SETTLED, timeout=30)
        await net.wait_state(t6, ch.TaskState.REFUNDED, timeout=30)
        await idle(net)

        # the chain: each task escrowed once, then settled or refunded once
        tasks = {"0x" + ch.task_key(t).hex(): t for t in (t1, t2, t3, t4, t5, t6)}
        events = await net.call(lambda: payment_events(net))
        seen: dict[str, list[str]] = {t: [] for t in tasks.values()}
        for event in events:
            if event.name in ("Escrowed", "Settled", "Refunded"):
                seen[tasks["0x" + bytes(event.args["taskId"]).hex()]].append(event.name)
        settled, refunded = (t1, t3, t5), (t2, t4, t6)
        assert {t: seen[t] for t in settled} == {t: ["Escrowed", "Settled"] for t in settled}
        assert {t: seen[t] for t in refunded} == {t: ["Escrowed", "Refunded"] for t in refunded}
        for task_id in (*settled, *refunded):
            assert await net.state(task_id) in TERMINAL
        assert await net.on_chain(lambda c: c.balance_of(net.admin)) == 10_000 - 1_200 - 1_200 - 3_000
        for node in net.nodes.values():  # equal thirds of 1,200, 1,200 and 3,000
            assert await net.on_chain(lambda c, n=node: c.balance_of(n)) == 400 + 400 + 1_000
        # no transaction twice: each one counted by the replica that sent it
        transactions = {e.tx_hash for e in events if e.name in ("Escrowed", "Settled", "Refunded")}
        assert sent_by_a + sample(b, "stipple_chain_indexer_transactions") == len(transactions)

        # the follower's cursor went on: every event of the deployment once in CHAIN, and
        # none published twice (not even one JetStream dropped as a duplicate)
        msgs = await bus.read_messages(net.js, subjects.CHAIN_STREAM, "chain.>")
        logs = [e for e in (chain_decoder.decode(m.data) for m in msgs) if isinstance(e, ChainLog)]
        keys = [(e.block_hash, e.log_index) for e in logs]
        assert len(keys) == len(set(keys))
        on_chain = await net.call(lambda: our_events(net))
        assert sorted(keys) == sorted(("0x" + e.block_hash.hex(), e.log_index) for e in on_chain)
        published_by_b = sample(b, "stipple_chain_indexer_events")
        assert published_by_b > 0
        assert published_by_a + published_by_b == len(logs)
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(*(t for t in (a_runs, b_runs) if t is not None), return_exceptions=True)
        if a_alive:
            await a_service.__aexit__(None, None, None)
        await b_service.__aexit__(None, None, None)
        await net.close()
