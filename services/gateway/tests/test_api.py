"""The gateway's HTTP contract against a real nats-server and the JetStream object store.

No other service runs here, so these tests cover input validation, refusals and
timeouts; tests/test_e2e.py covers tasks that complete.
"""

import time
import uuid

import httpx
import msgspec
import pytest

from stipple_common import bus, subjects
from stipple_common.blobstore import open_blob_store
from stipple_common.identity import dev_node_id
from stipple_common.messages import IndexedStake, TaskSubmitted, task_event_decoder
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_gateway.app import create_app
from stipple_gateway.settings import GatewaySettings
from stipple_gateway.tasks import TaskService
from stipple_testkit.nodes import joined

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateway(nc):
    js = nc.jetstream()
    await bus.ensure_streams(js, subjects.stream_configs())
    blobs = await open_blob_store(backend="jetstream", js=js, bucket=f"test-{uuid.uuid4().hex[:8]}")
    settings = GatewaySettings(max_body_bytes=2000, sync_timeout_s=0.5)
    gw = TaskService(nc, js, blobs, NodeDirectory(ttl_s=10), settings, Metrics("gateway"))
    await gw.start()
    yield gw
    await gw.stop()
    await blobs.close()


@pytest.fixture
async def client(gateway):
    transport = httpx.ASGITransport(app=create_app(gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        yield http


def make_live(gateway, *names):
    """Nodes `names` (their ids `dev_node_id(name)`) announced themselves just now."""
    for name in names:
        gateway.directory.apply(joined(dev_node_id(name)), seen_at=time.time())


def stake(gateway, name, amount, owner=""):
    """What the chain says of node `name` (the `stakes` bucket, as the directory follows it)."""
    gateway.directory.stakes[dev_node_id(name)] = IndexedStake(stake=amount, owner=dev_node_id(owner) if owner else "")


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="

TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}


async def test_healthz_and_metrics(client):
    health = await client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "nats": True, "live_nodes": 0}
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert 'stipple_gateway_requests_total{route="/healthz",status="200"} 1.0' in metrics.text


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        ({**TASK, "task_config": {"steps": 500}}, "task_config.steps", 500),
        ({**TASK, "task_config": {"image_width": 100}}, "task_config.image_width", 100),
        ({**TASK, "sampler": "Nope"}, "sampler", "Nope"),
        ({**TASK, "prompt": ["a", "b"]}, "prompt", ["a", "b"]),
        ({**TASK, "fee": -1}, "fee", -1),
        ({**TASK, "fee": "5"}, "fee", "5"),
        ({**TASK, "fee": 1.5}, "fee", 1.5),
        ({**TASK, "fee": 10 * 10**18 + 1}, "fee", 10 * 10**18 + 1),  # above STIPPLE_MAX_FEE
    ],
)
async def test_native_bad_input_is_422_naming_field_and_value(client, body, field, value):
    response = await client.post("/v1/tasks", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["field"] == field
    assert error["value"] == (value if not isinstance(value, list) else repr(value))
    assert field in error["message"]


async def test_native_missing_and_unknown_fields(client):
    response = await client.post("/v1/tasks", json={"prompt": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "base_model"
    response = await client.post("/v1/tasks", json={**TASK, "steps": 4})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("steps: unknown field")


async def test_malformed_empty_and_oversized_bodies(client):
    bad = await client.post("/v1/tasks", content=b"{not json")
    assert bad.status_code == 400
    assert "not valid JSON" in bad.json()["error"]["message"]
    empty = await client.post("/v1/tasks", content=b"")
    assert empty.status_code == 422
    assert "empty" in empty.json()["error"]["message"]
    big = await client.post("/v1/tasks", json={**TASK, "prompt": "x" * 5000})
    assert big.status_code == 413
    assert big.json()["error"]["message"].endswith("bytes; the limit is 2000")


async def test_no_nodes_is_503_and_unknown_model_is_422(client, gateway):
    response = await client.post("/v1/tasks", json=TASK)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_nodes"
    make_live(gateway, "a", "b")
    stake(gateway, "a", 10, owner="op-a")
    stake(gateway, "b", 10, owner="op-a")
    unknown = await client.post("/v1/tasks", json={**TASK, "base_model": "sdxl-base"})
    assert unknown.status_code == 422
    assert unknown.json()["error"] == {
        "code": "unknown_model",
        "message": "base_model: no node serves 'sdxl-base'; available models: tiny-sd",
        "field": "base_model",
        "value": "sdxl-base",
    }
    too_few = await client.post("/v1/tasks", json=TASK)  # two nodes, one operator: not three distinct
    assert too_few.status_code == 503
    assert "2 live nodes of 1 operators" in too_few.json()["error"]["message"]


async def test_accepted_task_is_published_with_a_concrete_seed(client, gateway):
    make_live(gateway, "a", "b", "c")
    response = await client.post("/v1/tasks", json=TASK)
    assert response.status_code == 202
    body = response.json()
    task_id = body["task_id"]
    assert body["status"] == "pending"
    assert 0 <= body["seed"] < 2**32
    events = await bus.read_subject(gateway.js, subjects.TASKS_STREAM, f"tasks.{task_id}.>", task_event_decoder)
    assert len(events) == 1
    assert isinstance(events[0], TaskSubmitted)
    assert events[0].spec.task_config.seed == body["seed"]
    view = (await client.get(f"/v1/tasks/{task_id}")).json()
    assert view["status"] == "pending"
    assert view["nodes"] == []
    not_ready = await client.get(f"/v1/tasks/{task_id}/images/0")
    assert not_ready.status_code == 409
    assert "pending" in not_ready.json()["error"]["message"]


async def test_idempotency_key_makes_a_retry_the_same_task(client, gateway):
    make_live(gateway, "a", "b", "c")
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = (await client.post("/v1/tasks", json=TASK, headers=key)).json()["task_id"]
    second = (await client.post("/v1/tasks", json=TASK, headers=key)).json()["task_id"]
    assert first == second
    events = await bus.read_subject(gateway.js, subjects.TASKS_STREAM, f"tasks.{first}.>", task_event_decoder)
    assert len(events) == 1


async def test_unknown_task_ids_are_404(client):
    assert (await client.get("/v1/tasks/" + "0" * 32)).status_code == 404
    bad = await client.get("/v1/tasks/../../etc")
    assert bad.status_code == 404
    response = await client.get("/v1/tasks/not-an-id")
    assert response.status_code == 404
    assert "32 hex digits" in response.json()["error"]["message"]


async def test_sdcn_errors_use_msg_and_sdcn_field_names(client, gateway):
    response = await client.post("/txt2img", json={"prompt": "x", "width": 63})
    assert response.status_code == 422
    assert response.json() == {"msg": "width: Expected `int` >= 64 (got 63)"}
    response = await client.post("/txt2img", json={"prompt": "x", "cfg_scale": 99})
    assert response.status_code == 422
    assert response.json()["msg"].startswith("cfg_scale: Expected `float` <= 30.0 (got 99.0)")
    response = await client.post("/txt2img", json={"prompt": "x", "loras": [["style", 9.5]]})
    assert response.status_code == 422
    assert response.json()["msg"].startswith("loras[0]: Expected `float` <= 4.0 (got 9.5)")
    response = await client.post("/txt2img", json={"prompt": "x", "loras": [["style"]]})
    assert response.status_code == 422
    assert response.json()["msg"].startswith("loras[0]: Expected `array` of length 2")
    response = await client.post("/img2img", json={"prompt": "x"})
    assert response.json() == {"msg": "init_image: required field is missing"}
    response = await client.post("/img2img", json={"prompt": "x", "init_image": "bm90IGFuIGltYWdl"})
    assert response.status_code == 422
    assert response.json()["msg"].startswith("init_image: not a PNG, JPEG or WebP image")
    response = await client.post("/img2img", json={"prompt": "x", "init_image": PNG, "denoising_strength": 2})
    assert response.json()["msg"].startswith("denoising_strength: Expected `float` <= 1.0 (got 2.0)")
    response = await client.post("/txt2img", json={"prompt": "x", "sampler_name": "Warp"})
    assert response.json()["msg"].startswith("sampler_name: unknown sampler")
    response = await client.post("/txt2img", json={"prompt": "x", "denoise": 1})
    assert response.json()["msg"].startswith("denoise: unknown field")
    response = await client.post("/txt2img", json={"prompt": "x"})
    assert response.status_code == 503
    assert (
        response.json()["msg"]
        == "base_model: no node serves 'tiny-sd'; available models: none (no node has registered)"
    )


async def test_sdcn_times_out_with_a_clear_message_instead_of_hanging(client, gateway):
    make_live(gateway, "a", "b", "c")  # announced, but nobody works
    started = time.monotonic()
    response = await client.post("/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2})
    assert time.monotonic() - started < 5
    assert response.status_code == 504
    message = response.json()["msg"]
    assert "did not finish within 0.5 s (state pending)" in message
    assert "poll GET /v1/tasks/" in message


async def test_nodes_listing(client, gateway):
    make_live(gateway, "a")
    body = (await client.get("/v1/nodes")).json()
    assert body["live"] == 1
    (node,) = body["nodes"]
    assert (node["node_id"], node["live"]) == (dev_node_id("a"), True)
    assert (node["operator"], node["stake"]) == (dev_node_id("a"), 0)  # the chain knows nothing of it yet
    stake(gateway, "a", 500, owner="op")
    (node,) = (await client.get("/v1/nodes")).json()["nodes"]
    assert (node["operator"], node["stake"]) == (dev_node_id("op"), 500)  # the chain's word, never the node's


async def test_nats_outage_is_503_not_500(fresh_nats_url):
    import nats

    client = await nats.connect(fresh_nats_url)
    js = client.jetstream()
    await bus.ensure_streams(js, subjects.stream_configs())
    blobs = await open_blob_store(backend="jetstream", js=js, bucket="outage")
    gw = TaskService(client, js, blobs, NodeDirectory(ttl_s=10), GatewaySettings(), Metrics("gateway"))
    await client.close()
    transport = httpx.ASGITransport(app=create_app(gw))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        response = await http.get("/v1/tasks/" + "a" * 32)
        health = await http.get("/healthz")
    assert response.status_code == 503
    assert "message bus is unavailable" in response.json()["error"]["message"]
    assert health.status_code == 503


async def test_task_view_summarizes_input_images(client, gateway):
    make_live(gateway, "a", "b", "c")
    body = {**TASK, "kind": "img2img", "init_image": PNG}
    task_id = (await client.post("/v1/tasks", json=body)).json()["task_id"]
    view = (await client.get(f"/v1/tasks/{task_id}")).json()
    assert view["task"]["init_image"] == f"<image, {len(PNG)} characters>"
    assert view["task"]["kind"] == "img2img"


async def test_unknown_paths_and_methods_answer_json_errors(client):
    missing = await client.get("/v2/tasks")
    assert missing.status_code == 404
    assert missing.json()["error"] == {"code": "not_found", "message": "GET /v2/tasks: Not Found"}
    wrong = await client.put("/v1/tasks/" + "a" * 32)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD", "DELETE"}


async def test_the_fee_travels_with_the_task(client, gateway):
    make_live(gateway, "a", "b", "c")
    response = await client.post("/v1/tasks", json={**TASK, "fee": 250})
    assert response.status_code == 202
    task_id = response.json()["task_id"]
    events = await bus.read_subject(gateway.js, subjects.TASKS_STREAM, f"tasks.{task_id}.>", task_event_decoder)
    assert events[0].fee == 250
    view = (await client.get(f"/v1/tasks/{task_id}")).json()
    assert view["fee"] == 250
    assert "queue" not in view  # no dispatcher answers here: the view says nothing rather than guessing


async def test_full_validation_travels_with_the_task_and_is_charged_for_three(client, gateway):
    make_live(gateway, "a", "b", "c")
    response = await client.post("/v1/tasks", json={**TASK, "fee": 250, "validation": "full"})
    assert response.status_code == 202
    task_id = response.json()["task_id"]
    events = await bus.read_subject(gateway.js, subjects.TASKS_STREAM, f"tasks.{task_id}.>", task_event_decoder)
    assert events[0].validation == "full"
    assert events[0].fee == 750  # three nodes, three fees
    sampled = await client.post("/v1/tasks", json={**TASK, "fee": 250})
    events = await bus.read_subject(
        gateway.js, subjects.TASKS_STREAM, f"tasks.{sampled.json()['task_id']}.>", task_event_decoder
    )
    assert (events[0].validation, events[0].fee) == ("sampled", 250)


@pytest.mark.parametrize("value", ["always", "", None, 3, ["full"]])
async def test_an_unknown_validation_is_refused_naming_the_field_and_value(client, gateway, value):
    make_live(gateway, "a", "b", "c")
    response = await client.post("/v1/tasks", json={**TASK, "validation": value})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "validation"
    assert error["value"] == (str(value) if isinstance(value, list) else value)  # a list is shown as text
    assert "full" in error["message"]


@pytest.mark.parametrize("depth", [33, 900, 5000])
@pytest.mark.parametrize(
    "path", ["/v1/tasks", "/txt2img", "/sdapi/v1/txt2img", "/v1/images/generations", "/api/v2/generate/async"]
)
async def test_deeply_nested_bodies_are_400_on_every_json_route(gateway, path, depth):
    """Below msgspec's recursion limit (900) and past it (5,000): a 400 naming the depth,
    never a 500 from a RecursionError in a parser, an error message's repr or a log line."""
    gateway.settings = msgspec.structs.replace(gateway.settings, max_body_bytes=100_000)
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    transport = httpx.ASGITransport(app=create_app(gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        response = await http.post(path, content=body)
    assert response.status_code == 400
    assert "nests deeper than 32 levels" in response.text


async def test_a_body_at_the_depth_limit_is_read_and_judged_on_its_fields(client):
    nested: object = 1
    for _ in range(31):
        nested = [nested]
    response = await client.post("/v1/tasks", json={**TASK, "prompt": nested})
    assert response.status_code == 422  # read, then refused for what it says: prompt is not a string
    assert response.json()["error"]["field"] == "prompt"


def test_json_depth_counts_without_recursion_and_stops_past_the_limit():
    from stipple_gateway.app import json_depth

    assert json_depth(1, 32) == 0
    assert json_depth({"a": [1, {"b": []}]}, 32) == 4
    deep: object = []
    for _ in range(100_000):  # far past Python's recursion limit
        deep = [deep]
    assert json_depth(deep, 32) == 33


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"loras": [{"model": "https://evil.example/x.safetensors"}]}, "loras[0].model"),
        ({"vae": "http://evil.example/vae.safetensors"}, "vae"),
        ({"base_model": "https://example.com/model.safetensors"}, "base_model"),
    ],
)
async def test_a_model_source_outside_the_operators_policy_is_422_at_submit(client, gateway, extra, field):
    """The default policy (no STIPPLE_MODEL_SOURCES) allows Hugging Face ids and no URL;
    the gateway refuses at submit, naming the field, before any node would fetch it."""
    make_live(gateway, "a", "b", "c")
    response = await client.post("/v1/tasks", json={**TASK, **extra})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    expected = extra["loras"][0]["model"] if "loras" in extra else next(iter(extra.values()))
    assert error["value"] == expected
