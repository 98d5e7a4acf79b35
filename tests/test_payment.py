"""Custodial payment: the gateway refuses (402, with the balance and the price) a paid
task that the deposit held for its apps cannot pay, and accepts the ones it can; the
chain-indexer (embedded chain) holds that deposit and escrows each accepted fee."""

from __future__ import annotations

import asyncio
import time

import httpx
import nats
import pytest

from stipple_chain_indexer.service import IndexerSettings
from stipple_chain_indexer.service import serve as serve_indexer
from stipple_common import bus, subjects
from stipple_common.blobstore import open_blob_store
from stipple_common.identity import dev_node_id
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_common.service import open_service
from stipple_gateway.app import Gateway, GatewaySettings, create_app
from stipple_testkit.nodes import joined

pytestmark = pytest.mark.integration

DEPOSIT = 5_000
TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}


@pytest.fixture
async def gateway(fresh_nats_url):
    settings = IndexerSettings(nats_url=fresh_nats_url, confirmations=0, embedded_deposit=DEPOSIT, settle_wait_s=0.1)
    stop = asyncio.Event()
    async with open_service("chain-indexer", settings, stop=stop) as ctx:
        indexer = asyncio.create_task(serve_indexer(ctx, settings))
        nc = await nats.connect(fresh_nats_url)
        js = nc.jetstream()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the indexer deploys, then writes the deployment
            try:
                await (await js.key_value(subjects.CHAIN_BUCKET)).get("deployment")
                break
            except Exception:
                await asyncio.sleep(0.1)
        blobs = await open_blob_store(backend="jetstream", js=js, bucket="payment-test")
        gw = Gateway(nc, js, blobs, NodeDirectory(ttl_s=60), GatewaySettings(), Metrics("gateway"))
        for name in "abc":  # three nodes (of three operators: each staked for itself)
            gw.directory.apply(joined(dev_node_id(name)), seen_at=time.time())
        await gw.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw") as http:
            yield http, js
        await gw.stop()
        await blobs.close()
        await nc.close()
        stop.set()
        await asyncio.wait_for(indexer, 20)


async def test_the_deposit_pays_what_it_can_and_the_rest_gets_402(gateway):
    http, js = gateway
    first = await http.post("/v1/tasks", json={**TASK, "fee": 3_000})
    assert first.status_code == 202, first.text
    free = await http.post("/v1/tasks", json=TASK)  # no fee: never refused for money
    assert free.status_code == 202
    await asyncio.sleep(0.5)  # the settler escrows the first fee (the reservation ends, the chain has it)
    refused = await http.post("/v1/tasks", json={**TASK, "fee": 2_500})
    assert refused.status_code == 402, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_deposit"
    assert (error["field"], error["value"], error["balance"], error["price"]) == ("fee", 2_500, 2_000, 2_500)
    assert "holds 2000, this task costs 2500" in error["message"]
    fits = await http.post("/v1/tasks", json={**TASK, "fee": 2_000})
    assert fits.status_code == 202
    # nothing of the refused task reached the network
    msgs = await bus.read_messages(js, subjects.TASKS_STREAM, "tasks.*.submitted")
    assert len(msgs) == 3


async def test_a_burst_cannot_spend_one_balance_twice(gateway):
    http, _ = gateway
    answers = await asyncio.gather(*(http.post("/v1/tasks", json={**TASK, "fee": 2_000}) for _ in range(4)))
    assert sorted(a.status_code for a in answers) == [202, 202, 402, 402]


async def test_a_retried_request_for_one_task_is_charged_once(gateway):
    http, _ = gateway
    key = {"Idempotency-Key": "retry-1"}
    first = await http.post("/v1/tasks", json={**TASK, "fee": 3_000}, headers=key)
    again = await http.post("/v1/tasks", json={**TASK, "fee": 3_000}, headers=key)  # before the escrow
    assert first.json()["task_id"] == again.json()["task_id"]
    await asyncio.sleep(0.5)
    late = await http.post("/v1/tasks", json={**TASK, "fee": 3_000}, headers=key)  # after it
    assert late.status_code == 202
    rest = await http.post("/v1/tasks", json={**TASK, "fee": 2_000})
    assert rest.status_code == 202, rest.text  # 5,000 - 3,000 once
