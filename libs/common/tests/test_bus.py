"""JetStream helpers against a real nats-server (one per session, unique streams per test)."""

import asyncio
import time
import uuid

import msgspec
import nats
import pytest
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError, ServerError

from stipple_common import bus
from stipple_common.errors import StippleError
from stipple_common.identity import dev_node_id
from stipple_common.messages import (
    IndexedStake,
    NodeBanned,
    NodeHeartbeat,
    NodeQuit,
    TaskStarted,
    encode,
    task_event_decoder,
)
from stipple_common.metrics import Metrics
from stipple_common.natsserver import NatsServer
from stipple_common.nodes import NodeDirectory
from stipple_common.pullfeed import LeaderAway, PullFeed, PullRefused
from stipple_testkit.nodes import joined
from stipple_testkit.waits import until

pytestmark = pytest.mark.integration


@pytest.fixture
async def stream(nc):
    js = nc.jetstream()
    name = f"T{uuid.uuid4().hex[:12]}"
    prefix = name.lower()
    await bus.ensure_streams(js, [StreamConfig(name=name, subjects=[f"{prefix}.>"], duplicate_window=60)])
    yield js, name, prefix
    await js.delete_stream(name)


async def test_ensure_streams_is_idempotent_and_updates(nc):
    js = nc.jetstream()
    name = f"T{uuid.uuid4().hex[:12]}"
    config = StreamConfig(name=name, subjects=[f"{name}.>"], max_msgs=10)
    await bus.ensure_streams(js, [config])
    await bus.ensure_streams(js, [config])
    await bus.ensure_streams(js, [StreamConfig(name=name, subjects=[f"{name}.>"], max_msgs=20)])
    assert (await js.stream_info(name)).config.max_msgs == 20
    await js.delete_stream(name)


async def test_publish_deduplicates_by_message_id(stream):
    js, name, prefix = stream
    event = TaskStarted(task_id="t", node_id="a")
    first = await bus.publish(js, f"{prefix}.t.started", event, msg_id="t:a:started")
    again = await bus.publish(js, f"{prefix}.t.started", event, msg_id="t:a:started")
    other = await bus.publish(js, f"{prefix}.t.started", event, msg_id="t:b:started")
    assert first == again
    assert other == first + 1
    assert (await js.stream_info(name)).state.messages == 2


async def test_read_subject_returns_history_in_order(stream):
    js, name, prefix = stream
    for node in "abc":
        await bus.publish(js, f"{prefix}.t1.started", TaskStarted(task_id="t1", node_id=node), msg_id=node)
    await bus.publish(js, f"{prefix}.t2.started", TaskStarted(task_id="t2", node_id="z"), msg_id="z")
    events = await bus.read_subject(js, name, f"{prefix}.t1.>", task_event_decoder)
    assert [e.node_id for e in events] == ["a", "b", "c"]
    assert await bus.read_subject(js, name, f"{prefix}.none.>", task_event_decoder) == []


async def test_read_subject_carries_trace_context(stream):
    js, name, prefix = stream
    from opentelemetry import trace

    from stipple_common.tracing import setup_tracing

    tracer = setup_tracing("test")
    with tracer.start_as_current_span("outer"):
        trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
        await bus.publish(js, f"{prefix}.t.started", TaskStarted(task_id="t", node_id="a"), msg_id="x")
    msg = await js.get_last_msg(name, f"{prefix}.t.started")
    assert trace_id in msg.headers["traceparent"]


