"""End to end: the real services as processes (gateway, dispatcher, validator, gatekeeper,
chain-indexer, three node agents on the built-in tiny model) on a real nats-server with
authentication on, as `stipple up` runs them, driven over HTTP as an app would.
"""

import asyncio
import base64
import io
import re
import time

import httpx
import pytest
from PIL import Image

from stipple_cli.network import MIN_STAKE, LocalNetwork

# The network runs as processes (eight interpreters importing torch and the services): its
# start takes up to a minute and more on a cold machine, so these modules have five, and
# they share one test worker (xdist_group "process-networks", see conftest.py) instead of starting two at once.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.xdist_group("process-networks"),
]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    # every task compared (rate 1): these tests follow a task through three nodes; the default
    # rate (one node for most tasks, which `stipple up` runs) is tested in process: tests/test_sampling.py
    net = LocalNetwork(
        data_dir=tmp_path_factory.mktemp("stipple"), port=0, nodes=3, extra_env={"STIPPLE_VALIDATION_RATE": "1"}
    )
    net.start(timeout=240)
    yield net
    net.stop()


@pytest.fixture(scope="module")
def http(network):
    with httpx.Client(base_url=network.gateway_url, timeout=120) as client:
        yield client


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def wait_finished(http, task_id, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = http.get(f"/v1/tasks/{task_id}").json()
        if view["status"] in ("succeeded", "aborted"):
            return view
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not finish: {view}")


def test_health_sees_three_live_nodes(http, network):
    body = http.get("/healthz").json()
    assert body == {"status": "ok", "nats": True, "live_nodes": 3}
    nodes = http.get("/v1/nodes").json()["nodes"]
    assert sorted(n["node_id"] for n in nodes) == sorted(network.node_ids().values())  # their keys' addresses
    assert all(n["models"] == ["tiny-sd"] for n in nodes)
    assert all(n["stake"] == MIN_STAKE for n in nodes)  # each staked the minimum with its own key


async def test_stipple_up_is_secure_by_default(network):
    """No anonymous client gets in; a key without stake is an applicant that reaches nothing."""
    import nats
    import nats.errors
    from eth_account import Account

    from stipple_common.service import nats_identity

    for options in ({}, {"user": "gateway", "password": "guess"}, {"token": "0x" + "ab" * 20}):
        with pytest.raises(nats.errors.Error):
            await nats.connect(network.nats_url, allow_reconnect=False, connect_timeout=3, **options)
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc))

    stranger = await nats.connect(
        network.nats_url, **nats_identity(Account.create()), error_cb=on_error, max_reconnect_attempts=0
    )
    try:
        await stranger.subscribe("tasks.>")
        await stranger.subscribe("nodes.>")
        await stranger.publish("tasks.t.submitted", b"{}")
        await stranger.flush(timeout=3)
        await asyncio.sleep(0.3)
    finally:
        await stranger.close()
    assert len([e for e in refused if "permissions violation" in e]) == 3, refused


def test_sdcn_txt2img_returns_base64_pngs_from_three_agreeing_nodes(http):
    request = {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "loras": [],
        "seed": 11,
        "sampler_name": "Euler",
        "steps": 3,
        "cfg_scale": 6.5,
        "width": 96,
        "height": 64,
        "model": "tiny-sd",
        "batch_size": 2,
    }
    response = http.post("/txt2img", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["images"]) == 2
    for encoded in body["images"]:
        image = decode_png(base64.b64decode(encoded))
        assert image.size == (96, 64)
    assert body["seeds"] == [11, 12]
    view = http.get(f"/v1/tasks/{body['task_id']}").json()
    assert view["status"] == "succeeded"
    assert view["source"] == "sdcn"
    assert len({n["node_id"] for n in view["nodes"]}) == 3
    assert view["outcome"]["reason"] == "unanimous"
    assert set(view["outcome"]["verdicts"].values()) == {"agree"}


