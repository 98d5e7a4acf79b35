"""The chain-indexer on anvil: how far it lags behind the chain under load, and how long a
validated task takes to be paid for good.

(a) Lag. A load generator (its own process) sends `--rate` (100) token transfers a second
    from six anvil accounts for `--duration` (15 s), first with a block every second
    (``--block-time 1``), then with anvil mining each transaction in its own block
    (automine: 100 blocks a second). The indexer runs as in production
    (``python -m stipple_chain_indexer``, confirmations 0, poll 0.1 s). Measured: head -
    cursor (the cursor from the `chain` KV bucket, the head from eth_blockNumber) every
    0.2 s, and for every transfer the time from its block first appearing at eth_blockNumber
    (polled every 10 ms: when its receipt is available) to its event arriving on
    ``chain.StippleToken.Transfer``. Baseline, in the same run and at the same poll interval:
    a bare web3 loop that polls eth_blockNumber and fetches the new blocks' logs with one
    eth_getLogs, timed the same way.
(b) Time to final. `--tasks` (50) paid tasks are escrowed (anvil on automine, not timed),
    then anvil mines a block a second and the tasks' `succeeded` events are published at
    once; measured is the time from each publish to its ``chain.TaskPayment.Settled``
    arriving from the CHAIN stream, with confirmations 2 (so: final), for settle_batch 50
    and settle_batch 1 (the baseline: one task per transaction), and gas per task from the
    settle receipts (the 21,000 of each transaction included), and per escrow.

    python bench/chain_indexer.py [--rate 100] [--duration 15] [--tasks 50] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import nats
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError

from stipple_common import bus, records, subjects
from stipple_common import chain as ch
from stipple_common.identity import node_id_of
from stipple_common.messages import ChainLog, TaskSubmitted, TaskSucceeded, chain_decoder
from stipple_common.natsserver import NatsServer, nats_server_binary
from stipple_common.process import ManagedProcess
from stipple_common.taskspec import parse_task
from stipple_testkit.nodes import joined, publish_joined

TOKEN = 10**18
POLL_S = 0.1
LOAD_ACCOUNTS = range(1, 7)  # anvil accounts 1-6 send the load; 7-9 are the nodes; 0 is the indexer
SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    anvil = subprocess.run([str(ch.anvil_binary()), "--version"], capture_output=True, text=True, check=False)
    nats_v = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, check=False)
    return (
        f"{cpu}, {os.cpu_count()} cores visible (shared), {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, web3 {version('web3')}, nats-py {version('nats-py')}, "
        f"{anvil.stdout.strip().splitlines()[0] if anvil.stdout else 'anvil ?'}, {nats_v.stdout.strip()}"
    )


# ---------------------------------------------------------------- load and clocks (threads, processes)


def load_generator(url: str, token: str, senders: list[str], rate: float, duration: float, out: Any) -> None:
    """Send `rate` token transfers a second for `duration` s, round-robin over `senders`
    (unlocked anvil accounts; anvil assigns the nonces). Runs in its own process."""
    w3 = ch.connect(url)
    contract = w3.eth.contract(address=token, abi=ch.load_artifacts()["StippleToken"].abi)
    data = contract.encode_abi("transfer", args=[senders[0], 1])
    sent = errors = 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < duration:
        due = start + sent / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        sender = senders[sent % len(senders)]
        tx = {"from": sender, "to": token, "data": data, "gas": hex(80_000)}
        response = w3.provider.make_request("eth_sendTransaction", [tx])  # type: ignore[arg-type]
        errors += "error" in response
        sent += 1
    out.put({"sent": sent, "errors": errors, "seconds": elapsed})


@dataclass
class BlockClock:
    """When each block first showed at eth_blockNumber (polled every 10 ms): when its receipts became readable."""

    url: str
    seen: dict[int, float] = field(default_factory=dict)
    head: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        w3 = ch.connect(self.url)
        self.head = int(w3.eth.block_number)
        while not self.stop.is_set():
            n = int(w3.eth.block_number)
            now = time.time()
            for b in range(self.head + 1, n + 1):
                self.seen[b] = now
            self.head = max(self.head, n)
            self.stop.wait(0.01)


@dataclass
class BareLoop:
    """The baseline: poll eth_blockNumber every POLL_S, fetch the new blocks' token logs with one eth_getLogs."""

    url: str
    token: str
    clock: BlockClock
    latencies: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        w3 = ch.connect(self.url)
        last = int(w3.eth.block_number)
        while not self.stop.is_set():
            head = int(w3.eth.block_number)
            head_at = time.time()
            if head > last:
                logs = w3.eth.get_logs({"fromBlock": last + 1, "toBlock": head, "address": self.token})
                now = time.time()
                for entry in logs:
                    # this loop may see a block before the clock does: then it appeared at `head_at`
                    seen = self.clock.seen.get(int(entry["blockNumber"]), head_at)
                    self.latencies.append(now - min(seen, head_at))
                last = head
            self.stop.wait(POLL_S)


