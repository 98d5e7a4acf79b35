"""Webhooks: validation of webhook_url, and signed delivery with retries to a real local
HTTP server, through the gateway's durable consumer on a nats-server of the test's own
(the consumer's name is fixed, as in production)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import nats
import pytest

from stipple_common import bus, subjects
from stipple_common.identity import dev_node_id
from stipple_common.messages import TaskAborted, TaskAssigned
from stipple_gateway.webhooks import MAX_URL_CHARS, WEBHOOK_DURABLE, is_private_host

pytestmark = pytest.mark.integration

SECRET = "webhook-secret-for-tests"
TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}


class Receiver:
    """A local HTTP server that answers each POST with the next status of `statuses`
    (the last one repeats) and records what it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.got = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.got:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses[min(len(receiver.requests), len(receiver.statuses)) - 1]
                    receiver.got.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/stipple?token=t1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        def wait() -> bool:
            with self.got:
                return self.got.wait_for(lambda: len(self.requests) >= count, timeout)

        assert await asyncio.to_thread(wait), f"got {len(self.requests)} requests, expected {count}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(statuses: list[int]) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
async def own_nc(fresh_nats_url: str) -> Any:
    """A connection to a nats-server of the test's own. Request it before make_gateway, so
    that the gateway stops before the connection drains."""
    client = await nats.connect(fresh_nats_url)
    yield client
    await client.drain()


def settings(**overrides: Any) -> dict[str, Any]:
    return {
        "webhook_secret": SECRET,
        "webhook_allow_private": True,
        "webhook_backoff_s": 0.05,
        "webhook_timeout_s": 2.0,
        **overrides,
    }


async def finish(gw: Any, task_id: str) -> None:
    """What the dispatcher and validator would publish: assigned, then an abort."""
    await bus.publish(
        gw.js,
        subjects.task_subject(task_id, "assigned"),
        TaskAssigned(
            task_id=task_id, nodes=[dev_node_id(name) for name in ("node-a", "node-b", "node-c")], deadline=9e9
        ),
        msg_id=f"{task_id}:assigned",
    )
    aborted = TaskAborted(task_id=task_id, reason="no_agreement", detail="three different images")
    await bus.publish(gw.js, subjects.task_subject(task_id, "aborted"), aborted, msg_id=f"{task_id}:outcome")


async def test_outcome_is_posted_signed_and_retried_until_a_2xx(own_nc, make_gateway, asgi_client, receiver_factory):
    receiver = receiver_factory([500, 204])
    gw = await make_gateway(own_nc, **settings())
    async with asgi_client(gw) as http:
        accepted = await http.post("/v1/tasks", json={**TASK, "webhook_url": receiver.url})
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["task_id"]
        assert (await http.get(f"/v1/tasks/{task_id}")).json()["webhook_url"] == receiver.url
        await finish(gw, task_id)
        await receiver.wait_for(2)
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
    for attempt, (headers, body) in enumerate(receiver.requests, 1):
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-stipple-signature"], expected)
        assert headers["x-stipple-task"] == task_id
        assert headers["x-stipple-event"] == "aborted"
        assert headers["x-stipple-delivery"] == str(attempt)
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == view  # the task view, as GET answers it
    assert view["outcome"]["reason"] == "no_agreement"
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 2  # a 2xx ends it
    async with asgi_client(gw) as http:
        text = (await http.get("/metrics")).text
    assert 'stipple_gateway_webhooks_total{result="retry"} 1.0' in text
    assert 'stipple_gateway_webhooks_total{result="delivered"} 1.0' in text


async def test_delivery_gives_up_after_the_configured_attempts(own_nc, make_gateway, asgi_client, receiver_factory):
    receiver = receiver_factory([503])
    gw = await make_gateway(own_nc, **settings(webhook_max_attempts=3))
    async with asgi_client(gw) as http:
        task_id = (await http.post("/v1/tasks", json={**TASK, "webhook_url": receiver.url})).json()["task_id"]
        plain = (await http.post("/v1/tasks", json=TASK)).json()["task_id"]  # no webhook: nothing is posted
        await finish(gw, plain)
        await finish(gw, task_id)
        await receiver.wait_for(3)
        await asyncio.sleep(0.5)
        assert len(receiver.requests) == 3
        assert {h["x-stipple-task"] for h, _ in receiver.requests} == {task_id}
        assert 'stipple_gateway_webhooks_total{result="gave_up"} 1.0' in (await http.get("/metrics")).text
    info = await gw.js.consumer_info(subjects.TASKS_STREAM, WEBHOOK_DURABLE)
    assert info.num_ack_pending == 0
    assert info.num_pending == 0


async def test_an_unreachable_receiver_is_retried_like_an_error(own_nc, make_gateway, asgi_client, receiver_factory):
    receiver = receiver_factory([200])
    url = receiver.url
    receiver.close()  # nothing listens there any more: connection refused
    gw = await make_gateway(own_nc, **settings(webhook_max_attempts=2))
    async with asgi_client(gw) as http:
        task_id = (await http.post("/v1/tasks", json={**TASK, "webhook_url": url})).json()["task_id"]
        await finish(gw, task_id)
        for _ in range(500):
            text = (await http.get("/metrics")).text
            if 'stipple_gateway_webhooks_total{result="gave_up"} 1.0' in text:
                break
            await asyncio.sleep(0.02)
    assert 'stipple_gateway_webhooks_total{result="retry"} 1.0' in text
    assert 'stipple_gateway_webhooks_total{result="gave_up"} 1.0' in text


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/hook", "expected an http or https URL"),
        ("example.com/hook", "expected an http or https URL"),
        ("https://", "the URL has no host"),
        ("https://example.com:99999/", "not a valid URL: Port out of range"),
        ("https://exa mple.com/", "contains spaces or control characters"),
        ("https://example.com/" + "a" * MAX_URL_CHARS, f"at most {MAX_URL_CHARS}"),
        ("http://127.0.0.1:9/hook", "points to a loopback, private or link-local address"),
        ("http://localhost/hook", "points to a loopback"),
        ("http://169.254.169.254/latest/meta-data", "points to a loopback"),
        (42, "expected a string: an http or https URL"),
    ],
)
async def test_bad_webhook_urls_are_422_naming_the_field(make_gateway, asgi_client, url, reason):
    gw = await make_gateway(webhook_secret=SECRET)
    async with asgi_client(gw) as http:
        response = await http.post("/v1/tasks", json={**TASK, "webhook_url": url})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["field"] == "webhook_url"
    assert error["value"] == url
    assert error["message"].startswith("webhook_url: ")
    assert reason in error["message"]


async def test_webhook_url_on_a_gateway_without_a_secret_is_422(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        response = await http.post("/v1/tasks", json={**TASK, "webhook_url": "https://example.com/hook"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "webhook_url"
    assert "no STIPPLE_WEBHOOK_SECRET" in response.json()["error"]["message"]
    assert gw.webhooks is None


def test_private_hosts():
    for host in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "::1", "fe80::1", "::ffff:127.0.0.1", "2130706433", "0x7f.1"):
        assert is_private_host(host), host
    for host in ("example.com", "93.184.216.34", "2606:2800:220:1::"):
        assert not is_private_host(host), host
