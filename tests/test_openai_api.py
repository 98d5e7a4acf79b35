"""The OpenAI images API, driven by OpenAI's own Python client, unmodified, against the real
gateway, dispatcher, validator and node agents (in one process, the tiny model)."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from stipple_gateway.taskids import network_secret, new_task_id
from stipple_testkit.network import Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_the_openai_client_generates_lists_models_and_reads_errors_in_its_own_shape(served: Network) -> None:
    net = served
    client = openai.AsyncOpenAI(base_url=f"{net.gateway_url}/v1", api_key="no keys on this gateway", max_retries=0)

    models = await client.models.list()
    assert "tiny-sd" in [model.id for model in models.data]

    # OpenAI's model names stand for the gateway's default model
    made = await client.images.generate(
        prompt="a red fox", model="dall-e-3", n=2, size="64x64", response_format="b64_json"
    )
    assert len(made.data) == 2
    for image in made.data:
        assert image.b64_json
        with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as png:
            assert png.size == (64, 64)

    linked = await client.images.generate(prompt="a red fox", model="tiny-sd", size="64x64", response_format="url")
    (only,) = linked.data
    assert only.url
    assert only.url.startswith(f"{net.gateway_url}/v1/tasks/")
    async with httpx.AsyncClient() as http:
        fetched = await http.get(only.url)
    assert fetched.status_code == 200
    assert fetched.content.startswith(b"\x89PNG")

    with pytest.raises(openai.BadRequestError) as bad_size:
        await client.images.generate(prompt="a red fox", size="65x64")
    assert bad_size.value.param == "size"
    assert "65x64" in bad_size.value.message

    with pytest.raises(openai.BadRequestError) as unknown:
        await client.images.generate(prompt="a red fox", size="64x64", extra_body={"quality": "hd"})
    assert unknown.value.param == "quality"  # refused, naming it: never ignored silently

    with pytest.raises(openai.BadRequestError) as too_many:
        await client.images.generate(prompt="a red fox", size="64x64", n=11)
    assert too_many.value.param == "n"

    with pytest.raises(openai.APIStatusError) as no_model:
        await client.images.generate(prompt="a red fox", size="64x64", model="no-such-model")
    assert no_model.value.status_code == 422
    assert no_model.value.body["param"] == "model"
    assert "no-such-model" in no_model.value.message


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def test_the_openai_client_edits_an_image_where_the_mask_is_transparent(served: Network) -> None:
    """``images.edit``: multipart from OpenAI's client; the mask's transparent pixels are
    painted anew and the rest is kept; bad files and fields are 400s naming them."""
    client = openai.AsyncOpenAI(base_url=f"{served.gateway_url}/v1", api_key="none", max_retries=0)
    base = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: painted

    edited = await client.images.edit(
        image=("fox.png", png_bytes(base), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a blue boat",
        n=2,
        response_format="b64_json",
        extra_headers={"Idempotency-Key": "edit-1"},
    )
    assert len(edited.data) == 2
    with Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json or ""))) as png:
        assert png.size == (64, 64)  # size defaults to the image's own

    # the task it ran: inpainting at strength 1 (its id comes from the Idempotency-Key, under
    # the network's task-id secret, which a service reads from KV as the gateways do)
    ctx = await served.client()
    task_id = new_task_id("edit-1", "", await network_secret(ctx.js, replicas=1))
    async with httpx.AsyncClient(base_url=served.gateway_url) as http:
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
    assert view["status"] == "succeeded"
    assert (view["task"]["kind"], view["task"]["strength"], view["task"]["prompt"]) == ("inpaint", 1.0, "a blue boat")

    # without a mask, the image's own transparent pixels mark the area
    holed = base.copy()
    holed.paste((0, 0, 0, 0), (0, 0, 32, 32))
    own = await client.images.edit(image=("holed.png", png_bytes(holed), "image/png"), prompt="sky", size="64x64")
    assert len(own.data) == 1

    with pytest.raises(openai.BadRequestError) as opaque:  # nothing transparent: nothing to paint
        await client.images.edit(image=("fox.png", png_bytes(base), "image/png"), prompt="sky")
    assert opaque.value.param == "image"
    with pytest.raises(openai.BadRequestError) as small_mask:
        await client.images.edit(
            image=("fox.png", png_bytes(base), "image/png"),
            mask=("mask.png", png_bytes(mask.resize((32, 32))), "image/png"),
            prompt="sky",
        )
    assert small_mask.value.param == "mask"
    assert "32x32" in small_mask.value.message
    with pytest.raises(openai.BadRequestError) as not_png:
        await client.images.edit(image=("fox.png", b"GIF89a not a png", "image/png"), prompt="sky")
    assert not_png.value.param == "image"
    with pytest.raises(openai.BadRequestError) as unknown:
        await client.images.edit(image=("holed.png", png_bytes(holed), "image/png"), prompt="sky", quality="high")
    assert unknown.value.param == "quality"

    # a PNG whose header claims a huge picture is refused before its pixels are decoded
    huge = bytearray(png_bytes(Image.new("RGBA", (8, 8))))
    huge[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width and height
    with pytest.raises(openai.BadRequestError) as bomb:
        await client.images.edit(image=("bomb.png", bytes(huge), "image/png"), prompt="sky")
    assert bomb.value.param == "image"

    async with httpx.AsyncClient(base_url=served.gateway_url) as http:
        as_json = await http.post("/v1/images/edits", json={"prompt": "sky"})
    assert as_json.status_code == 400
    assert as_json.json()["error"]["param"] == "content-type"