# ---------------------------------------------------------------- the indexer as a process


class Indexer:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "stipple_chain_indexer"]
        self.process = ManagedProcess("chain-indexer", cmd, env={**os.environ, **env}, log_path=log).start()

    def stop(self) -> None:
        self.process.stop(timeout=30)

    def check(self) -> None:
        if self.process.returncode is not None:
            tail = self.process.output()[-3000:]
            raise RuntimeError(f"the chain-indexer exited with {self.process.returncode}:\n{tail}")


async def cursor(js: JetStreamContext) -> int:
    try:
        kv = await js.key_value(subjects.CHAIN_BUCKET)
    except BucketNotFoundError:  # the indexer has not started yet
        return -1
    found = await records.get(kv, records.CURSOR_KEY, records.cursor_decoder)
    return found.number if found is not None else -1


async def wait_for(what: str, check: Any, indexer: Indexer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        indexer.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s (log: {indexer.log})")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- (a) lag


async def lag_run(
    mode: str, js: JetStreamContext, nc: Any, w3: Any, url: str, deployment: ch.Deployment, args: Any, indexer: Indexer
) -> dict[str, Any]:
    rpc = w3.provider.make_request
    if mode == "automine":
        await asyncio.to_thread(rpc, "evm_setAutomine", [True])
    else:
        await asyncio.to_thread(rpc, "evm_setIntervalMining", [1])
    await asyncio.sleep(1.5)
    head0 = await asyncio.to_thread(lambda: int(w3.eth.block_number))
    await wait_for("indexer caught up", lambda: _at_least(js, head0), indexer, 60)

    clock = BlockClock(url)
    bare = BareLoop(url, deployment.token, clock)
    arrivals: list[float] = []

    async def on_transfer(msg: Any) -> None:
        event = chain_decoder.decode(msg.data)
        if isinstance(event, ChainLog):
            now = time.time()  # an event may beat the 10 ms clock to its block: then it took ~0
            arrivals.append(now - clock.seen.get(event.block_number, now))

    sub = await nc.subscribe(subjects.chain_subject("StippleToken", "Transfer"), cb=on_transfer)
    threads = [threading.Thread(target=clock.run, daemon=True)]
    threads[0].start()
    await asyncio.sleep(0.2)
    threads.append(threading.Thread(target=bare.run, daemon=True))
    threads[1].start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    senders = [w3.eth.accounts[i] for i in LOAD_ACCOUNTS]
    gen = ctx.Process(target=load_generator, args=(url, deployment.token, senders, args.rate, args.duration, out))
    gen.start()
    lags: list[int] = []
    while gen.is_alive():
        indexer.check()
        lags.append(max(0, clock.head - await cursor(js)))
        await asyncio.sleep(0.2)
    gen.join()
    sent = out.get(timeout=5)
    await asyncio.sleep(1.5)  # the last transactions in the pool are mined (block-time mode)
    end_head = await asyncio.to_thread(lambda: int(w3.eth.block_number))
    logs = await asyncio.to_thread(
        lambda: w3.eth.get_logs({"fromBlock": head0 + 1, "toBlock": end_head, "address": deployment.token})
    )
    drain_start = time.monotonic()
    await wait_for("indexer drained", lambda: _at_least(js, end_head), indexer, 60)
    drained = time.monotonic() - drain_start
    await asyncio.sleep(1.0)  # the last events reach the subscription and the bare loop
    clock.stop.set()
    bare.stop.set()
    for t in threads:
        t.join(5)
    await sub.unsubscribe()
    blocks = end_head - head0
    return {
        "mode": mode,
        "tx_sent": sent["sent"],
        "tx_errors": sent["errors"],
        "tx_per_s": sent["sent"] / sent["seconds"],
        "blocks": blocks,
        "lag_blocks_p50": pct(lags, 0.5),
        "lag_blocks_p99": pct(lags, 0.99),
        "lag_blocks_max": max(lags) if lags else math.nan,
        "drain_after_load_s": drained,
        "events_on_chain": len(logs),
        "events_indexer": len(arrivals),
        "events_bare": len(bare.latencies),
        "indexer_p50_ms": pct(arrivals, 0.5) * 1e3,
        "indexer_p99_ms": pct(arrivals, 0.99) * 1e3,
        "bare_p50_ms": pct(bare.latencies, 0.5) * 1e3,
        "bare_p99_ms": pct(bare.latencies, 0.99) * 1e3,
    }


async def _at_least(js: JetStreamContext, block: int) -> bool:
    return await cursor(js) >= block


# ---------------------------------------------------------------- (b) time to final


async def final_run(
    batch: int,
    js: JetStreamContext,
    nc: Any,
    w3: Any,
    chain: ch.StippleChain,
    env: dict[str, str],
    args: Any,
    tmp: Path,
) -> dict[str, Any]:
    rpc = w3.provider.make_request
    await asyncio.to_thread(rpc, "evm_setAutomine", [True])
    indexer = Indexer({**env, "STIPPLE_CONFIRMATIONS": "2", "STIPPLE_SETTLE_BATCH": str(batch)}, tmp / "final.log")
    try:
        run_id = f"b{batch}-{int(time.time())}"
        tasks = [f"{run_id}-{i}" for i in range(args.tasks)]
        for task_id in tasks:
            event = TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time(), fee=TOKEN)
            await bus.publish(js, subjects.task_subject(task_id, "submitted"), event, msg_id=f"{task_id}:s")

        async def escrowed() -> bool:
            states = await asyncio.to_thread(lambda: [chain.task(t).state for t in tasks])
            return all(s == ch.TaskState.ESCROWED for s in states)

        await wait_for("tasks escrowed", escrowed, indexer, 120)
        await asyncio.to_thread(rpc, "evm_setIntervalMining", [1])
        by_key = {"0x" + ch.task_key(t).hex(): t for t in tasks}
        landed: dict[str, float] = {}
        txs: dict[str, str] = {}

        async def on_settled(msg: Any) -> None:
            event = chain_decoder.decode(msg.data)
            if isinstance(event, ChainLog) and (task := by_key.get(str(event.args["taskId"]))):
                landed.setdefault(task, time.time())
                txs[task] = event.tx_hash

        sub = await nc.subscribe(subjects.chain_subject("TaskPayment", "Settled"), cb=on_settled)
        await asyncio.sleep(1.0)
        published: dict[str, float] = {}
        n1, n2, n3 = (node_id_of(w3.eth.accounts[7 + i]) for i in range(3))  # the nodes' ids are their addresses
        for task_id in tasks:
            outcome = TaskSucceeded(
                task_id=task_id,
                reason="unanimous",
                images=[],
                verdicts={n1: "agree", n2: "agree", n3: "agree"},
                qos={n1: 10, n2: 5, n3: 2},
            )
            published[task_id] = time.time()
            await bus.publish(js, subjects.task_subject(task_id, "succeeded"), outcome, msg_id=f"{task_id}:o")

        async def all_final() -> bool:
            return len(landed) == len(tasks)

        await wait_for("settlements final", all_final, indexer, 240)
        await sub.unsubscribe()
        latencies = [landed[t] - published[t] for t in tasks]
        settle_txs = set(txs.values())
        receipts = await asyncio.to_thread(lambda: [w3.eth.get_transaction_receipt(h) for h in settle_txs])
        escrows = [
            chain_decoder.decode(m.data)
            for m in await bus.read_messages(js, subjects.CHAIN_STREAM, "chain.TaskPayment.Escrowed")
        ]
        escrow_txs = {e.tx_hash for e in escrows if isinstance(e, ChainLog) and str(e.args["taskId"]) in by_key}
        escrow_receipts = await asyncio.to_thread(lambda: [w3.eth.get_transaction_receipt(h) for h in escrow_txs])
        return {
            "settle_batch": batch,
            "tasks": len(tasks),
            "final_p50_s": pct(latencies, 0.5),
            "final_p99_s": pct(latencies, 0.99),
            "final_max_s": max(latencies),
            "settle_transactions": len(settle_txs),
            "settle_gas_per_task": sum(r["gasUsed"] for r in receipts) / len(tasks),
            "escrow_gas_per_task": (
                sum(r["gasUsed"] for r in escrow_receipts) / len(escrow_receipts) if escrow_receipts else math.nan
            ),
        }
    finally:
        indexer.stop()


