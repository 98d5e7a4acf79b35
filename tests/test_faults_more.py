"""Nothing is lost, part two (issue 15): a node frozen with SIGSTOP, the gateway SIGKILLed
mid-task, the blob store unreachable for a while. Every task still ends exactly once, with
the right outcome, and nothing an app was promised is lost.

The real network as processes (LocalNetwork, as `stipple up` runs it), as in
tests/test_faults.py, whose helpers are in stipple_testkit.faults. Each test submits a
batch over HTTP, makes one part fail while the batch is in flight, lets it come back, and
then checks every task's events in the stream (one outcome each, the right one, no honest
node judged wrong), and what the app can read from the gateway.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stipple_cli.network import LocalNetwork
from stipple_common.messages import NodeErrored, TaskAborted, TaskCommitted, TaskSucceeded
from stipple_gateway.webhooks import app_secret, verify
from stipple_testkit import free_port
from stipple_testkit.faults import (
    TcpProxy,
    WebhookReceiver,
    check_all_succeeded_once,
    check_ended_once,
    computing,
    ended,
    events_of,
    outcomes,
    submit_batch,
    wait_ended,
    wait_live,
)

# The network runs as processes (eight interpreters importing torch and the services): its
# start takes up to a minute and more on a cold machine, and each test here waits out a
# deadline or an outage on top of a batch (about two minutes on a loaded 2-core machine),
# so these have seven; they share one test worker (xdist_group "process-networks", see
# conftest.py) with tests/test_faults.py instead of starting two networks at once.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.xdist_group("process-networks"),
]

BATCH = 6
WEBHOOK_SECRET = "fault-tests-webhook-master-secret"
OUTCOME_TYPES = (TaskSucceeded, TaskAborted)

SETTINGS = {
    "STIPPLE_VALIDATION_RATE": "1",  # every task on three nodes: a frozen one leaves two
    "STIPPLE_TASK_TIMEOUT_S": "20",  # a silent node's commitment is given up after this
    "STIPPLE_DISPATCH_TIMEOUT_S": "150",  # queued tasks outwait a freeze, a restart or an outage
}


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    net = LocalNetwork(
        data_dir=tmp_path_factory.mktemp("faults-more"),
        port=0,
        nodes=3,
        extra_env={
            **SETTINGS,
            "STIPPLE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STIPPLE_WEBHOOK_ALLOW_PRIVATE": "true",  # the test's receiver is on loopback
            "STIPPLE_WEBHOOK_BACKOFF_S": "0.5",
            # the most a synchronous call waits (the one retried after the restart included)
            "STIPPLE_SYNC_TIMEOUT_S": "30",
        },
    )
    net.start(timeout=240)
    yield net
    for name in ("node-1", "node-2", "node-3"):
        net.thaw(name)  # a frozen process would outwait SIGTERM
    net.stop()


# --------------------------------------------------------------------------- a node frozen


async def test_a_node_frozen_mid_task_is_timed_out_its_late_work_ignored_and_it_works_again(
    network: LocalNetwork,
) -> None:
    wait_live(network, 3)
    ids = network.node_ids()
    frozen = ids["node-2"]
    admin = network.admin_url()
    task_ids = submit_batch(network.gateway_url, BATCH, steps=20)
    victim = await computing(admin, task_ids, frozen)
    network.freeze("node-2")
    try:
        # frozen through its heartbeats' TTL and the commit deadline: the two others decide
        first = await outcomes(admin, [victim], timeout=90)
    finally:
        network.thaw("node-2")
    assert first[victim], "the task of the frozen node never ended"
    decided = first[victim][0]
    assert isinstance(decided, TaskSucceeded), decided
    assert decided.verdicts == {ids["node-1"]: "agree", frozen: "timeout", ids["node-3"]: "agree"}
    assert decided.qos[frozen] == 0
    assert all(frozen not in image.key for image in decided.images)

    # thawed, it carries on: its late work for the decided task reaches the stream, and is
    # not believed (no second outcome, the verdict stands)
    late = await late_work(admin, victim, frozen)
    assert any(isinstance(e, TaskCommitted) for e in late), f"no late commitment from the thawed node: {late}"
    found = await outcomes(admin, task_ids, timeout=240)
    check_ended_once(found)
    assert found[victim] == [decided]
    # nor does its redelivered assignment (its ack wait ran out while it was frozen) turn into
    # an `errored` after its commitment: that would be `withheld`, a slashable verdict
    mine = [e for e in await events_of(admin, victim) if getattr(e, "node_id", None) == frozen]
    assert not [e for e in mine if isinstance(e, NodeErrored)], mine
    async with httpx.AsyncClient(base_url=network.gateway_url, timeout=30) as http:
        view = (await http.get(f"/v1/tasks/{victim}")).json()
    assert view["status"] == "succeeded", view
    assert view["outcome"]["verdicts"][frozen] == "timeout", view

    # never slashed: a timeout (QoS 0) is all being frozen costs; and it gets work again
    # (with three nodes, every other task of the batch needs it)
    check_all_succeeded_once(found, honest=set(ids.values()))
    verdicts = [found[t][0].verdicts.get(frozen) for t in task_ids if t != victim]
    assert "agree" in verdicts, f"the thawed node agreed on no later task: {verdicts}"
    after = submit_batch(network.gateway_url, 2, steps=6)
    again = await outcomes(admin, after, timeout=120)
    check_all_succeeded_once(again, honest=set(ids.values()))
    assert [again[t][0].verdicts[frozen] for t in after] == ["agree", "agree"]


async def late_work(nats_url: str, task_id: str, node: str, timeout: float = 60.0) -> list[Any]:
    """What `node` published about `task_id` after its outcome (a commitment, an error)."""
    deadline = time.monotonic() + timeout
    while True:
        events = await events_of(nats_url, task_id)
        outcome_at = next(i for i, e in enumerate(events) if isinstance(e, OUTCOME_TYPES))
        after = [e for e in events[outcome_at + 1 :] if getattr(e, "node_id", None) == node]
        if any(isinstance(e, (TaskCommitted, NodeErrored)) for e in after) or time.monotonic() > deadline:
            return after
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- the gateway killed


class Watcher(threading.Thread):
    """An app watching a task's events over SSE: the event names it got, and how it ended."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[str] = []
        self.error: str = ""

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=httpx.Timeout(10.0, read=120.0)) as response:
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        self.events.append(line.partition(":")[2].strip())
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"


