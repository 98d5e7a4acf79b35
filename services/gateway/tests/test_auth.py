"""API keys: who may call, whose tasks they see, and per-key rate limits."""

from __future__ import annotations

import pytest

from stipple_common.settings import InvalidSettings
from stipple_gateway.auth import TokenBucket, parse_api_keys
from stipple_gateway.events import read_task_events

pytestmark = pytest.mark.integration

ALICE = "alice-secret-0123456789"
BOB = "bob-secret-9876543210xx"
KEYS = f"alice:{ALICE}:600,bob:{BOB}:600"
TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing Authorization header: send 'Authorization: Bearer <API key secret>'"),
        ({"Authorization": "Bearer wrong-secret-0123456789"}, "Authorization: unknown API key"),
        ({"Authorization": f"Basic {ALICE}"}, "Authorization: expected 'Bearer <API key secret>', got scheme 'Basic'"),
        ({"Authorization": "Bearer"}, "Authorization: expected 'Bearer <API key secret>', got scheme 'Bearer' with no"),
    ],
)
async def test_v1_and_sdcn_need_a_key(make_gateway, asgi_client, headers, message):
    gw = await make_gateway(api_keys=KEYS)
    async with asgi_client(gw, headers=headers) as http:
        for method, path in (("GET", "/v1/nodes"), ("POST", "/v1/tasks"), ("GET", "/v1/tasks/" + "a" * 32)):
            response = await http.request(method, path, json=TASK if method == "POST" else None)
            assert response.status_code == 401, path
            error = response.json()["error"]
            assert error["code"] == "unauthorized"
            assert error["field"] == "Authorization"
            assert error["message"].startswith(message)
            assert response.headers["www-authenticate"] == 'Bearer realm="stipple"'
        sdcn = await http.post("/txt2img", json={"prompt": "x"})
        assert sdcn.status_code == 401
        assert sdcn.json()["msg"].startswith(message)
        # the open routes stay open
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/openapi.json")).status_code == 200
        assert (await http.get("/docs")).status_code == 200


async def test_keys_own_their_tasks(make_gateway, asgi_client):
    gw = await make_gateway(api_keys=KEYS)
    async with asgi_client(gw, headers=bearer(ALICE)) as alice, asgi_client(gw, headers=bearer(BOB)) as bob:
        accepted = await alice.post("/v1/tasks", json=TASK)
        assert accepted.status_code == 202
        task_id = accepted.json()["task_id"]
        stored = await read_task_events(gw.js, task_id)
        assert stored[0].event.owner == "alice"
        view = (await alice.get(f"/v1/tasks/{task_id}")).json()
        assert view["owner"] == "alice"
        # bob cannot tell alice's task from one that does not exist
        for method, path in (
            ("GET", f"/v1/tasks/{task_id}"),
            ("DELETE", f"/v1/tasks/{task_id}"),
            ("GET", f"/v1/tasks/{task_id}/events"),
            ("GET", f"/v1/tasks/{task_id}/images/0"),
        ):
            response = await bob.request(method, path)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"] == {"code": "not_found", "message": f"no task with id {task_id!r}"}
        assert (await alice.delete(f"/v1/tasks/{task_id}")).status_code == 202
        cancelled = (await alice.get(f"/v1/tasks/{task_id}")).json()
        assert cancelled["outcome"]["detail"] == "cancelled by the app (API key alice)"


async def test_one_idempotency_key_from_two_api_keys_is_two_tasks(make_gateway, asgi_client):
    gw = await make_gateway(api_keys=KEYS)
    same = {"Idempotency-Key": "order-17"}
    async with asgi_client(gw, headers=bearer(ALICE)) as alice, asgi_client(gw, headers=bearer(BOB)) as bob:
        first = (await alice.post("/v1/tasks", json=TASK, headers=same)).json()["task_id"]
        again = (await alice.post("/v1/tasks", json=TASK, headers=same)).json()["task_id"]
        other = (await bob.post("/v1/tasks", json=TASK, headers=same)).json()["task_id"]
    assert first == again
    assert other != first
    assert (await read_task_events(gw.js, other))[0].event.owner == "bob"


