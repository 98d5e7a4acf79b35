"""The gateway is stateless: two replicas on one network, one SIGKILLed under load, and an
app that retries on the other loses nothing and duplicates nothing.

The real network as processes (LocalNetwork with `gateways=2`, as two pods behind a load
balancer). An app submits a steady batch with an Idempotency-Key per task, alternating
between the two gateways, from a few threads at once. One gateway is SIGKILLed mid-batch.
Each request that fails on it (connection refused or reset) is sent again to the other
gateway with the same key. Then:

- every task ends exactly once, succeeded (read from the TASKS stream);
- each key is one task: the stream holds one `submitted` per key and no other;
- a retry on the live gateway of a request the dead one accepted is the same task id
  (idempotency lives in the TASKS stream, not in a gateway's memory);
- an API key's burst spent on one gateway is refused on the other, and still after the
  kill (rate limits live in the NATS KV bucket).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from stipple_cli.network import LocalNetwork
from stipple_testkit.faults import check_all_succeeded_once, outcomes, submitted_ids, task_body

# The network runs as processes (nine interpreters importing torch and the services): its
# start takes up to a minute and more on a cold machine, and the batch runs on three CPU
# nodes; like tests/test_faults.py it shares one test worker with the other process networks.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.xdist_group("process-networks"),
]

APP = "app-secret-0123456789abcdef"  # a steady app: plenty of rate
TIGHT = "tight-secret-0123456789abcd"  # one token a minute, burst 2: the shared limit is visible
BATCH = 12
KILL_AFTER = 4  # accepted requests before the second gateway is SIGKILLed
WORKERS = 3  # the app's concurrent requests


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    net = LocalNetwork(
        data_dir=tmp_path_factory.mktemp("replicas"),
        port=0,
        gateways=2,
        nodes=3,
        chain=False,  # nothing here is paid
        extra_env={
            "STIPPLE_API_KEYS": f"app:{APP}:6000:200,tight:{TIGHT}:1:2",
            "STIPPLE_DISPATCH_TIMEOUT_S": "120",  # the batch queues on three CPU nodes
        },
    )
    net.start(timeout=240)
    yield net
    net.stop()


def post(url: str, key: str, i: int) -> httpx.Response:
    headers = {"Authorization": f"Bearer {APP}", "Idempotency-Key": key}
    return httpx.post(f"{url}/v1/tasks", json=task_body(i), headers=headers, timeout=30)


def test_a_gateway_killed_mid_batch_loses_and_duplicates_nothing(network: LocalNetwork) -> None:
    first, second = network.gateway_urls
    assert first != second

    # the shared rate limit: a burst spent on one gateway is refused on the other
    tight = {"Authorization": f"Bearer {TIGHT}"}
    assert [httpx.get(f"{first}/v1/nodes", headers=tight).status_code for _ in range(2)] == [200, 200]
    refused = httpx.get(f"{second}/v1/nodes", headers=tight)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited"

    accepted: dict[str, tuple[str, str]] = {}  # key -> (task id, the gateway that accepted it)
    retried: list[str] = []
    lock = threading.Lock()
    enough, killed = threading.Event(), threading.Event()

    def submit(i: int) -> None:
        if i >= KILL_AFTER + WORKERS:  # the rest of the batch comes after the kill: some of it was for gateway-2
            assert killed.wait(60)
        key = f"batch-{i}"
        url, other = (first, second) if i % 2 == 0 else (second, first)
        try:
            response = post(url, key, i)
            response.raise_for_status()
        except httpx.HTTPError:  # refused, reset mid-request, or a 5xx: the app retries elsewhere
            url = other
            response = post(url, key, i)
            with lock:
                retried.append(key)
        assert response.status_code == 202, response.text
        with lock:
            accepted[key] = (response.json()["task_id"], url)
            if len(accepted) >= KILL_AFTER:
                enough.set()

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = [pool.submit(submit, i) for i in range(BATCH)]
        assert enough.wait(60), "the batch never got going"
        network.kill("gateway-2")  # SIGKILL (and wait for it to die): requests in flight on it are cut
        killed.set()
        for future in futures:
            future.result()

    task_ids = [task_id for task_id, _ in accepted.values()]
    assert len(accepted) == BATCH, accepted
    assert len(set(task_ids)) == BATCH, accepted
    after_kill = [f"batch-{i}" for i in range(KILL_AFTER + WORKERS, BATCH) if i % 2 == 1]
    assert set(after_kill) <= set(retried), retried  # sent to the dead gateway, accepted by the live one

    # a retry on the live gateway of what the dead one accepted is the same task
    by_dead = {key: task_id for key, (task_id, url) in accepted.items() if url == second}
    assert by_dead, "the killed gateway accepted nothing before it died"
    for key, task_id in by_dead.items():
        again = post(first, key, int(key.split("-")[1]))
        assert again.status_code == 202, again.text
        assert again.json()["task_id"] == task_id
    # the same key with another body is refused there too, naming the header (the stored digest)
    key = next(iter(by_dead))
    changed = post(first, key, int(key.split("-")[1]) + 100)
    assert changed.status_code == 409, changed.text
    assert "Idempotency-Key" in changed.text
    # and the shared limit outlived the gateway that spent part of it
    assert httpx.get(f"{first}/v1/nodes", headers=tight).status_code == 429

    found = asyncio.run(outcomes(network.admin_url(), task_ids, timeout=240))
    check_all_succeeded_once(found, honest=set(network.node_ids().values()))
    # one `submitted` per key, and nothing else submitted: no retry made a second task
    assert sorted(asyncio.run(submitted_ids(network.admin_url()))) == sorted(task_ids)
