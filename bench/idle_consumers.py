"""What idle pull consumers cost the bus, and how soon one gets its next message (issue 16).

Every node holds two durable pull consumers (its work and its control messages) and waits
on them most of the time; a network of ten thousand nodes holds twenty thousand. This
bench runs N idle consumers on one nats-server of its own, each way of waiting in turn,
in the same run:

- `fetch+info`: what a node's consumer cost until stop 28: nats-py's `fetch(batch,
  timeout=1.0)` in a loop (an empty consumer answers each fetch's request with a timeout
  status, and `fetch` asks again), and the lag gauges' `consumer_info` every 5 s;
- `fetch`: the loop alone;
- `feed`: what it costs now: `stipple_common.pullfeed.PullFeed`, the standing pull
  `bus.consume` uses (credit kept outstanding, asked again once per expiry,
  `PULL_EXPIRES_S`, no heartbeats), with the lag read off the deliveries (no polls).

For each: the core messages in and out of the server per second per consumer (`/varz`),
the server's and this process's CPU per second, and, once they are idle, the time from a
publish to the consumer's handler, one consumer at a time.

    .venv/bin/python bench/idle_consumers.py                 # 500 consumers, 15 s each way
    .venv/bin/python bench/idle_consumers.py --consumers 2000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats
import psutil
from control_plane import machine  # bench/ is on sys.path
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from stipple_common.natsserver import NatsServer
from stipple_common.process import free_port
from stipple_common.pullfeed import PullFeed

STREAM = "IDLE"
LAG_POLL_S = 5.0  # stipple_common.metrics.CONSUMER_LAG_POLL_S
PER_STREAM = 900  # nats-server 2.15 holds at most 1,000 consumers on a stream


def stream_of(name: str) -> str:
    return f"{STREAM}{int(name.lstrip('abcdefghijklmnopqrstuvwxyz')) // PER_STREAM}"


Wakes = dict[str, "asyncio.Future[float]"]  # consumer -> when its wake-up message reached its loop


def woke(wakes: Wakes, name: str) -> None:
    waiting = wakes.get(name)
    if waiting is not None and not waiting.done():
        waiting.set_result(time.monotonic())


async def fetch_loop(js: JetStreamContext, durable: str, wakes: Wakes, stop: asyncio.Event) -> None:
    sub = await js.pull_subscribe_bind(durable=durable, stream=stream_of(durable))
    while not stop.is_set():
        try:
            msgs = await sub.fetch(1, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in msgs:
            woke(wakes, durable)
            await msg.ack()
    await sub.unsubscribe()


async def feed_loop(js: JetStreamContext, durable: str, wakes: Wakes, stop: asyncio.Event) -> None:
    feed = PullFeed(js._nc, api_prefix=js._prefix, stream=stream_of(durable), durable=durable, batch=1)
    await feed.start()
    while not stop.is_set():
        msg = await feed.next(timeout=1.0)
        if msg is not None:
            woke(wakes, durable)
            await msg.ack()
            await feed.top_up()
    await feed.close()


async def info_loop(js: JetStreamContext, durable: str, stop: asyncio.Event) -> None:
    """A consumer's lag poll, as `bus.consume` made for a node's consumers until stop 28."""
    while not stop.is_set():
        await js.consumer_info(stream_of(durable), durable, timeout=5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), LAG_POLL_S)


async def one_way(
    url: str, monitor: str, server: psutil.Process, mode: str, n: int, seconds: float
) -> dict[str, float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    names = [f"c{i}" for i in range(n)]
    for name in names:
        await js.add_consumer(
            stream_of(name),
            ConsumerConfig(
                durable_name=name, filter_subject=f"idle.{stream_of(name)}.{name}", ack_policy=AckPolicy.EXPLICIT
            ),
        )
    stop = asyncio.Event()
    wakes: Wakes = {}
    loop = feed_loop if mode == "feed" else fetch_loop
    tasks = [asyncio.create_task(loop(js, name, wakes, stop)) for name in names]
    if mode.endswith("+info"):
        tasks += [asyncio.create_task(info_loop(js, name, stop)) for name in names]
    await asyncio.sleep(3.0)  # every loop started and waiting
    async with httpx.AsyncClient() as http:
        varz0 = (await http.get(f"{monitor}/varz")).json()
        server0, self0, t0 = server.cpu_times(), resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        await asyncio.sleep(seconds)
        varz1 = (await http.get(f"{monitor}/varz")).json()
        server1, self1, t1 = server.cpu_times(), resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    span = t1 - t0
    waits = []
    for name in names[:: max(1, n // 50)]:  # about 50 consumers, one at a time, each idle
        wakes[name] = asyncio.get_running_loop().create_future()
        published = time.monotonic()
        await js.publish(f"idle.{stream_of(name)}.{name}", b"wake")
        waits.append((await asyncio.wait_for(wakes[name], 10.0) - published) * 1000)
    stop.set()
    await asyncio.gather(*tasks)
    for name in names:
        await js.delete_consumer(stream_of(name), name)
    for stream in sorted({stream_of(name) for name in names}):
        await js.purge_stream(stream)  # the next way's consumers (same names) start empty
    await nc.close()
    waits.sort()
    return {
        "in": (varz1["in_msgs"] - varz0["in_msgs"]) / span / n,
        "out": (varz1["out_msgs"] - varz0["out_msgs"]) / span / n,
        "server_cpu": (server1.user + server1.system - server0.user - server0.system) / span,
        "client_cpu": (self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime) / span,
        "wake_p50": waits[len(waits) // 2],
        "wake_max": waits[-1],
    }


async def main(args: argparse.Namespace) -> None:
    for line in machine():
        print(line)
    with tempfile.TemporaryDirectory() as tmp:
        http_port = free_port()
        server = NatsServer.start(Path(tmp) / "nats", config=f'http: "127.0.0.1:{http_port}"\n')
        try:
            assert server.process is not None
            assert server.process.pid is not None
            proc = psutil.Process(server.process.pid)
            nc = await nats.connect(server.url)
            for k in range((args.consumers - 1) // PER_STREAM + 1):
                await nc.jetstream().add_stream(StreamConfig(name=f"{STREAM}{k}", subjects=[f"idle.{STREAM}{k}.>"]))
            await nc.close()
            monitor = f"http://127.0.0.1:{http_port}"
            print(f"{args.consumers} idle consumers, {args.seconds:.0f} s measured each way, {args.rounds} rounds\n")
            print(
                f"{'way':10s} {'msgs in/s':>10s} {'msgs out/s':>11s} {'server CPU':>11s} {'client CPU':>11s} "
                f"{'wake p50':>9s} {'wake max':>9s}"
            )
            print(f"{'':10s} {'per consumer':>22s} {'s per s':>23s} {'ms':>19s}")
            for _ in range(args.rounds):
                for mode in ("fetch+info", "fetch", "feed"):
                    r = await one_way(server.url, monitor, proc, mode, args.consumers, args.seconds)
                    print(
                        f"{mode:10s} {r['in']:10.3f} {r['out']:11.3f} {r['server_cpu']:11.3f} {r['client_cpu']:11.3f} "
                        f"{r['wake_p50']:9.2f} {r['wake_max']:9.2f}",
                        flush=True,
                    )
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--consumers", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    sys.exit(asyncio.run(main(parser.parse_args())))
