"""The gateway's web pages, in Debian's chromium driven by Playwright, against the real
gateway, dispatcher, validator and three node agents (in this process, the tiny model),
with no internet: the pages load nothing but what the gateway serves. And the JSON the
network pages read (``GET /v1/network``, ``GET /v1/nodes/{node_id}``), and the static
files' fixed list, over plain HTTP.

Playwright's async API runs in the test's event loop, beside the in-process network: it
talks to its driver over a pipe, so waiting on the browser never blocks the gateway.

A screenshot of the generator after a generation goes to ``$STIPPLE_SCREENSHOT`` when set
(what produced docs/img/generator.png: ``STIPPLE_SCREENSHOT=docs/img/generator.png pytest
tests/test_web_pages.py -k generator``), else to the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from stipple_testkit.browser import local_chromium, require_chromium
from stipple_testkit.network import Network

needs_chromium = pytest.mark.usefixtures("chromium_installed")
TASK = {
    "base_model": "tiny-sd",
    "prompt": "a red fox in the snow",
    "task_config": {"image_width": 64, "image_height": 64, "steps": 2},
}


@pytest.fixture
def chromium_installed() -> None:
    require_chromium()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh chromium that may reach nothing but 127.0.0.1: a request anywhere else fails
    the test (`offsite`), and so does a script error."""
    offsite: list[str] = []
    async with local_chromium(tmp_path / "chromium", offsite) as context:
        script_errors: list[str] = []
        context.on("weberror", lambda error: script_errors.append(str(error.error)))
        yield context
    assert not offsite, f"the pages asked for something not served by the gateway: {offsite}"
    assert not script_errors, f"the pages' scripts failed: {script_errors}"


async def finished_task(http: httpx.AsyncClient, base: str, body: dict[str, Any]) -> dict[str, Any]:
    """Submit `body` and return its view once it has an outcome."""
    accepted = await http.post(f"{base}/v1/tasks", json=body)
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    for _ in range(600):
        view = (await http.get(f"{base}/v1/tasks/{task_id}")).json()
        if view.get("outcome"):
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} never finished")


