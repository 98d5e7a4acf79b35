"""The gateway's newer surface tried as a hostile app, node or page would: the Horde routes
(request ids are capabilities: unguessable, never the task id a node is given, never a
way to another app's task), the network JSON (what one API key learns of another's tasks,
what a node learns of the secret sample, how much the fold keeps), the web pages' files
and headers, and A1111's interrupt across API keys. A real gateway over a real
nats-server (`make_gateway`), called in process; the fold is fed as its subscriptions
would feed it where a test needs events only the control plane may publish."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
import uuid
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from stipple_common.identity import dev_node_id
from stipple_common.messages import ChainLog, NodeQos, TaskSucceeded
from stipple_gateway import network
from stipple_gateway.app import create_app
from stipple_gateway.horde import task_id_of
from stipple_gateway.network import RECENT_TASKS, NetworkFold, task_key

pytestmark = pytest.mark.integration

ALICE = "alice-secret-0123456789"
BOB = "bob-secret-9876543210xx"
KEYS = f"alice:{ALICE}:600,bob:{BOB}:600"
NODES = [dev_node_id(name) for name in ("node-a", "node-b", "node-c")]
TASK = {"base_model": "tiny-sd", "prompt": "a secret fox", "task_config": {"image_width": 64, "image_height": 64}}
HORDE = {"prompt": "a secret horde fox", "models": ["tiny-sd"], "params": {"width": 64, "height": 64, "steps": 2}}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def eventually(check: Any, what: str) -> Any:
    """`check()`'s first truthy answer (the gateway folds core NATS messages as they come)."""
    for _ in range(200):
        if found := check():
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


# --------------------------------------------------------------------------- the Horde


