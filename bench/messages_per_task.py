"""How many messages one task costs, stored and delivered (issue 16, "Scale out").

Counted, not estimated: the real services run in this process (stipple_testkit.network,
as the `served` fixture of the end-to-end tests: gatekeeper, dispatcher, validator, the
gateway and three node agents of three operators on the built-in tiny model), on a
nats-server of its own with its monitoring port open. For one task of each kind, each
submitted over HTTP once the network is idle, it takes the difference before and after of:

- messages written, per stream (`stream_info` last sequence: TASKS, WORK, NODES, the object
  store's, the KV buckets; a work queue's acked or a one-per-subject stream's replaced
  messages count too);
- messages delivered to each durable JetStream consumer (`consumer_info().delivered`;
  ephemeral ones come and go within the window: the tap counts their deliveries);
- core NATS messages in and out of the server (`/varz` in_msgs / out_msgs);
- and, to say which event each one is, every message on a wire-tap subscription to `>`
  (the server is plain, without accounts, so the tap sees JetStream API calls, acks and
  deliveries too), grouped by kind.

Heartbeats and other timers run meanwhile. The tap leaves heartbeats out of its table by
subject. The server's totals and the rest cannot be split that way, so an idle window as
long as the task's is counted afterwards and printed beside them. The tap's own copies of
messages are left out of `out_msgs` (the tap sees every message once). The bench's own
requests use an inbox prefix of their own and are left out. The outcome is seen on the tap:
the bench reads nothing from the streams inside a window.

    .venv/bin/python bench/messages_per_task.py            # one task of each kind, after a warm-up of each
    .venv/bin/python bench/messages_per_task.py --json out.json

Not measured here: the chain (no escrow or settlement events: `chain.*` and the settler's
batches are per batch, not per task) and webhooks (none set). The images are 128x128 PNGs
(one chunk each in the object store).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats

from stipple_common.messages import decode_task_event
from stipple_common.natsserver import NatsServer
from stipple_common.process import free_port
from stipple_testkit.network import Network, tiny_runner

BENCH_INBOX = "_INBOX_BENCH"  # the bench's own requests (snapshots) and their answers: not the task's
BACKGROUND = re.compile(r"^(nodes\.[^.]+\.heartbeat|\$JS\.EVENT\.ADVISORY\.API.*)$")
EPHEMERAL = re.compile(
    r"^(?=.*[a-z0-9])[A-Za-z0-9]{8}$"
)  # a generated consumer name (read_messages, object store gets)


OUTCOMES = {"succeeded", "aborted", "cancelled"}
TASK_TRAFFIC = ("publish tasks", "publish work", "object store", "delivery from TASKS", "delivery from WORK")


def task_body(seed: int, validation: str) -> dict[str, Any]:
    return {
        "base_model": "tiny-sd",
        "prompt": f"a lighthouse at dusk, take {seed}",
        "task_config": {"image_width": 128, "image_height": 128, "steps": 4, "seed": seed},
        "validation": validation,
    }


def kind_of(subject: str, reply: str, task_id: str, data: bytes = b"") -> str:
    """What a message on the wire is, in the table's words."""
    if subject.startswith("$JS.ACK."):
        # $JS.ACK.<stream>.<consumer>.<delivered>...: an ack (+ACK, -NAK, +WPI, ...) of a delivery
        parts = subject.split(".")
        return f"ack/in-progress to {parts[2]}/{short(parts[3])}"
    if reply.startswith("$JS.ACK."):
        parts = reply.split(".")
        return f"delivery from {parts[2]}/{short(parts[3])}"
    if subject.startswith("$JS.API.CONSUMER.CREATE."):
        try:
            config = json.loads(data or b"{}").get("config", {})
        except ValueError:
            config = {}
        what = config.get("filter_subject") or ",".join(config.get("filter_subjects") or []) or "?"
        durable = "durable" if config.get("durable_name") else "ephemeral"
        return f"JetStream API: CONSUMER.CREATE ({durable}, {generic(what, task_id)})"
    if subject.startswith("$JS.API.STREAM.MSG.GET.") or subject.startswith("$JS.API.DIRECT.GET."):
        try:
            request = json.loads(data or b"{}")
        except ValueError:
            request = {}
        how = (
            "last of " + request["last_by_subj"]
            if "last_by_subj" in request
            else "next of " + request.get("next_by_subj", "?")
        )
        return f"JetStream API: {subject.split('.')[2]} GET, {generic(how, task_id)}"
    if subject.startswith("$JS.API."):
        return "JetStream API: " + ".".join(short(p) for p in subject.split(".")[2:4])
    if subject.startswith("$O."):
        return "object store: " + subject.split(".")[2]  # $O.<bucket>.C (chunks) / .M (meta)
    if subject.startswith("_INBOX"):
        return "reply to a request (inbox)"
    if subject.startswith("$JS.EVENT.ADVISORY."):
        return "server advisory: " + ".".join(subject.split(".")[3:5])
    if subject.startswith("tasks."):
        parts = subject.split(".")
        return f"publish tasks.<id>.{parts[2]}" + (".<node>" if len(parts) > 3 else "")
    if subject.startswith("work."):
        return "publish work.<node>." + subject.split(".")[2]
    if subject.startswith("nodes."):
        return "publish nodes.<node>." + subject.split(".")[2]
    if subject.startswith("progress."):
        return "core progress.<id>.<node>"
    if subject.startswith("rpc."):
        parts = subject.split(".")
        return f"request rpc.{parts[1]}.<node>" + ("".join(f".{p}" for p in parts[3:]) if len(parts) > 3 else "")
    if subject.startswith("$KV."):
        return "KV put " + subject.split(".")[1]
    return subject