def test_native_task_lifecycle(http):
    task = {
        "base_model": "tiny-sd",
        "prompt": "a red fox",
        "negative_prompt": "",
        "task_config": {"image_width": 64, "image_height": 80, "steps": 2, "cfg": 7, "seed": -1, "num_images": 1},
    }
    accepted = http.post("/v1/tasks", json=task)
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    seed = accepted.json()["seed"]
    assert seed >= 0  # -1 was resolved by the gateway, so every node uses the same seed
    view = wait_finished(http, task_id)
    assert view["status"] == "succeeded"
    assert len(view["nodes"]) == 3
    assert len({n["node_id"] for n in view["nodes"]}) == 3
    hashes = {n["node_id"]: [i["phash"] for i in n["images"]] for n in view["nodes"]}
    assert all(len(h) == 1 and len(h[0]) == 16 for h in hashes.values())
    assert len({tuple(h) for h in hashes.values()}) == 1  # one machine, fixed threads: identical hashes
    assert view["images"][0]["seed"] == seed
    png = http.get(f"/v1/tasks/{task_id}/images/0")
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert decode_png(png.content).size == (64, 80)
    missing = http.get(f"/v1/tasks/{task_id}/images/1")
    assert missing.status_code == 404
    assert "out of range" in missing.json()["error"]["message"]


def test_same_seed_gives_the_same_image_and_another_seed_does_not(http):
    def image(seed):
        body = {"prompt": "a castle", "seed": seed, "steps": 2, "width": 64, "height": 64}
        response = http.post("/txt2img", json=body)
        assert response.status_code == 200, response.text
        return base64.b64decode(response.json()["images"][0])

    first, second, other = image(1234), image(1234), image(4321)
    assert first == second
    assert first != other


def test_malformed_requests_get_4xx_naming_the_field(http):
    sdcn = http.post("/txt2img", json={"prompt": "x", "steps": 0})
    assert sdcn.status_code == 422
    assert sdcn.json()["msg"] == "steps: Expected `int` >= 1 (got 0)"
    native = http.post("/v1/tasks", json={"base_model": "tiny-sd", "prompt": "x", "task_config": {"num_images": 50}})
    assert native.status_code == 422
    assert native.json()["error"]["field"] == "task_config.num_images"
    assert native.json()["error"]["value"] == 50
    assert http.post("/v1/tasks", content=b"]]").status_code == 400
    unknown = http.post("/v1/tasks", json={"base_model": "nope", "prompt": "x"})
    assert unknown.status_code == 422
    assert unknown.json()["error"]["field"] == "base_model"


