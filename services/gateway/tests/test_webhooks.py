"""Webhooks: validation of webhook_url; Standard Webhooks signatures with per-app secrets,
checked the way a receiver checks them; the send-time resolution check; and delivery with
retries to a real local HTTP server, through the gateway's durable consumer on a
nats-server of the test's own (the consumer's name is fixed, as in production).

Every POST goes to 127.0.0.1. Names are answered by a stub resolver (`Webhooks.resolve`);
a name it maps to a non-public address must be refused before any connection is made."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import nats
import pytest
from prometheus_client import CollectorRegistry

from stipple_common import bus, subjects
from stipple_common.identity import dev_node_id
from stipple_common.messages import TaskAborted, TaskAssigned
from stipple_common.settings import InvalidSettings
from stipple_gateway.metrics import GatewayMetrics
from stipple_gateway.views import TaskView
from stipple_gateway.webhooks import (
    MAX_URL_CHARS,
    TOLERANCE_S,
    WEBHOOK_DURABLE,
    Webhooks,
    WebhookVerificationError,
    app_secret,
    hkdf_sha256,
    is_private_host,
    refusal,
    sign,
    verify,
)
from stipple_testkit.waits import until

try:  # the Standard Webhooks reference library, when installed: it must accept what the gateway sends
    from standardwebhooks.webhooks import Webhook as ReferenceWebhook
except ImportError:  # pragma: no cover - depends on the environment
    ReferenceWebhook = None

SECRET = "webhook-secret-for-tests"
OLD_SECRET = "the-webhook-secret-before-rotation"
KEY_A, KEY_B = "secret-of-app-a-0123456789", "secret-of-app-b-0123456789"
API_KEYS = f"app-a:{KEY_A}:6000,app-b:{KEY_B}:6000"
TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}

# the published test vector of the Standard Webhooks specification
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


class Receiver:
    """A local HTTP server that answers each POST with the next status of `statuses`
    (the last one repeats) and records what it got."""

    def __init__(self, statuses: list[int], tls: ssl.SSLContext | None = None) -> None:
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
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/stipple?token=t1"
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


class StubResolver:
    """Answers names from `table` (an exception is raised), and counts the questions."""

    def __init__(self, table: dict[str, list[str] | Exception]) -> None:
        self.table = table
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        answer = self.table[host]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(statuses: list[int], tls: ssl.SSLContext | None = None) -> Receiver:
        made.append(Receiver(statuses, tls))
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


def check_signed(secret: str, headers: dict[str, str], body: bytes) -> None:
    """What a receiver does: our verifier, and the reference library's when it is installed."""
    verify(secret, headers, body)
    if ReferenceWebhook is not None:
        ReferenceWebhook(secret).verify(body, headers)


def signed_by(secret: str, headers: dict[str, str], body: bytes) -> bool:
    try:
        verify(secret, headers, body)
    except WebhookVerificationError:
        return False
    return True


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


async def metric_reaches(http: Any, line: str) -> str:
    for _ in range(500):
        text = (await http.get("/metrics")).text
        if line in text:
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{line!r} not in /metrics:\n{text}")


# --------------------------------------------------------------------------- the scheme


def test_signatures_reproduce_the_standard_webhooks_test_vector():
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TIMESTAMP), "webhook-signature": SPEC_SIGNATURE}
    verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP)
    verify(SPEC_SECRET, {k.upper(): v for k, v in headers.items()}, SPEC_BODY, now=SPEC_TIMESTAMP)  # any case
    two = {**headers, "webhook-signature": "v1,bm9wZQ== " + SPEC_SIGNATURE}  # one of a list matches
    verify(SPEC_SECRET, two, SPEC_BODY, now=SPEC_TIMESTAMP)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(SPEC_SECRET, headers, SPEC_BODY + b" ", now=SPEC_TIMESTAMP)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(SPEC_SECRET, {"webhook-id": SPEC_ID}, SPEC_BODY, now=SPEC_TIMESTAMP)
    with pytest.raises(WebhookVerificationError, match="not Unix seconds"):
        verify(SPEC_SECRET, {**headers, "webhook-timestamp": "1e9"}, SPEC_BODY, now=SPEC_TIMESTAMP)