def generic(subject: str, task_id: str) -> str:
    """A subject with the task id, node ids and object names in words."""
    if task_id:
        subject = subject.replace(task_id, "<id>")
    subject = re.sub(r"0x[0-9a-f]{40}", "<node>", subject)
    subject = re.sub(r"(\$O\.[^.]+\.[CM])\.\S+", r"\1.<object>", subject)
    return re.sub(r"\b[0-9a-f]{32}\b", "<other task>", subject)


def short(token: str) -> str:
    """Node ids (0x...) and generated names shortened to their kind."""
    if token.startswith("node-0x"):
        return "node-<id>" + ("-control" if token.endswith("-control") else "")
    if token.startswith("0x"):
        return "<node>"
    if EPHEMERAL.match(token):
        return "<ephemeral>"
    return token


@dataclass
class Tap:
    """Every message the server routes, counted by kind (a `>` subscription)."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    total: int = 0
    background: int = 0
    task_traffic: int = 0  # a task's own messages (tasks.*, work.*, the object store, deliveries): for quiet()
    task_id: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: Any = None

    async def start(self, nc: Any) -> None:
        async def on_msg(msg: Any) -> None:
            reply = msg.reply or ""
            if msg.subject.startswith(BENCH_INBOX) or reply.startswith(BENCH_INBOX):
                return  # the bench's own snapshots
            self.total += 1
            if BACKGROUND.match(msg.subject):
                self.background += 1  # heartbeats; API advisories (sent only while someone listens)
                return
            if (
                self.task_id
                and msg.subject.startswith(f"tasks.{self.task_id}.")
                and msg.subject.split(".")[2] in OUTCOMES
            ):
                self.outcome = decode_task_event(msg.subject, msg.data)
                self.ended.set()
            kind = kind_of(msg.subject, msg.reply or "", self.task_id, msg.data)
            self.counts[kind] += 1
            if kind.startswith(TASK_TRAFFIC):
                self.task_traffic += 1

        await nc.subscribe(">", cb=on_msg)

    def reset(self, task_id: str = "") -> None:
        self.counts.clear()
        self.total = self.background = 0
        self.task_id = task_id
        self.ended.clear()


async def snapshot(js: Any, monitor: str, varz_first: bool = False) -> dict[str, Any]:
    """Messages stored per stream, delivered per consumer, and the server's core totals. The
    server's totals are read last before a window and first after it, so that the snapshot's
    own API calls stay outside the window."""
    async with httpx.AsyncClient(timeout=5) as http:
        if varz_first:
            varz = (await http.get(f"{monitor}/varz")).json()
        streams, delivered = await jetstream_counts(js)
        if not varz_first:
            varz = (await http.get(f"{monitor}/varz")).json()
    return {"streams": streams, "delivered": delivered, "in_msgs": varz["in_msgs"], "out_msgs": varz["out_msgs"]}


async def jetstream_counts(js: Any) -> tuple[dict[str, int], dict[str, int]]:
    streams: dict[str, int] = {}
    delivered: dict[str, int] = {}
    for info in await js.streams_info():
        name = info.config.name
        streams[name] = info.state.last_seq  # written, also where a newer message replaced it or it was acked away
        for consumer in await js.consumers_info(name):
            key = f"{name}/{short(consumer.name)}"
            delivered[key] = delivered.get(key, 0) + _delivered(consumer)
    return streams, delivered


def _delivered(consumer: Any) -> int:
    """Deliveries of a consumer so far, redeliveries included (the server's `num_delivered`
    is not in nats-py's ConsumerInfo; delivered.consumer_seq counts every delivery)."""
    return int(consumer.delivered.consumer_seq or 0)


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        "streams": {k: v - before["streams"].get(k, 0) for k, v in after["streams"].items()},
        "delivered": {k: v - before["delivered"].get(k, 0) for k, v in after["delivered"].items()},
        "in_msgs": after["in_msgs"] - before["in_msgs"],
        "out_msgs": after["out_msgs"] - before["out_msgs"],
    }


