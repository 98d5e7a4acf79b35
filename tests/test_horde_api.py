"""The AI Horde API (v2), driven by the Horde's own SDK (`horde_sdk`), unmodified, against the
real gateway, dispatcher, validator and node agents (in one process, the tiny model).

The SDK reads its base URL from AI_HORDE_URL once, when it is imported. So this module takes a
free port first and points AI_HORDE_URL at it, and each test starts a gateway of the `served`
network on that port (a second gateway: any number of them serve one network). The SDK's
async simple client submits, polls `check` and reads `status`; its manual client drives the
rest (a burst to see a queue, delete, bad input, API keys: the simple client sends no key with
its checks, which a gateway with keys on needs)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import uuid
from urllib.parse import urlparse

import aiohttp
import httpx
import pytest
from PIL import Image

from stipple_common.process import free_port
from stipple_gateway.horde import task_id_of
from stipple_testkit.network import Network

HORDE_URL = f"http://127.0.0.1:{free_port()}/api/"
os.environ["AI_HORDE_URL"] = HORDE_URL  # before the SDK is imported: it reads it then

from horde_sdk.ai_horde_api import endpoints  # noqa: E402
from horde_sdk.ai_horde_api.ai_horde_clients import (  # noqa: E402
    AIHordeAPIAsyncClientSession,
    AIHordeAPIAsyncManualClient,
    AIHordeAPIAsyncSimpleClient,
)
from horde_sdk.ai_horde_api.apimodels import (  # noqa: E402
    HordeStatusModelsAllRequest,
    HordeStatusModelsAllResponse,
    ImageGenerateAsyncRequest,
    ImageGenerateAsyncResponse,
    ImageGenerateStatusRequest,
    ImageGenerateStatusResponse,
    ImageGenerationInputPayload,
)
from horde_sdk.ai_horde_api.exceptions import AIHordePayloadValidationError, AIHordeRequestError  # noqa: E402
from horde_sdk.ai_horde_api.fields import JobID  # noqa: E402
from horde_sdk.generic_api.apimodels import RequestErrorResponse  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ANONYMOUS = "0000000000"  # the Horde's anonymous key
SECRET = "horde-secret-01234567x"  # 22 characters: the SDK takes such a key (or the anonymous one)
SMALL = ImageGenerationInputPayload(width=64, height=64, steps=4, seed="7", sampler_name="k_euler_a")


async def horde_gateway(net: Network, **settings: object) -> str:
    """A gateway of `net` on AI_HORDE_URL's port; its URL."""
    assert endpoints.AI_HORDE_BASE_URL == HORDE_URL, "horde_sdk was imported before this module set AI_HORDE_URL"
    await net.gateway(port=urlparse(HORDE_URL).port, **settings)
    return net.gateway_url


async def live_models(manual: AIHordeAPIAsyncManualClient) -> HordeStatusModelsAllResponse:
    """``status/models`` once the new gateway's directory has the three nodes live."""
    for _ in range(100):
        models = await manual.submit_request(HordeStatusModelsAllRequest(), HordeStatusModelsAllResponse)
        assert isinstance(models, HordeStatusModelsAllResponse), models
        if any(model.name == "tiny-sd" and model.count == 3 for model in models):
            return models
        await asyncio.sleep(0.1)
    raise AssertionError(f"the gateway never saw three live nodes: {models}")