def test_hkdf_reproduces_rfc_5869_test_case_1():
    okm = hkdf_sha256(bytes([0x0B] * 22), salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)), length=42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_an_old_or_future_timestamp_is_refused_within_the_documented_tolerance():
    secret = app_secret(SECRET, "app-a")
    now = int(time.time())
    for stamp, ok in ((now - TOLERANCE_S - 1, False), (now + TOLERANCE_S + 60, False), (now - 60, True)):
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(stamp)}
        headers["webhook-signature"] = sign(secret, "msg_1", stamp, b"{}")  # a genuine signature: a replay
        if ok:
            check_signed(secret, headers, b"{}")
            continue
        with pytest.raises(WebhookVerificationError, match=f"more than {TOLERANCE_S} s from now"):
            verify(secret, headers, b"{}")
        if ReferenceWebhook is not None:
            with pytest.raises(Exception, match="too (old|new)"):
                ReferenceWebhook(secret).verify(b"{}", headers)
    assert TOLERANCE_S == 300  # docs/api.md says five minutes


def test_each_app_has_its_own_secret_and_the_master_is_needed():
    a, b, anonymous = app_secret(SECRET, "app-a"), app_secret(SECRET, "app-b"), app_secret(SECRET, "")
    assert len({a, b, anonymous, app_secret(OLD_SECRET, "app-a")}) == 4
    assert a == app_secret(SECRET, "app-a")  # derived, so every gateway computes the same
    assert a.startswith("whsec_")
    assert len(base64.b64decode(a.removeprefix("whsec_"))) == 32
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(time.time()))}
    headers["webhook-signature"] = sign(b, "msg_1", int(headers["webhook-timestamp"]), b"{}")
    assert signed_by(b, headers, b"{}")
    assert not signed_by(a, headers, b"{}")


async def test_a_short_master_secret_is_refused_at_start_without_showing_it(make_gateway):
    with pytest.raises(InvalidSettings, match="STIPPLE_WEBHOOK_SECRET: is 7 characters; at least 16") as caught:
        await make_gateway(webhook_secret="hunter2")
    assert "hunter2" not in str(caught.value)


# --------------------------------------------------------------------------- delivery


async def test_outcome_is_posted_signed_pinned_and_retried_until_a_2xx(
    own_nc, make_gateway, asgi_client, receiver_factory
):
    receiver = receiver_factory([500, 204])
    gw = await make_gateway(own_nc, **settings())
    resolver = StubResolver({"receiver.hooks.test": ["127.0.0.1"]})
    gw.webhooks.resolve = resolver
    url = f"http://receiver.hooks.test:{receiver.port}/hooks/stipple?token=t1"  # exists only in the stub
    async with asgi_client(gw) as http:
        answer = await http.get("/v1/webhook-secret")
        assert answer.status_code == 200, answer.text
        assert answer.headers["cache-control"] == "no-store"
        secret = answer.json()["secret"]
        assert answer.json() == {"key_id": "", "secret": secret, "scheme": "v1", "tolerance_s": TOLERANCE_S}
        accepted = await http.post("/v1/tasks", json={**TASK, "webhook_url": url})
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["task_id"]
        assert (await http.get(f"/v1/tasks/{task_id}")).json()["webhook_url"] == url
        await finish(gw, task_id)
        await receiver.wait_for(2)
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
    for attempt, (headers, body) in enumerate(receiver.requests, 1):
        check_signed(secret, headers, body)
        assert headers["webhook-id"] == f"msg_{task_id}_aborted"  # the same on every attempt
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < TOLERANCE_S
        assert headers["host"] == f"receiver.hooks.test:{receiver.port}"  # the name, on the vetted address
        assert headers["x-stipple-task"] == task_id
        assert headers["x-stipple-event"] == "aborted"
        assert headers["x-stipple-delivery"] == str(attempt)
        assert headers["content-type"] == "application/json"
        assert "x-stipple-signature" not in headers  # the shared-secret signature is gone
        assert json.loads(body) == view  # the task view, as GET answers it
        with pytest.raises(WebhookVerificationError):  # the gateway's master secret is not an app's secret
            verify("whsec_" + base64.b64encode(SECRET.encode()).decode(), headers, body)
        stamp = int(headers["webhook-timestamp"])
        with pytest.raises(WebhookVerificationError, match="from now"):  # replayed after the tolerance
            verify(secret, headers, body, now=stamp + TOLERANCE_S + 1)
    assert resolver.asked == [("receiver.hooks.test", receiver.port)] * 2  # once per attempt, never again
    assert view["outcome"]["reason"] == "no_agreement"
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 2  # a 2xx ends it
    async with asgi_client(gw) as http:
        text = (await http.get("/metrics")).text
    assert 'stipple_gateway_webhooks_total{result="retry"} 1.0' in text
    assert 'stipple_gateway_webhooks_total{result="delivered"} 1.0' in text