async def test_consume_maps_every_outcome(stream):
    """ack on success, nak on Redeliver and on errors worth retrying, term on poison and on final errors."""
    js, name, prefix = stream
    seen: dict[str, int] = {}
    done = asyncio.Event()

    async def handler(msg):
        kind = msg.subject.rsplit(".", 1)[1]
        seen[kind] = seen.get(kind, 0) + 1
        if seen == {"ok": 1, "poison": 1, "final": 1, "later": 2, "retry": 2, "crash": 2}:
            done.set()
        if kind == "poison":
            task_event_decoder.decode(msg.data)
        if kind == "final":
            raise StippleError("no", code="bad")
        if kind == "later" and seen[kind] == 1:
            return bus.Redeliver(delay=0.05)
        if kind == "retry" and seen[kind] == 1:
            raise StippleError("again", retryable=True)
        if kind == "crash" and seen[kind] == 1:
            raise RuntimeError("unexpected")
        return None

    for kind in ("ok", "poison", "final", "later", "retry", "crash"):
        await js.publish(f"{prefix}.m.{kind}", b"not json")
    stop = asyncio.Event()
    metrics = Metrics("test")
    config = ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, ack_wait=5, max_deliver=5)
    original_backoff = bus.backoff
    bus.backoff = lambda attempt: 0.05  # keep the retries quick
    try:
        runner = asyncio.create_task(
            bus.consume(js, stream=name, config=config, handler=handler, stop=stop, metrics=metrics, fetch_timeout=0.2)
        )
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(runner, 5)
    finally:
        bus.backoff = original_backoff
    assert seen == {"ok": 1, "poison": 1, "final": 1, "later": 2, "retry": 2, "crash": 2}
    info = await js.consumer_info(name, "c")
    assert info.num_ack_pending == 0
    assert info.num_pending == 0

    def count(outcome):
        return metrics.registry.get_sample_value("stipple_test_messages_total", {"stream": name, "outcome": outcome})

    assert count("ack") == 4  # ok, later (2nd), retry (2nd), crash (2nd)
    assert count("nak") == 2  # retry, crash: failures
    assert count("redeliver") == 1  # later: the handler's own timer, not a failure
    assert count("term") == 2


def test_backoff_grows_and_caps():
    assert bus.backoff(1) == 0.5
    assert bus.backoff(3) == 2.0
    assert bus.backoff(50) == 30.0


A, B, C = dev_node_id("a"), dev_node_id("b"), dev_node_id("c")


def test_directory_liveness_by_ttl_and_quit():
    directory = NodeDirectory(ttl_s=5)
    directory.apply(joined(A), seen_at=100.0)
    directory.apply(joined(B), seen_at=100.0)
    directory.apply(NodeHeartbeat(node_id=A, at=0.0), seen_at=104.0)
    directory.apply(NodeHeartbeat(node_id=dev_node_id("ghost"), at=0.0), seen_at=104.0)  # never joined: ignored
    assert {n.node_id for n in directory.live(now=106.0)} == {A}  # b's last sign is 6 s old
    directory.apply(NodeQuit(node_id=A, at=0.0), seen_at=107.0)
    assert directory.live(now=107.5) == []
    directory.apply(NodeHeartbeat(node_id=A, at=0.0), seen_at=108.0)  # came back
    assert [n.node_id for n in directory.live(now=108.5)] == [A]


def test_directory_takes_stakes_and_operators_from_the_chain_and_leaves_banned_nodes_out():
    directory = NodeDirectory(ttl_s=5)
    owner = dev_node_id("operator")
    directory.apply(joined(A), seen_at=100.0)
    directory.apply(joined(B), seen_at=100.0)
    directory.stakes[A] = IndexedStake(stake=10, owner="0x" + owner[2:].upper())  # any case
    directory.stakes[B] = IndexedStake(stake=7, leaving=True)
    assert (directory.operator(A), directory.stake(A)) == (owner, 10)
    assert (directory.operator(B), directory.stake(B)) == (B, 0)  # staked alone, and leaving
    assert (directory.operator(C), directory.stake(C)) == (C, 0)  # the chain knows nothing of it
    directory.apply(NodeBanned(node_id=B, reason="not_assigned", detail="", until=110.0, at=100.0), seen_at=100.0)
    directory.apply(NodeBanned(node_id=C, reason="bad_subject", detail="", until=110.0, at=100.0), seen_at=100.0)
    directory.apply(joined(C), seen_at=101.0)  # a ban that came first still holds
    assert {n.node_id for n in directory.live(now=102.0)} == {A}
    for node_id in (A, B, C):
        directory.apply(NodeHeartbeat(node_id=node_id, at=0.0), seen_at=110.0)
    assert {n.node_id for n in directory.live(now=110.5)} == {A, B, C}  # the bans ran out


