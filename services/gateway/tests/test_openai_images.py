"""The OpenAI images request, translated to a native task (openai_images.py): no NATS."""

import pytest

from stipple_common.errors import InvalidInput
from stipple_gateway.errors import ApiError
from stipple_gateway.openai_images import error_body, parse_generation


def test_a_request_becomes_the_native_task_and_openai_model_names_mean_the_default_model():
    spec, asked = parse_generation(
        {"prompt": "a fox", "model": "dall-e-2", "n": 3, "size": "256x128", "user": "u-1"}, "tiny-sd"
    )
    assert spec.model_name == "tiny-sd"
    assert (spec.task_config.image_width, spec.task_config.image_height, spec.task_config.num_images) == (256, 128, 3)
    assert asked.user == "u-1"
    assert asked.response_format == "b64_json"
    assert parse_generation({"prompt": "a fox", "model": "sd15"}, "tiny-sd")[0].model_name == "sd15"


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        ({"prompt": "p", "size": "512"}, "size", "512"),
        ({"prompt": "p", "size": "60x64"}, "size", "60x64"),  # not a multiple of 8
        ({"prompt": "p", "size": "4096x4096"}, "size", "4096x4096"),
        ({"prompt": "p", "n": 0}, "n", 0),
        ({"prompt": "p", "response_format": "png"}, "response_format", "png"),
        ({"prompt": "p", "style": "vivid"}, "style", None),  # unsupported: named, not ignored
        ({"size": "64x64"}, "prompt", None),
    ],
)
def test_a_bad_or_unsupported_field_is_refused_naming_it(body, field, value):
    with pytest.raises(InvalidInput) as caught:
        parse_generation(body, "tiny-sd")
    assert caught.value.field == field
    if value is not None:
        assert caught.value.value == value


def test_errors_take_openais_shape():
    body = error_body(ApiError(400, "invalid_input", "size: expected WIDTHxHEIGHT", field="size", value="x"))
    assert body == {
        "error": {
            "message": "size: expected WIDTHxHEIGHT",
            "type": "invalid_request_error",
            "param": "size",
            "code": "invalid_input",
        }
    }
    assert error_body(ApiError(401, "unauthorized", "no key"))["error"]["type"] == "authentication_error"
    assert error_body(ApiError(503, "no_nodes", "later"))["error"]["type"] == "api_error"
