"""The AUTOMATIC1111 API, driven by the `webuiapi` client, unmodified, against the real
gateway, dispatcher, validator and node agents (in one process, the tiny model)."""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest
import webuiapi
from PIL import Image

from stipple_testkit.network import Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_webuiapi_generates_paints_lists_and_is_refused_naming_the_field(served: Network) -> None:
    net = served
    url = urlparse(net.gateway_url)

    def run() -> None:
        # webuiapi is synchronous and its constructor already asks the server (for its scripts):
        # every call of it runs off the event loop the in-process gateway answers on
        api = webuiapi.WebUIApi(host=url.hostname, port=url.port, sampler="Euler a", steps=4)
        assert "tiny-sd" in [model["model_name"] for model in api.get_sd_models()]
        assert "DPM++ 2M Karras" in [sampler["name"] for sampler in api.get_samplers()]
        assert {s["name"] for s in api.get_schedulers()} == {"automatic", "karras"}
        api.util_set_model("tiny-sd")
        assert api.get_options()["sd_model_checkpoint"] == "tiny-sd"

        made = api.txt2img(prompt="a red fox", seed=7, width=64, height=64, batch_size=2)
        assert len(made.images) == 2
        assert all(image.size == (64, 64) for image in made.images)
        assert made.info["all_seeds"] == [7, 8]
        assert made.info["sd_model_name"] == "tiny-sd"
        assert made.parameters["prompt"] == "a red fox"

        init = made.image.convert("RGB")
        mask = Image.new("L", init.size, 0)
        mask.paste(255, (16, 16, 48, 48))  # white: repainted
        painted = api.img2img(
            images=[init],
            mask_image=mask,
            prompt="a blue boat",
            seed=7,
            width=64,
            height=64,
            denoising_strength=0.8,
        )
        assert len(painted.images) == 1
        assert painted.image.size == (64, 64)

        with pytest.raises(RuntimeError) as tiled:  # webuiapi raises (status, body) on an error
            api.txt2img(prompt="a red fox", width=64, height=64, tiling=True)
        status, body = tiled.value.args
        assert status == 400
        assert '"field":"tiling"' in body.replace(" ", "")
        with pytest.raises(RuntimeError) as hires:
            api.txt2img(prompt="a red fox", width=64, height=64, enable_hr=True)
        assert '"field":"enable_hr"' in hires.value.args[1].replace(" ", "")

    await asyncio.to_thread(run)


async def test_webuiapi_follows_progress_and_interrupts_the_running_job(served: Network) -> None:
    """`progress` shows the caller's running job at the step of its node furthest along, and
    `interrupt` cancels it: its txt2img answers 200 with no images, marked interrupted."""
    url = urlparse(served.gateway_url)

    def run() -> str:
        api = webuiapi.WebUIApi(host=url.hostname, port=url.port, sampler="Euler", steps=150)
        idle = api.get_progress()
        assert (idle["progress"], idle["state"]["job_count"], idle["current_task"]) == (0.0, 0, None)

        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(api.txt2img, prompt="a slow fox", seed=3, width=256, height=256, batch_size=2)
            try:
                seen: dict = {}
                for _ in range(600):  # until a node reports a step (bounded: 60 s)
                    seen = api.get_progress()
                    if seen["state"]["sampling_step"] > 0 or job.done():
                        break
                    time.sleep(0.1)
                assert not job.done(), "the job finished before a step was seen: make it longer"
                assert seen["state"]["job_count"] == 1
                assert seen["state"]["sampling_steps"] >= 150  # the node counts the steps of every image
                assert 0 < seen["progress"] < 1
                assert seen["current_task"]
            finally:
                assert api.interrupt() is None  # also when an assertion failed: the job must end
            made = job.result(timeout=60)
        assert made.images == []
        assert made.info["interrupted"] is True
        assert made.info["task_id"] == seen["current_task"]
        assert api.get_progress()["state"]["job_count"] == 0
        assert api.interrupt() is None  # nothing running: nothing to do
        return str(seen["current_task"])

    task_id = await asyncio.to_thread(run)
    async with httpx.AsyncClient(base_url=served.gateway_url) as http:
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
    assert view["status"] == "cancelled"


async def test_webuiapi_lists_loras_and_a_lora_tag_still_becomes_the_tasks_lora(served: Network) -> None:
    """`get_loras` answers A1111's list: the LoRAs live nodes hold in their model stores. The
    nodes here run without a store, so the list is empty, and a `<lora:name:weight>` tag is
    still the task's LoRA, as before: each node asked for it says it does not have it."""
    url = urlparse(served.gateway_url)

    def run() -> str:
        api = webuiapi.WebUIApi(host=url.hostname, port=url.port, sampler="Euler a", steps=4)
        loras = api.get_loras()
        assert isinstance(loras, list)
        assert all(set(lora) == {"name", "alias", "path", "metadata"} for lora in loras)
        assert "acme/fox-lora" not in [lora["name"] for lora in loras]  # no node holds it
        with pytest.raises(RuntimeError) as refused:  # webuiapi raises (status, body) on an error
            api.txt2img(prompt="a red fox <lora:acme/fox-lora:0.8>", seed=11, width=64, height=64)
        status, body = refused.value.args
        assert status == 502
        assert isinstance(api.get_loras(), list)
        found = re.search(r"task ([0-9a-f]{32})", body)
        assert found, body
        return found.group(1)

    task_id = await asyncio.to_thread(run)
    async with httpx.AsyncClient(base_url=served.gateway_url) as http:
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
    assert view["task"]["prompt"] == "a red fox"
    assert view["task"]["loras"] == [{"model": "acme/fox-lora", "weight_file_name": "", "weight": 0.8}]
    errors = [node["error"]["message"] for node in view["nodes"] if "error" in node]
    assert errors, view
    assert all(message.startswith("loras[0].model: ") and "acme/fox-lora" in message for message in errors)