async def test_over_the_rate_limit_is_429_with_retry_after(make_gateway, asgi_client):
    gw = await make_gateway(api_keys=f"alice:{ALICE}:2,bob:{BOB}:60:1")
    async with asgi_client(gw, headers=bearer(ALICE)) as alice, asgi_client(gw, headers=bearer(BOB)) as bob:
        assert (await alice.get("/v1/nodes")).status_code == 200
        assert (await alice.get("/v1/nodes")).status_code == 200
        limited = await alice.get("/v1/nodes")
        assert limited.status_code == 429
        retry_after = int(limited.headers["retry-after"])
        assert 1 <= retry_after <= 30  # one token every 30 s at 2 per minute
        error = limited.json()["error"]
        assert error["code"] == "rate_limited"
        assert error["message"].startswith("API key 'alice' is over its limit of 2 requests per minute (burst 2)")
        assert error["limit"] == {"key_id": "alice", "rate_per_minute": 2, "burst": 2}
        assert (await alice.get("/healthz")).status_code == 200  # open routes do not count
        # another key has its own bucket
        assert (await bob.get("/v1/nodes")).status_code == 200
        assert (await bob.get("/v1/nodes")).status_code == 429  # burst 1


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(per_second=1.0, capacity=2)
    assert bucket.take(100.0) == 0
    assert bucket.take(100.0) == 0
    assert bucket.take(100.0) == pytest.approx(1.0)
    assert bucket.take(100.5) == pytest.approx(0.5)
    assert bucket.take(101.0) == 0
    assert bucket.take(110.0) == 0  # refilled, but never beyond the capacity
    assert bucket.take(110.0) == 0
    assert bucket.take(110.0) > 0


def test_keys_from_a_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# production keys\nalice:{ALICE}:60\n\nbob:{BOB}:120:10  # the batch job\n")
    keys = parse_api_keys(f"@{path}")
    assert [(k.key_id, k.rate_per_minute, k.burst) for k in keys] == [("alice", 60, 60), ("bob", 120, 10)]
    assert parse_api_keys("  ") == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("alice", "entry 1 (key id 'alice'): has 1 ':'-separated parts, not 3 or 4"),
        ("alice:short:60", "entry 1 (key id 'alice'): the secret must be at least 16 characters"),
        (f"alice:{ALICE}:0", "entry 1 (key id 'alice'): rate_per_minute must be an integer from 1 to 1000000 (got 0)"),
        (f"alice:{ALICE}:fast", "entry 1 (key id 'alice'): rate_per_minute must be an integer from 1 to 1000000;"),
        (f"alice:{ALICE}:60:0", "entry 1 (key id 'alice'): burst must be an integer"),
        (f"al ice:{ALICE}:60", "entry 1: key id 'al ice' must be 1-64 letters"),
        (f"alice:{ALICE}:60,,", "entry 2: is empty"),
        (f"alice:{ALICE}:60,alice:{BOB}:60", "entry 2 (key id 'alice'): the key id is used twice"),
        (f"alice:{ALICE}:60,bob:{ALICE}:60", "entry 2 (key id 'bob'): the secret is the same as another key's"),
        ("@/nonexistent/keys", "cannot read key file '/nonexistent/keys'"),
    ],
)
def test_bad_key_settings_fail_at_start_naming_the_entry_not_the_secret(value, message):
    with pytest.raises(InvalidSettings) as info:
        parse_api_keys(value)
    text = str(info.value)
    assert text.startswith("STIPPLE_API_KEYS: ")
    assert message in text
    assert ALICE not in text
    assert BOB not in text


async def test_a_gateway_with_bad_keys_does_not_start(make_gateway):
    with pytest.raises(InvalidSettings, match="STIPPLE_API_KEYS"):
        await make_gateway(api_keys="alice:x:1")