async def quiet(tap: Tap, settle: float = 2.0, timeout: float = 30.0) -> None:
    """Until no message but the background has passed for `settle` seconds."""
    deadline = time.monotonic() + timeout
    last = tap.task_traffic
    still = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = tap.task_traffic
        if now != last:
            last, still = now, time.monotonic()
        elif time.monotonic() - still >= settle:
            return


async def measure(
    net: Network, js: Any, tap: Tap, monitor: str, body: dict[str, Any] | None, window: float = 0.0
) -> dict[str, Any]:
    """One task (or, with `body` None, an idle window of `window` seconds): the deltas."""
    await quiet(tap)
    tap.reset()
    before = await snapshot(js, monitor)
    tap_before = tap.total
    started = time.monotonic()
    task_id = ""
    if body is not None:
        async with httpx.AsyncClient(base_url=net.gateway_url, timeout=30) as http:
            response = await http.post("/v1/tasks", json=body)
            response.raise_for_status()
            task_id = response.json()["task_id"]
        tap.task_id = task_id
        await asyncio.wait_for(tap.ended.wait(), 120)  # seen on the tap: no polling of the stream of ours
        await quiet(tap)
        outcome = tap.outcome  # as the tap saw it: the bench reads nothing from the stream
    else:
        await asyncio.sleep(window)
        outcome = None
    elapsed = time.monotonic() - started
    after = await snapshot(js, monitor, varz_first=True)
    delta = diff(before, after)
    wire = dict(tap.counts)
    # the tap's own copies of what it saw are not the task's
    delta["out_msgs_without_tap"] = delta["out_msgs"] - (tap.total - tap_before)
    return {
        "task_id": task_id,
        "outcome": type(outcome).__name__ if outcome is not None else "",
        "nodes": len(getattr(outcome, "verdicts", {}) or {}),
        "seconds": round(elapsed, 2),
        **delta,
        "wire": dict(sorted(wire.items())),
        "background_on_wire": tap.background,
    }


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, values: list[Any]) -> None:
        lines.append(f"| {label} | " + " | ".join(str(v) for v in values) + " |")

    row("outcome (nodes)", [f"{r['outcome']} ({r['nodes']})" if r["outcome"] else "-" for r in results.values()])
    row("window (s)", [r["seconds"] for r in results.values()])
    streams = sorted({s for r in results.values() for s in r["streams"]})
    for s in streams:
        row(f"stored in {s}", [r["streams"].get(s, 0) for r in results.values()])
    row("**stored, all streams**", [sum(r["streams"].values()) for r in results.values()])
    # durables only: an ephemeral consumer made and deleted within the window is not in the
    # snapshots (the tap's table counts its deliveries)
    consumers = sorted({c for r in results.values() for c, v in r["delivered"].items() if v and "<ephemeral>" not in c})
    for c in consumers:
        row(f"delivered by {c}", [r["delivered"].get(c, 0) for r in results.values()])
    row(
        "**delivered, durable consumers**", [sum(r["delivered"].get(c, 0) for c in consumers) for r in results.values()]
    )
    row("core in_msgs (server)", [r["in_msgs"] for r in results.values()])
    row("core out_msgs (server, without the tap's copies)", [r["out_msgs_without_tap"] for r in results.values()])
    lines += ["", "On the wire (the tap), by kind; heartbeats and the bench's own polls left out:", ""]
    lines += ["| kind | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    kinds = sorted({k for r in results.values() for k in r["wire"]})
    for k in kinds:
        row(k, [r["wire"].get(k, 0) for r in results.values()])
    row("**all (without background)**", [sum(r["wire"].values()) for r in results.values()])
    row("background (left out)", [r["background_on_wire"] for r in results.values()])
    return lines


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="stipple-msgs-") as tmp:
        http_port = free_port()
        server = NatsServer.start(Path(tmp) / "nats", config=f'http: "127.0.0.1:{http_port}"\n')
        monitor = f"http://127.0.0.1:{http_port}"
        try:
            runner = tiny_runner(Path(tmp) / "tiny")
            async with Network.plain(server.url) as net:
                await net.gatekeeper()
                await net.dispatcher(validation_rate=0.0)  # sampled tasks are never sampled: one node
                await net.validator(phash_threshold=2)
                for i in (1, 2, 3):  # three operators: what the gateway needs live
                    await net.node(runner, f"node-{i}", heartbeat_s=args.heartbeat_s)
                await net.gateway()
                await asyncio.sleep(2.0)  # nodes announce themselves
                nc = await nats.connect(server.url, name="bench-tap", inbox_prefix=BENCH_INBOX.encode())
                js = nc.jetstream()
                tap = Tap()
                await tap.start(nc)
                # a warm-up task of each kind: consumers made, model loaded, first-time KV writes
                for seed, validation in ((1, "sampled"), (2, "full")):
                    await measure(net, js, tap, monitor, task_body(seed, validation))
                results: dict[str, dict[str, Any]] = {}
                results["sampled, rate 0 (1 node)"] = await measure(net, js, tap, monitor, task_body(10, "sampled"))
                results["full (3 nodes)"] = await measure(net, js, tap, monitor, task_body(11, "full"))
                window = max(r["seconds"] for r in results.values())
                results[f"idle, {window:.0f} s"] = await measure(net, js, tap, monitor, None, window)
                await nc.drain()
        finally:
            server.stop()
    print(f"# messages per task, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    cpus = f"{os.cpu_count()} CPUs"
    print(f"# {platform.platform()}, Python {sys.version.split()[0]}, {cpus}; heartbeat {args.heartbeat_s} s")
    print()
    print("\n".join(table(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heartbeat-s", type=float, default=5.0, help="the nodes' heartbeat period (default 5 s)")
    parser.add_argument("--json", help="also write the figures here")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