async def test_directory_follows_the_nodes_stream(nc):
    from stipple_common.subjects import NODES_STREAM, stream_configs

    js = nc.jetstream()
    await bus.ensure_streams(js, stream_configs())
    node_id = dev_node_id(uuid.uuid4().hex)
    await js.publish(f"nodes.{node_id}.joined", encode(joined(node_id)))
    await js.publish(f"nodes.{node_id}.heartbeat", encode(NodeHeartbeat(node_id=node_id, at=0.0)))
    directory = NodeDirectory(ttl_s=30)
    sub = await directory.follow(js)
    try:
        live = await directory.wait_for(1, timeout=5)
        assert node_id in {n.node_id for n in live}
        await js.publish(f"nodes.{node_id}.quit", msgspec.json.encode(NodeQuit(node_id=node_id, at=0.0)))
        for _ in range(50):
            if node_id not in {n.node_id for n in directory.live()}:
                break
            await asyncio.sleep(0.05)
        assert node_id not in {n.node_id for n in directory.live()}
    finally:
        await sub.unsubscribe()
        await js.purge_stream(NODES_STREAM, subject=f"nodes.{node_id}.>")


async def test_directory_ignores_and_logs_an_event_its_subject_does_not_allow(nc):
    from stipple_common.subjects import NODES_STREAM, stream_configs

    js = nc.jetstream()
    await bus.ensure_streams(js, stream_configs())
    honest, liar = dev_node_id(uuid.uuid4().hex), dev_node_id(uuid.uuid4().hex)
    await js.publish(f"nodes.{honest}.joined", encode(joined(honest)))
    await js.publish(f"nodes.{liar}.quit", encode(NodeQuit(node_id=honest, at=0.0)))  # speaks for another node
    await js.publish(f"nodes.{liar}.joined", encode(joined(liar, address=honest)))  # with another's address
    await js.publish(f"nodes.{liar}.heartbeat", encode(joined(liar)))  # an announcement as a heartbeat
    directory = NodeDirectory(ttl_s=30)
    with structlog.testing.capture_logs() as logs:
        sub = await directory.follow(js)
    try:
        assert directory.caught_up.is_set()
        assert honest in {n.node_id for n in directory.live()}  # the liar's quit did not count
        assert liar not in directory.entries
        rejected = [e for e in logs if e["event"] == "node_event_rejected" and e["sender"] == liar]
        assert sorted(e["reason"] for e in rejected) == ["address_mismatch", "node_mismatch", "type_mismatch"]
        assert all(e["log_level"] == "warning" for e in rejected)
    finally:
        await sub.unsubscribe()
        for node_id in (honest, liar):
            await js.purge_stream(NODES_STREAM, subject=f"nodes.{node_id}.>")


async def test_the_work_stream_holds_more_than_a_thousand_consumers(fresh_nats_url):
    """Two consumers per admitted node: nats-server caps a stream that names no limit at
    1,000 consumers (500 nodes); WORK names its own."""
    import nats

    from stipple_common import subjects

    nc = await nats.connect(fresh_nats_url)
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js, subjects.stream_configs())
        for i in range(1001):
            await js.add_consumer(subjects.WORK_STREAM, subjects.node_work_consumer(f"0x{i:040x}"))
        assert (await js.stream_info(subjects.WORK_STREAM)).state.consumer_count == 1001
    finally:
        await nc.close()


async def test_held_messages_are_kept_alive_then_settled_by_the_consume_table(stream):
    """A handler that holds messages (a queue, a batch): kept alive past the ack wait, then
    acked, or settled by the error that stopped the work (final: term; else nak)."""
    js, name, prefix = stream
    for i in range(3):
        await js.publish(f"{prefix}.m{i}", f"m{i}".encode())
    config = ConsumerConfig(durable_name="held", ack_policy=AckPolicy.EXPLICIT, ack_wait=1.0, max_deliver=5)
    await js.add_consumer(name, config)
    sub = await js.pull_subscribe_bind(durable="held", stream=name)
    held = bus.HeldMessages(keepalive_s=0.3, name="test")
    msgs = await sub.fetch(3, timeout=2)
    for msg in msgs:
        held.hold(msg)
    stop = asyncio.Event()
    touching = asyncio.create_task(held.keep_alive(stop))
    await asyncio.sleep(2.0)  # twice the ack wait: nothing comes back, they are kept alive
    with pytest.raises((TimeoutError, Exception)):
        await sub.fetch(1, timeout=0.5)
    assert await held.settle(msgs[0]) == "ack"
    assert await held.settle(msgs[1], StippleError("bad input", code="invalid_input")) == "term"
    assert await held.settle(msgs[2], RuntimeError("chain away")) == "nak"
    assert len(held) == 0
    stop.set()
    await touching
    again = await sub.fetch(3, timeout=3)  # only the nak'ed one is delivered again
    assert [m.data for m in again] == [b"m2"]
    await again[0].ack()
    await sub.unsubscribe()  # else draining the connection waits out its pull requests


