"""The metrics every service gets from the consumer loop: its durable consumer's lag,
read from the server while the loop runs, and the service prefixes."""

import asyncio
import uuid

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from stipple_common import bus
from stipple_common.metrics import Metrics, prefix_of

pytestmark = pytest.mark.integration


def test_prefixes_follow_the_convention():
    assert prefix_of("gateway") == "stipple_gateway"
    assert prefix_of("chain-indexer") == "stipple_chain_indexer"
    assert prefix_of("node-agent") == "stipple_node"


async def test_consume_reports_its_consumers_lag(nc):
    js = nc.jetstream()
    name = f"T{uuid.uuid4().hex[:12]}"
    prefix = name.lower()
    await bus.ensure_streams(js, [StreamConfig(name=name, subjects=[f"{prefix}.>"])])
    held: list = []

    async def handler(msg):
        held.append(msg)
        return bus.Hold()  # unacknowledged: ack pending

    for i in range(30):
        await js.publish(f"{prefix}.m.{i}", b"{}")
    metrics = Metrics("test", lag_poll_s=0.1)
    # at most 5 in flight, fetched 2 at a time: the rest stays pending on the server
    config = ConsumerConfig(durable_name="lagging", ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=5)
    stop = asyncio.Event()
    loop = asyncio.create_task(
        bus.consume(
            js, stream=name, config=config, handler=handler, stop=stop, metrics=metrics, batch=2, fetch_timeout=0.2
        )
    )

    def gauge(kind):
        labels = {"stream": name, "consumer": "lagging"}
        return metrics.registry.get_sample_value(f"stipple_test_consumer_{kind}_messages", labels)

    try:
        for _ in range(100):
            await asyncio.sleep(0.1)
            if gauge("ack_pending") == 5 and gauge("pending") == 25:
                break
        assert gauge("ack_pending") == 5
        assert gauge("pending") == 25
        for msg in held:
            await msg.ack()
        held.clear()
        for _ in range(100):  # acknowledging lets the rest through, and the gauges follow
            await asyncio.sleep(0.1)
            for msg in held:
                await msg.ack()
            held.clear()
            if gauge("pending") == 0 and gauge("ack_pending") == 0:
                break
        assert gauge("pending") == 0
        assert gauge("ack_pending") == 0
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)
        await js.delete_stream(name)


async def test_a_consumer_info_failure_is_counted_not_raised():
    class NoServer:
        async def consumer_info(self, stream, consumer, timeout=None):
            raise TimeoutError("no NATS")

    metrics = Metrics("test", lag_poll_s=0.05)
    stop = asyncio.Event()
    watch = asyncio.create_task(metrics.watch_consumer(NoServer(), "S", "c", stop))
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(watch, 2)
    errors = metrics.registry.get_sample_value(
        "stipple_test_consumer_info_errors_total", {"stream": "S", "consumer": "c"}
    )
    assert errors >= 2
