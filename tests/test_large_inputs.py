"""Inputs larger than a NATS message (1 MiB) within the documented limits: the gateway
puts them in the blob store and the task carries `blob:sha256:<hex>` references, which
the nodes fetch and check (docs/api.md, "Limits"; docs/protocol.md, "Large inputs")."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import time
import uuid
from pathlib import Path

import httpx
import nats
import pytest
from PIL import Image

from stipple_common import bus, subjects
from stipple_common.blobstore.inputs import InputUnavailable, fetch_input
from stipple_common.errors import Transient
from stipple_common.messages import NodeErrored, TaskAborted, TaskSubmitted, TaskSucceeded, decode_task_event
from stipple_common.taskspec import MAX_IMAGE_BYTES, blob_key, blob_ref, parse_task, with_input_images
from stipple_gateway.inputs import MAX_ANSWERS_PER_INPUT
from stipple_node.pipeline import PipelineRunner
from stipple_node.service import NodeAgent
from stipple_testkit.network import Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def noise_png(side: int) -> bytes:
    """A PNG of random noise: it does not compress, so its size is about 3 bytes a pixel."""
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


async def img2img_above_a_nats_message(net: Network, side: int = 680) -> tuple[str, bytes, dict[str, object]]:
    """Run an img2img task with an init image of noise `side` pixels square (680: 1.4 MB,
    above 1 MiB and within the default body limit as base64) through the gateway: its id,
    the init image and the task's view, once it produced an image."""
    png = noise_png(side)
    assert len(png) > 1024 * 1024
    task = {
        "base_model": "tiny-sd",
        "prompt": "noise",
        "kind": "img2img",
        "init_image": data_url(png),
        "strength": 0.5,
        "task_config": {"image_width": 64, "image_height": 64, "steps": 2, "seed": 7},
    }
    async with httpx.AsyncClient(base_url=net.gateway_url, timeout=60) as http:
        accepted = await http.post("/v1/tasks", json=task)
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["task_id"]
        outcome = await net.outcome(task_id)
        assert isinstance(outcome, TaskSucceeded), outcome
        image = await http.get(f"/v1/tasks/{task_id}/images/0")
        assert image.status_code == 200
        with Image.open(io.BytesIO(image.content)) as made:
            assert made.size == (64, 64)
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
    return task_id, png, view


async def test_an_img2img_task_above_a_nats_message_succeeds_end_to_end(served: Network) -> None:
    task_id, png, view = await img2img_above_a_nats_message(served)

    # the task travelled with a reference, and the input is stored under its digest
    digest = hashlib.sha256(png).hexdigest()
    assert await served.contexts["gateway"].blobs.get(blob_key(digest)) == png
    ref = blob_ref(digest)
    client = await served.client("gateway")
    stored = await bus.read_messages(client.js, subjects.TASKS_STREAM, subjects.task_subject(task_id, "submitted"))
    submitted = decode_task_event(stored[0].subject, stored[0].data)
    assert isinstance(submitted, TaskSubmitted)
    assert submitted.spec.init_image == ref
    assert len(stored[0].data) < 10_000
    # a node of the task gets the bytes; any other node is refused, naming the field
    node = view["nodes"][0]["node_id"]  # type: ignore[index]
    assert await fetch_input(client.nc, node, task_id, "init_image", ref) == png
    with pytest.raises(InputUnavailable) as refused:
        await fetch_input(client.nc, "0x" + "ab" * 20, task_id, "init_image", ref)
    assert refused.value.code == "input_refused"
    assert refused.value.message.startswith("init_image: ")
    assert "not assigned" in refused.value.message
    for task, other_ref in (("*", ref), (task_id, blob_ref("0" * 64)), (task_id, ref.upper())):
        with pytest.raises(InputUnavailable) as not_this:  # a wildcard for a task; an input the task has not
            await fetch_input(client.nc, node, task, "init_image", other_ref)
        assert not_this.value.code == "input_refused"
    # a node of the task that asks again and again (only to make gateways send megabytes)
    # gets the input MAX_ANSWERS_PER_INPUT times in all (its fetches above included)
    refusals = []
    for _ in range(MAX_ANSWERS_PER_INPUT):
        try:
            assert await fetch_input(client.nc, node, task_id, "init_image", ref) == png
        except InputUnavailable as exc:
            refusals.append(exc)
    assert refusals, "a node got its input more than MAX_ANSWERS_PER_INPUT times"
    assert {exc.code for exc in refusals} == {"input_refused"}
    assert "times already" in refusals[0].message


