"""The client against the real gateway, dispatcher, validator and three node agents (in one
process, the tiny model; conftest.py). The network runs on the test's event loop, so the
blocking `Client` runs in a thread (asyncio.to_thread)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from stipple_client import AsyncClient, Client, Conflict, InvalidInput, NotFound, TaskFailed
from stipple_testkit.network import Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "tiny-sd"


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    image.load()
    return image


async def test_generate_returns_the_pngs_of_the_asked_size_and_their_seeds_sync_and_async(served: Network) -> None:
    async with AsyncClient(served.gateway_url) as client:
        made = await client.generate("a red fox", model=MODEL, width=96, height=64, steps=4, seed=11, num_images=2)
        nodes = await client.nodes()
    assert made.task.task_id == made.task_id
    assert made.task.status == "succeeded"
    assert made.task.outcome is not None
    assert made.task.outcome.status == "succeeded"
    assert made.seeds == [11, 12]  # image i uses seed + i
    assert [(i.index, i.seed, i.width, i.height) for i in made.task.images] == [(0, 11, 96, 64), (1, 12, 96, 64)]
    assert [decode(png).size for png in made.images] == [(96, 64), (96, 64)]
    assert len(nodes) == 3
    assert all(node.live and node.models == [MODEL] for node in nodes)

    def blocking() -> object:
        with Client(served.gateway_url, model=MODEL) as client:  # the client's default model
            return client.generate("a red fox", width=96, height=64, steps=4, seed=11, num_images=2)

    again = await asyncio.to_thread(blocking)
    assert again.task_id != made.task_id
    assert again.seeds == [11, 12]
    # the same task and seed: the same pixels, whichever nodes ran it
    assert [decode(png).tobytes() for png in again.images] == [decode(png).tobytes() for png in made.images]


async def test_submit_then_the_events_show_progress_and_end_with_the_outcome(served: Network) -> None:
    async with AsyncClient(served.gateway_url) as client:
        submitted = await client.submit("a lighthouse", model=MODEL, width=128, height=128, steps=30, seed=5)
        assert (submitted.status, submitted.seed) == ("pending", 5)
        assert submitted.links["events"] == f"/v1/tasks/{submitted.task_id}/events"
        events = [event async for event in client.events(submitted.task_id)]
        task = await client.get(submitted.task_id)
        png = await client.image(submitted.task_id, 0)

    types = [event.type for event in events]
    assert types[0] == "submitted", types
    assert events[0].data["spec"]["prompt"] == "a lighthouse"
    assert types[-1] == "succeeded", types  # the stream ends with the outcome, and only one
    assert [event.is_outcome for event in events].count(True) == 1
    progress = [event for event in events if event.type == "progress"]
    assert progress, types
    assert all(event.id is None and 1 <= event.data["step"] <= event.data["total"] for event in progress)
    assert all(event.id for event in events if event.type != "progress")

    assert task.status == "succeeded"
    assert task.finished
    assert task.seed == 5
    assert task.spec["task_config"]["steps"] == 30
    assert task.outcome is not None
    assert task.outcome.reason in ("unanimous", "majority")
    assert task.images[0].url == f"/v1/tasks/{submitted.task_id}/images/0"
    assert decode(png).size == (128, 128)

    def replay() -> list[object]:  # the stored events after the first one, with the blocking client
        with Client(served.gateway_url) as client:
            return list(client.events(submitted.task_id, last_event_id=events[0].id))

    replayed = await asyncio.to_thread(replay)
    assert replayed, types
    assert events[0].id not in {event.id for event in replayed}  # resumed after it
    assert {event.id for event in replayed} <= {event.id for event in events if event.id}, (types, replayed)
    assert (replayed[-1].type, replayed[-1].id) == ("succeeded", events[-1].id)
    assert all(event.type != "progress" for event in replayed)  # progress is live only, never stored


async def test_a_cancelled_or_aborted_task_raises_task_failed_with_its_reason(served: Network, tmp_path: Path) -> None:
    async with AsyncClient(served.gateway_url, model=MODEL) as client:
        submitted = await client.submit("a long one", width=256, height=256, steps=150)
        cancelled = await client.cancel(submitted.task_id)
        assert cancelled.status == "cancelled"
        assert cancelled.outcome is not None
        assert cancelled.outcome.detail == "cancelled by the app"
        assert (await client.cancel(submitted.task_id)).status == "cancelled"  # as a retried cancel would
        with pytest.raises(TaskFailed) as failed:
            await client.wait(submitted.task_id)
        assert (failed.value.task_status, failed.value.reason) == ("cancelled", "cancelled")
        assert failed.value.task.task_id == submitted.task_id
        with pytest.raises(Conflict) as not_ready:
            await client.image(submitted.task_id, 0)
        assert (not_ready.value.status, not_ready.value.code) == (409, "not_ready")

        # the gateway cannot know what is on the nodes' disks: every node fails it, and it is aborted
        missing = str(tmp_path / "no-such-lora.safetensors")
        with pytest.raises(TaskFailed) as aborted:
            await client.generate("x", width=64, height=64, steps=2, seed=1, loras=[{"model": missing}])
    assert (aborted.value.task_status, aborted.value.reason) == ("aborted", "too_few_results")
    assert "too_few_results" in str(aborted.value)
    assert {node["status"] for node in aborted.value.task.nodes} == {"errored"}


class LoseFirstAnswer(httpx.AsyncBaseTransport):
    """The real transport, except that the answer to the first POST is lost after the gateway
    handled it (as when a connection drops): the client must retry, and get the same task."""

    def __init__(self) -> None:
        self.real = httpx.AsyncHTTPTransport()
        self.posts: list[httpx.Request] = []
        self.lost: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.real.handle_async_request(request)
        if request.method == "POST":
            self.posts.append(request)
            if not self.lost:
                await response.aread()
                self.lost.append(httpx.Response(response.status_code, content=response.content).json()["task_id"])
                raise httpx.ReadError("connection reset after the gateway answered", request=request)
        return response

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_a_retried_submit_is_the_same_task_and_bad_input_names_the_field_and_value(served: Network) -> None:
    transport = LoseFirstAnswer()
    async with AsyncClient(served.gateway_url, model=MODEL, transport=transport, backoff=0) as client:
        submitted = await client.submit("a fox", width=64, height=64, steps=2, seed=3)
        assert transport.lost == [submitted.task_id]
        assert [post.headers["idempotency-key"] for post in transport.posts] == [
            transport.posts[0].headers["idempotency-key"]
        ] * 2
        first = await client.submit("a fox", width=64, height=64, steps=2, seed=4, idempotency_key="order-1")
        second = await client.submit("a fox", width=64, height=64, steps=2, seed=4, idempotency_key="order-1")
        assert second.task_id == first.task_id != submitted.task_id
        assert (await client.get(submitted.task_id)).task_id == submitted.task_id

    def refusals() -> list[InvalidInput | NotFound]:
        caught: list[InvalidInput | NotFound] = []
        with Client(served.gateway_url, model=MODEL) as client:
            for params in ({"steps": 0}, {"width": 65}, {"model": "no-such-model"}, {"colour": "red"}):
                with pytest.raises(InvalidInput) as bad:
                    client.submit("a fox", **params)
                caught.append(bad.value)
            for call in (lambda: client.get("0" * 32), lambda: list(client.events("0" * 32))):
                with pytest.raises(NotFound) as missing:
                    call()
                caught.append(missing.value)
        return caught

    steps, width, model, unknown, no_task, no_events = await asyncio.to_thread(refusals)
    assert (steps.status, steps.code, steps.field, steps.value) == (422, "invalid_input", "task_config.steps", 0)
    assert (width.field, width.value) == ("task_config.image_width", 65)
    assert (model.status, model.code, model.field, model.value) == (422, "unknown_model", "base_model", "no-such-model")
    assert "no-such-model" in model.message
    assert unknown.field == "colour"
    assert (no_task.status, no_task.code) == (404, "not_found")
    assert no_events.status == 404
