"""`stipple generate`, `stipple task` and `stipple nodes` against the real network in this
process (the `served` fixture): each command runs as `main(argv)` in a thread, off the event
loop the gateway answers on; the tests check its exit status, output and the files it wrote."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from stipple_cli import state
from stipple_cli.__main__ import main

pytestmark = pytest.mark.integration


@dataclass
class Ran:
    status: int
    out: str
    err: str


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")  # the in-process services' (structlog's console)


def _printed(buffer: io.StringIO) -> str:
    """What the command printed: the services of this process log to the same stdout meanwhile."""
    return "".join(line for line in buffer.getvalue().splitlines(keepends=True) if not LOG_LINE.match(line))


def _run(argv: list[str]) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(argv)
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
    return Ran(status, _printed(out), _printed(err))


async def stipple(*argv: str) -> Ran:
    """`stipple ARGV...` in a thread; its exit status and what it printed."""
    return await asyncio.to_thread(_run, list(argv))


def png(path: Path) -> Image.Image:
    image = Image.open(path)
    assert image.format == "PNG"
    image.load()
    return image


SMALL = ["--model", "tiny-sd", "--width", "64", "--height", "64", "--steps", "2"]


async def test_generate_writes_each_image_and_prints_the_task_seeds_and_paths(served, tmp_path):
    target = tmp_path / "out" / "fox.png"
    ran = await stipple(
        "generate", "a red fox", *SMALL, "--seed", "7", "--num-images", "2", "--output", str(target),
        "--gateway", served.gateway_url,
    )  # fmt: skip
    assert ran.status == 0, ran.err
    first, second = tmp_path / "out" / "fox-1.png", tmp_path / "out" / "fox-2.png"
    assert png(first).size == (64, 64)
    assert png(second).size == (64, 64)
    assert not target.exists()
    task_id = ran.out.split()[1]
    assert ran.out.startswith(f"task {task_id} succeeded")
    assert f"{first}  seed 7  64x64" in ran.out
    assert f"{second}  seed 8  64x64" in ran.out  # the second image's seed follows the first's
    assert f"task {task_id} (seed 7)" in ran.err


async def test_generate_without_flags_finds_the_network_in_the_state_file(served, tmp_path, monkeypatch):
    """No --gateway: the state file of a running `stipple up` (this process) names the gateway;
    no --model: the live nodes' model; no --output: stipple-<task id>-1.png here."""
    state.write(
        state.NetworkState(
            pid=os.getpid(),
            started_at=0.0,
            data_dir=str(tmp_path),
            gateway_url=served.gateway_url,
            nats_url=served.url,
            nats_server=served.url,
        )
    )
    monkeypatch.chdir(tmp_path)
    ran = await stipple("generate", "a lighthouse", "--width", "64", "--height", "64", "--steps", "2")
    assert ran.status == 0, ran.err
    task_id = ran.out.split()[1]
    assert png(tmp_path / f"stipple-{task_id}-1.png").size == (64, 64)
    assert "model tiny-sd" in ran.err


async def test_generate_with_bad_input_names_the_field_and_value_and_exits_2(served, tmp_path):
    ran = await stipple("generate", "a fox", *SMALL, "--steps", "0", "--gateway", served.gateway_url)
    assert ran.status == 2
    assert "steps" in ran.err
    assert "=0" in ran.err
    assert ran.err.startswith("stipple generate: ")
    ran = await stipple("generate", "a fox", *SMALL, "--width", "65", "--gateway", served.gateway_url)
    assert ran.status == 2
    assert "image_width" in ran.err
    assert "65" in ran.err
    assert not list(tmp_path.rglob("*.png"))


async def test_generate_with_an_unserved_model_fails_naming_it(served):
    ran = await stipple("generate", "a fox", *SMALL, "--model", "no-such-model", "--gateway", served.gateway_url)
    assert ran.status in (1, 2)  # refused (no node serves it) or aborted (unservable): either way not 0
    assert "no-such-model" in ran.err or "unservable" in ran.err or "no_nodes" in ran.err