async def test_an_input_of_the_largest_size_works_through_a_gateway_whose_body_limit_takes_it(
    served: Network,
) -> None:
    """8 MiB is the limit of one input image (taskspec.MAX_IMAGE_BYTES): in base64 it needs a
    body limit of about 11.2 MB (docs/api.md, "Limits"). A second gateway with that limit
    stores it; either gateway may answer the nodes."""
    await served.gateway(max_body_bytes=12_000_000)
    _task_id, png, _view = await img2img_above_a_nats_message(served, side=1660)
    assert 8_000_000 < len(png) <= MAX_IMAGE_BYTES


async def test_an_app_cannot_send_a_blob_reference_and_a_task_too_big_without_its_images_is_413(
    served: Network,
) -> None:
    ref = blob_ref("0" * 64)
    base = {"base_model": "tiny-sd", "prompt": "x", "task_config": {"image_width": 64, "image_height": 64}}
    async with httpx.AsyncClient(base_url=served.gateway_url, timeout=60) as http:
        native = await http.post("/v1/tasks", json={**base, "kind": "img2img", "init_image": ref})
        assert native.status_code == 422, native.text
        assert native.json()["error"]["field"] == "init_image"
        assert "blob references are written by the gateway" in native.json()["error"]["message"]
        sdcn = await http.post("/img2img", json={"prompt": "x", "init_image": ref, "width": 64, "height": 64})
        assert sdcn.status_code == 422, sdcn.text
        assert "init_image" in sdcn.json()["msg"]

        # what cannot be stored apart (1.2 MB of preprocessor arguments) is refused, not a 503 "retry"
        control = {
            "model": "some-controlnet",
            "image_dataurl": data_url(noise_png(64)),
            "preprocess": {"method": "canny", "args": {"junk": "x" * 1_200_000}},
        }
        too_big = await http.post("/v1/tasks", json={**base, "controlnet": control})
        assert too_big.status_code == 413, too_big.text
        assert too_big.json()["error"]["code"] == "task_too_large"


async def submit_with_reference(net: Network, field: str, ref: str) -> list[NodeErrored]:
    """Submit, as the gateway would, an inpainting task whose `field` holds `ref`; the
    nodes' `errored` events once the task ended."""
    small = data_url(noise_png(64))
    spec = parse_task(
        {
            "base_model": "tiny-sd",
            "prompt": "x",
            "kind": "inpaint",
            "init_image": small,
            "mask_image": small,
            "task_config": {"image_width": 64, "image_height": 64, "steps": 2, "seed": 3},
        }
    )
    spec = with_input_images(spec, {field: ref})
    task_id = uuid.uuid4().hex
    client = await net.client("gateway")
    submitted = TaskSubmitted(task_id=task_id, spec=spec, submitted_at=time.time())
    await bus.publish(client.js, subjects.task_subject(task_id, "submitted"), submitted, msg_id=task_id)
    outcome = await net.outcome(task_id)
    assert isinstance(outcome, TaskAborted), outcome
    msgs = await bus.read_messages(client.js, subjects.TASKS_STREAM, subjects.task_events(task_id))
    errors = [e for e in (decode_task_event(m.subject, m.data) for m in msgs) if isinstance(e, NodeErrored)]
    assert errors
    return errors


async def test_a_missing_or_tampered_input_fails_the_task_with_a_typed_error_naming_the_field(
    served: Network,
) -> None:
    missing = await submit_with_reference(served, "init_image", blob_ref(hashlib.sha256(b"never stored").hexdigest()))
    for error in missing:
        assert error.code == "input_missing", error
        assert error.message.startswith("init_image: "), error

    # other bytes under the digest's key (a store that was written behind the gateway's back)
    claimed = hashlib.sha256(b"the real mask").hexdigest()
    await served.contexts["gateway"].blobs.put(blob_key(claimed), noise_png(64))
    tampered = await submit_with_reference(served, "mask_image", blob_ref(claimed))
    for error in tampered:
        assert error.code == "input_mismatch", error
        assert error.message.startswith("mask_image: "), error


async def test_with_authentication_on_nodes_read_large_inputs_within_their_permissions(
    tmp_path: Path, runner: PipelineRunner
) -> None:
    """As in production: nodes admitted by the gatekeeper's callout, with a node's NATS
    permissions (they ask on rpc.blobs.<id>.inputs, the answer comes to their own inbox)."""
    async with Network.secured(tmp_path / "nats") as net:
        await net.control_plane_and_nodes(runner, [(f"node-{i}", NodeAgent) for i in (1, 2, 3)])
        await net.gateway()
        await asyncio.sleep(1.0)  # nodes announce themselves
        await img2img_above_a_nats_message(net)


async def test_without_a_gateway_to_answer_a_fetch_is_transient(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        with pytest.raises(Transient) as unanswered:
            await fetch_input(nc, "0x" + "cd" * 20, uuid.uuid4().hex, "init_image", blob_ref("1" * 64), timeout_s=0.2)
    finally:
        await nc.close()
    assert unanswered.value.retryable
    assert unanswered.value.message.startswith("init_image: ")