async def test_supervise_restarts_a_failing_consumer_then_gives_up():
    metrics = Metrics("test-supervise")
    calls = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("NATS away")

    await bus.supervise(flaky, asyncio.Event(), name="flaky", metrics=metrics)
    assert len(calls) == 3
    assert (
        metrics.registry.get_sample_value("stipple_test_supervise_consumer_restarts_total", {"consumer": "flaky"}) == 2
    )

    async def broken() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        await bus.supervise(broken, asyncio.Event(), name="broken", max_failures=2)


async def test_a_handler_waits_in_place_for_a_stream_being_elected_and_spends_no_delivery(stream, nc):
    """While a stream cannot store (its leader being elected: here its subjects narrowed, so
    a publish gets no answer), a handler's publish waits in place: the message is handled
    once, on its first delivery, and stored once when the stream is back. The time away is
    in `bus.weather`."""
    js, name, prefix = stream
    target = f"E{uuid.uuid4().hex[:12]}"
    await js.add_stream(StreamConfig(name=target, subjects=[f"{target.lower()}.other"], duplicate_window=60))
    deliveries: list[int] = []
    done = asyncio.Event()

    async def handler(msg):
        deliveries.append(msg.metadata.num_delivered)
        await bus.publish(js, f"{target.lower()}.out", TaskStarted(task_id="t1", node_id="n1"), msg_id="t1:started")
        done.set()

    await js.publish(f"{prefix}.m.go", b"{}")
    stop = asyncio.Event()
    config = ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=3, max_deliver=2)
    started = time.time()
    runner = asyncio.create_task(bus.consume(js, stream=name, config=config, handler=handler, stop=stop))
    await asyncio.sleep(4.0)  # past the ack wait: the message is kept alive, not redelivered
    assert not done.is_set()
    assert bus.weather.is_away
    await js.update_stream(StreamConfig(name=target, subjects=[f"{target.lower()}.>"], duplicate_window=60))
    await asyncio.wait_for(done.wait(), 10)
    stop.set()
    await asyncio.wait_for(runner, 5)
    try:
        assert deliveries == [1]
        assert (await js.stream_info(target)).state.messages == 1
        assert (await js.consumer_info(name, "w")).num_ack_pending == 0
        assert not bus.weather.is_away
        assert bus.weather.away_seconds(started) >= 3.5
    finally:
        await js.delete_stream(target)


async def test_outside_a_handler_a_publish_to_an_away_stream_fails_at_once(stream):
    """A request path (the gateway's) is not patient: it answers 503 and the app retries."""
    js, _name, _prefix = stream
    with pytest.raises(bus.BUS_AWAY):
        await bus.publish(js, "nowhere.at.all", TaskStarted(task_id="t1", node_id="n1"), msg_id="x", timeout=1.0)


def test_bus_weather_adds_up_the_time_away_within_a_window():
    weather = bus.BusWeather()
    weather.away(now=10.0)
    weather.fair(now=14.0)
    weather.away(now=20.0)
    assert weather.away_seconds(0.0, 12.0) == 2.0
    assert weather.away_seconds(12.0, 30.0) == 2.0 + 10.0  # the spell going on counts up to `end`
    assert weather.away_seconds(15.0, 19.0) == 0.0
    weather.fair(now=25.0)
    assert weather.away_seconds(0.0, 100.0) == 4.0 + 5.0


async def _feed_of(js, name, durable, *, batch, expires_s=5.0, ack_wait=30.0):
    await js.add_consumer(name, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait))
    feed = PullFeed(js._nc, api_prefix=js._prefix, stream=name, durable=durable, batch=batch, expires_s=expires_s)
    await feed.start()
    return feed


async def _take(feed, n, timeout=5.0):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        msg = await feed.next(timeout=0.2)
        if msg is not None:
            got.append(msg)
            await msg.ack()
            await feed.top_up()
    return got


