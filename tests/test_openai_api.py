"""The OpenAI images API, driven by OpenAI's own Python client, unmodified, against the real
gateway, dispatcher, validator and node agents (in one process, the tiny model)."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

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
