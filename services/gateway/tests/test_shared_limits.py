"""Rate limits and idempotency shared by gateway replicas: two gateways (two task services,
each with its own app and memory) on one real nats-server, as two pods behind a load
balancer. The limits live in a NATS KV bucket (limits.py); a retried POST finds its task in
the TASKS stream however long after JetStream's duplicate window (tasks.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import nats
import pytest
from structlog.testing import capture_logs

from stipple_common import bus, subjects
from stipple_gateway import limits
from stipple_gateway.app import create_app
from stipple_gateway.tasks import DIGEST_HEADER

pytestmark = pytest.mark.integration

ALICE, BOB = "alice-secret-0123456789", "bob-secret-0123456789ab"
UNKNOWN = "0" * 32
TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}


def sample(gw: Any, name: str, **labels: str) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


def client(gw: Any, ip: str = "127.0.0.1", **kwargs: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(gw), client=(ip, 5000))
    return httpx.AsyncClient(transport=transport, base_url="http://gw", **kwargs)


@pytest.fixture
async def own_nc(fresh_nats_url: str) -> Any:
    """A connection to a nats-server of the test's own. Request it before make_gateway, so
    that the gateways stop before the connection drains."""
    connection = await nats.connect(fresh_nats_url)
    yield connection
    await connection.drain()


# --------------------------------------------------------------------------- rate limits


async def test_a_keys_burst_spent_on_one_gateway_is_refused_by_the_other(make_gateway):
    keys = f"alice:{ALICE}:1:3,bob:{BOB}:1:3"
    first, second = await make_gateway(api_keys=keys), await make_gateway(api_keys=keys)
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    async with client(first, headers=alice) as one, client(second, headers=alice) as two:
        for _ in range(3):
            assert (await one.get("/v1/nodes")).status_code == 200
        refused = await two.get("/v1/nodes")
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1  # one token a minute: about 60 s
        assert refused.json() == {
            "error": {
                "code": "rate_limited",
                "message": "API key 'alice' is over its limit of 1 requests per minute (burst 3); "
                f"retry in {refused.headers['retry-after']} s",
                "limit": {"key_id": "alice", "rate_per_minute": 1, "burst": 3},
            }
        }
        assert (await one.get("/v1/nodes")).status_code == 429  # the first gateway too
        assert (await two.get("/v1/nodes", headers=bob)).status_code == 200  # another key, its own bucket
    assert sample(second, "stipple_gateway_limit_leases_total", result="empty") >= 1
    assert sample(first, "stipple_gateway_limit_fallback_total", reason="unavailable") == 0


async def test_with_shared_limits_off_each_gateway_has_its_own_bucket(make_gateway):
    keys = f"alice:{ALICE}:1:2"
    first = await make_gateway(api_keys=keys, shared_limits=False)
    second = await make_gateway(api_keys=keys, shared_limits=False)
    alice = {"Authorization": f"Bearer {ALICE}"}
    for gw in (first, second):
        async with client(gw, headers=alice) as http:
            assert [(await http.get("/v1/nodes")).status_code for _ in range(3)] == [200, 200, 429]
    assert first.limits is None


async def test_a_client_ips_burst_spent_on_one_gateway_is_refused_by_the_other(make_gateway):
    first = await make_gateway(anon_rate_per_minute=1, anon_burst=2)
    second = await make_gateway(anon_rate_per_minute=1, anon_burst=2)
    async with client(first, "198.51.100.7") as one, client(second, "198.51.100.7") as two:
        assert (await one.get(f"/v1/tasks/{UNKNOWN}")).status_code == 404
        assert (await two.get(f"/v1/tasks/{UNKNOWN}")).status_code == 404
        refused = await two.get(f"/v1/tasks/{UNKNOWN}")
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "rate_limited"
        assert "client 198.51.100.7" in error["message"]
        assert "STIPPLE_ANON_RATE_PER_MINUTE=1" in error["message"]
        assert error["limit"] == {"client": "198.51.100.7", "rate_per_minute": 1, "burst": 2}
        assert (await one.get(f"/v1/tasks/{UNKNOWN}")).status_code == 429
    async with client(second, "198.51.100.8") as other:
        assert (await other.get(f"/v1/tasks/{UNKNOWN}")).status_code == 404  # another IP, its own bucket
    assert sample(second, "stipple_gateway_refused_total", limit="anon_rate") == 1
    assert sample(first, "stipple_gateway_refused_total", limit="anon_rate") == 1
    kv = await first.js.key_value(first.settings.limits_bucket)
    assert set(await kv.keys()) == {limits.client_limit_name(ip) for ip in ("198.51.100.7", "198.51.100.8")}
    assert "198.51.100" not in str(await kv.keys())  # the bucket holds digests, not addresses


async def test_leases_make_few_kv_writes_and_never_more_than_the_burst(make_gateway, monkeypatch):
    monkeypatch.setattr(limits, "LEASE_S", 600.0)  # no lease lapses, however slow this machine is
    burst = 100  # a lease takes 5 tokens
    keys = f"alice:{ALICE}:1:{burst}"
    gateways = [await make_gateway(api_keys=keys), await make_gateway(api_keys=keys)]
    alice = {"Authorization": f"Bearer {ALICE}"}
    admitted = 0
    async with client(gateways[0], headers=alice) as one, client(gateways[1], headers=alice) as two:
        refused = [False, False]
        for turn in range(4 * burst):  # alternately, until both refuse (every leased token spent)
            side = turn % 2
            status = (await (one, two)[side].get("/v1/nodes")).status_code
            assert status in (200, 429)
            admitted += status == 200
            refused[side] = status == 429
            if all(refused):
                break
        assert all(refused)
    size = limits.lease_size(burst)
    assert size == 5
    assert admitted == burst  # every token spent once, across both gateways, none made
    leases = sum(sample(gw, "stipple_gateway_limit_leases_total", result="leased") for gw in gateways)
    assert leases == burst / size  # one KV write per lease of 5, not one per request


def test_lease_sizes_and_bucket_names():
    assert [limits.lease_size(b) for b in (1, 3, 39, 40, 100, 1000, 10**6)] == [1, 1, 1, 2, 5, 50, 50]
    assert limits.key_limit_name("alice") == "key.alice"
    assert limits.key_limit_name("team.app-1") == "key.team.app-1"
    odd = limits.key_limit_name("ends.")  # no valid KV key as it is
    assert odd.startswith("keyh.")
    assert "ends" not in odd
    v6 = limits.client_limit_name("2001:db8::1")
    assert v6.startswith("ip.")
    assert ":" not in v6
    assert v6 != limits.client_limit_name("2001:db8::2")


async def test_without_the_kv_bucket_requests_are_served_by_each_gateways_own_bucket(make_gateway):
    gw = await make_gateway(api_keys=f"alice:{ALICE}:1:2")
    await gw.js.delete_key_value(gw.settings.limits_bucket)  # NATS KV cannot answer for it now
    alice = {"Authorization": f"Bearer {ALICE}"}
    async with client(gw, headers=alice) as http:
        with capture_logs() as logs:
            served = [(await http.get("/v1/nodes")).status_code for _ in range(3)]
        assert served == [200, 200, 429]  # served (fail open), and still limited by this gateway's bucket
        assert [e["event"] for e in logs].count("shared_limits_unavailable") == 1
        assert sample(gw, "stipple_gateway_limit_fallback_total", reason="unavailable") == 3
        # later (past limits.RETRY_S) the gateway makes the bucket again and shares it again
        assert gw.limits is not None
        clock = gw.limits.monotonic
        gw.limits.monotonic = lambda: clock() + 2 * limits.RETRY_S
        with capture_logs() as logs:
            again = await http.get("/v1/nodes")
        assert again.status_code == 200  # the shared bucket (new, so full) answers again
        assert "shared_limits_restored" in [e["event"] for e in logs]
    kv = await gw.js.key_value(gw.settings.limits_bucket)
    assert await kv.keys() == [limits.key_limit_name("alice")]
    assert sample(gw, "stipple_gateway_limit_fallback_total", reason="unavailable") == 3


# --------------------------------------------------------------------------- idempotency


async def submitted_messages(gw: Any, task_id: str) -> list[bus.StoredMessage]:
    return await bus.read_stored(gw.js, subjects.TASKS_STREAM, subjects.task_subject(task_id, "submitted"))


async def wait_out_the_duplicate_window(js: Any) -> None:
    """Publish a probe with a message id, then again until the stream stores it again: the
    ids published before the probe's first publish are forgotten by then too."""
    subject, msg_id = f"tasks.{uuid.uuid4().hex}.probe", uuid.uuid4().hex
    assert not (await js.publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id})).duplicate
    for _ in range(300):
        if not (await js.publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id})).duplicate:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the duplicate window did not pass within 15 s")