async def test_a_pull_feed_asks_once_per_half_batch_not_once_per_message(stream):
    """The standing pull: 60 messages through a feed of batch 8 cost about 60 / 4 pull
    requests (each top-up asks for at least half a batch), where `fetch` asked at least
    once per batch and, at one message per batch, once per message."""
    js, name, prefix = stream
    feed = await _feed_of(js, name, "standing", batch=8)
    try:
        for i in range(60):
            await js.publish(f"{prefix}.m.{i}", str(i).encode())
        got = await _take(feed, 60)
        assert [m.data for m in got] == [str(i).encode() for i in range(60)]
        assert feed.requests <= 60 // 4 + 2
        assert feed.credit == 8  # asked for a whole batch again, owed
        await js._nc.flush()

        async def acked() -> bool:  # the last acks may still be on their way into the consumer's state
            return (await js.consumer_info(name, "standing")).num_ack_pending == 0

        await until("the acks in the consumer's state", acked, timeout=2.0)
        info = await js.consumer_info(name, "standing")
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
    finally:
        await feed.close()


async def test_an_idle_pull_feed_asks_once_per_expiry_and_still_gets_the_next_message_at_once(stream):
    """Idle, the feed's request expires (a 408 with what it still owed) and is asked
    again: one request per expiry, not per second; a message published while it waits
    arrives within the wait, not at the next ask."""
    js, name, prefix = stream
    feed = await _feed_of(js, name, "idle", batch=4, expires_s=0.5)
    try:
        assert await feed.next(timeout=2.2) is None
        assert 4 <= feed.requests <= 6  # the first ask and one per expiry
        assert feed.credit == 4  # each expiry's owed messages subtracted and asked again
        await asyncio.sleep(0.2)
        published = time.monotonic()
        await js.publish(f"{prefix}.m.late", b"late")
        msg = await feed.next(timeout=2.0)
        assert msg is not None
        assert msg.data == b"late"
        assert time.monotonic() - published < 0.4
        await msg.ack()
    finally:
        await feed.close()


async def test_a_pull_feed_on_a_missing_consumer_says_nobody_answers(stream):
    js, name, _prefix = stream
    feed = PullFeed(js._nc, api_prefix=js._prefix, stream=name, durable="nobody", batch=4)
    await feed.start()
    try:
        with pytest.raises(LeaderAway):
            await feed.next(timeout=3.0)
        assert feed.credit == 0
    finally:
        await feed.close()


async def test_consume_makes_its_consumer_again_when_it_is_deleted_under_it(stream):
    """A consumer deleted while the feed's request waits on it (the server says so, or
    nobody answers the next ask): made again, and the messages after it handled."""
    js, name, prefix = stream
    seen: list[bytes] = []
    config = ConsumerConfig(durable_name="again", ack_policy=AckPolicy.EXPLICIT, ack_wait=5)

    async def handler(msg):
        seen.append(msg.data)

    stop = asyncio.Event()
    runner = asyncio.create_task(
        bus.consume(js, stream=name, config=config, handler=handler, stop=stop, fetch_timeout=0.2)
    )
    try:

        async def handled(data: bytes) -> bool:
            return data in seen

        await js.publish(f"{prefix}.m.1", b"1")
        await until("the first message handled", lambda: handled(b"1"), timeout=5.0)
        assert seen == [b"1"]
        await js.delete_consumer(name, "again")
        await asyncio.sleep(0.5)
        await js.publish(f"{prefix}.m.2", b"2")
        await until("the message after the delete handled", lambda: handled(b"2"), timeout=10.0)
        assert seen in ([b"1", b"2"], [b"1", b"1", b"2"])  # made again, it starts from the stream's first

        async def acked() -> bool:  # (the ack follows the handler: seen before it is acked)
            return (await js.consumer_info(name, "again")).num_ack_pending == 0

        await until("the message after the delete acked", acked, timeout=5.0)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)


async def test_a_consumer_made_again_waits_out_the_server_removing_the_old_one(stream, monkeypatch):
    """Made again at once after a delete, a consumer may meet the server still removing the
    old one's store (500, err_code 10012, seen in CI): asked again after a pause, a few
    times, then the error goes to `supervise`."""
    js, name, _prefix = stream
    config = ConsumerConfig(durable_name="remade", ack_policy=AckPolicy.EXPLICIT, ack_wait=5)
    real = js.add_consumer
    refusals = [bus.REMAKE_ATTEMPTS - 1]

    async def busy_server(stream_name, cfg, **kw):
        if refusals[0] > 0:
            refusals[0] -= 1
            raise ServerError(code=500, err_code=10012, description="error creating store for consumer")
        return await real(stream_name, cfg, **kw)

    monkeypatch.setattr(js, "add_consumer", busy_server)
    await bus._make_again(js, name, config, create=True)
    assert refusals == [0]
    assert (await js.consumer_info(name, "remade")).config.durable_name == "remade"

    await js.delete_consumer(name, "remade")
    refusals[0] = bus.REMAKE_ATTEMPTS
    with pytest.raises(ServerError):
        await bus._make_again(js, name, config, create=True)
    with pytest.raises(NotFoundError):
        await js.consumer_info(name, "remade")