@pytest.mark.integration
@pytest.mark.slow
@needs_chromium
async def test_the_generator_makes_an_image_shows_progress_errors_and_keeps_a_gallery(
    served: Network, browser: Any, tmp_path: Path
) -> None:
    net = served
    page = await browser.new_page()
    await page.goto(f"{net.gateway_url}/")
    await page.wait_for_function("() => document.querySelector('select[name=model]')?.value === 'tiny-sd'")
    await page.fill("textarea[name=prompt]", "a red fox in the snow")
    await page.fill("textarea[name=negative_prompt]", "blurry")
    await page.fill("input[name=width]", "64")
    await page.fill("input[name=height]", "64")
    await page.fill("input[name=steps]", "2")
    await page.fill("input[name=seed]", "1234")
    await page.click("button[name=generate]")

    image = page.locator(".results img")
    await image.wait_for()
    await page.wait_for_function("() => { const i = document.querySelector('.results img'); return i && i.complete }")
    assert await image.evaluate("img => img.naturalWidth") == 64
    assert await image.evaluate("img => img.naturalHeight") == 64
    task_id = await page.get_attribute(".task", "data-task")
    assert task_id
    assert re.fullmatch(r"[0-9a-f]{32}", task_id)
    assert await page.get_attribute(".task", "data-status") == "succeeded"
    assert (await page.inner_text(".results .seed")).strip() == "seed 1234"
    download = page.locator(".results a.download")
    assert await download.get_attribute("download") == f"stipple-{task_id}-0.png"
    assert await download.get_attribute("href") == f"/v1/tasks/{task_id}/images/0"

    # a bar per node the task ran on (the dispatcher compares every task here: three), from the events stream
    async with httpx.AsyncClient() as http:
        view = (await http.get(f"{net.gateway_url}/v1/tasks/{task_id}")).json()
    ran_on = {node["node_id"] for node in view["nodes"]}
    bars = page.locator(".node-progress")
    assert {await bar.get_attribute("data-node") for bar in await bars.all()} == ran_on
    for bar in await bars.all():  # each committed its result: its bar is full
        assert await bar.locator("progress").evaluate("p => p.value === p.max")

    shot = Path(os.environ.get("STIPPLE_SCREENSHOT") or tmp_path / "generator.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    await page.set_viewport_size({"width": 1100, "height": 900})
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000

    # bad input: the API's error is shown, naming the field, and the field is marked
    await page.fill("input[name=steps]", "0")
    await page.click("button[name=generate]")
    error = page.locator(".error")
    await error.wait_for()
    assert "steps" in await error.inner_text()
    assert "task_config.steps" in await page.inner_text(".error-field")
    assert await page.get_attribute("input[name=steps]", "aria-invalid") == "true"

    # the gallery keeps the task after a reload, with its image
    await page.reload()
    thumb = page.locator(f".thumb[data-task='{task_id}'] img")
    await thumb.wait_for()
    await page.wait_for_function(
        "(id) => { const i = document.querySelector(`.thumb[data-task='${id}'] img`); return i && i.complete }",
        arg=task_id,
    )
    assert await thumb.evaluate("img => img.naturalWidth") == 64
    await page.click(f".thumb[data-task='{task_id}'] button")
    assert await page.get_attribute(".task", "data-task") == task_id

    # img2img: an uploaded init image and a strength
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(init)
    await page.fill("textarea[name=prompt]", "a red square, painted")
    for name, value in (("width", "64"), ("height", "64"), ("steps", "2"), ("seed", "")):
        await page.fill(f"input[name={name}]", value)
    await page.set_input_files("input[name=init_image]", str(init))
    await page.locator("img.init-preview").wait_for()
    await page.fill("input[name=strength]", "0.5")
    await page.click("button[name=generate]")
    await page.wait_for_function(
        "(old) => { const t = document.querySelector('.task'); return t && t.dataset.task !== old"
        " && t.dataset.status === 'succeeded' && document.querySelector('.results img')?.complete }",
        arg=task_id,
    )
    second = await page.get_attribute(".task", "data-task")
    async with httpx.AsyncClient() as http:
        made = (await http.get(f"{net.gateway_url}/v1/tasks/{second}")).json()
    assert made["task"]["kind"] == "img2img"
    assert made["task"]["strength"] == 0.5
    assert made["task"]["init_image"].startswith("<image, ")
    assert await page.locator(".results img").evaluate("img => img.naturalWidth") == 64
    assert await page.locator(".thumb").count() == 2  # the gallery, newest first
    assert await page.get_attribute(".thumb >> nth=0", "data-task") == second
    await page.close()


@pytest.mark.integration
@pytest.mark.slow
@needs_chromium
async def test_the_network_page_lists_the_nodes_and_links_to_a_node_page_with_its_task(
    served: Network, browser: Any
) -> None:
    net = served
    async with httpx.AsyncClient() as http:
        view = await finished_task(http, net.gateway_url, TASK)
    assert view["status"] == "succeeded"
    task_id = view["task_id"]
    node_ids = {handle.node_id for handle in net.nodes.values()}

    page = await browser.new_page()
    await page.goto(f"{net.gateway_url}/network")
    await page.wait_for_selector(f".task-row[data-task='{task_id}'][data-status=succeeded]")
    rows = page.locator(".node-row")
    assert {await row.get_attribute("data-node") for row in await rows.all()} == node_ids
    for row in await rows.all():
        assert await row.get_attribute("data-state") in ("live", "busy")
        assert "tiny-sd" in await row.locator(".models").inner_text()
    verdicts = await page.inner_text(f".task-row[data-task='{task_id}'] .verdicts")
    assert verdicts.count("agree") == 3
    assert await page.inner_text(".live-count") == "3"

    chosen = sorted(node_ids)[0]
    await page.click(f".node-row[data-node='{chosen}'] a.node-link")
    await page.wait_for_url(f"**/nodes/{chosen}")
    await page.wait_for_selector(f".task-row[data-task='{task_id}']")
    assert "agree" in await page.inner_text(f".task-row[data-task='{task_id}']")
    assert "tiny-sd" in await page.inner_text(".node-info .models")
    assert await page.locator(".no-chain").count() == 2  # earnings and slashes: this network runs no chain
    await page.close()


@pytest.mark.integration
@pytest.mark.slow
async def test_network_and_node_json_and_the_static_files_fixed_list(served: Network) -> None:
    net = served
    base = net.gateway_url
    node_ids = {handle.node_id for handle in net.nodes.values()}
    async with httpx.AsyncClient() as http:
        view = await finished_task(http, base, TASK)
        task_id = view["task_id"]

        network = (await http.get(f"{base}/v1/network")).json()
        assert {n["node_id"] for n in network["nodes"]} == node_ids
        assert network["live"] == 3
        for node in network["nodes"]:
            assert node["models"] == ["tiny-sd"]
            assert node["state"] in ("live", "busy")
            assert node["live"] is True
            assert node["paused"] is False
        (seen,) = [t for t in network["recent_tasks"] if t["task_id"] == task_id]
        assert seen["status"] == "succeeded"
        assert seen["model"] == "tiny-sd"
        assert set(seen["nodes"]) == node_ids
        assert seen["verdicts"] == dict.fromkeys(node_ids, "agree")
        assert sorted(seen["qos"].values()) == [2, 5, 10]  # by commit order
        assert network["queue"] == {"length": 0, "source": "gateway"}
        assert network["chain"] is False

        node_id = sorted(node_ids)[0]
        for _ in range(100):  # the validator writes the node's QoS window just after the outcome
            detail = (await http.get(f"{base}/v1/nodes/{node_id}")).json()
            if any(s["task_id"] == task_id for s in detail["qos_window"]):
                break
            await asyncio.sleep(0.1)
        assert detail["node"]["node_id"] == node_id
        assert [t["task_id"] for t in detail["recent_tasks"]] == [task_id]
        assert next(s for s in detail["qos_window"] if s["task_id"] == task_id)["verdict"] == "agree"
        assert detail["earnings"] == {"total": 0, "recent": []}
        assert detail["slashes"] == {"total": 0, "recent": []}
        assert detail["chain"] is False

        unknown = await http.get(f"{base}/v1/nodes/0x{'0' * 40}")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["field"] == "node_id"
        assert unknown.json()["error"]["value"] == f"0x{'0' * 40}"
        malformed = await http.get(f"{base}/v1/nodes/not-a-node")
        assert malformed.status_code == 404
        assert malformed.json()["error"] | {"message": ""} == {
            "code": "not_found",
            "message": "",
            "field": "node_id",
            "value": "not-a-node",
        }

        for path, kind in (("/", "text/html"), ("/network", "text/html"), (f"/nodes/{node_id}", "text/html")):
            served_page = await http.get(f"{base}{path}")
            assert served_page.status_code == 200
            assert served_page.headers["content-type"].startswith(kind)
            assert "https://" not in served_page.text  # no CDN, no fonts
            assert "http://" not in served_page.text
            for asset in re.findall(r'"(/web/[^"]+)"', served_page.text):
                assert (await http.get(f"{base}{asset}")).status_code == 200, asset
        for name, kind in (
            ("generator.js", "text/javascript"),
            ("vendor/preact.mjs", "text/javascript"),
            ("vendor/hooks.mjs", "text/javascript"),
            ("vendor/htm.mjs", "text/javascript"),
            ("style.css", "text/css"),
            ("vendor/LICENSE-preact.txt", "text/plain"),
        ):
            asset = await http.get(f"{base}/web/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"].startswith(kind), name
            assert "https://" not in asset.text or name.startswith("vendor/")
        # only the files of static/web: nothing above it, however the path is spelled
        for escape in (
            "/web/..%2Fnetwork.py",
            "/web/..%2F..%2Fapp.py",
            "/web/%2e%2e/%2e%2e/app.py",
            "/web/vendor/..%2F..%2F..%2Ftasks.py",
            "/web/%2Fetc%2Fpasswd",
            "/web/",
            "/web/nope.js",
        ):
            refused = await http.get(httpx.URL(base).copy_with(raw_path=escape.encode()))
            assert refused.status_code == 404, escape
            assert refused.json()["error"]["code"] == "not_found", escape


SECRET = "web-pages-test-secret-0123456789"


@pytest.fixture
async def keyed(fresh_nats_url: str, runner: Any) -> AsyncIterator[Network]:
    """The `served` network, its gateway with API keys on (one key, `SECRET`)."""
    from stipple_node.service import NodeAgent

    async with Network.plain(fresh_nats_url) as net:
        nodes = [(f"node-{i}", NodeAgent) for i in (1, 2, 3)]
        await net.control_plane_and_nodes(runner, nodes, validator={"phash_threshold": 2})
        await net.gateway(api_keys=f"web:{SECRET}:100000")
        await asyncio.sleep(1.0)  # nodes announce themselves
        yield net


@pytest.mark.integration
@pytest.mark.slow
@needs_chromium
async def test_with_api_keys_the_pages_ask_for_a_key_and_send_it(keyed: Network, browser: Any) -> None:
    net = keyed
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{net.gateway_url}/")).status_code == 200  # the pages are public ...
        assert (await http.get(f"{net.gateway_url}/web/generator.js")).status_code == 200
        assert (await http.get(f"{net.gateway_url}/v1/network")).status_code == 401  # ... their data is not
        assert (await http.get(f"{net.gateway_url}/v1/nodes/0x{'0' * 40}")).status_code == 401

    page = await browser.new_page()
    await page.goto(f"{net.gateway_url}/")
    await page.locator(".error", has_text="unauthorized").wait_for()
    await page.fill("input[name=api_key]", SECRET)
    await page.click("form.key button[type=submit]")
    await page.wait_for_function("() => document.querySelector('select[name=model]')?.value === 'tiny-sd'")
    assert await page.evaluate("() => localStorage.getItem('stipple.apiKey')") == SECRET
    await page.fill("textarea[name=prompt]", "a lighthouse at dusk")
    await page.fill("input[name=width]", "64")
    await page.fill("input[name=height]", "72")
    await page.fill("input[name=steps]", "2")
    await page.click("button[name=generate]")
    # an <img> cannot send the key: the page fetches the image with it and shows the bytes
    await page.wait_for_function(
        "() => { const i = document.querySelector('.results img'); return i?.src.startsWith('blob:') && i.complete }"
    )
    assert await page.locator(".results img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 72]
    assert (await page.get_attribute(".results a.download", "href") or "").startswith("blob:")
    task_id = await page.get_attribute(".task", "data-task")

    await page.goto(f"{net.gateway_url}/network")  # the key kept in this browser
    await page.wait_for_selector(f".task-row[data-task='{task_id}']")
    assert await page.locator(".node-row").count() == 3
    await page.close()


TOKEN = 10**18
MIN_STAKE = 100 * TOKEN


@pytest.mark.integration
@pytest.mark.slow
async def test_a_nodes_json_shows_what_the_chain_paid_it(tmp_path: Path, runner: Any) -> None:
    async with Network.secured(tmp_path / "nats") as net:
        await net.chain_indexer(min_stake=MIN_STAKE, confirmations=1, embedded_block_s=0.2, poll_s=0.1)
        await net.gatekeeper(min_stake=MIN_STAKE)
        await net.dispatcher(min_stake=MIN_STAKE)
        await net.validator(phash_threshold=2)
        await net.gateway()
        for i in (1, 2, 3):
            await net.node(runner, f"paid-{i}", chain=True)
        await asyncio.sleep(1.5)  # heartbeats reach the directories
        node_ids = {handle.node_id for handle in net.nodes.values()}
        async with httpx.AsyncClient(base_url=net.gateway_url, timeout=30) as http:
            view = await finished_task(http, net.gateway_url, {**TASK, "fee": 3 * TOKEN})
            assert view["status"] == "succeeded", view
            task_id = view["task_id"]
            network = (await http.get("/v1/network")).json()
            assert network["chain"] is True
            assert {n["node_id"]: n["stake"] for n in network["nodes"]} == dict.fromkeys(node_ids, MIN_STAKE)
            paid: dict[str, int] = {}
            for _ in range(300):  # the settler's batch is mined, the follower publishes `Settled`
                details = {n: (await http.get(f"/v1/nodes/{n}")).json() for n in node_ids}
                paid = {n: d["earnings"]["total"] for n, d in details.items()}
                if all(paid.values()):
                    break
                await asyncio.sleep(0.2)
        assert sum(paid.values()) == 3 * TOKEN  # the fee, split by the task's QoS scores (10/5/2)
        for node_id, detail in details.items():
            (payment,) = detail["earnings"]["recent"]
            assert payment["task_id"] == task_id  # the chain's bytes32 key mapped back to the task
            assert payment["amount"] == paid[node_id]
            assert payment["tx_hash"].startswith("0x")
            assert detail["slashes"] == {"total": 0, "recent": []}


def test_the_fold_keeps_slashes_and_drops_what_a_reorg_voided() -> None:
    from eth_utils import keccak

    from stipple_common.messages import ChainLog, ChainReorg
    from stipple_gateway.network import NetworkFold

    fold = NetworkFold()
    node = "0x" + "ab" * 20
    fold.submitted("f" * 32, "tiny-sd", "native", 1.0)
    key = "0x" + keccak(text="f" * 32).hex()

    def log(event: str, contract: str, block: str, args: dict[str, Any]) -> ChainLog:
        return ChainLog(
            contract=contract, event=event, args=args, block_number=7, block_hash=block, log_index=0, tx_hash="0x01"
        )

    checksummed = "0x" + "AB" * 20
    fold.chain_event(log("Settled", "TaskPayment", "0xb1", {"taskId": key, "nodes": [checksummed], "amounts": [40]}))
    fold.chain_event(log("Slashed", "NodeStaking", "0xb2", {"taskId": key, "node": checksummed, "amount": 9}))
    fold.chain_event(log("Slashed", "NodeStaking", "0xb3", {"taskId": "0x" + "00" * 32, "node": node, "amount": 1}))
    record = fold.nodes[node]
    assert (record.earned, record.slashed) == (40, 10)
    assert [s.task_id for _, s in record.slashes] == ["f" * 32, ""]  # an unknown task: its chain key only
    fold.chain_event(ChainReorg(from_block=7, orphaned=["0xb2", "0xb1"], at=2.0))
    assert (record.earned, record.slashed) == (0, 1)
    assert [p for _, p in record.payments] == []
    assert [s.amount for _, s in record.slashes] == [1]
    fold.chain_event(log("Settled", "TaskPayment", "0xb4", {"taskId": key, "nodes": "not a list", "amounts": [1]}))
    assert record.earned == 0  # malformed arguments are skipped, not folded