def test_every_service_serves_prometheus_metrics(http, network):
    urls = network.metrics_urls()
    assert len(urls) == 8
    expected = {
        "gateway": "stipple_gateway_tasks_submitted_total",
        "dispatcher": "stipple_dispatcher_tasks_total",
        "validator": "stipple_validator_outcomes_total",
        "chain-indexer": "stipple_chain_indexer_transactions_total",
        "gatekeeper": "stipple_gatekeeper_admissions_total",
    }
    catalog = metric_catalog()  # what docs/metrics.md, the dashboards and the alerts are checked against
    for name, url in urls.items():
        body = httpx.get(url, timeout=10).text
        metric = expected.get(name, "stipple_node_tasks_total")
        assert f"# TYPE {metric} counter" in body, f"{name} at {url} lacks {metric}"
        served = {m[0] for m in re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M) if not m[0].endswith("_created")}
        listed = catalog["node-agent" if name.startswith("node-") else name]
        assert served <= listed, f"{name} serves metrics the catalog lacks: {sorted(served - listed)}"
        optional = {"stipple_gateway_webhooks_total"}  # only with STIPPLE_WEBHOOK_SECRET
        assert listed - optional <= served, f"{name} lacks {sorted(listed - optional - served)}"
    # and they say what happened: the tasks of the tests above, three live nodes, lag read
    gateway, dispatcher, validator = (scrape(urls[name]) for name in ("gateway", "dispatcher", "validator"))
    assert gateway[("stipple_gateway_task_seconds_count", (("outcome", "succeeded"),))] >= 1
    live = sum(dispatcher[("stipple_dispatcher_nodes", (("state", s),))] for s in ("idle", "busy"))
    assert live == 3
    assert validator[("stipple_validator_verdicts_total", (("verdict", "agree"),))] >= 3
    lag = ("stipple_validator_consumer_pending_messages", (("consumer", "validator"), ("stream", "TASKS")))
    assert lag in validator
    node = scrape(urls["node-1"])
    assert node[("stipple_node_model_loads_total", (("result", "loaded"),))] >= 1
    assert node[("stipple_node_gpu_devices", ())] >= 0
    assert node[("stipple_node_denoise_seconds_count", ())] >= 1


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def metric_catalog() -> dict[str, set[str]]:
    """Service -> the names its registries declare (deploy/tools/exported_metrics.py), as
    `# TYPE` lines name them (a counter with _total)."""
    import importlib.util
    import sys
    from pathlib import Path

    module = sys.modules.get("exported_metrics")
    if module is None:
        path = Path(__file__).resolve().parents[1] / "deploy" / "tools" / "exported_metrics.py"
        spec = importlib.util.spec_from_file_location("exported_metrics", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["exported_metrics"] = module  # before running it: its dataclass looks itself up
        spec.loader.exec_module(module)
    out: dict[str, set[str]] = {}
    for family in module.families():
        out.setdefault(family.service, set()).add(family.name + ("_total" if family.type == "counter" else ""))
    return out


async def chain_events(nats_url: str, subject: str, want, timeout: float = 60.0):
    """CHAIN events on `subject` for which `want(event)` holds, once there is one."""
    import asyncio

    import nats

    from stipple_common import bus, subjects
    from stipple_common.messages import chain_decoder

    nc = await nats.connect(nats_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = await bus.read_messages(nc.jetstream(), subjects.CHAIN_STREAM, subject)
            found = [e for e in (chain_decoder.decode(m.data) for m in msgs) if want(e)]
            if found:
                return found
            await asyncio.sleep(0.2)
        raise AssertionError(f"no {subject} event came within {timeout} s")
    finally:
        await nc.close()


async def test_a_paid_task_is_escrowed_and_settled_on_chain_to_its_three_nodes(http, network):
    from stipple_common.chain import task_key

    config = {"image_width": 64, "image_height": 64, "steps": 2, "seed": 11}
    body = {"base_model": "tiny-sd", "prompt": "a paid fox", "fee": 3_000, "task_config": config}
    task_id = http.post("/v1/tasks", json=body).json()["task_id"]
    view = wait_finished(http, task_id)
    assert view["status"] == "succeeded"
    key = "0x" + task_key(task_id).hex()
    settled_events = await chain_events(
        network.admin_url("chain-indexer"), "chain.TaskPayment.Settled", lambda e: e.args["taskId"] == key
    )
    (settled,) = settled_events
    addresses = {n["node_id"]: n["address"] for n in http.get("/v1/nodes").json()["nodes"]}
    assert sorted(settled.args["nodes"]) == sorted(addresses.values())
    assert sum(settled.args["amounts"]) == 3_000
    # QoS 10/5/2 by commit order: floor(3000 * share / 17), the 2 left over to the first node
    shares = [1_764, 882, 352]
    assert sorted(settled.args["amounts"]) in [sorted([*shares[:i], shares[i] + 2, *shares[i + 1 :]]) for i in range(3)]


# ----------------------------------------------------------------------------- the whole task format


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> str:
    """A LoRA for the tiny model, on this machine's disk, which every local node can read."""
    from stipple_testkit.tinyzoo import make_tiny_lora

    return str(make_tiny_lora(tmp_path_factory.mktemp("lora") / "tiny-lora.safetensors", base="sd15"))


def test_a_crynux_task_runs_as_it_is(http, lora_file):
    crynux = {
        "version": "2.5.0",
        "base_model": {"name": "tiny-sd", "variant": None},
        "dtype": "auto",
        "unet": "",
        "prompt": "a (red fox:1.4) in snow, best quality",
        "negative_prompt": "lowres",
        "lora": {"model": lora_file, "weight_file_name": "", "weight": 80},
        "scheduler": {"method": "EulerAncestralDiscreteScheduler", "args": {"timestep_spacing": "trailing"}},
        "vae": "",
        "textual_inversion": "",
        "task_config": {
            "image_width": 64,
            "image_height": 64,
            "steps": 3,
            "seed": 99975892,
            "num_images": 2,
            "safety_checker": False,
            "cfg": 5,
        },
    }
    accepted = http.post("/v1/tasks", json=crynux)
    assert accepted.status_code == 202, accepted.text
    view = wait_finished(http, accepted.json()["task_id"])
    assert view["status"] == "succeeded", view
    assert view["outcome"]["reason"] == "unanimous"
    assert [i["seed"] for i in view["images"]] == [99975892, 99975893]
    assert view["task"]["loras"] == [{"model": lora_file, "weight_file_name": "", "weight": 0.8}]
    plain = http.post("/v1/tasks", json={**crynux, "lora": None})
    plain_view = wait_finished(http, plain.json()["task_id"])
    assert plain_view["status"] == "succeeded"
    with_lora_png = http.get(view["images"][0]["url"]).content
    assert http.get(plain_view["images"][0]["url"]).content != with_lora_png  # the LoRA was applied


def test_sdcn_img2img(http):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    response = http.post(
        "/img2img",
        json={
            "prompt": "a red square",
            "init_image": png_data_url(init),
            "denoising_strength": 0.5,
            "steps": 4,
            "width": 64,
            "height": 64,
            "seed": 3,
        },
    )
    assert response.status_code == 200, response.text
    image = decode_png(base64.b64decode(response.json()["images"][0]))
    assert image.size == (64, 64)


def test_a_task_the_nodes_cannot_run_ends_with_their_typed_errors(http, tmp_path):
    missing = str(tmp_path / "no-such-lora.safetensors")
    task = {
        "base_model": "tiny-sd",
        "prompt": "x",
        "loras": [{"model": missing}],
        "task_config": {"image_width": 64, "image_height": 64, "steps": 2, "seed": 1},
    }
    accepted = http.post("/v1/tasks", json=task)
    assert accepted.status_code == 202  # the gateway cannot know what is on the nodes' disks
    view = wait_finished(http, accepted.json()["task_id"])
    assert view["status"] == "aborted"
    assert view["outcome"]["reason"] == "too_few_results"
    assert set(view["outcome"]["verdicts"].values()) == {"error"}
    for node in view["nodes"]:
        assert node["status"] == "errored"
        assert node["error"]["message"].startswith("loras[0].model: ")
        assert "no-such-lora" in node["error"]["message"]


def test_a_queued_task_shows_its_position_and_eta_and_the_fee_orders_the_queue(http):
    """Each task needs all three nodes, so a burst queues; the dearer task runs sooner."""
    body = {
        "base_model": "tiny-sd",
        "prompt": "a queue",
        "task_config": {"image_width": 128, "image_height": 128, "steps": 30, "seed": 3},
    }
    ids = [http.post("/v1/tasks", json=body).json()["task_id"] for _ in range(4)]
    dear = http.post("/v1/tasks", json={**body, "fee": 1000}).json()["task_id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the dispatcher has them once its consumer fetched them
        cheap_last = http.get(f"/v1/tasks/{ids[-1]}").json()
        dear_view = http.get(f"/v1/tasks/{dear}").json()
        if "queue" in cheap_last and "queue" in dear_view:
            break
        time.sleep(0.02)
    assert cheap_last["status"] == "pending"
    assert cheap_last["queue"]["position"] > dear_view["queue"]["position"]
    assert cheap_last["queue"]["eta_s"] > dear_view["queue"]["eta_s"] > 0
    finished = {task_id: wait_finished(http, task_id) for task_id in [*ids, dear]}
    assert all(view["status"] == "succeeded" for view in finished.values())
    assigned_at = {task_id: view["outcome"]["finished_at"] for task_id, view in finished.items()}
    assert assigned_at[dear] < assigned_at[ids[-1]]
