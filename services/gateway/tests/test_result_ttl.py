"""Results expire: the gateway answers 410 after STIPPLE_RESULT_TTL_S, and makes the blob
store delete them (the JetStream bucket's max_age; an S3 lifecycle rule, on moto's S3)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from stipple_common import bus, subjects
from stipple_common.blobstore import BlobNotFound, open_blob_store, set_ttl
from stipple_common.blobstore.jetstream import JetStreamBlobStore
from stipple_common.errors import Transient
from stipple_common.identity import dev_node_id
from stipple_common.messages import ImageResult, TaskAssigned, TaskSucceeded
from stipple_gateway.service import STORE_TTL_GRACE_S, apply_result_ttl

pytestmark = pytest.mark.integration

NODES = [dev_node_id(name) for name in ("node-a", "node-b", "node-c")]
TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}
PNG = b"\x89PNG\r\n\x1a\n not really"


async def succeeded_task(gw, http) -> str:
    """A task that succeeded with one image in the gateway's store."""
    task_id = (await http.post("/v1/tasks", json=TASK)).json()["task_id"]
    key = f"tasks/{task_id}/{NODES[0]}/0.png"
    await gw.blobs.put(key, PNG, content_type="image/png")
    assigned = TaskAssigned(task_id=task_id, nodes=NODES, deadline=9e9)
    await bus.publish(gw.js, subjects.task_subject(task_id, "assigned"), assigned, msg_id=f"{task_id}:assigned")
    image = ImageResult(index=0, key=key, phash="0" * 16, seed=1, width=64, height=64)
    done = TaskSucceeded(task_id=task_id, reason="unanimous", images=[image], verdicts=dict.fromkeys(NODES, "agree"))
    await bus.publish(gw.js, subjects.task_subject(task_id, "succeeded"), done, msg_id=f"{task_id}:outcome")
    return task_id


async def test_images_answer_410_once_the_ttl_passed(make_gateway, asgi_client):
    gw = await make_gateway(result_ttl_s=60)
    async with asgi_client(gw) as http:
        task_id = await succeeded_task(gw, http)
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
        finished_at = view["outcome"]["finished_at"]
        assert abs(finished_at - time.time()) < 5
        assert view["expires_at"] == pytest.approx(finished_at + 60)
        fresh = await http.get(f"/v1/tasks/{task_id}/images/0")
        assert fresh.status_code == 200
        assert fresh.content == PNG
        cache, max_age = fresh.headers["cache-control"].split(", max-age=")
        assert cache == "public"
        assert 50 < int(max_age) <= 60  # caches keep it no longer than the gateway serves it

        gw.clock = lambda: finished_at + 60.5
        expired = await http.get(f"/v1/tasks/{task_id}/images/0")
        assert expired.status_code == 410
        error = expired.json()["error"]
        assert error["code"] == "expired"
        assert error["message"].startswith(f"image 0 of task {task_id} expired at ")
        assert error["message"].endswith("(results are kept 60 s)")
        assert (await http.get(f"/v1/tasks/{task_id}")).status_code == 200  # the task itself is still there


async def test_without_ttl_images_are_served_until_the_store_loses_them(make_gateway, asgi_client):
    gw = await make_gateway(result_ttl_s=0)
    async with asgi_client(gw) as http:
        task_id = await succeeded_task(gw, http)
        assert "expires_at" not in (await http.get(f"/v1/tasks/{task_id}")).json()
        gw.clock = lambda: time.time() + 10 * 365 * 86400
        assert (await http.get(f"/v1/tasks/{task_id}/images/0")).status_code == 200
        await gw.blobs.delete(f"tasks/{task_id}/{NODES[0]}/0.png")
        gone = await http.get(f"/v1/tasks/{task_id}/images/0")
        assert gone.status_code == 410
        assert gone.json()["error"]["message"] == f"image 0 of task {task_id} is no longer stored"


async def test_jetstream_bucket_deletes_blobs_after_its_ttl(nc):
    js = nc.jetstream()
    bucket = f"ttl-{uuid.uuid4().hex[:8]}"
    await open_blob_store(backend="jetstream", js=js, bucket=bucket)  # created without a TTL
    store = await JetStreamBlobStore.open(js, bucket, timeout_s=1.0)
    await set_ttl(store, 1.0)
    assert (await js.stream_info(f"OBJ_{bucket}")).config.max_age == pytest.approx(1.0)
    await store.put("tasks/t/n/0.png", PNG)
    assert await store.get("tasks/t/n/0.png") == PNG
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server expires messages on its own timer
        await asyncio.sleep(0.1)
        try:
            await store.get("tasks/t/n/0.png")
        except BlobNotFound:
            break
        except Transient:  # caught half expired: the chunks go a moment before the metadata
            continue
    else:
        pytest.fail("the blob outlived the bucket's TTL")
    await set_ttl(store, None)
    assert (await js.stream_info(f"OBJ_{bucket}")).config.max_age == 0


async def test_the_gateway_applies_its_ttl_to_the_store_with_a_grace(nc):
    js = nc.jetstream()
    bucket = f"ttl-{uuid.uuid4().hex[:8]}"
    store = await open_blob_store(backend="jetstream", js=js, bucket=bucket)
    from stipple_gateway.settings import GatewaySettings

    await apply_result_ttl(SimpleNamespace(blobs=store), GatewaySettings(result_ttl_s=600))  # type: ignore[arg-type]
    assert (await js.stream_info(f"OBJ_{bucket}")).config.max_age == pytest.approx(600 + STORE_TTL_GRACE_S)
    await apply_result_ttl(SimpleNamespace(blobs=store), GatewaySettings(result_ttl_s=0))  # type: ignore[arg-type]
    assert (await js.stream_info(f"OBJ_{bucket}")).config.max_age == pytest.approx(600 + STORE_TTL_GRACE_S)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


async def test_s3_ttl_is_a_lifecycle_rule_of_whole_days(s3_endpoint):
    bucket = f"ttl-{uuid.uuid4().hex[:12]}"
    store = await open_blob_store(
        backend="s3", js=None, bucket=bucket, s3_endpoint=s3_endpoint, s3_access_key="k", s3_secret_key="secret"
    )
    client = Minio(s3_endpoint, access_key="k", secret_key="secret", secure=False)

    def rules() -> dict[str, int | None]:
        config = client.get_bucket_lifecycle(bucket)
        return {r.rule_id: r.expiration.days if r.expiration else None for r in (config.rules if config else [])}

    try:
        theirs = Rule(ENABLED, rule_filter=Filter(prefix="logs/"), rule_id="theirs", expiration=Expiration(days=30))
        await asyncio.to_thread(client.set_bucket_lifecycle, bucket, LifecycleConfig([theirs]))
        await set_ttl(store, 3600)
        assert await asyncio.to_thread(rules) == {"theirs": 30, "stipple-ttl": 1}  # at least a day
        await set_ttl(store, 3 * 86400 + 1)
        assert await asyncio.to_thread(rules) == {"theirs": 30, "stipple-ttl": 4}  # rounded up
        await set_ttl(store, 0)
        assert await asyncio.to_thread(rules) == {"theirs": 30}  # only ours is removed
        await asyncio.to_thread(client.delete_bucket_lifecycle, bucket)
        await set_ttl(store, 60)
        await set_ttl(store, None)
        assert await asyncio.to_thread(client.get_bucket_lifecycle, bucket) is None  # no empty config left behind
    finally:
        await store.close()