async def test_one_apps_secret_does_not_verify_another_apps_webhook(
    own_nc, make_gateway, asgi_client, receiver_factory
):
    receiver = receiver_factory([200])
    gw = await make_gateway(own_nc, **settings(api_keys=API_KEYS, webhook_secret_previous=OLD_SECRET))
    secrets: dict[str, str] = {}
    tasks: dict[str, str] = {}
    for app, key in (("app-a", KEY_A), ("app-b", KEY_B)):
        async with asgi_client(gw, headers={"Authorization": f"Bearer {key}"}) as http:
            answer = await http.get("/v1/webhook-secret")
            assert answer.status_code == 200, answer.text
            assert answer.json()["key_id"] == app
            secrets[app] = answer.json()["secret"]
            accepted = await http.post("/v1/tasks", json={**TASK, "webhook_url": receiver.url})
            tasks[accepted.json()["task_id"]] = app
    assert secrets["app-a"] != secrets["app-b"]
    for task_id in tasks:
        await finish(gw, task_id)
    await receiver.wait_for(2)
    assert {headers["x-stipple-task"] for headers, _ in receiver.requests} == set(tasks)
    for headers, body in receiver.requests:
        app = tasks[headers["x-stipple-task"]]
        other = "app-b" if app == "app-a" else "app-a"
        check_signed(secrets[app], headers, body)
        assert signed_by(app_secret(OLD_SECRET, app), headers, body)  # rotating: the old secret still verifies
        assert len(headers["webhook-signature"].split(" ")) == 2
        for wrong in (secrets[other], app_secret(OLD_SECRET, other), app_secret(SECRET, "")):
            assert not signed_by(wrong, headers, body), f"{app}'s webhook verified with another app's secret"


async def test_the_secret_endpoint_needs_the_apps_key(make_gateway, asgi_client):
    gw = await make_gateway(webhook_secret=SECRET, api_keys=API_KEYS)
    async with asgi_client(gw) as http:
        missing = await http.get("/v1/webhook-secret")
        wrong = await http.get("/v1/webhook-secret", headers={"Authorization": "Bearer not-a-key-of-this-gateway"})
        right = await http.get("/v1/webhook-secret", headers={"Authorization": f"Bearer {KEY_A}"})
    for answer in (missing, wrong):
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "unauthorized"
        assert answer.json()["error"]["field"] == "Authorization"
        assert "whsec_" not in answer.text
    assert right.status_code == 200
    assert right.json()["secret"] == app_secret(SECRET, "app-a")