async def test_horde_request_ids_are_random_uuid4s_and_not_the_task_id_nodes_are_given(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        ids = []
        for _ in range(2):
            accepted = await http.post("/api/v2/generate/async", json=HORDE)
            assert accepted.status_code == 202, accepted.text
            ids.append(accepted.json()["id"])
        assert ids[0] != ids[1]
        for request_id in ids:
            assert uuid.UUID(request_id).version == 4
        request_id = ids[0]
        task_id = task_id_of(request_id)
        assert task_id in accepted.json()["message"] or task_id_of(ids[1]) in accepted.json()["message"]
        assert request_id.replace("-", "") != task_id  # the id nodes see is not the capability
        # what a node holds (the task id, in any UUID spelling) opens nothing here
        for spelling in (task_id, str(uuid.UUID(task_id)), str(uuid.UUID(task_id)).upper()):
            for method, path in (("GET", "check"), ("GET", "status"), ("DELETE", "status")):
                answer = await http.request(method, f"/api/v2/generate/{path}/{spelling}")
                assert answer.status_code == 404, (method, path, spelling, answer.text)
                assert answer.json()["rc"] == "RequestNotFound"
        native = (await http.get(f"/v1/tasks/{task_id}")).json()
        assert native["status"] != "cancelled"
        # ... while the request id, in any spelling, does
        for spelling in (request_id, request_id.replace("-", ""), request_id.upper()):
            checked = await http.get(f"/api/v2/generate/check/{spelling}")
            assert checked.status_code == 200, checked.text
            assert checked.json()["done"] is False
        cancelled = await http.delete(f"/api/v2/generate/status/{request_id}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["cancelled"] is True


@pytest.mark.parametrize("keys", ["", KEYS])
async def test_horde_routes_never_reach_a_task_another_api_submitted(make_gateway, asgi_client, keys):
    gw = await make_gateway(api_keys=keys)
    async with asgi_client(gw, headers=bearer(ALICE) if keys else {}) as http:
        task_id = (await http.post("/v1/tasks", json=TASK, headers={"Idempotency-Key": "guessable-1"})).json()[
            "task_id"
        ]
        for spelling in (task_id, str(uuid.UUID(task_id))):
            for method, path in (("GET", "check"), ("GET", "status"), ("DELETE", "status")):
                answer = await http.request(method, f"/api/v2/generate/{path}/{spelling}")
                assert answer.status_code == 404, (method, path, answer.text)
                assert answer.json() == {
                    "message": f"no request with id {spelling!r}",
                    "rc": "RequestNotFound",
                }
        assert (await http.get(f"/v1/tasks/{task_id}")).json()["status"] == "pending"


@pytest.mark.parametrize(
    "request_id",
    [
        "x",
        "0" * 32,
        "ffffffff-ffff-4fff-bfff-ffffffffffff",
        "..%2F..%2Fetc%2Fpasswd",
        "%00",
        "%F0%9F%A6%8A",  # an emoji
        "%ED%A0%80",  # not UTF-8 (a lone surrogate's bytes)
        "a" * 5000,
        "{12345678-1234-4234-8234-123456789abc}",
        "urn:uuid:12345678-1234-4234-8234-123456789abc",
    ],
)
async def test_horde_ids_that_name_no_request_are_404_in_the_hordes_shape(make_gateway, asgi_client, request_id):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        for method, path in (("GET", "check"), ("GET", "status"), ("DELETE", "status")):
            answer = await http.request(method, f"/api/v2/generate/{path}/{request_id}")
            assert answer.status_code == 404, (method, path, answer.text)
            body = answer.json()
            if "/" in unquote(request_id):  # no Horde route matches: Starlette's 404, in the native shape
                assert body["error"]["code"] == "not_found"
                continue
            assert body["rc"] == "RequestNotFound"
            assert len(body["message"]) < 200  # the id is cut, not echoed whole


async def test_with_keys_on_anyone_holding_a_horde_request_id_may_cancel_it_but_no_key_learns_it(
    make_gateway, asgi_client
):
    """The request id is the capability (as on the Horde): Bob may cancel Alice's request
    only if she gives him its id; /v1/network, which Bob may read, does not give it, nor her
    task's id, nor her prompt."""
    gw = await make_gateway(api_keys=KEYS)
    async with asgi_client(gw) as http:
        accepted = await http.post("/api/v2/generate/async", json=HORDE, headers={"apikey": ALICE})
        assert accepted.status_code == 202, accepted.text
        request_id = accepted.json()["id"]
        task_id = task_id_of(request_id)
        await eventually(lambda: task_id in gw.network.tasks, "the fold saw the submission")
        for reader, sees_id in ((BOB, False), (ALICE, True)):
            raw = (await http.get("/v1/network", headers=bearer(reader))).text
            assert request_id not in raw
            assert request_id.replace("-", "") not in raw
            assert "secret horde fox" not in raw
            assert (task_id in raw) is sees_id
            assert task_key(task_id) in raw or sees_id
        cancelled = await http.delete(f"/api/v2/generate/status/{request_id}")  # no key: the id is enough
        assert cancelled.json()["cancelled"] is True


# --------------------------------------------------------------------------- the network JSON


async def test_with_keys_on_the_network_shows_another_keys_tasks_by_task_key_only(make_gateway, asgi_client):
    gw = await make_gateway(api_keys=KEYS)
    async with asgi_client(gw) as http:
        alices = (await http.post("/v1/tasks", json=TASK, headers=bearer(ALICE))).json()["task_id"]
        bobs = (await http.post("/v1/tasks", json=TASK, headers=bearer(BOB))).json()["task_id"]
        await eventually(lambda: {alices, bobs} <= set(gw.network.owners), "the fold saw both submissions")
        # paid and scored on chain and by the validator, as the indexer and the validator say
        node = NODES[0]
        gw.network.chain_event(
            ChainLog(
                contract="TaskPayment",
                event="Settled",
                args={"taskId": task_key(alices), "nodes": [node], "amounts": [7]},
                block_number=1,
                block_hash="0xb1",
                log_index=0,
                tx_hash="0xt1",
            )
        )
        gw.network.qos_published(NodeQos(node_id=node, qos=9.0, samples=1, recent_timeouts=0, task_id=alices))
        for reader, own, other in ((ALICE, alices, bobs), (BOB, bobs, alices)):
            view = (await http.get("/v1/network", headers=bearer(reader))).json()
            shown = {t["task_id"] for t in view["recent_tasks"]}
            assert own in shown
            assert task_key(other) in shown
            assert other not in shown
            detail = (await http.get(f"/v1/nodes/{node}", headers=bearer(reader))).json()
            (payment,) = detail["earnings"]["recent"]
            assert payment["task_key"] == task_key(alices)
            assert payment["task_id"] == (alices if reader == ALICE else "")
            (point,) = detail["qos_history"]
            assert point["task_id"] == (alices if reader == ALICE else task_key(alices))
            assert "secret fox" not in str(view) + str(detail)
        assert (await http.get("/v1/network")).status_code == 401  # the JSON is keyed; the pages are not


async def test_a_running_tasks_nodes_are_not_shown_until_it_ends(make_gateway, asgi_client):
    """A node that could see who else runs its task would know, before it commits, whether
    the secret sample drew it (three nodes) or not (itself alone): the network JSON shows a
    task's nodes once it ended, and a node's page lists its ended tasks only."""
    gw = await make_gateway()
    fold = gw.network
    sampled, alone = uuid.uuid4().hex, uuid.uuid4().hex
    fold.submitted(sampled, "tiny-sd", "native", time.time())
    fold.submitted(alone, "tiny-sd", "native", time.time())
    fold.assigned(sampled, NODES)
    fold.assigned(alone, NODES[:1])
    async with asgi_client(gw) as http:
        view = (await http.get("/v1/network")).json()
        by_id = {t["task_id"]: t for t in view["recent_tasks"]}
        assert by_id[sampled]["nodes"] == by_id[alone]["nodes"] == []
        assert by_id[sampled]["status"] == by_id[alone]["status"] == "assigned"
        for node in NODES:
            detail = (await http.get(f"/v1/nodes/{node}")).json()
            assert detail["recent_tasks"] == []
        fold.finished(
            TaskSucceeded(
                task_id=sampled,
                reason="unanimous",
                images=[],
                verdicts=dict.fromkeys(NODES, "agree"),
                qos={NODES[0]: 10, NODES[1]: 5, NODES[2]: 2},
            )
        )
        view = (await http.get("/v1/network")).json()
        by_id = {t["task_id"]: t for t in view["recent_tasks"]}
        assert by_id[sampled]["nodes"] == NODES
        assert by_id[alone]["nodes"] == []
        detail = (await http.get(f"/v1/nodes/{NODES[1]}")).json()
        assert [t["task_id"] for t in detail["recent_tasks"]] == [sampled]


def test_the_fold_is_bounded_in_tasks_per_node_and_in_nodes(monkeypatch):
    """A flood of tasks (an app submitting as fast as it may) keeps the last RECENT_TASKS
    tasks, with their keys and owners; a node its last PER_NODE of everything; the fold at
    most MAX_NODES nodes."""
    fold = NetworkFold()
    node = NODES[0]
    for i in range(RECENT_TASKS + 300):
        task_id = f"{i:032x}"
        fold.submitted(task_id, "m" * 2000, "native", float(i), owner=f"key-{i}")
        fold.assigned(task_id, [node])
        fold.qos_published(NodeQos(node_id=node, qos=5.0, samples=1, recent_timeouts=0, task_id=task_id))
        fold.chain_event(
            ChainLog(
                contract="TaskPayment",
                event="Settled",
                args={"taskId": task_key(task_id), "nodes": [node], "amounts": [1]},
                block_number=i,
                block_hash=f"0x{i:x}",
                log_index=0,
                tx_hash="0x",
            )
        )
    assert len(fold.tasks) == len(fold.keys) == len(fold.owners) == RECENT_TASKS
    assert set(fold.owners) == set(fold.tasks)
    record = fold.nodes[node]
    for ring in (record.tasks, record.qos, record.payments):
        assert len(ring) == network.PER_NODE
    assert len(record.by_block) <= 4 * network.PER_NODE
    assert record.earned == RECENT_TASKS + 300  # the total counts everything; only the rings are cut
    monkeypatch.setattr(network, "MAX_NODES", 5)
    for name in range(20):
        fold.qos_published(NodeQos(node_id=dev_node_id(f"flood-{name}"), qos=1.0, samples=1, recent_timeouts=0))
    assert len(fold.nodes) == 5


async def test_node_ids_in_the_path_are_checked_and_never_echoed_whole(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        for node_id in ("<script>alert(1)<script>", "0x" + "A" * 40, "0x" + "0" * 39, "x" * 5000):
            answer = await http.get(f"/v1/nodes/{node_id}")
            assert answer.status_code == 404, answer.text
            assert answer.json()["error"]["field"] == "node_id"
            assert len(answer.text) < 600
        unknown = await http.get(f"/v1/nodes/{dev_node_id('nobody')}")
        assert unknown.status_code == 404


# --------------------------------------------------------------------------- the pages


async def test_the_pages_send_a_self_only_content_security_policy_and_nosniff(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        for path in ("/", "/network", f"/nodes/{NODES[0]}", "/nodes/<b>x<b>"):
            page = await http.get(path)
            assert page.status_code == 200
            assert page.headers["x-content-type-options"] == "nosniff"
            policy = dict(
                ([*d.split(" ", 1), ""])[:2] for d in page.headers["content-security-policy"].split("; ") if d
            )
            assert policy["default-src"] == "'self'"
            assert policy["object-src"] == "'none'"
            assert policy["frame-ancestors"] == "'none'"
            assert policy["base-uri"] == "'none'"
            assert "unsafe-inline" not in page.headers["content-security-policy"]
            assert "unsafe-eval" not in page.headers["content-security-policy"]
            # the one inline script (the import map) is allowed by its hash, and nothing else is
            (importmap,) = re.findall(r'<script type="importmap">(.*?)</script>', page.text)
            digest = base64.b64encode(hashlib.sha256(importmap.encode()).digest()).decode()
            assert policy["script-src"] == f"'self' 'sha256-{digest}'"
            assert "<b>" not in page.text  # the node page's shell never echoes its path
        for asset in ("network.js", "style.css", "vendor/preact.mjs"):
            answer = await http.get(f"/web/{asset}")
            assert answer.status_code == 200
            assert answer.headers["x-content-type-options"] == "nosniff"
        assert (await http.get("/v1/network")).headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "../app.py",
        "..%2fapp.py",
        "%2e%2e/%2e%2e/app.py",
        "%2e%2e%2f%2e%2e%2fapp.py",
        "vendor/../../app.py",
        "vendor/..%2f..%2fapp.py",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "....//app.py",
        "..\\app.py",
        "network.js%00.png",
        "network.js/",
        "",
        "vendor",
        "NETWORK.JS",
    ],
)
async def test_web_serves_only_its_fixed_files(make_gateway, asgi_client, path):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        answer = await http.get(f"/web/{path}")
        assert answer.status_code == 404, (path, answer.status_code, answer.text[:200])
        assert answer.json()["error"]["code"] == "not_found"
        assert "import " not in answer.text
        assert "root:" not in answer.text


# --------------------------------------------------------------------------- A1111's interrupt


async def test_a1111_interrupt_and_progress_are_the_callers_own(make_gateway, asgi_client):
    """With keys on, Bob's interrupt does not touch Alice's running txt2img, nor does his
    progress show it; hers cancels it, and her request answers with no images."""
    gw = await make_gateway(api_keys=KEYS, sync_timeout_s=30)
    async with asgi_client(gw) as http:
        running = asyncio.create_task(
            http.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "steps": 2}, headers=bearer(ALICE))
        )

        async def alices_task() -> str | None:
            return (await http.get("/sdapi/v1/progress", headers=bearer(ALICE))).json()["current_task"]

        task_id = None
        for _ in range(200):
            if task_id := await alices_task():
                break
            await asyncio.sleep(0.02)
        assert task_id, "Alice's txt2img never showed in her progress"
        assert (await http.get("/sdapi/v1/progress", headers=bearer(BOB))).json()["current_task"] is None
        assert (await http.post("/sdapi/v1/interrupt", headers=bearer(BOB))).status_code == 200
        assert (await http.get(f"/v1/tasks/{task_id}", headers=bearer(ALICE))).json()["status"] != "cancelled"
        assert not running.done()
        assert (await http.post("/sdapi/v1/interrupt")).status_code == 401  # no key: refused, nothing touched
        assert (await http.post("/sdapi/v1/interrupt", headers=bearer(ALICE))).status_code == 200
        answer = await asyncio.wait_for(running, 20)
        assert answer.status_code == 200, answer.text
        assert answer.json()["images"] == []
        assert (await http.get(f"/v1/tasks/{task_id}", headers=bearer(ALICE))).json()["status"] == "cancelled"


