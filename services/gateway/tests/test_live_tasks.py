"""Cancellation, the events stream (SSE) and step progress, against a real nats-server.
No other service runs: the tests publish the events the dispatcher, nodes and validator
would, with the same message ids."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import msgspec
import pytest

from stipple_common import bus, subjects
from stipple_common.identity import dev_node_id
from stipple_common.messages import (
    Progress,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskReassigned,
    TaskStarted,
    encode,
)
from stipple_gateway.events import read_task_events
from stipple_gateway.progress import MAX_NODES_PER_TASK, ProgressBoard

pytestmark = pytest.mark.integration

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}
NODES = [dev_node_id(name) for name in ("node-a", "node-b", "node-c")]
A, B, C = NODES
STRANGER = dev_node_id("stranger")  # a node with no part in the tasks here


async def publish(gw: Any, task_id: str, event: msgspec.Struct, name: str, msg_id: str) -> None:
    subject = subjects.task_subject(task_id, name, getattr(event, "node_id", ""))
    await bus.publish(gw.js, subject, event, msg_id=msg_id)


async def assign(gw: Any, task_id: str) -> None:
    event = TaskAssigned(task_id=task_id, nodes=NODES, deadline=9e9)
    await publish(gw, task_id, event, "assigned", f"{task_id}:assigned")


async def report(gw: Any, task_id: str, node: str, step: int, total: int = 8, *, claiming: str = "") -> None:
    """`node` publishes step progress on its own subject (saying it is `claiming`'s, if given)."""
    progress = Progress(task_id=task_id, node_id=claiming or node, step=step, total=total)
    await gw.nc.publish(subjects.progress_subject(task_id, node), encode(progress))


async def submit(http: httpx.AsyncClient, body: dict[str, Any] | None = None) -> str:
    response = await http.post("/v1/tasks", json=body or TASK)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


class Sse:
    """Reads SSE frames off a streamed response, as dicts of their fields ({"comment": ...}
    for comment lines), across several calls."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def read(self, until: int | None = None) -> list[dict[str, str]]:
        """`until` frames, or every frame to the end of the stream."""
        frames: list[dict[str, str]] = []
        current: dict[str, str] = {}
        async for line in self.lines:
            if line.startswith(":"):
                frames.append({"comment": line[1:].strip()})
            elif line:
                name, _, value = line.partition(":")
                current[name] = value.removeprefix(" ")
            elif current:
                frames.append(current)
                current = {}
            if until is not None and len(frames) >= until:
                break
        return frames


async def read_sse(response: httpx.Response) -> list[dict[str, str]]:
    return await Sse(response).read()


# --------------------------------------------------------------------------- cancel


async def test_cancel_publishes_the_outcome_and_answers_202_then_409(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        task_id = await submit(http)
        await assign(gw, task_id)
        response = await http.delete(f"/v1/tasks/{task_id}")
        assert response.status_code == 202, response.text
        view = response.json()
        assert view["status"] == "cancelled"
        assert view["outcome"]["status"] == "cancelled"
        assert view["outcome"]["reason"] == "cancelled"
        assert view["outcome"]["detail"] == "cancelled by the app"
        assert view["outcome"]["verdicts"] == dict.fromkeys(NODES, "cancelled")
        assert view["outcome"]["finished_at"] > view["submitted_at"]
        stored = await read_task_events(gw.js, task_id)
        assert isinstance(stored[-1].event, TaskCancelled)
        assert stored[-1].msg_id == f"{task_id}:outcome"

        again = await http.delete(f"/v1/tasks/{task_id}")
        assert again.status_code == 409
        error = again.json()["error"]
        assert error["code"] == "already_finished"
        assert error["status"] == "cancelled"
        assert "status cancelled" in error["message"]
        assert (await http.get(f"/v1/tasks/{task_id}")).json()["status"] == "cancelled"
        assert len(await read_task_events(gw.js, task_id)) == 3  # submitted, assigned, one outcome


async def test_cancel_after_the_network_decided_is_409_naming_status_and_outcome(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        task_id = await submit(http)
        aborted = TaskAborted(task_id=task_id, reason="no_nodes", detail="no 3 nodes for 30 s")
        await publish(gw, task_id, aborted, "aborted", f"{task_id}:outcome")
        response = await http.delete(f"/v1/tasks/{task_id}")
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["message"] == (
            f"task {task_id} already finished: status aborted, outcome no_nodes: no 3 nodes for 30 s; "
            "it can no longer be cancelled"
        )
        assert (error["status"], error["reason"]) == ("aborted", "no_nodes")


async def test_cancel_that_loses_the_race_to_the_validator_is_409(make_gateway, asgi_client):
    """The outcome is stored between the gateway's read and its publish: JetStream drops the
    cancel (same message id) and the gateway says so instead of claiming it cancelled."""
    gw = await make_gateway()
    load = gw.load_task
    calls = 0

    async def racing_load(task_id: str, owner: str = "") -> Any:
        nonlocal calls
        calls += 1
        loaded = await load(task_id, owner)
        if calls == 1:
            aborted = TaskAborted(task_id=task_id, reason="no_agreement")
            await publish(gw, task_id, aborted, "aborted", f"{task_id}:outcome")
        return loaded

    async with asgi_client(gw) as http:
        task_id = await submit(http)
        await assign(gw, task_id)
        gw.load_task = racing_load  # type: ignore[method-assign]
        response = await http.delete(f"/v1/tasks/{task_id}")
    assert response.status_code == 409
    assert "status aborted, outcome no_agreement" in response.json()["error"]["message"]
    assert [type(s.event).__name__ for s in await read_task_events(gw.js, task_id)][-1] == "TaskAborted"


async def test_cancel_unknown_or_malformed_ids_is_404(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        unknown = await http.delete("/v1/tasks/" + "ab" * 16)
        assert unknown.status_code == 404
        assert unknown.json()["error"] == {"code": "not_found", "message": f"no task with id {'ab' * 16!r}"}
        malformed = await http.delete("/v1/tasks/nope")
        assert malformed.status_code == 404
        assert "32 hex digits" in malformed.json()["error"]["message"]


# --------------------------------------------------------------------------- events (SSE)


async def test_events_replay_then_follow_live_without_gap_or_duplicate(make_gateway, serve_http):
    gw = await make_gateway()
    url = await serve_http(gw)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await submit(http, {**TASK, "kind": "img2img", "init_image": PNG})
        await assign(gw, task_id)
        async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            sse = Sse(response)
            stored = await sse.read(until=2)
            assert [f["event"] for f in stored] == ["submitted", "assigned"]
            assert [f["id"] for f in stored] == [f"{task_id}:submitted", f"{task_id}:assigned"]
            submitted = json.loads(stored[0]["data"])
            assert submitted["type"] == "submitted"
            assert submitted["spec"]["init_image"] == f"<image, {len(PNG)} characters>"  # not the image itself
            assert json.loads(stored[1]["data"])["nodes"] == NODES

            # live from here: the stream is subscribed since before it read the stored events
            started = TaskStarted(task_id=task_id, node_id=A)
            await publish(gw, task_id, started, "started", f"{task_id}:{A}:started")
            await assign(gw, task_id)  # a retried publish: JetStream drops it, core NATS still delivers it
            await report(gw, task_id, A, 1, 2)
            assert (await http.delete(f"/v1/tasks/{task_id}")).status_code == 202
            live = await sse.read()  # to the end: the stream closes after the outcome
    assert [f["event"] for f in live] == ["started", "progress", "cancelled"]
    assert json.loads(live[1]["data"]) == {"task_id": task_id, "node_id": A, "step": 1, "total": 2}
    assert "id" not in live[1]  # progress is not a stored event: it does not move Last-Event-ID
    assert live[2]["id"] == f"{task_id}:outcome"
    assert json.loads(live[2]["data"])["detail"] == "cancelled by the app"


async def test_events_of_a_finished_task_replay_and_end_and_resume_after_last_event_id(make_gateway, serve_http):
    gw = await make_gateway()
    url = await serve_http(gw)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await submit(http)
        await assign(gw, task_id)
        assert (await http.delete(f"/v1/tasks/{task_id}")).status_code == 202
        async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            frames = await read_sse(response)
        assert [f["event"] for f in frames] == ["submitted", "assigned", "cancelled"]
        headers = {"Last-Event-ID": f"{task_id}:assigned"}
        async with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response:
            resumed = await read_sse(response)
        assert [f["event"] for f in resumed] == ["cancelled"]
        headers = {"Last-Event-ID": "not-one-of-ours"}
        async with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response:
            assert len(await read_sse(response)) == 3  # an unknown id replays everything


async def test_events_keep_alive_and_end_when_the_gateway_stops(make_gateway, serve_http):
    gw = await make_gateway(sse_keepalive_s=0.1)
    url = await serve_http(gw)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await submit(http)
        async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            sse = Sse(response)
            frames = await sse.read(until=3)
            assert frames[0]["event"] == "submitted"
            assert frames[1:] == [{"comment": "keep-alive"}, {"comment": "keep-alive"}]
            gw.closing.set()
            rest = await asyncio.wait_for(sse.read(), 5)  # ends instead of holding uvicorn's shutdown
    assert all("comment" in f for f in rest)


async def test_events_show_progress_only_from_the_tasks_own_nodes(make_gateway, serve_http):
    gw = await make_gateway()
    url = await serve_http(gw)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await submit(http)
        await assign(gw, task_id)
        async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            sse = Sse(response)
            assert [f["event"] for f in await sse.read(until=2)] == ["submitted", "assigned"]
            await report(gw, task_id, STRANGER, 1)  # not one of the task's nodes
            await report(gw, task_id, STRANGER, 2, claiming=A)  # saying it is node-a's, on its own subject
            await report(gw, task_id, A, 3)
            await gw.nc.flush()
            replaced = TaskReassigned(task_id=task_id, replaced=C, by=STRANGER, deadline=9e9)
            await publish(gw, task_id, replaced, "reassigned", f"{task_id}:reassigned:1")
            early = await sse.read(until=2)
            await report(gw, task_id, STRANGER, 4)  # now it is the task's node
            await gw.nc.flush()
            await asyncio.sleep(0.1)
            assert (await http.delete(f"/v1/tasks/{task_id}")).status_code == 202
            late = await sse.read()
    assert [f["event"] for f in early] == ["progress", "reassigned"]
    assert (json.loads(early[0]["data"])["node_id"], json.loads(early[0]["data"])["step"]) == (A, 3)
    assert [f["event"] for f in late] == ["progress", "cancelled"]
    assert (json.loads(late[0]["data"])["node_id"], json.loads(late[0]["data"])["step"]) == (STRANGER, 4)


async def test_events_of_unknown_tasks_are_404_not_a_stream(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        task_id = await submit(http)
        head = await asyncio.wait_for(http.head(f"/v1/tasks/{task_id}/events"), 5)  # headers, not a stream
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/event-stream")
        response = await http.get("/v1/tasks/" + "c" * 32 + "/events")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert (await http.get("/v1/tasks/xyz/events")).status_code == 404


# --------------------------------------------------------------------------- progress


async def test_task_view_shows_each_nodes_latest_progress_until_the_task_ends(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        task_id = await submit(http)
        await assign(gw, task_id)
        await report(gw, task_id, A, 1)
        await report(gw, task_id, A, 3)
        await report(gw, task_id, STRANGER, 5)  # not one of the task's nodes: not shown
        await report(gw, task_id, STRANGER, 7, claiming=A)  # saying it is node-a's: rejected
        await report(gw, task_id, B, 1)  # last: once it shows, the others have been read
        await gw.nc.flush()
        for _ in range(250):
            view = (await http.get(f"/v1/tasks/{task_id}")).json()
            by_node = {n["node_id"]: n.get("progress") for n in view["nodes"]}
            if by_node[B]:
                break
            await asyncio.sleep(0.02)
        eta = by_node[A].pop("eta_s", None)  # A went from step 1 to 3 (test_progress_board_estimates_...)
        assert eta is None or eta >= 0
        assert "eta_s" not in by_node[B]  # one step seen: no rate yet
        assert by_node == {A: {"step": 3, "total": 8}, B: {"step": 1, "total": 8}, C: None}

        await publish(
            gw, task_id, TaskAborted(task_id=task_id, reason="too_few_results"), "aborted", f"{task_id}:outcome"
        )
        await report(gw, task_id, C, 8)  # late
        await gw.nc.flush()
        for _ in range(250):
            if not gw.progress.of(task_id, NODES):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        assert gw.progress.of(task_id, NODES) == {}  # dropped with the outcome; the late message did not bring it back
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
        assert all("progress" not in n for n in view["nodes"])


def test_progress_board_is_bounded():
    board = ProgressBoard(max_tasks=2)
    for task in ("t1", "t2", "t3"):
        board.assign(task, ["n"])
        board.update(Progress(task_id=task, node_id="n", step=1, total=2))
    assert len(board) == 2
    assert board.of("t1", ["n"]) == {}  # the least recently updated went first
    board.update(Progress(task_id="t2", node_id="n", step=2, total=2))
    board.assign("t4", ["n"])
    board.update(Progress(task_id="t4", node_id="n", step=1, total=2))
    assert board.of("t3", ["n"]) == {}
    assert board.of("t2", ["n"])["n"].step == 2
    assert board.of("t2", ["other"]) == {}  # only the task's nodes' progress is shown
    board.finish("t2")
    board.update(Progress(task_id="t2", node_id="n", step=2, total=2))
    assert board.of("t2", ["n"]) == {}
    nodes = [f"n{i}" for i in range(MAX_NODES_PER_TASK + 5)]
    board.assign("t5", nodes)
    for node in nodes:
        board.update(Progress(task_id="t5", node_id=node, step=1, total=2))
    assert len(board.of("t5", nodes)) == MAX_NODES_PER_TASK


def test_progress_board_estimates_a_nodes_last_step_from_its_rate_so_far():
    """Unknown until two messages with steps between them; then the steps left at the
    rate seen, less the time since the latest message; never below 0; strangers none."""
    now = [100.0]
    board = ProgressBoard(clock=lambda: now[0])
    board.assign("t", ["a", "b"])
    board.update(Progress(task_id="t", node_id="a", step=5, total=25))  # first seen at step 5
    board.update(Progress(task_id="t", node_id="stranger", step=1, total=25))
    assert board.etas("t", ["a", "b"]) == {}
    now[0] = 102.0
    board.update(Progress(task_id="t", node_id="a", step=10, total=25))  # 5 steps in 2 s
    board.update(Progress(task_id="t", node_id="b", step=3, total=25))
    assert board.etas("t", ["a", "b"]) == {"a": 6.0}  # 15 steps left at 2.5 steps/s
    now[0] = 103.5
    assert board.etas("t", ["a", "b"]) == {"a": 4.5}
    assert board.etas("t", ["b"]) == {}  # only the nodes asked for
    now[0] = 200.0
    assert board.etas("t", ["a"]) == {"a": 0.0}
    board.finish("t")
    assert board.etas("t", ["a"]) == {}


def test_strangers_take_no_room_on_the_progress_board():
    """Progress from a node the task was not given to, or for a task id nobody assigned,
    is not kept: it can neither crowd out the assigned nodes nor push real tasks out."""
    board = ProgressBoard(max_tasks=2)
    board.assign("real", ["a"])
    for i in range(100):
        board.update(Progress(task_id="real", node_id=f"stranger{i}", step=1, total=2))
        board.update(Progress(task_id=f"made-up-{i}", node_id="stranger", step=1, total=2))
    board.update(Progress(task_id="real", node_id="a", step=1, total=2))
    assert board.of("real", ["a"])["a"].step == 1
    assert len(board) == 1
    assert board.refused == 200
    board.assign("real", ["b"])  # a replacement (reassigned) joins the task's nodes
    board.update(Progress(task_id="real", node_id="b", step=2, total=2))
    assert board.of("real", ["a", "b"])["b"].step == 2


async def test_sync_wait_reads_again_when_it_woke_before_the_outcome_was_stored(make_gateway, asgi_client):
    """nats-server hands a publish to core subscribers and to the stream at the same time,
    so the gateway can wake on an outcome that its read of the stream does not show yet:
    it reads again instead of answering 504 for a finished task."""
    gw = await make_gateway(sync_timeout_s=10)
    load = gw.load_task
    outcome_published = asyncio.Event()
    reads: list[str] = []

    async def racing_load(task_id: str, owner: str = "") -> Any:
        loaded = await load(task_id, owner)
        if outcome_published.is_set():
            reads.append(loaded.task.status)
            if len(reads) == 1:  # the first read after the wake-up: the stream as it was before the outcome
                before = [s for s in await read_task_events(gw.js, task_id) if not isinstance(s.event, TaskAborted)]
                stale = gw.fold(task_id, before, owner)
                reads[0] = stale.task.status
                return stale
        return loaded

    async def decide(msg: Any) -> None:  # the network aborts the task as soon as it is submitted
        task_id = msg.subject.split(".")[1]
        await publish(gw, task_id, TaskAborted(task_id=task_id, reason="no_agreement"), "aborted", f"{task_id}:outcome")
        outcome_published.set()

    gw.load_task = racing_load  # type: ignore[method-assign]
    sub = await gw.nc.subscribe(subjects.task_subject("*", "submitted"), cb=decide)
    try:
        async with asgi_client(gw) as http:
            response = await http.post("/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2})
    finally:
        await sub.unsubscribe()
    assert reads[:2] == ["pending", "aborted"]  # woken, read stale, read again
    assert response.status_code == 502, response.text
    assert "no_agreement" in response.json()["msg"]
