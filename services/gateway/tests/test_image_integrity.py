"""The gateway serves only the bytes the validator checked: an accepted image's PNG must
hash to the outcome's SHA-256, or the answer is 502 `image_integrity` and not one byte of
it goes out. The blob is overwritten behind the gateway's back to show it."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid

import pytest
import structlog

from stipple_common import bus, subjects
from stipple_common.blobstore import open_blob_store
from stipple_common.messages import ImageResult, TaskAssigned, TaskSubmitted, TaskSucceeded
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_common.taskspec import parse_task
from stipple_gateway.settings import GatewaySettings
from stipple_gateway.tasks import TaskService

pytestmark = pytest.mark.integration

SPEC = parse_task(
    {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "seed": 1}}
)
PNG = b"\x89PNG\r\n\x1a\n the validated image"
OTHER = b"\x89PNG\r\n\x1a\n swapped in afterwards"
NODES = ["0x" + "a" * 40, "0x" + "b" * 40, "0x" + "c" * 40]


@pytest.fixture
async def gateway(nc):
    js = nc.jetstream()
    await bus.ensure_streams(js, subjects.stream_configs())
    blobs = await open_blob_store(backend="jetstream", js=js, bucket=f"test-{uuid.uuid4().hex[:8]}")
    gw = TaskService(nc, js, blobs, NodeDirectory(ttl_s=10), GatewaySettings(sync_timeout_s=0.5), Metrics("gateway"))
    await gw.start()
    yield gw
    await gw.stop()
    await blobs.close()


async def succeeded(gw: TaskService, task_id: str, *, sha256: str | None = None) -> str:
    """A task that succeeded with one image, stored; returns the image's key."""
    key = f"tasks/{task_id}/{NODES[0]}/s/0.png"
    await gw.blobs.put(key, PNG, content_type="image/png")
    events = [
        TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time()),
        TaskAssigned(task_id=task_id, nodes=NODES, deadline=9e9),
        TaskSucceeded(
            task_id=task_id,
            reason="unanimous",
            images=[
                ImageResult(
                    index=0,
                    key=key,
                    phash="0" * 16,
                    seed=1,
                    width=64,
                    height=64,
                    sha256=hashlib.sha256(PNG).hexdigest() if sha256 is None else sha256,
                )
            ],
            verdicts=dict.fromkeys(NODES, "agree"),
        ),
    ]
    for event, name in zip(events, ("submitted", "assigned", "succeeded"), strict=True):
        subject = subjects.task_subject(task_id, name)
        await bus.publish(gw.js, subject, event, msg_id=f"{task_id}:{name}")
    return key


def failures(gw: TaskService) -> float:
    return gw.metrics.registry.get_sample_value("stipple_gateway_image_integrity_failures_total") or 0.0


async def test_an_image_whose_bytes_changed_after_validation_is_not_served(gateway, asgi_client):
    task_id = uuid.uuid4().hex
    key = await succeeded(gateway, task_id)
    async with asgi_client(gateway) as http:
        fine = await http.get(f"/v1/tasks/{task_id}/images/0")
        assert fine.status_code == 200
        assert fine.content == PNG

        await gateway.blobs.put(key, OTHER, content_type="image/png")  # behind the gateway's back
        with structlog.testing.capture_logs() as logs:
            swapped = await http.get(f"/v1/tasks/{task_id}/images/0")
    assert swapped.status_code == 502
    assert swapped.headers["content-type"] == "application/json"
    error = swapped.json()["error"]
    assert error["code"] == "image_integrity"
    assert error["message"] == (
        f"image 0 of task {task_id}: the stored bytes are not the validated image (SHA-256 mismatch); it is not served"
    )
    assert OTHER not in swapped.content
    assert failures(gateway) == 1
    [logged] = [entry for entry in logs if entry["event"] == "image_integrity_failed"]
    assert logged["log_level"] == "error"
    assert (logged["task_id"], logged["key"]) == (task_id, key)
    assert logged["got"] == hashlib.sha256(OTHER).hexdigest()


async def test_an_outcome_without_a_sha256_is_served_as_stored(gateway, asgi_client):
    """Outcomes from before the SHA-256 was revealed carry none: nothing to check against."""
    task_id = uuid.uuid4().hex
    key = await succeeded(gateway, task_id, sha256="")
    await gateway.blobs.put(key, OTHER, content_type="image/png")
    async with asgi_client(gateway) as http:
        served = await http.get(f"/v1/tasks/{task_id}/images/0")
    assert served.status_code == 200
    assert served.content == OTHER
    assert failures(gateway) == 0


async def test_sdcn_answers_embed_only_checked_images(gateway, asgi_client, monkeypatch):
    """The synchronous SDCN answer embeds the images: the same check, in its error shape."""

    async def outcome_is_in(task_id, owner, submit):  # the network's part, already done
        return (await gateway.load_task(task_id, owner)).task

    monkeypatch.setattr(gateway, "wait_for_outcome", outcome_is_in)
    body = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}
    async with asgi_client(gateway) as http:
        await succeeded(gateway, gateway.new_task_id("fine"))
        fine = await http.post("/txt2img", json=body, headers={"Idempotency-Key": "fine"})
        assert fine.status_code == 200
        assert base64.b64decode(fine.json()["images"][0]) == PNG

        key = await succeeded(gateway, gateway.new_task_id("swapped"))
        await gateway.blobs.put(key, OTHER, content_type="image/png")
        swapped = await http.post("/txt2img", json=body, headers={"Idempotency-Key": "swapped"})
    assert swapped.status_code == 502
    assert swapped.json() == {
        "msg": f"image 0 of task {gateway.new_task_id('swapped')}: the stored bytes are not the validated image "
        "(SHA-256 mismatch); it is not served"
    }
    assert base64.b64encode(OTHER).decode() not in swapped.text
    assert failures(gateway) == 1