async def test_a_retry_after_the_duplicate_window_is_the_same_task_on_any_gateway(own_nc, make_gateway):
    first, second = await make_gateway(own_nc), await make_gateway(own_nc)
    config = (await own_nc.jetstream().stream_info(subjects.TASKS_STREAM)).config
    config.duplicate_window = 1.0  # seconds: so that the test outlives it
    await own_nc.jetstream().update_stream(config)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    async with client(first) as one, client(second) as two:
        accepted = await one.post("/v1/tasks", json=TASK, headers=key)
        assert accepted.status_code == 202, accepted.text
        task_id, seed = accepted.json()["task_id"], accepted.json()["seed"]
        await wait_out_the_duplicate_window(own_nc.jetstream())
        # the same body, spelled otherwise (key order, spacing): the same request
        retried = await two.post(
            "/v1/tasks",
            content=json.dumps(dict(reversed(TASK.items())), indent=2),
            headers={**key, "Content-Type": "application/json"},
        )
        assert retried.status_code == 202, retried.text
        assert retried.json()["task_id"] == task_id
        assert retried.json()["seed"] == seed  # the stored task's drawn seed, not a new draw
        stored = await submitted_messages(second, task_id)
        assert len(stored) == 1  # not published again
        assert len(stored[0].headers[DIGEST_HEADER]) == 64

        changed = await two.post("/v1/tasks", json={**TASK, "prompt": "a wolf"}, headers=key)
        assert changed.status_code == 409, changed.text
        error = changed.json()["error"]
        assert error["code"] == "idempotency_conflict"
        assert error["field"] == "Idempotency-Key"
        assert "Idempotency-Key" in error["message"]
        assert "the body differs" in error["message"]
        assert task_id in error["message"]
        # the same key on another route (SDCN's shape of error)
        sdcn = await one.post("/txt2img", json={"prompt": "a fox", "model": "tiny-sd"}, headers=key)
        assert sdcn.status_code == 409
        assert sdcn.json()["msg"].startswith("Idempotency-Key: this key was used for task")
        assert len(await submitted_messages(first, task_id)) == 1
    assert sample(first, "stipple_gateway_tasks_submitted_total", source="native") == 1
    assert sample(second, "stipple_gateway_tasks_submitted_total", source="native") == 0