@pytest.mark.timeout(240)  # the SDK polls every 4 s: three generations, then a burst of tasks and refusals
async def test_the_horde_sdk_generates_queues_cancels_and_reads_errors_in_the_hordes_shape(served: Network) -> None:
    net = served
    gateway = await horde_gateway(net)
    node_ids = {handle.node_id.lower() for handle in net.nodes.values()}
    async with aiohttp.ClientSession() as http, AIHordeAPIAsyncClientSession(http) as session:
        client = AIHordeAPIAsyncSimpleClient(aiohttp_session=http, horde_client_session=session)
        manual = AIHordeAPIAsyncManualClient(http)

        heartbeat = await client.heartbeat_request()
        assert heartbeat.message == "OK"
        assert heartbeat.version
        models = await live_models(manual)
        (tiny,) = [model for model in models if model.name == "tiny-sd"]
        assert tiny.count == 3
        assert tiny.type_ == "image"

        # end to end: async submit, check until done, status; images as URLs (r2, the default)
        asked = ImageGenerateAsyncRequest(
            prompt="a red fox###blurry",
            models=["tiny-sd"],
            params=ImageGenerationInputPayload(width=64, height=64, steps=4, n=2, seed="7", sampler_name="k_euler_a"),
        )
        done, job = await client.image_generate_request(asked, timeout=120)
        assert done.done
        assert (done.finished, done.waiting, done.processing, done.faulted) == (2, 0, 0, False)
        assert [generation.seed for generation in done.generations] == ["7", "8"]
        images = []
        for generation in done.generations:
            assert generation.img.startswith(f"{gateway}/v1/tasks/{task_id_of(str(job.root))}/images/")
            assert generation.model == "tiny-sd"
            assert generation.state == "ok"
            assert generation.worker_id in node_ids
            assert not generation.censored
            image, _ = await client.download_image_from_generation(generation)
            assert image.size == (64, 64)
            images.append(image)
        async with httpx.AsyncClient(base_url=gateway) as native:
            view = (await native.get(f"/v1/tasks/{task_id_of(str(job.root))}")).json()  # the same task, natively
        assert view["status"] == "succeeded"
        assert (view["task"]["prompt"], view["task"]["negative_prompt"]) == ("a red fox", "blurry")
        assert view["task"]["sampler"] == "Euler a"
        assert view["source"] == "horde"

        # r2 false: base64 PNG in the answer; same seed and prompt, so the same pixels
        inline, _ = await client.image_generate_request(
            ImageGenerateAsyncRequest(prompt="a red fox###blurry", models=["tiny-sd"], params=SMALL, r2=False),
            timeout=120,
        )
        (generation,) = inline.generations
        png = base64.b64decode(generation.img)
        assert png.startswith(b"\x89PNG")
        with Image.open(io.BytesIO(png)) as decoded:
            assert decoded.tobytes() == images[0].tobytes()
        assert generation.seed == "7"

        # inpainting: the image with a mask (white is repainted)
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        painted, repainted_job = await client.image_generate_request(
            ImageGenerateAsyncRequest(
                prompt="a blue boat",
                models=["tiny-sd"],
                params=ImageGenerationInputPayload(width=64, height=64, steps=4, seed="9", denoising_strength=0.8),
                source_image=generation.img,
                source_processing="inpainting",
                source_mask=base64.b64encode(buffer.getvalue()).decode(),
                r2=False,
            ),
            timeout=120,
        )
        (repainted,) = painted.generations
        with Image.open(io.BytesIO(base64.b64decode(repainted.img))) as decoded:
            assert decoded.size == (64, 64)
            assert decoded.tobytes() != images[0].tobytes()
        async with httpx.AsyncClient(base_url=gateway) as native:
            view = (await native.get(f"/v1/tasks/{task_id_of(str(repainted_job.root))}")).json()
        assert (view["task"]["kind"], view["task"]["strength"]) == ("inpaint", 0.8)

        # a burst: each task needs all three nodes, so the later ones queue
        burst = ImageGenerateAsyncRequest(
            prompt="a queue",
            models=["tiny-sd"],
            params=ImageGenerationInputPayload(width=128, height=128, steps=30, seed="3"),
        )
        jobs = []
        for _ in range(5):
            accepted = await manual.submit_request(burst, ImageGenerateAsyncResponse)
            assert isinstance(accepted, ImageGenerateAsyncResponse), accepted
            assert accepted.kudos == 0
            jobs.append(accepted.id_)
        for _ in range(200):  # the dispatcher has them once its consumer fetched them
            last = await manual.get_generate_check(jobs[-1])
            before = await manual.get_generate_check(jobs[-2])
            if last.queue_position and before.queue_position:
                break
            await asyncio.sleep(0.05)
        assert (last.waiting, last.processing, last.finished, last.done) == (1, 0, 0, False)
        assert last.queue_position > before.queue_position >= 1
        assert last.wait_time >= before.wait_time >= 0
        assert last.is_possible
        pending = await manual.get_generate_status(jobs[-1])
        assert pending.generations == []
        assert (pending.waiting, pending.done) == (1, False)

        deleted = await manual.delete_pending_image(jobs[-1])
        assert (deleted.done, deleted.faulted, deleted.waiting, deleted.queue_position) == (True, False, 0, 0)
        assert deleted.model_extra == {"cancelled": True}
        assert deleted.generations == []
        after = await manual.get_generate_check(jobs[-1])
        assert (after.done, after.waiting) == (True, 0)
        for other in jobs[:-1]:  # frees the nodes (a running one is cancelled too)
            assert (await manual.delete_pending_image(other)).done
        async with httpx.AsyncClient(base_url=gateway) as native:
            assert (await native.get(f"/v1/tasks/{task_id_of(str(jobs[-1].root))}")).json()["status"] == "cancelled"
        # a finished request: DELETE answers its status as it is
        again = await manual.delete_pending_image(job)
        assert again.done
        assert again.model_extra == {"cancelled": False}
        assert [generation.seed for generation in again.generations] == ["7", "8"]

        # refusals name the field (the SDK keeps the message of a 400 with `errors`)
        refusals = {
            # the SDK itself wants multiples of 64: model_construct skips its check, as another client would
            "params.width": {"params": ImageGenerationInputPayload.model_construct(width=70, height=64, steps=4)},
            "params.sampler_name": {"params": ImageGenerationInputPayload(sampler_name="k_dpm_fast", steps=4)},
            "params.karras": {"params": ImageGenerationInputPayload(karras=True, steps=4)},  # Euler a has none
            "models": {"models": ["no-such-model"]},
            "colour": {"colour": "red"},  # unknown: the SDK sends what it is given
            "params.tiling": {"params": ImageGenerationInputPayload(tiling=True, width=64, height=64)},
            "trusted_workers": {"trusted_workers": True},
        }
        for field, fields in refusals.items():
            request = ImageGenerateAsyncRequest(**{"prompt": "a red fox", "models": ["tiny-sd"], **fields})
            with pytest.raises(AIHordePayloadValidationError) as refused:
                await client.image_generate_request(request, timeout=30)
            assert str(refused.value).startswith(f"{field}: "), (field, str(refused.value))
        async with httpx.AsyncClient(base_url=gateway) as raw:
            bad = await raw.post("/api/v2/generate/async", json={"prompt": "a fox", "params": {"width": 70}})
            assert bad.status_code == 400
            assert bad.json()["rc"] == "InvalidSize"
            assert set(bad.json()["errors"]) == {"params.width"}
            assert "70" in bad.json()["errors"]["params.width"]

        # no such request: 404 in the Horde's shape
        nobody = JobID(root=uuid.uuid4())
        missing = await manual.submit_request(ImageGenerateStatusRequest(id=nobody), ImageGenerateStatusResponse)
        assert isinstance(missing, RequestErrorResponse)
        assert missing.rc == "RequestNotFound"
        assert str(nobody.root) in missing.message
        with pytest.raises(AIHordeRequestError):
            await manual.get_generate_check(nobody)
        async with httpx.AsyncClient(base_url=gateway) as raw:
            for path in (f"/api/v2/generate/check/{nobody}", "/api/v2/generate/status/not-a-request-id"):
                answer = await raw.get(path)
                assert answer.status_code == 404
                assert answer.json()["rc"] == "RequestNotFound"
                assert "errors" not in answer.json()