class SyncCall(threading.Thread):
    """An app waiting on the synchronous SDCN route: its answer, or how the call failed."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.status = 0
        self.answer: dict[str, Any] = {}
        self.error = ""

    def run(self) -> None:
        body = {"prompt": "a lighthouse, waited for", "steps": 12, "width": 128, "height": 128, "model": "tiny-sd"}
        try:
            response = httpx.post(self.url, json=body, headers={"Idempotency-Key": self.key}, timeout=120)
            self.status, self.answer = response.status_code, response.json()
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"


async def test_the_gateway_killed_mid_batch_loses_no_outcome_and_no_webhook(network: LocalNetwork) -> None:
    wait_live(network, 3)
    admin = network.admin_url()
    honest = set(network.node_ids().values())
    gateway = network.gateway_url
    with WebhookReceiver() as receiver:
        task_ids = submit_batch(gateway, BATCH, steps=12, webhook_url=receiver.url)
        watchers = [Watcher(f"{gateway}/v1/tasks/{t}/events") for t in task_ids[:2]]
        sync = SyncCall(f"{gateway}/txt2img", key=f"fault-test-{time.time_ns()}")
        for thread in (*watchers, sync):
            thread.start()
        await asyncio.sleep(1.0)  # some tasks assigned, some queued, the watchers connected
        network.kill("gateway")
        await asyncio.sleep(1.0)  # a POST the dead gateway had sent is recorded by now
        delivered_before = set(receiver.by_task())
        ended_before = await ended(admin, task_ids)
        # the network goes on without it: wait until tasks end while it is down
        done = await wait_ended(admin, task_ids, count=min(BATCH, len(ended_before) + 2))
        ended_while_down = done - ended_before - delivered_before
        assert ended_while_down, "no task ended while the gateway was down"
        # the apps saw their connections end, not hang
        for thread in (*watchers, sync):
            thread.join(timeout=30)
            assert not thread.is_alive(), "a client of the killed gateway still hangs"
        assert sync.error or sync.status == 200, (sync.status, sync.answer)
        network.restart("gateway")
        wait_live(network, 3)

        # the synchronous call, retried with its Idempotency-Key, is the same task, and answers
        async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
            retried = SyncCall(f"{gateway}/txt2img", key=sync.key)
            await asyncio.to_thread(retried.run)
            assert retried.status == 200, (retried.status, retried.answer, retried.error)
            assert len(retried.answer["images"]) == 1
            sync_task = retried.answer["task_id"]
            if sync.status == 200:
                assert sync.answer["task_id"] == sync_task

            found = await outcomes(admin, [*task_ids, sync_task], timeout=240)
            check_all_succeeded_once(found, honest)
            # every outcome can be read from the restarted gateway, images too
            for task_id in task_ids:
                view = (await http.get(f"/v1/tasks/{task_id}")).json()
                assert view["status"] == "succeeded", view
                assert view["outcome"]["verdicts"] == found[task_id][0].verdicts
                assert (await http.get(f"/v1/tasks/{task_id}/images/0")).status_code == 200
            # a watcher that reconnects gets the whole story, to the outcome
            for watcher in watchers:
                again = Watcher(watcher.url)
                await asyncio.to_thread(again.run)
                assert again.events[-1:] == ["succeeded"], (again.events, again.error)

        # every webhook is delivered, signed; those of tasks that ended while the gateway was
        # down once each, by the restarted gateway
        got = receiver.wait_for(task_ids, timeout=90)
        secret = app_secret(WEBHOOK_SECRET, "")
        for task_id in task_ids:
            deliveries = got.get(task_id, [])
            assert deliveries, f"task {task_id}: no webhook"
            for delivery in deliveries:
                verify(secret, delivery.headers, delivery.body)
                assert delivery.headers["webhook-id"] == f"msg_{task_id}_succeeded"
        twice = {t: len(got[t]) for t in ended_while_down if len(got[t]) != 1}
        assert not twice, f"webhooks of tasks that ended while the gateway was down, not once: {twice}"


# --------------------------------------------------------------------------- the blob store unreachable


@pytest.fixture(scope="module")
def store_proxy() -> Iterator[TcpProxy]:
    """moto's S3 on loopback, behind a proxy the test cuts: the store unreachable for a while
    (connections refused, open ones reset), then back with everything it held."""
    from moto.server import ThreadedMotoServer

    port = free_port("127.0.0.1")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    proxy = TcpProxy(("127.0.0.1", port)).start()
    yield proxy
    proxy.stop()
    moto.stop()


@pytest.fixture(scope="module")
def s3_network(tmp_path_factory: pytest.TempPathFactory, store_proxy: TcpProxy) -> Iterator[LocalNetwork]:
    net = LocalNetwork(
        data_dir=tmp_path_factory.mktemp("faults-store"),
        port=0,
        nodes=3,
        extra_env={
            **SETTINGS,
            "STIPPLE_BLOB_BACKEND": "s3",
            "STIPPLE_S3_ENDPOINT": store_proxy.endpoint,
            "STIPPLE_S3_ACCESS_KEY": "fault-tests",
            "STIPPLE_S3_SECRET_KEY": "fault-tests-secret",
        },
    )
    net.start(timeout=240)
    yield net
    net.stop()


async def test_tasks_during_a_blob_store_outage_succeed_after_it_or_end_typed_and_no_node_is_slashed(
    s3_network: LocalNetwork, store_proxy: TcpProxy
) -> None:
    network = s3_network
    wait_live(network, 3)
    admin = network.admin_url()
    honest = set(network.node_ids().values())

    # away for less than the commit deadline: the nodes keep their results and store them once
    # it is back (they wait it out in place), and every task succeeds
    store_proxy.cut()
    try:
        brief = submit_batch(network.gateway_url, 3, steps=6)
        await asyncio.sleep(8.0)  # the nodes finish and fail to store their images meanwhile
    finally:
        store_proxy.restore()
    found = await outcomes(admin, brief, timeout=180)
    check_all_succeeded_once(found, honest)
    async with httpx.AsyncClient(base_url=network.gateway_url, timeout=30) as http:
        for task_id in brief:
            assert (await http.get(f"/v1/tasks/{task_id}/images/0")).status_code == 200

    # away past the deadline: the task ends while the store is still away (it does not hang),
    # typed, each node saying why (an honest `error`, not a slashable verdict, nor a
    # `timeout` that would pause it)
    store_proxy.cut()
    try:
        (long,) = submit_batch(network.gateway_url, 1, steps=6)
        decided = check_ended_once(await outcomes(admin, [long], timeout=120))[long]
    finally:
        store_proxy.restore()
    assert isinstance(decided, TaskAborted), decided
    assert decided.reason == "too_few_results", decided
    assert decided.verdicts == dict.fromkeys(honest, "error"), decided
    errors = [e for e in await events_of(admin, long) if isinstance(e, NodeErrored)]
    assert sorted(e.node_id for e in errors) == sorted(honest)
    assert {e.code for e in errors} == {"store_unavailable"}, errors

    # back: new tasks succeed on the same nodes (none paused)
    after = submit_batch(network.gateway_url, 2, steps=6)
    again = await outcomes(admin, after, timeout=150)
    check_all_succeeded_once(again, honest)
    assert all(set(again[t][0].verdicts) == honest for t in after)