async def test_task_shows_status_nodes_outcome_and_image_urls(served, tmp_path):
    made = await stipple(
        "generate", "a fox", *SMALL, "--output", str(tmp_path / "a.png"), "--gateway", served.gateway_url
    )
    assert made.status == 0, made.err
    task_id = made.out.split()[1]

    shown = await stipple("task", task_id, "--gateway", served.gateway_url)
    assert shown.status == 0, shown.err
    assert f"task     {task_id}" in shown.out
    assert "status   succeeded" in shown.out
    assert "outcome  succeeded" in shown.out
    assert f"{served.gateway_url}/v1/tasks/{task_id}/images/0" in shown.out
    view = json.loads((await stipple("task", task_id, "--json", "--gateway", served.gateway_url)).out)
    assert view["task_id"] == task_id
    assert view["status"] == "succeeded"
    for node in view["nodes"]:
        assert node["node_id"] in shown.out
        assert f"verdict {view['outcome']['verdicts'][node['node_id']]}" in shown.out

    watched = await stipple("task", task_id, "--watch", "--gateway", served.gateway_url)  # already ended
    assert watched.status == 0, watched.err
    assert "status   succeeded" in watched.out


async def test_task_watch_follows_a_task_to_its_end(served):
    import httpx

    body = {
        "base_model": "tiny-sd",
        "prompt": "a cat",
        "task_config": {"image_width": 64, "image_height": 64, "steps": 4},
    }
    async with httpx.AsyncClient(base_url=served.gateway_url) as http:
        task_id = (await http.post("/v1/tasks", json=body)).json()["task_id"]
    watched = await stipple("task", task_id, "--watch", "--gateway", served.gateway_url)
    assert watched.status == 0, watched.err
    assert "status   succeeded" in watched.out
    view = json.loads((await stipple("task", task_id, "--json", "--gateway", served.gateway_url)).out)
    for node in view["nodes"]:  # a bar per node, in the state its last event left it
        (bar,) = [line for line in watched.err.splitlines() if line.startswith(node["node_id"][:10])]
        assert "revealed" in bar


def test_a_node_bar_counts_the_progress_events_steps():
    """The bars themselves (progress events are not stored: a task that ended before the
    stream opened has none, so this is not checked against the network)."""
    from rich.console import Console

    from stipple_cli.commands import NodeBars
    from stipple_client import Event

    a, b = "0x" + "a" * 40, "0x" + "b" * 40
    with NodeBars(Console(file=io.StringIO())) as bars:
        bars.feed(Event("1", "assigned", {"nodes": [a, b]}))
        bars.feed(Event(None, "progress", {"node_id": a, "step": 3, "total": 8}))
        bars.feed(Event("2", "committed", {"node_id": b}))
        bars.feed(Event(None, "progress", {"node_id": b, "step": 8, "total": 8}))
        bars.feed(Event("3", "errored", {"node_id": b, "code": "oom"}))
        shown = {bars.progress.tasks[i].fields["node"]: bars.progress.tasks[i] for i in bars.bars.values()}
    first, second = shown["0xaaaaaaaa…aaaa"], shown["0xbbbbbbbb…bbbb"]
    assert (first.completed, first.total, first.fields["status"]) == (3, 8, "")
    assert (second.completed, second.total, second.fields["status"]) == (8, 8, "errored: oom")


async def test_an_unknown_task_exits_2_naming_it(served):
    ran = await stipple("task", "0" * 32, "--gateway", served.gateway_url)
    assert ran.status == 2
    assert "HTTP 404" in ran.err
    assert ran.err.startswith("stipple task: ")


async def test_nodes_lists_every_node_as_a_table_and_as_json(served):
    ran = await stipple("nodes", "--gateway", served.gateway_url)
    assert ran.status == 0, ran.err
    header, *rows, total = ran.out.splitlines()
    assert header.split() == ["NODE", "OPERATOR", "STAKE", "MODELS", "LIVE"]
    assert total == "3 live of 3"
    listed = json.loads((await stipple("nodes", "--json", "--gateway", served.gateway_url)).out)
    assert len(listed) == 3
    assert len(rows) == 3
    for node, row in zip(sorted(listed, key=lambda n: n["node_id"]), rows, strict=True):
        assert row.split()[0] == node["node_id"]
        assert "tiny-sd" in node["models"]
        assert "tiny-sd" in row
        assert row.rstrip().endswith("live")


async def test_a_gateway_that_does_not_answer_exits_1(served, unused_tcp_port):
    ran = await stipple("nodes", "--gateway", f"http://127.0.0.1:{unused_tcp_port}")
    assert ran.status == 1
    assert "stipple nodes: " in ran.err
    assert "connection_failed" in ran.err