async def test_a_synchronous_retry_of_a_finished_task_answers_its_outcome(make_gateway):
    gw = await make_gateway()  # no node runs anything: the task waits until it is cancelled
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"prompt": "a fox", "model": "tiny-sd", "width": 64, "height": 64, "steps": 2}
    async with client(gw) as http:
        waited = await http.post("/txt2img", json=body, headers=key)
        assert waited.status_code == 504  # STIPPLE_SYNC_TIMEOUT_S (0.5 s here); the task goes on
        task_id = waited.json()["msg"].split()[1]
        assert (await http.delete(f"/v1/tasks/{task_id}")).status_code == 202
        retried = await http.post("/txt2img", json=body, headers=key)
        assert retried.status_code == 502, retried.text  # the stored outcome, not a new task
        assert retried.json()["msg"].startswith(f"task {task_id} was cancelled")
        assert len(await submitted_messages(gw, task_id)) == 1


async def test_without_an_idempotency_key_every_post_is_a_new_task(make_gateway):
    gw = await make_gateway()
    async with client(gw) as http:
        ids = {(await http.post("/v1/tasks", json=TASK)).json()["task_id"] for _ in range(2)}
        assert len(ids) == 2
        empty = await http.post("/v1/tasks", json=TASK, headers={"Idempotency-Key": ""})
        assert empty.status_code == 202
        assert empty.json()["task_id"] not in ids
    for task_id in ids:
        assert DIGEST_HEADER not in (await submitted_messages(gw, task_id))[0].headers