@pytest.mark.timeout(120)  # two generations through the simple client (it polls every 4 s)
async def test_the_apikey_header_is_a_stipple_api_key_and_a_request_id_is_its_own_key(served: Network) -> None:
    net = served
    gateway = await horde_gateway(net, api_keys=f"horde-app:{SECRET}:600")
    async with aiohttp.ClientSession() as http, AIHordeAPIAsyncClientSession(http, apikey=SECRET) as session:
        client = AIHordeAPIAsyncSimpleClient(aiohttp_session=http, horde_client_session=session)
        manual = AIHordeAPIAsyncManualClient(http)  # sends the anonymous key, 0000000000
        await live_models(manual)  # open, as on the Horde

        anonymous = ImageGenerateAsyncRequest(prompt="a red fox", models=["tiny-sd"], params=SMALL)
        refused = await manual.submit_request(anonymous, ImageGenerateAsyncResponse)
        assert isinstance(refused, RequestErrorResponse)
        assert refused.rc == "AnonForbidden"

        # the simple client sends its key when it submits, and none when it checks and reads
        inline = ImageGenerateAsyncRequest(prompt="a red fox", models=["tiny-sd"], params=SMALL, r2=False)
        done, job = await client.image_generate_request(inline, timeout=60)
        (generation,) = done.generations
        assert generation.seed == "7"
        with Image.open(io.BytesIO(base64.b64decode(generation.img))) as image:
            assert image.size == (64, 64)
        async with httpx.AsyncClient(base_url=gateway) as native:
            assert (await native.get(f"/v1/tasks/{task_id_of(str(job.root))}")).status_code == 401
            owned = await native.get(
                f"/v1/tasks/{task_id_of(str(job.root))}", headers={"Authorization": f"Bearer {SECRET}"}
            )
            assert owned.json()["owner"] == "horde-app"

        # an image answered as a URL (r2) is the native image route: it needs the key as a bearer token
        linked, _ = await client.image_generate_request(
            ImageGenerateAsyncRequest(prompt="a red fox", models=["tiny-sd"], params=SMALL), timeout=60
        )
        (generation,) = linked.generations
        async with httpx.AsyncClient(base_url=gateway) as raw:
            assert (await raw.get(generation.img)).status_code == 401
            fetched = await raw.get(generation.img, headers={"Authorization": f"Bearer {SECRET}"})
            assert fetched.status_code == 200
            assert fetched.content.startswith(b"\x89PNG")

            # a task of the native API keeps its rule: with keys on, only its key sees it
            bearer = {"Authorization": f"Bearer {SECRET}"}
            native = {
                "base_model": "tiny-sd",
                "prompt": "a fox",
                "task_config": {"image_width": 64, "image_height": 64},
            }
            native_id = (await raw.post("/v1/tasks", json=native, headers=bearer)).json()["task_id"]
            for hidden in (
                await raw.get(f"/api/v2/generate/check/{native_id}"),
                await raw.delete(f"/api/v2/generate/status/{native_id}"),
            ):
                assert hidden.status_code == 404
                assert hidden.json()["rc"] == "RequestNotFound"
            assert (await raw.get(f"/v1/tasks/{native_id}", headers=bearer)).json()["status"] != "cancelled"

            denied = await raw.post("/api/v2/generate/async", json={"prompt": "a fox"}, headers={"apikey": ANONYMOUS})
            assert denied.status_code == 401
            assert denied.json() == {
                "message": f"apikey: this gateway needs an API key (the anonymous key {ANONYMOUS} is not one)",
                "rc": "AnonForbidden",
            }
            unknown = await raw.post("/api/v2/generate/async", json={"prompt": "a fox"}, headers={"apikey": "x" * 22})
            assert unknown.status_code == 401
            assert unknown.json() == {"message": "apikey: unknown API key", "rc": "InvalidAPIKey"}
            heartbeat = await raw.get("/api/v2/status/heartbeat")
            assert heartbeat.json()["message"] == "OK"
