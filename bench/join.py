"""What zero trust costs: joining through the auth callout, and uploading through the intake.

One secured nats-server (stipple_common.natsserver.start_secured) and the real
gatekeeper in this process. Measured in the same run, alternating:

- connect: a node connecting with its key (the server's nonce signed, the gatekeeper's
  callout deciding from its registry, the node's consumers confirmed) against the
  baseline, a control-plane service connecting with its password (no callout); sequential
  connects, then `--parallel` at once;
- upload: one image of `--image-kb` through the blob intake (`IntakeClient.put`: a
  request per 256 KiB part, the write into the JetStream object store) against the
  baseline, the same bytes put straight into the object store by a trusted service.

    python bench/join.py [--connects 200] [--parallel 50] [--uploads 100] [--image-kb 40]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import nats
from eth_account import Account

from stipple_common import bus, subjects
from stipple_common.blobstore import open_blob_store
from stipple_common.blobstore.intake import IntakeClient
from stipple_common.identity import node_id_of
from stipple_common.messages import IndexedStake, TaskAssigned
from stipple_common.natsserver import start_secured
from stipple_common.service import nats_identity, open_service
from stipple_gatekeeper.service import GatekeeperSettings, serve


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(name: str, ours: list[float], base: list[float]) -> str:
    p50, b50 = statistics.median(ours), statistics.median(base)
    p99, b99 = pct(ours, 0.99), pct(base, 0.99)
    return (
        f"| {name} | {p50 * 1e3:.2f} / {p99 * 1e3:.2f} ms | {b50 * 1e3:.2f} / {b99 * 1e3:.2f} ms "
        f"| {p50 / b50:.2f} / {p99 / b99:.2f} |"
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server, credentials = start_secured(Path(tmp) / "nats")
        stop = asyncio.Event()
        settings = GatekeeperSettings(
            nats_url=credentials.service_url(server.url, "gatekeeper"),
            issuer_seed=credentials.issuer_seed,
            callout_seed=credentials.callout_seed,
            system_url=credentials.system_url(server.url),
            min_stake=1,
            check_assignment=True,
        )
        try:
            async with open_service("gatekeeper", settings, blobs=True, stop=stop) as ctx:
                task = asyncio.create_task(serve(ctx, settings))
                admin = await nats.connect(credentials.service_url(server.url, "validator"))
                js = admin.jetstream()
                stakes = await js.key_value(subjects.STAKES_BUCKET)
                accounts = [Account.create() for _ in range(max(args.connects, args.parallel))]
                for account in accounts:
                    await stakes.put(node_id_of(account.address), msgspec.json.encode(IndexedStake(stake=1)))
                await asyncio.sleep(0.5)
                service_url = credentials.service_url(server.url, "dispatcher")

                async def node_connect(account) -> float:
                    started = time.perf_counter()
                    nc = await nats.connect(server.url, **nats_identity(account), max_reconnect_attempts=0)
                    elapsed = time.perf_counter() - started
                    await nc.close()
                    return elapsed

                async def service_connect() -> float:
                    started = time.perf_counter()
                    nc = await nats.connect(service_url, max_reconnect_attempts=0)
                    elapsed = time.perf_counter() - started
                    await nc.close()
                    return elapsed

                ours, base = [], []
                for account in accounts[: args.connects]:  # alternating
                    ours.append(await node_connect(account))
                    base.append(await service_connect())
                started = time.perf_counter()
                await asyncio.gather(*(node_connect(a) for a in accounts[: args.parallel]))
                parallel_node = time.perf_counter() - started
                started = time.perf_counter()
                await asyncio.gather(*(service_connect() for _ in range(args.parallel)))
                parallel_service = time.perf_counter() - started

                # uploads: one node assigned to one task, its images through the intake
                uploader = accounts[0]
                node_id = node_id_of(uploader.address)
                task_id = uuid.uuid4().hex
                assigned = TaskAssigned(task_id=task_id, nodes=[node_id], deadline=time.time() + 600)
                await bus.publish(js, subjects.task_subject(task_id, "assigned"), assigned, msg_id=task_id)
                node_nc = await nats.connect(server.url, **nats_identity(uploader))
                intake = IntakeClient(node_nc, node_id)
                direct = await open_blob_store(backend="jetstream", js=js, bucket=subjects.IMAGES_BUCKET)
                data = os.urandom(args.image_kb * 1024)
                up, put = [], []
                for i in range(args.uploads):
                    started = time.perf_counter()
                    await intake.put(f"tasks/{task_id}/{node_id}/bench/{i}.png", data, content_type="image/png")
                    up.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await direct.put(f"bench/{task_id}/{i}.png", data, content_type="image/png")
                    put.append(time.perf_counter() - started)
                await node_nc.close()
                await admin.close()
                stop.set()
                await task
        finally:
            server.stop()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    print("| measured | ours p50 / p99 | baseline p50 / p99 | ratio p50 / p99 |")
    print("|---|---|---|---|")
    print(row(f"connect ({args.connects}, sequential): node key via callout vs service password", ours, base))
    print(row(f"upload {args.image_kb} KiB ({args.uploads}): intake vs direct object-store put", up, put))
    print(
        f"| {args.parallel} connects at once | {parallel_node * 1e3:.0f} ms | {parallel_service * 1e3:.0f} ms "
        f"| {parallel_node / parallel_service:.2f} |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--image-kb", type=int, default=40)
    asyncio.run(main(parser.parse_args()))
