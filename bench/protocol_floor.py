"""The floor of the task protocol: its messages alone, without Stipple's logic (issue 16).

`bench/control_plane.py` measures the real services. This bench asks what part of that is
the protocol's message pattern itself, on this machine: the same processes (a gateway, a
dispatcher, a validator, a gatekeeper's intake and N nodes, each its own process on uvloop
with its own NATS connection), the same streams and durable pull consumers (waiting on
`stipple_common.pullfeed.PullFeed`, as `bus.consume` does), and the same messages per task
on the common path (a sampled task run by one node), of about the real sizes, but no
decoding, checks, signatures, spans, logs, metrics or HTTP. Per task:

- gateway: publishes `tasks.<id>.submitted` (acknowledged), waits for the outcome on a
  core subscription;
- dispatcher (durable on submitted, started, committed, outcome: 4 deliveries): on
  `submitted` publishes `tasks.<id>.assigned`, then `work.<node>.task`;
- node (durable on its work, and on its control): publishes `started`, uploads the image
  through the intake (a core request), publishes `committed`; on the reveal request,
  `revealed`;
- intake: one Direct Get (`last of tasks.<id>.assigned`), the image's chunk and meta
  messages, the reply;
- validator (durable on `tasks.>`: 7 deliveries): on `committed` publishes `reveal` and the
  node's `work.<node>.control`; on `revealed` one Direct Get (the image's meta) and the
  outcome; on the outcome the node's QoS window (a 3 KiB message, as the `qos` KV record).

That is 12 stored messages (the real task stores 14: the KV rate-limit lease and, when it
changed, `nodes.<id>.qos`, are left out), 13 durable deliveries, 3 requests. Each
publish awaits its acknowledgement, as the services' do.

It reports, as control_plane.py does: p50 from publish to outcome for sequential tasks,
tasks/s with closed-loop submitters, CPU per task across every process (nats-server
included), and raw `publish_async` on the same server, in the same run.

    .venv/bin/python bench/protocol_floor.py
    .venv/bin/python bench/protocol_floor.py --nodes 3 --concurrency 8,32 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import secrets
import statistics
import time
from typing import Any

import nats
from control_plane import machine, raw_publish, reference_ms, submitted_size, usage  # bench/ is on sys.path
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from stipple_common import bus
from stipple_common.natsserver import NatsServer
from stipple_common.pullfeed import PullFeed

# About the real messages' sizes (bytes), measured on the bench network's tasks.
SIZES = {
    "assigned": 900,  # the spec and the sampling proof
    "work": 700,
    "started": 90,
    "committed": 330,
    "reveal": 160,
    "control": 110,
    "revealed": 1_300,  # an ImageResult with its checkpoints and summaries
    "outcome": 1_600,
    "qos": 3_000,  # a window of 50 samples
    "image": 12_000,  # a small PNG (the fixed image node's)
    "meta": 450,
}
PAD = {name: secrets.token_hex(size)[:size].encode() for name, size in SIZES.items()}
BATCH = 16  # bus.consume's pull batch


def streams() -> list[StreamConfig]:
    def stream(name: str, subjects: list[str], **kw: Any) -> StreamConfig:
        return StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE, max_age=3600.0, **kw)

    return [
        stream("FTASKS", ["ftasks.>"], duplicate_window=120.0, allow_direct=True),
        stream("FWORK", ["fwork.>"], duplicate_window=120.0),
        stream("FOBJ", ["fobj.>"], allow_direct=True),
        stream("FQOS", ["fqos.>"], max_msgs_per_subject=1),
    ]


def consumers(nodes: int) -> list[tuple[str, ConsumerConfig]]:
    def durable(name: str, **kw: Any) -> ConsumerConfig:
        return ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0, **kw)

    events = ("submitted", "started", "committed", "succeeded")
    out = [
        ("FTASKS", durable("dispatcher", filter_subjects=[f"ftasks.*.{e}" for e in events])),
        ("FTASKS", durable("validator", filter_subject="ftasks.>")),
    ]
    for i in range(nodes):
        out.append(("FWORK", durable(f"node{i}", filter_subject=f"fwork.node{i}.task")))
        out.append(("FWORK", durable(f"node{i}-control", filter_subject=f"fwork.node{i}.control")))
    return out


async def consume(
    nc: Any, stream: str, durable: str, handler: Any, stop: asyncio.Event, loop: str, config: ConsumerConfig
) -> None:
    """`feed`: the services' standing pull, the handler, the ack, and nothing else. `bus`:
    the services' own loop (`bus.consume`: its span per message, its log context, its
    outcome table), without metrics."""
    if loop == "bus":

        async def handle(msg: Any) -> None:
            await handler(msg)

        await bus.consume(nc.jetstream(), stream=stream, config=config, handler=handle, stop=stop, create=False)
        return
    feed = PullFeed(nc, api_prefix="$JS.API", stream=stream, durable=durable, batch=BATCH, heartbeat_s=1.0)
    await feed.start()
    try:
        while not stop.is_set():
            msg = await feed.next(timeout=0.5)
            if msg is None:
                continue
            await handler(msg)
            await msg.ack()
            await feed.top_up()
    finally:
        await feed.close()


async def role_main(role: str, url: str, index: int, nodes: int, loop: str) -> None:
    configs = {config.durable_name: config for _stream, config in consumers(nodes)}
    nc = await nats.connect(url, name=f"floor-{role}{index}")
    js = nc.jetstream()
    stop = asyncio.Event()

    async def stopping(_msg: Any) -> None:
        stop.set()

    await nc.subscribe("floor.stop", cb=stopping)
    runners: list[asyncio.Task[None]] = []
    if role == "dispatcher":
        turn = [0]

        async def dispatch(msg: Any) -> None:
            task_id, event = msg.subject.split(".")[1:3]
            if event == "submitted":
                node = f"node{turn[0] % nodes}"
                turn[0] += 1
                await js.publish(f"ftasks.{task_id}.assigned", PAD["assigned"], headers={"Nats-Msg-Id": f"{task_id}:a"})
                await js.publish(f"fwork.{node}.task", task_id.encode() + b" " + PAD["work"])

        runners.append(
            asyncio.create_task(consume(nc, "FTASKS", "dispatcher", dispatch, stop, loop, configs["dispatcher"]))
        )
    elif role == "validator":
        nodes_of: dict[str, str] = {}

        async def validate(msg: Any) -> None:
            parts = msg.subject.split(".")
            task_id, event = parts[1], parts[2]
            if event == "committed":
                node = parts[3]
                nodes_of[task_id] = node
                await js.publish(f"ftasks.{task_id}.reveal", PAD["reveal"], headers={"Nats-Msg-Id": f"{task_id}:r"})
                await js.publish(f"fwork.{node}.control", task_id.encode() + b" " + PAD["control"])
            elif event == "revealed":
                await js.get_last_msg("FOBJ", f"fobj.meta.{task_id}", direct=True)
                await js.publish(f"ftasks.{task_id}.succeeded", PAD["outcome"], headers={"Nats-Msg-Id": f"{task_id}:o"})
            elif event == "succeeded":
                node = nodes_of.pop(task_id, "node0")
                await js.publish(f"fqos.{node}", PAD["qos"])

        runners.append(
            asyncio.create_task(consume(nc, "FTASKS", "validator", validate, stop, loop, configs["validator"]))
        )
    elif role == "intake":

        async def upload(msg: Any) -> None:
            task_id = msg.subject.split(".")[-1]
            await js.get_last_msg("FTASKS", f"ftasks.{task_id}.assigned", direct=True)
            await js.publish(f"fobj.chunk.{task_id}", msg.data)
            await js.publish(f"fobj.meta.{task_id}", PAD["meta"])
            await msg.respond(b"ok")

        await nc.subscribe("frpc.blobs.>", cb=upload)
    elif role == "node":
        me = f"node{index}"

        async def work(msg: Any) -> None:
            task_id = msg.data.split(b" ", 1)[0].decode()
            started = asyncio.create_task(
                js.publish(f"ftasks.{task_id}.started.{me}", PAD["started"], headers={"Nats-Msg-Id": f"{task_id}:s"})
            )
            await nc.request(f"frpc.blobs.{me}.{task_id}", PAD["image"], timeout=10.0)
            await started
            await js.publish(
                f"ftasks.{task_id}.committed.{me}", PAD["committed"], headers={"Nats-Msg-Id": f"{task_id}:c"}
            )

        async def control(msg: Any) -> None:
            task_id = msg.data.split(b" ", 1)[0].decode()
            await js.publish(
                f"ftasks.{task_id}.revealed.{me}", PAD["revealed"], headers={"Nats-Msg-Id": f"{task_id}:v"}
            )

        runners.append(asyncio.create_task(consume(nc, "FWORK", me, work, stop, loop, configs[me])))
        runners.append(
            asyncio.create_task(consume(nc, "FWORK", f"{me}-control", control, stop, loop, configs[f"{me}-control"]))
        )
    elif role == "gateway":
        waiting: dict[str, asyncio.Future[float]] = {}

        async def outcome(msg: Any) -> None:
            future = waiting.pop(msg.subject.split(".")[1], None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())

        await nc.subscribe("ftasks.*.succeeded", cb=outcome)
        submitted = secrets.token_hex(submitted_size())[: submitted_size()].encode()

        async def one() -> float:
            task_id = secrets.token_hex(16)
            future = asyncio.get_running_loop().create_future()
            waiting[task_id] = future
            began = time.perf_counter()
            await js.publish(f"ftasks.{task_id}.submitted", submitted, headers={"Nats-Msg-Id": f"{task_id}:sub"})
            return await asyncio.wait_for(future, 10.0) - began

        async def serve(msg: Any) -> None:
            ask = json.loads(msg.data)
            if ask["phase"] == "sequential":
                times = [await one() for _ in range(ask["tasks"])]
                await msg.respond(json.dumps({"times": times}).encode())
                return
            ends = time.perf_counter() + ask["seconds"]
            count = [0]

            async def submitter() -> None:
                while time.perf_counter() < ends:
                    await one()
                    count[0] += 1

            began = time.perf_counter()
            await asyncio.gather(*(submitter() for _ in range(ask["concurrency"])))
            await msg.respond(json.dumps({"tasks": count[0], "seconds": time.perf_counter() - began}).encode())

        await nc.subscribe("floor.run", cb=serve)
    await nc.publish("floor.ready", f"{role}{index}".encode())
    await nc.flush()
    await stop.wait()
    await asyncio.gather(*runners, return_exceptions=True)
    await nc.drain()


def role_process(role: str, url: str, index: int, nodes: int, loop: str) -> None:
    import uvloop

    uvloop.run(role_main(role, url, index, nodes, loop))


async def main(args: argparse.Namespace) -> None:
    for line in machine():
        print(line)
    print(f"consumers' loop: {args.loop}")
    server = NatsServer.start()
    procs: list[multiprocessing.Process] = []
    try:
        nc = await nats.connect(server.url, name="floor-bench")
        js = nc.jetstream()
        for config in streams():
            await js.add_stream(config)
        for stream, config in consumers(args.nodes):
            await js.add_consumer(stream, config)
        ready = await nc.subscribe("floor.ready")
        context = multiprocessing.get_context("spawn")
        plan = [("gateway", 0), ("dispatcher", 0), ("validator", 0), ("intake", 0)]
        plan += [("node", i) for i in range(args.nodes)]
        for role, index in plan:
            proc = context.Process(
                target=role_process, args=(role, server.url, index, args.nodes, args.loop), daemon=True
            )
            proc.start()
            procs.append(proc)
        for _ in plan:
            await ready.next_msg(timeout=60.0)
        pids = {
            f"{role}{index}" if role == "node" else role: p.pid for (role, index), p in zip(plan, procs, strict=True)
        }
        assert server.process is not None
        assert server.process.pid is not None
        pids["nats-server"] = server.process.pid

        async def ask(body: dict[str, Any], timeout: float) -> dict[str, Any]:
            reply = await nc.request("floor.run", json.dumps(body).encode(), timeout=timeout)
            result: dict[str, Any] = json.loads(reply.data)
            return result

        await ask({"phase": "sequential", "tasks": args.warmup_tasks}, 120.0)
        times = sorted((await ask({"phase": "sequential", "tasks": args.tasks}, 300.0))["times"])
        p50 = statistics.median(times) * 1000
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
        print(f"\n[a] {args.tasks} sequential tasks: publish -> outcome p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        best = 0.0
        for concurrency in args.concurrency:
            await ask({"phase": "load", "seconds": args.warmup_s, "concurrency": concurrency}, 120.0)
            reference = reference_ms()
            before = usage(pids)
            result = await ask({"phase": "load", "seconds": args.seconds, "concurrency": concurrency}, 300.0)
            after = usage(pids)
            rate = result["tasks"] / result["seconds"]
            best = max(best, rate)
            used = {name: after[name].cpu_s - before[name].cpu_s for name in pids}  # not the bench client
            per_task = sum(used.values()) / max(result["tasks"], 1) * 1000
            print(
                f"[b] {concurrency} submitters: {rate:.1f} tasks/s; CPU per task, every process: {per_task:.2f} ms "
                f"({per_task / reference:.2f} reference loops of {reference:.1f} ms)"
            )
            print(
                "    CPU s in the window: "
                + ", ".join(f"{k} {v:.2f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
            )
        raw = await raw_publish(js, submitted_size(), args.raw_messages, 1_000)
        print(f"[c] raw publish_async {raw.async_msgs_s:,.0f} msgs/s; one at a time {raw.sync_rtt_ms:.3f} ms each")
        print(f"ratio best tasks/s / raw msgs/s: {best / raw.async_msgs_s:.4f}")
        await nc.publish("floor.stop", b"")
        await nc.flush()
        await nc.close()
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        server.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=200, help="sequential tasks for latency")
    parser.add_argument("--warmup-tasks", type=int, default=20)
    parser.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",")], default=[8, 32])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument(
        "--loop", choices=["feed", "bus"], default="feed", help="the consumers' loop: the bare pull, or bus.consume"
    )
    parser.add_argument("--raw-messages", type=int, default=50_000)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