async def test_a_consumer_that_stops_gives_back_at_once_what_it_received_and_did_not_handle(stream):
    """A stopping service hands the messages its standing pull had already received back to
    the consumer (nak, no delay): the next replica gets them at once, not after the ack
    wait (30 s here)."""
    js, name, prefix = stream
    for i in range(6):
        await js.publish(f"{prefix}.m.{i}", str(i).encode())
    config = ConsumerConfig(durable_name="handover", ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    stop = asyncio.Event()
    first: list[bytes] = []

    async def handler(msg):
        first.append(msg.data)
        stop.set()  # stop after the first: the rest of the batch was received, not handled
        await asyncio.sleep(0.3)

    await asyncio.wait_for(
        bus.consume(js, stream=name, config=config, handler=handler, stop=stop, batch=16, fetch_timeout=0.2), 10
    )
    assert first == [b"0"]
    # the stopped one's request still owed 10 messages; its inbox is gone, so the server
    # must not spend the next message on it
    await js.publish(f"{prefix}.m.6", b"6")
    feed = PullFeed(js._nc, api_prefix=js._prefix, stream=name, durable="handover", batch=16)
    await feed.start()
    try:
        started = time.monotonic()
        rest = await _take(feed, 6, timeout=5.0)
        assert sorted(m.data for m in rest) == [str(i).encode() for i in range(1, 7)]
        assert time.monotonic() - started < 3.0
    finally:
        await feed.close()


async def test_a_pull_feed_asks_again_at_once_when_its_server_came_back(tmp_path):
    """A server killed and started again holds none of the requests it held, and said
    nothing: the feed asks again as soon as its connection is back, not after the silence
    it waits out for a lost request (32 s at this expiry)."""
    server = NatsServer.start(tmp_path / "nats")
    restarted = None
    nc = await bus.connect(server.url, "feed-test")
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="BACK", subjects=["back.>"]))
        feed = await _feed_of(js, "BACK", "back", batch=4, expires_s=30.0)
        assert await feed.next(timeout=0.5) is None
        assert server.process is not None
        server.process.kill()  # lost without a word: no "server shutdown" status to its requests
        restarted = NatsServer.start(server.store_dir, host=server.host, port=server.port)

        async def reconnected() -> bool:
            return nc.is_connected and nc.stats["reconnects"] >= 1

        await until("reconnected", reconnected, timeout=10.0)
        assert nc.is_connected
        publisher = await nats.connect(restarted.url)
        try:
            await publisher.jetstream().publish("back.m", b"after")
        finally:
            await publisher.close()
        published = time.monotonic()
        got = await _take(feed, 1, timeout=10.0)
        assert [m.data for m in got] == [b"after"]
        assert time.monotonic() - published < 3.0  # not the stall's 7 s
        await feed.close()
    finally:
        await nc.close()
        server.stop()
        if restarted is not None:
            restarted.stop()


async def test_a_pull_feed_with_heartbeats_notices_a_lost_request_by_their_silence(stream):
    """The control plane's consumers ask for idle heartbeats: while they come, a waiting
    request is alive; when they stop (the server forgot the request: here its inbox lost
    interest for a moment, as when a consumer's leader dies with its server), the feed asks
    again after two heartbeats and the margin, not at the request's expiry (30 s here)."""
    js, name, prefix = stream
    await js.add_consumer(name, ConsumerConfig(durable_name="beats", ack_policy=AckPolicy.EXPLICIT))
    feed = PullFeed(
        js._nc, api_prefix=js._prefix, stream=name, durable="beats", batch=4, expires_s=30.0, heartbeat_s=0.2
    )
    await feed.start()
    try:
        assert await feed.next(timeout=1.1) is None
        assert feed.heartbeats >= 3
        assert feed.requests == 1
        # the server forgets the request: no interest on its reply subject for a moment
        await feed._sub.unsubscribe()
        await js._nc.flush()
        await js.publish(f"{prefix}.m.gap", b"gap")  # nobody may take this one yet
        feed._sub = await js._nc.subscribe(feed._inbox, cb=feed._queue.put)
        await js._nc.flush()
        started = time.monotonic()
        got = await _take(feed, 1, timeout=8.0)
        assert [m.data for m in got] == [b"gap"]
        assert feed.requests == 2  # asked again, after the silence
        assert 0.4 <= time.monotonic() - started < 4.5
    finally:
        await feed.close()