async def test_a1111_progress_of_a_job_whose_submission_is_not_stored_yet(make_gateway):
    """Between a txt2img's start and its stored submission, `progress` shows the job as
    queued (no estimate), not a 404 an A1111 client cannot read (it found no `state`)."""
    app = create_app(await make_gateway(api_keys=KEYS))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        alice = (await http.get("/sdapi/v1/progress", headers=bearer(ALICE))).json()
        assert alice["current_task"] is None
        unstored = uuid.uuid4().hex  # as `a1111` records it before the submission is stored
        app.state.routes.a1111_running["alice"] = (unstored, time.time())
        answer = await http.get("/sdapi/v1/progress", headers=bearer(ALICE))
        assert answer.status_code == 200, answer.text
        seen = answer.json()
        assert (seen["current_task"], seen["progress"], seen["state"]["job_count"]) == (unstored, 0.0, 1)


# --------------------------------------------------------------------------- deeply nested bodies

DEEP_BODY_PROBE = """
import asyncio, sys, types
import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from stipple_gateway.app import ApiError, Routes
from stipple_gateway.settings import GatewaySettings

# what eth_account's py_ecc once did to every service (stipple_common now undoes it): the
# gateway's own check must hold even then
sys.setrecursionlimit(100_000)
routes = Routes(types.SimpleNamespace(settings=GatewaySettings()))

async def echo(request):
    try:
        await routes.read_json(request)
    except ApiError as exc:
        return JSONResponse(exc.native_body(), status_code=exc.status)
    return JSONResponse({"read": True})

async def main():
    app = Starlette(routes=[Route("/", echo, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        for body in (b"[" * 60_000 + b"]" * 60_000, b'{"prompt": "' + b"[" * 60_000 + b'"}', b'{"a": [[1]]}'):
            answer = await http.post("/", content=body, headers={"Content-Type": "application/json"})
            print(answer.status_code, answer.json(), flush=True)

asyncio.run(main())
"""