# ---------------------------------------------------------------- the run


async def bench(args: Any, nats_url: str, anvil_url: str, tmp: Path) -> dict[str, Any]:
    w3 = ch.connect(anvil_url)
    accounts = w3.eth.accounts
    admin = accounts[0]
    await asyncio.to_thread(w3.provider.make_request, "evm_setAutomine", [True])

    def setup() -> ch.Deployment:
        deployment = ch.deploy_all(
            w3,
            admin,
            min_stake=1_000 * TOKEN,
            cooldown_s=3600,
            treasury=accounts[1],
            validator=admin,
            gateway=admin,
            settler=admin,
        )
        chain = ch.StippleChain(w3, deployment)
        chain.mint(admin, admin, 1_000_000 * TOKEN)
        chain.deposit(admin, 1_000 * TOKEN)
        for i in LOAD_ACCOUNTS:
            chain.mint(admin, accounts[i], 1_000_000 * TOKEN)
        return deployment

    deployment = await asyncio.to_thread(setup)
    chain = ch.StippleChain(w3, deployment)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js, subjects.stream_configs())
    nodes = accounts[7:10]
    await publish_joined(js, *(joined(node_id_of(a), address=a, started_at=time.time()) for a in nodes))
    d = deployment
    env = {
        "STIPPLE_NATS_URL": nats_url,
        "STIPPLE_CHAIN_URL": anvil_url,
        "STIPPLE_DEPLOYMENT": f"token={d.token},staking={d.staking},payment={d.payment}",
        "STIPPLE_ACCOUNT": admin,
        "STIPPLE_POLL_S": str(POLL_S),
        "STIPPLE_LOG_FORMAT": "json",
        "STIPPLE_NODE_TTL_S": "3600",
    }
    results: dict[str, Any] = {"lag": [], "final": []}
    indexer = Indexer({**env, "STIPPLE_CONFIRMATIONS": "0"}, tmp / "lag.log")
    try:
        for mode in ("block-time 1 s", "automine"):
            started = time.monotonic()
            results["lag"].append(await lag_run(mode, js, nc, w3, anvil_url, deployment, args, indexer))
            print(f"  lag, {mode}: {time.monotonic() - started:.0f} s", flush=True)
    finally:
        indexer.stop()
    for batch in (50, 1):
        started = time.monotonic()
        results["final"].append(await final_run(batch, js, nc, w3, chain, env, args, tmp))
        print(f"  time to final, settle_batch {batch}: {time.monotonic() - started:.0f} s", flush=True)
    await nc.close()
    return results