def test_a_pull_feed_refuses_a_heartbeat_that_could_not_arrive_before_its_expiry(nc):
    with pytest.raises(ValueError, match="heartbeat_s"):
        PullFeed(nc, api_prefix="$JS.API", stream="S", durable="d", batch=1, expires_s=5.0, heartbeat_s=3.0)
    with pytest.raises(ValueError, match="batch"):
        PullFeed(nc, api_prefix="$JS.API", stream="S", durable="d", batch=0)


@pytest.mark.parametrize("poll_lag", [True, False])
async def test_a_consumer_that_does_not_poll_reads_its_lag_off_its_deliveries(stream, poll_lag):
    """A node's consumers (`poll_lag=False`) never ask the server for their info (ten
    thousand nodes would ask 4,000 times a second); the lag gauges come from the
    deliveries: what is pending behind each, and 1 unacknowledged while it is handled."""
    js, name, prefix = stream
    for i in range(3):
        await js.publish(f"{prefix}.m.{i}", str(i).encode())
    metrics = Metrics("test", lag_poll_s=0.1)
    asked: list[str] = []
    real_info = js.consumer_info

    async def counted_info(*args, **kwargs):
        asked.append(args[1])
        return await real_info(*args, **kwargs)

    js.consumer_info = counted_info

    def gauge(metric):
        labels = {"stream": name, "consumer": "lag"}
        return metrics.registry.get_sample_value(f"stipple_test_consumer_{metric}_messages", labels)

    during: list[tuple[float | None, float | None]] = []
    stop = asyncio.Event()

    async def handler(msg):
        during.append((gauge("pending"), gauge("ack_pending")))
        if len(during) == 3:
            stop.set()

    config = ConsumerConfig(durable_name="lag", ack_policy=AckPolicy.EXPLICIT)
    await asyncio.wait_for(
        bus.consume(
            js, stream=name, config=config, handler=handler, stop=stop, metrics=metrics, batch=1, poll_lag=poll_lag
        ),
        10,
    )
    if poll_lag:
        assert "lag" in asked  # the control plane's consumers poll (the test can tell)
    else:
        assert asked == []
        assert during == [(2.0, 1.0), (1.0, 1.0), (0.0, 1.0)]
        assert (gauge("pending"), gauge("ack_pending")) == (0.0, 0.0)


async def test_a_pull_the_server_refuses_ends_the_loop_instead_of_asking_again_and_again(stream):
    """A request the server refuses outright (a limit of the consumer's: here its
    MaxRequestBatch of 2, below the batch asked for) is no request's end: asking the same
    again would be refused again. The feed raises `PullRefused`, and `consume` ends with it
    for `supervise` to start it again after a back-off, or to end the service."""
    js, name, _prefix = stream
    # nats-py's ConsumerConfig has no max_batch: the server's own API, as any client may call it
    made = await js._nc.request(
        f"$JS.API.CONSUMER.CREATE.{name}.limited",
        msgspec.json.encode(
            {"stream_name": name, "config": {"durable_name": "limited", "ack_policy": "explicit", "max_batch": 2}}
        ),
        timeout=5,
    )
    assert b'"max_batch":2' in made.data
    feed = PullFeed(js._nc, api_prefix=js._prefix, stream=name, durable="limited", batch=8)
    await feed.start()
    try:
        with pytest.raises(PullRefused, match="MaxRequestBatch"):
            await feed.next(timeout=3.0)
        assert feed.requests == 1
    finally:
        await feed.close()
    config = ConsumerConfig(durable_name="limited", ack_policy=AckPolicy.EXPLICIT)

    async def handler(msg):
        return None

    with pytest.raises(PullRefused):  # bound to as it is (as a node binds to the gatekeeper's)
        await asyncio.wait_for(
            bus.consume(js, stream=name, config=config, handler=handler, stop=asyncio.Event(), batch=8, create=False),
            5,
        )
