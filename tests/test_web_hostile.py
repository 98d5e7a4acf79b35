"""The web pages against hostile strings, in Debian's chromium driven by Playwright: a node
announces a device and model names that are markup and script (``<img src=x onerror=...>``,
``javascript:`` URLs, a closing ``</script>``), a task carries a model name and source of
the same kind, and the node page is opened at a path that is markup too. Every one must be
shown as text: no script of theirs runs (``window.__pwned`` stays undefined, no dialog
opens) and none even tries (no Content-Security-Policy violation: escaping holds on its
own, the policy is the second line).

A real gateway over a real nats-server, served by uvicorn; the strings go where a node's
announcement and the control plane's task events put them (the node directory and the
network fold), as no hostile node could otherwise be made to announce them here.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import uvicorn

from stipple_common import bus, subjects
from stipple_common.blobstore import open_blob_store
from stipple_common.identity import dev_node_id
from stipple_common.messages import NodeQos, TaskSucceeded
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_gateway.app import create_app
from stipple_gateway.settings import GatewaySettings
from stipple_gateway.tasks import TaskService
from stipple_testkit.browser import local_chromium
from stipple_testkit.nodes import joined

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOSTILE = dev_node_id("hostile")
HONEST = dev_node_id("honest")
DEVICE = "<img src=x onerror=\"window.__pwned='device'\">"
MODELS = [
    '"><svg onload="window.__pwned=\'model-attr\'">',
    "javascript:window.__pwned='model-url'",
    "</td></tr></table><script>window.__pwned='model-script'</script>",
]
TASK_MODEL = "<img src=x onerror=\"window.__pwned='task-model'\">"
TASK_SOURCE = "<iframe src=\"javascript:parent.__pwned='task-source'\"></iframe>"
QOS_TASK = "<img src=x onerror=\"window.__pwned='qos'\">"
WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) =>
  window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


@pytest.fixture
async def hostile_gateway(nc: Any) -> AsyncIterator[tuple[TaskService, str]]:
    """A gateway whose directory holds an honest node and one announcing markup, and whose
    network fold holds an ended task of both with a markup model and source; served on a
    free loopback port."""
    js = nc.jetstream()
    await bus.ensure_streams(js, subjects.stream_configs())
    blobs = await open_blob_store(backend="jetstream", js=js, bucket=f"test-{uuid.uuid4().hex[:8]}")
    gw = TaskService(nc, js, blobs, NodeDirectory(ttl_s=600), GatewaySettings(), Metrics("gateway"))
    gw.directory.apply(joined(HONEST), seen_at=time.time())
    gw.directory.apply(joined(HOSTILE, device=DEVICE, models=MODELS, models_on_disk=MODELS), seen_at=time.time())
    await gw.start()
    task_id = uuid.uuid4().hex
    gw.network.submitted(task_id, TASK_MODEL, TASK_SOURCE, time.time())
    gw.network.assigned(task_id, [HOSTILE, HONEST])
    gw.network.finished(
        TaskSucceeded(
            task_id=task_id,
            reason="unanimous",
            images=[],
            verdicts={HOSTILE: "agree", HONEST: "agree"},
            qos={HOSTILE: 10, HONEST: 5},
        )
    )
    gw.network.qos_published(NodeQos(node_id=HOSTILE, qos=9.5, samples=1, recent_timeouts=0, task_id=QOS_TASK))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(gw), log_config=None, access_log=False, lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(1000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield gw, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        await gw.stop()
        await blobs.close()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh chromium that may reach nothing but 127.0.0.1, recording dialogs and script errors."""
    async with local_chromium(tmp_path / "chromium") as context:
        await context.add_init_script(WATCH)
        yield context


async def assert_inert(page: Any, dialogs: list[str]) -> None:
    assert await page.evaluate("window.__pwned") is None
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    assert dialogs == []
    assert await page.evaluate("window.__violations") == []


async def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = await browser.new_page()
    dialogs: list[str] = []

    async def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    await page.goto(url)
    return page, dialogs


@pytest.mark.timeout(180)  # two chromium pages and a gateway: a loaded 2-core machine is slow to start them
async def test_node_announced_and_task_strings_render_as_text_on_the_network_and_node_pages(
    hostile_gateway: tuple[TaskService, str], browser: Any
) -> None:
    _, base = hostile_gateway
    page, dialogs = await open_page(browser, f"{base}/network")
    row = page.locator(f".node-row[data-node='{HOSTILE}']")
    await row.wait_for()
    assert await row.locator("td").nth(5).inner_text() == DEVICE  # the markup, as text
    assert await row.locator(".models").inner_text() == ", ".join(MODELS)
    task = page.locator(".task-row").first
    await task.wait_for()
    assert TASK_MODEL in await task.inner_text()
    assert await page.locator("img, svg, iframe, script:not([type])").count() == 0  # none of theirs
    await page.click(f".node-row[data-node='{HOSTILE}'] a.node-link")
    await page.wait_for_url(f"**/nodes/{HOSTILE}")
    await page.locator(".node-info .models").wait_for()
    assert await page.inner_text(".node-info .models") == ", ".join(MODELS)
    assert DEVICE in await page.inner_text(".node-info")
    await page.locator(".task-row").first.wait_for()
    assert TASK_MODEL in await page.inner_text(".task-row")
    assert QOS_TASK in await page.inner_text(".qos-history")
    assert await page.locator("img, svg, iframe").count() == 0
    await assert_inert(page, dialogs)
    await page.close()


@pytest.mark.timeout(120)  # a chromium page: see above
async def test_a_node_page_at_a_markup_path_shows_the_path_and_the_error_as_text(
    hostile_gateway: tuple[TaskService, str], browser: Any
) -> None:
    _, base = hostile_gateway
    hostile_path = "<img src=x onerror=\"window.__pwned='path'\">"
    page, dialogs = await open_page(browser, f"{base}/nodes/{quote(hostile_path, safe='')}")
    await page.locator(".error-message").wait_for()
    assert hostile_path in await page.inner_text("h1")
    assert "is not a node id" in await page.inner_text(".error-message")
    assert await page.locator("img").count() == 0
    await assert_inert(page, dialogs)
    await page.close()