async def test_the_secret_endpoint_is_404_when_webhooks_are_off(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        answer = await http.get("/v1/webhook-secret")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "webhooks_off"
    assert "STIPPLE_WEBHOOK_SECRET" in answer.json()["error"]["message"]


async def test_names_resolving_to_non_public_addresses_are_refused_at_send_time(
    own_nc, make_gateway, asgi_client, monkeypatch
):
    table: dict[str, list[str] | Exception] = {
        "ten.hooks.test": ["10.0.0.1"],
        "metadata.hooks.test": ["169.254.169.254"],
        "loopback6.hooks.test": ["::1"],
        "mapped.hooks.test": ["::ffff:127.0.0.1"],
        "mixed.hooks.test": ["93.184.216.34", "10.0.0.1"],  # one bad address is enough
        "nxdomain.hooks.test": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    }
    resolver = StubResolver(table)
    gw = await make_gateway(own_nc, **settings(webhook_allow_private=False, webhook_max_attempts=2))
    gw.webhooks.resolve = resolver
    for _ in range(500):  # the worker opens its client when it starts
        if gw.webhooks.http is not None:
            break
        await asyncio.sleep(0.01)
    sent: list[Any] = []

    async def no_send(request: Any, **kwargs: Any) -> Any:
        sent.append(request)
        raise AssertionError(f"the gateway connected to {request.url}")

    monkeypatch.setattr(gw.webhooks.http, "send", no_send)
    async with asgi_client(gw) as http:
        for name in table:
            accepted = await http.post("/v1/tasks", json={**TASK, "webhook_url": f"https://{name}/hook"})
            assert accepted.status_code == 202, accepted.text  # a name passes at submission
            await finish(gw, accepted.json()["task_id"])
        text = await metric_reaches(http, 'stipple_gateway_webhooks_total{result="refused"} 5.0')
        text = await metric_reaches(http, 'stipple_gateway_webhooks_total{result="gave_up"} 1.0')
    assert sent == []
    assert 'stipple_gateway_webhooks_total{result="retry"} 1.0' in text  # only the name that did not resolve
    assert 'result="delivered"' not in text
    asked = sorted(host for host, _ in resolver.asked)
    assert asked == sorted([*table, "nxdomain.hooks.test"])  # once each, and again for the retried one
    assert {port for _, port in resolver.asked} == {443}

    async def all_acked() -> bool:  # (counted before its ack is sent: read until the ack is in)
        return (await gw.js.consumer_info(subjects.TASKS_STREAM, WEBHOOK_DURABLE)).num_ack_pending == 0

    await until("every outcome's webhook message acked", all_acked, timeout=5.0)


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
        text = await metric_reaches(http, 'stipple_gateway_webhooks_total{result="gave_up"} 1.0')
    assert 'stipple_gateway_webhooks_total{result="retry"} 1.0' in text


def self_signed(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for DNS name `name` only (no IP address): the receiver's TLS context,
    and a client context that trusts that certificate and nothing else."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server, ssl.create_default_context(cadata=pem.decode())


@pytest.mark.parametrize(("certified", "delivered"), [("receiver.hooks.test", True), ("other.hooks.test", False)])
async def test_https_to_the_pinned_address_checks_the_certificate_against_the_name(
    tmp_path, receiver_factory, certified, delivered
):
    """The connection goes to the vetted address, and TLS still names the host: its SNI and
    certificate check use the name (a certificate for another name fails; so would one
    checked against the address, which no certificate here names)."""
    server_tls, client_tls = self_signed(tmp_path, certified)
    seen_sni: list[str | None] = []
    server_tls.sni_callback = lambda _sock, name, _ctx: seen_sni.append(name)
    receiver = receiver_factory([200], server_tls)
    task_id = "ab" * 16
    view = msgspec.convert(
        {
            "task_id": task_id,
            "status": "aborted",
            "source": "native",
            "submitted_at": 0.0,
            "seed": 1,
            "task": TASK,
            "nodes": [],
            "owner": "app-a",
            "webhook_url": f"https://receiver.hooks.test:{receiver.port}/hook",
        },
        TaskView,
    )

    async def load(_task_id: str) -> TaskView:
        return view

    resolver = StubResolver({"receiver.hooks.test": ["127.0.0.1"]})
    webhooks = Webhooks(
        None,  # type: ignore[arg-type]  # handle() needs no JetStream
        load,
        secret=SECRET,
        timeout_s=5.0,
        max_attempts=2,
        backoff_s=0.05,
        backoff_max_s=1.0,
        gateway_metrics=GatewayMetrics(CollectorRegistry(), webhooks=True),
        allow_private=True,  # the receiver is on 127.0.0.1
        resolve=resolver,
        tls=client_tls,
    )
    msg = SimpleNamespace(subject=subjects.task_subject(task_id, "aborted"), metadata=SimpleNamespace(num_delivered=1))
    async with webhooks.client() as webhooks.http:
        answer = await webhooks.handle(msg)  # type: ignore[arg-type]
    assert seen_sni == ["receiver.hooks.test"]
    assert resolver.asked == [("receiver.hooks.test", receiver.port)]
    if delivered:
        assert answer is None
        assert len(receiver.requests) == 1
        headers, body = receiver.requests[0]
        assert headers["host"] == f"receiver.hooks.test:{receiver.port}"
        check_signed(app_secret(SECRET, "app-a"), headers, body)
    else:
        assert isinstance(answer, bus.Redeliver)  # a failure like any other: retried, then given up
        assert receiver.requests == []


# --------------------------------------------------------------------------- submission


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/hook", "expected an http or https URL"),
        ("example.com/hook", "expected an http or https URL"),
        ("https://", "the URL has no host"),
        ("https://example.com:99999/", "not a valid URL: Port out of range"),
        ("https://exa mple.com/", "contains spaces or control characters"),
        ("https://example.com/" + "a" * MAX_URL_CHARS, f"at most {MAX_URL_CHARS}"),
        ("http://127.0.0.1:9/hook", "points to a loopback address"),
        ("http://localhost/hook", "points to a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "points to a link-local address"),
        ("http://10.0.0.1/hook", "points to a private address"),
        ("http://[::ffff:127.0.0.1]/hook", "points to a loopback (inside ::ffff:7f00:1) address"),
        ("http://0x7f.1/hook", "points to a loopback address"),
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


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback (inside ::ffff:7f00:1)"),
        ("::ffff:10.0.0.1", "private (inside ::ffff:a00:1)"),
        ("2002:7f00:1::", "loopback (inside 2002:7f00:1::)"),  # 6to4 of 127.0.0.1
        ("93.184.216.34", ""),
        ("8.8.8.8", ""),
        ("2606:2800:220:1::", ""),
    ],
)
def test_send_time_address_kinds(address, kind):
    assert refusal(ipaddress.ip_address(address)) == kind