def report(results: dict[str, Any], args: Any) -> None:
    print(f"\n(a) indexer lag under load, {args.rate:.0f} tx/s target for {args.duration:.0f} s, poll {POLL_S} s,")
    print("    confirmations 0; latency from the block's appearance to the event (ms)")
    print(
        f"  {'mode':<15} {'tx/s':>6} {'blocks':>6} {'lag p50/p99/max (blocks)':>25} "
        f"{'indexer p50/p99':>16} {'bare getLogs p50/p99':>21} {'ratio p50/p99':>14}"
    )
    for r in results["lag"]:
        lag = f"{r['lag_blocks_p50']:.0f} / {r['lag_blocks_p99']:.0f} / {r['lag_blocks_max']:.0f}"
        ratio = f"{r['indexer_p50_ms'] / r['bare_p50_ms']:.2f} / {r['indexer_p99_ms'] / r['bare_p99_ms']:.2f}"
        print(
            f"  {r['mode']:<15} {r['tx_per_s']:>6.1f} {r['blocks']:>6} {lag:>25} "
            f"{r['indexer_p50_ms']:>7.0f} / {r['indexer_p99_ms']:<6.0f} {r['bare_p50_ms']:>9.0f} / "
            f"{r['bare_p99_ms']:<9.0f} {ratio:>14}"
        )
        print(
            f"  {'':<15} events: {r['events_on_chain']} on chain, {r['events_indexer']} via the indexer, "
            f"{r['events_bare']} via the bare loop; "
            f"{r['tx_errors']} send errors; drained {r['drain_after_load_s']:.1f} s after the load stopped"
        )
    print("\n(b) time from `succeeded` published to Settled final in the CHAIN stream (confirmations 2, block 1 s)")
    print(
        f"  {'settle_batch':>12} {'tasks':>5} {'p50 s':>7} {'p99 s':>7} {'txs':>4} "
        f"{'settle gas/task':>16} {'escrow gas':>11}"
    )
    base = results["final"][-1]
    for r in results["final"]:
        print(
            f"  {r['settle_batch']:>12} {r['tasks']:>5} {r['final_p50_s']:>7.2f} {r['final_p99_s']:>7.2f} "
            f"{r['settle_transactions']:>4} {r['settle_gas_per_task']:>16,.0f} {r['escrow_gas_per_task']:>11,.0f}"
        )
    batched = results["final"][0]
    print(
        f"  batched vs one per transaction: p50 {batched['final_p50_s'] / base['final_p50_s']:.2f}x, "
        f"p99 {batched['final_p99_s'] / base['final_p99_s']:.2f}x, "
        f"settle gas per task {batched['settle_gas_per_task'] / base['settle_gas_per_task']:.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="load transactions per second (default 100)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per mode (default 15)")
    parser.add_argument("--tasks", type=int, default=50, help="tasks per settle_batch run (default 50)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    ch.install_node_modules()
    print(f"chain-indexer on anvil; {machine()}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stipple-bench-") as tmp:
        nats_server = NatsServer.start(Path(tmp) / "nats")
        anvil = ch.Anvil.start(extra_args=["--block-time", "1"])
        try:
            results = asyncio.run(bench(args, nats_server.url, anvil.url, Path(tmp)))
        finally:
            anvil.stop()
            nats_server.stop()
    report(results, args)
    print(f"\nwhole run {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), **results}, indent=2))


if __name__ == "__main__":
    main()
