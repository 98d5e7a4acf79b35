"""Reads that cost the server nothing, and the caps on what one caller may hold open.

A task's view and its events stream's stored phase are read by JetStream Direct Get: no
consumer is created (watched on the JetStream API subjects and its advisories, and
counted on the stream). Events streams are capped per gateway and per caller, and end
after ``STIPPLE_SSE_MAX_S``; callers without an API key are limited per client IP, which
is the socket peer unless a trusted proxy says otherwise. Against a real nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import httpx
import pytest

from stipple_common import bus, subjects
from stipple_common.settings import InvalidSettings
from stipple_gateway.app import create_app
from stipple_gateway.auth import ClientLimits, client_ip, parse_trusted_proxies
from stipple_gateway.errors import ApiError

pytestmark = pytest.mark.integration

TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}
UNKNOWN = "ab" * 16


def sample(gw: Any, name: str, **labels: str) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


async def wait_for_streams(gw: Any, count: int) -> None:
    """The server gives a slot back when it sees the client gone (a few loop turns later)."""
    for _ in range(500):
        if sample(gw, "stipple_gateway_sse_streams") == count:
            return
        await asyncio.sleep(0.01)
    assert sample(gw, "stipple_gateway_sse_streams") == count


async def submit(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/tasks", json=TASK)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


@contextlib.asynccontextmanager
async def consumer_spy(nc: Any) -> Any:
    """Every JetStream consumer request (create, delete, info) and creation advisory."""
    seen: list[str] = []

    async def saw(msg: Any) -> None:
        seen.append(msg.subject)

    subs = [
        await nc.subscribe("$JS.API.CONSUMER.>", cb=saw),
        await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{subjects.TASKS_STREAM}.>", cb=saw),
    ]
    try:
        yield seen
    finally:
        await nc.flush()
        for sub in subs:
            await sub.unsubscribe()


# --------------------------------------------------------------------------- no consumer per read


async def test_task_reads_and_event_streams_create_no_consumer(make_gateway, serve_http, nc):
    gw = await make_gateway()
    url = await serve_http(gw)
    consumers_before = (await gw.js.stream_info(subjects.TASKS_STREAM)).state.consumer_count
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await submit(http)
        async with consumer_spy(nc) as seen:
            for _ in range(20):
                assert (await http.get(f"/v1/tasks/{UNKNOWN}")).status_code == 404
                view = await http.get(f"/v1/tasks/{task_id}")
                assert view.status_code == 200
                assert view.json()["status"] == "pending"
            for _ in range(5):
                assert (await http.get(f"/v1/tasks/{UNKNOWN}/events")).status_code == 404
            assert (await http.delete(f"/v1/tasks/{task_id}")).status_code == 202
            for _ in range(10):
                async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
                    lines = [line async for line in response.aiter_lines() if line.startswith("event:")]
                assert lines == ["event: submitted", "event: cancelled"]
            await nc.flush()
        assert seen == []
        after = await gw.js.stream_info(subjects.TASKS_STREAM)
        assert after.state.consumer_count == consumers_before
        assert after.config.allow_direct is True

        async with consumer_spy(nc) as control:  # the spy sees a consumer when one is made
            assert len(await bus.read_messages(gw.js, subjects.TASKS_STREAM, subjects.task_events(task_id))) == 2
            await nc.flush()
        assert any(s.startswith("$JS.API.CONSUMER.CREATE") for s in control)


async def test_direct_reads_return_what_the_consumer_read_returned(make_gateway, asgi_client):
    """Same messages, ids, subjects, headers, sequences and stored-at timestamps."""
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        task_id = await submit(http)
        assert (await http.delete(f"/v1/tasks/{task_id}")).status_code == 202
    subject = subjects.task_events(task_id)
    direct = await bus.read_direct(gw.js, subjects.TASKS_STREAM, subject, batch=1)  # one message a batch
    consumed = await bus.read_messages(gw.js, subjects.TASKS_STREAM, subject)
    assert [(m.subject, m.data, m.headers["Nats-Msg-Id"], m.seq, m.time) for m in direct] == [
        (m.subject, m.data, m.headers["Nats-Msg-Id"], m.metadata.sequence.stream, m.metadata.timestamp.timestamp())
        for m in consumed
    ]
    assert await bus.read_direct(gw.js, subjects.TASKS_STREAM, subjects.task_events(UNKNOWN)) == []


async def test_a_stream_without_direct_get_is_read_by_a_consumer(nc):
    js = nc.jetstream()
    prefix = f"nodirect{uuid.uuid4().hex[:8]}"
    name = prefix.upper()
    await js.add_stream(name=name, subjects=[f"{prefix}.>"])
    try:
        await js.publish(f"{prefix}.a.one", b"1", headers={"Nats-Msg-Id": "one"})
        with pytest.raises(bus.DirectGetUnavailable):
            await bus.read_direct(js, name, f"{prefix}.a.>")
        stored = await bus.read_stored(js, name, f"{prefix}.a.>")
        assert [(m.subject, m.data, m.headers["Nats-Msg-Id"]) for m in stored] == [(f"{prefix}.a.one", b"1", "one")]
    finally:
        await js.delete_stream(name)


# --------------------------------------------------------------------------- caps on events streams


async def test_events_streams_are_capped_per_client_and_given_back_when_closed(make_gateway, serve_http):
    gw = await make_gateway(max_sse_per_client=2, max_sse_streams=100)
    url = await serve_http(gw)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await submit(http)
        async with contextlib.AsyncExitStack() as open_streams:
            for _ in range(2):
                response = await open_streams.enter_async_context(http.stream("GET", f"/v1/tasks/{task_id}/events"))
                assert response.status_code == 200
            await wait_for_streams(gw, 2)
            refused = await http.get(f"/v1/tasks/{task_id}/events")
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "10"
            error = refused.json()["error"]
            assert (error["code"], error["field"], error["value"]) == ("too_many_streams", "events", 2)
            assert "STIPPLE_MAX_SSE_PER_CLIENT=2" in error["message"]
            assert "127.0.0.1" in error["message"]
            assert error["limit"] == {"name": "STIPPLE_MAX_SSE_PER_CLIENT", "max": 2}
            assert (await http.get(f"/v1/tasks/{task_id}/events")).status_code == 429
        await wait_for_streams(gw, 0)  # both closed by the client: their slots are back
        async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            assert response.status_code == 200
    assert sample(gw, "stipple_gateway_refused_total", limit="sse_per_client") == 2


async def test_events_streams_are_capped_per_gateway(make_gateway, serve_http):
    keys = "a:" + "a" * 16 + ":600,b:" + "b" * 16 + ":600"
    gw = await make_gateway(max_sse_streams=1, max_sse_per_client=0, api_keys=keys)
    url = await serve_http(gw)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        key_a, key_b = {"Authorization": "Bearer " + "a" * 16}, {"Authorization": "Bearer " + "b" * 16}
        task_a = (await http.post("/v1/tasks", json=TASK, headers=key_a)).json()["task_id"]
        task_b = (await http.post("/v1/tasks", json=TASK, headers=key_b)).json()["task_id"]
        async with http.stream("GET", f"/v1/tasks/{task_a}/events", headers=key_a) as response:
            assert response.status_code == 200
            refused = await http.get(f"/v1/tasks/{task_b}/events", headers=key_b)  # another key: the gateway's cap
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert (error["code"], error["field"]) == ("too_many_streams", "events")
            assert "STIPPLE_MAX_SSE_STREAMS=1" in error["message"]
            assert (await http.get(f"/v1/tasks/{task_a}/events", headers=key_b)).status_code == 429
    await wait_for_streams(gw, 0)
    assert sample(gw, "stipple_gateway_refused_total", limit="sse_streams") == 2
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        unknown = await http.get(f"/v1/tasks/{task_a}/events", headers=key_b)
        assert unknown.status_code == 404  # another key's task: not found, and the slot is given back
    await wait_for_streams(gw, 0)


async def test_an_events_stream_ends_after_its_max_duration_and_resumes(make_gateway, serve_http):
    gw = await make_gateway(sse_max_s=0.3, sse_keepalive_s=0.1)
    url = await serve_http(gw)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await submit(http)
        async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            lines = [line async for line in response.aiter_lines() if line]
        assert lines[:3] == ["id: " + f"{task_id}:submitted", "event: submitted", lines[2]]
        assert lines[-1] == ": max duration reached; reconnect with Last-Event-ID"
        assert all(line.startswith(":") for line in lines[3:])  # keep-alives, and no outcome
        await wait_for_streams(gw, 0)
        resumed_from = {"Last-Event-ID": f"{task_id}:submitted"}
        async with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=resumed_from) as response:
            again = [line async for line in response.aiter_lines() if line.startswith("event:")]
        assert again == []  # nothing new since the id it had


# --------------------------------------------------------------------------- callers without a key


async def test_callers_without_a_key_are_limited_per_client_ip(make_gateway):
    gw = await make_gateway(anon_rate_per_minute=1, anon_burst=3)
    app = create_app(gw)
    peer = httpx.ASGITransport(app=app, client=("198.51.100.7", 5000))
    async with httpx.AsyncClient(transport=peer, base_url="http://gw") as http:
        for _ in range(3):
            assert (await http.get(f"/v1/tasks/{UNKNOWN}")).status_code == 404
        refused = await http.get(f"/v1/tasks/{UNKNOWN}")
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "rate_limited"
        assert "client 198.51.100.7" in error["message"]
        assert "STIPPLE_ANON_RATE_PER_MINUTE=1" in error["message"]
        assert error["limit"] == {"client": "198.51.100.7", "rate_per_minute": 1, "burst": 3}
        submitting = await http.post("/v1/tasks", json=TASK)  # submissions share the bucket
        assert submitting.status_code == 429
        spoofed = await http.get(f"/v1/tasks/{UNKNOWN}", headers={"X-Forwarded-For": "203.0.113.1"})
        assert spoofed.status_code == 429  # the peer is no trusted proxy: the header is ignored
    other = httpx.ASGITransport(app=app, client=("198.51.100.8", 5000))
    async with httpx.AsyncClient(transport=other, base_url="http://gw") as http:
        assert (await http.get(f"/v1/tasks/{UNKNOWN}")).status_code == 404  # another IP, its own bucket
    assert sample(gw, "stipple_gateway_refused_total", limit="anon_rate") == 3


async def test_a_trusted_proxy_names_the_client(make_gateway):
    gw = await make_gateway(anon_rate_per_minute=1, anon_burst=1, trusted_proxies="10.0.0.0/8, 192.0.2.1")
    proxy = httpx.ASGITransport(app=create_app(gw), client=("10.1.2.3", 5000))
    async with httpx.AsyncClient(transport=proxy, base_url="http://gw") as http:
        for client in ("203.0.113.1", "203.0.113.2"):
            response = await http.get(f"/v1/tasks/{UNKNOWN}", headers={"X-Forwarded-For": client})
            assert response.status_code == 404  # each its own bucket
        # a client prepending an address gets the rightmost untrusted one: its own
        forged = await http.get(f"/v1/tasks/{UNKNOWN}", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.1"})
        assert forged.status_code == 429
        assert "client 203.0.113.1" in forged.json()["error"]["message"]
        # through two trusted proxies: the address before them
        chained = await http.get(f"/v1/tasks/{UNKNOWN}", headers={"X-Forwarded-For": "203.0.113.2, 192.0.2.1"})
        assert chained.status_code == 429
        assert "client 203.0.113.2" in chained.json()["error"]["message"]


async def test_public_routes_are_limited_per_ip_with_keys_on(make_gateway):
    gw = await make_gateway(anon_rate_per_minute=1, anon_burst=1, api_keys="a:" + "a" * 16 + ":600")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw") as http:
        assert (await http.get("/api/v2/generate/check/" + UNKNOWN)).status_code == 404
        assert (await http.get("/api/v2/generate/check/" + UNKNOWN)).status_code == 429
        key = {"Authorization": "Bearer " + "a" * 16}
        assert (await http.get(f"/v1/tasks/{UNKNOWN}", headers=key)).status_code == 404  # a key: its own limit


def test_client_ip_and_trusted_proxies():
    trusted = parse_trusted_proxies("10.0.0.0/8,::1")
    assert client_ip("203.0.113.5", "1.2.3.4", trusted) == "203.0.113.5"
    assert client_ip("10.0.0.1", "1.2.3.4", trusted) == "1.2.3.4"
    assert client_ip("10.0.0.1", "1.2.3.4, 10.9.9.9", trusted) == "1.2.3.4"
    assert client_ip("10.0.0.1", "not-an-ip", trusted) == "10.0.0.1"
    assert client_ip("10.0.0.1", None, trusted) == "10.0.0.1"
    assert client_ip("::1", "2001:db8::1", trusted) == "2001:db8::1"
    assert client_ip("10.0.0.1", "1.2.3.4", []) == "10.0.0.1"
    assert client_ip(None, "1.2.3.4", trusted) == "unknown"
    assert parse_trusted_proxies("") == []
    with pytest.raises(InvalidSettings, match=r"STIPPLE_TRUSTED_PROXIES: '10.0.0.0/33' is not an IP network"):
        parse_trusted_proxies("10.0.0.0/8, 10.0.0.0/33")


def test_client_buckets_are_bounded_least_recently_seen_first():
    limits = ClientLimits(rate_per_minute=1, burst=1, max_clients=2)
    limits.admit("a", 0.0)
    limits.admit("b", 0.0)
    with pytest.raises(ApiError):
        limits.admit("a", 0.0)  # "a" is seen again: "b" is now the least recent
    limits.admit("c", 0.0)
    assert list(limits.buckets) == ["a", "c"]
    with pytest.raises(ApiError) as refused:
        limits.admit("a", 1.0)
    assert refused.value.status == 429
    limits.admit("b", 0.0)  # dropped, so a full bucket again
    assert ClientLimits(0, 0).enabled is False
    with pytest.raises(InvalidSettings, match="STIPPLE_ANON_RATE_PER_MINUTE=-1"):
        ClientLimits(-1, 0)
    assert json.loads(json.dumps(refused.value.native_body()))["error"]["code"] == "rate_limited"