def test_a_deeply_nested_body_is_refused_before_it_is_parsed_and_never_kills_the_gateway():
    """Every service imports eth_account, whose py_ecc raises Python's recursion limit to
    100,000: a JSON body nested 60,000 deep (120 KB, under the body limit) then overflowed
    the C stack in msgspec and the gateway died (SIGSEGV). In a child process, so that a
    regression kills the child, not the test run."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", DEEP_BODY_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the process died (rc {done.returncode}): {done.stderr[-2000:]}"
    deep, bracketed_string, shallow = done.stdout.splitlines()
    assert deep.startswith("400 ")
    assert "nests deeper than" in deep
    assert bracketed_string == "200 {'read': True}"  # brackets inside a string do not count
    assert shallow == "200 {'read': True}"


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'"a fox"',
        b"null",
        b"1e999",
        b'{"prompt": 1}',
        b'{"prompt": "a", "params": []}',
        b'{"prompt": "a", "params": {"seed": 1e400}}',
        b'{"prompt": "a", "params": {"seed": "99999999999999999999"}}',
        b'{"prompt": "a", "params": {"seed": -99999999999999999999}}',
        b'{"prompt": "a", "params": {"n": 1000000000000000000000000000000}}',
        b'{"prompt": "a", "params": {"cfg_scale": NaN}}',
        b'{"prompt": "a", "params": {"steps": 1.5}}',
        b'{"prompt": "a", "params": {"loras": [{"name": "x", "model": 1, "clip": 2}]}}',
        b'{"prompt": "a", "params": {"loras": [{}]}}',
        b'{"prompt": "a", "models": [1]}',
        b'{"prompt": "a", "models": "tiny-sd"}',
        b'{"prompt": "a", "source_image": "not base64 at all!"}',
        b'{"prompt": "a", "source_image": "iVBORw0KGgo=", "source_processing": "inpainting"}',
        b'{"prompt": "a", "source_processing": "outpainting"}',
        b'{"prompt": "a", "extra_source_images": [{"image": "x"}]}',
        b'{"prompt": "a", "worker_blacklist": "yes"}',
        b'{"prompt": "\\u0000###\\ud800"}',
        b'{"prompt": "a", "prompt": "b", "unknown": 1}',
    ],
)
async def test_horde_garbage_is_4xx_never_500(make_gateway, asgi_client, body):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        answer = await http.post("/api/v2/generate/async", content=body, headers={"Content-Type": "application/json"})
        assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
        assert answer.json()["rc"]
        assert answer.json()["message"]
