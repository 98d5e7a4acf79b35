"""The OpenAI images API (``POST /v1/images/generations``, ``GET /v1/models``), mapped onto
a native task, so that code written for OpenAI's client works against Stipple unchanged
but for its base URL and key.

- `prompt` (required), `n` (1-10, the task's `num_images`), `size` as ``WxH`` (each side
  64-2048, a multiple of 8), `response_format` ``b64_json`` (default) or ``url`` (the
  gateway's image URL, which needs the same bearer token when API keys are on), `user`
  (kept in the log line of the task, as OpenAI uses it: to trace abuse to an end user).
- `model`: a model the network serves (``GET /v1/models`` lists them); OpenAI's own names
  (``dall-e-2``, ``dall-e-3``, ``gpt-image-1``) stand for the gateway's default model, so
  that code which names one keeps working.
- Anything else (`quality`, `style`, `background`, ...) is refused with 400 naming the
  field: never ignored silently.
- Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

The edits endpoint (multipart) is not built yet.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from stipple_common.errors import InvalidInput
from stipple_common.taskspec import TaskSpec, convert_strict, parse_task

from .errors import ApiError

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1")  # names that mean "the default model" here
SIZE = re.compile(r"^(\d{2,4})x(\d{2,4})$")


class ImageGenerationRequest(msgspec.Struct, kw_only=True):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str = "512x512"
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str = ""


class ImageData(msgspec.Struct, kw_only=True, omit_defaults=True):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(msgspec.Struct, kw_only=True):
    created: int
    data: list[ImageData]


class OpenAIErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str  # invalid_request_error, authentication_error, rate_limit_error, api_error, ...
    param: str | None  # the OpenAI field at fault
    code: str


class OpenAIError(msgspec.Struct, kw_only=True):
    """An error in OpenAI's shape."""

    error: OpenAIErrorDetail


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "stipple"


class ModelList(msgspec.Struct, kw_only=True):
    data: list[Model]
    object: str = "list"


def parse_generation(raw: Any, default_model: str) -> tuple[TaskSpec, ImageGenerationRequest]:
    """The native task of an OpenAI image generation request, and the request (for
    `response_format` and `user`); InvalidInput names the OpenAI field."""
    request = convert_strict(raw, ImageGenerationRequest)
    match = SIZE.match(request.size)
    if match is None:
        raise InvalidInput("size", request.size, "expected WIDTHxHEIGHT, e.g. 512x512")
    width, height = int(match.group(1)), int(match.group(2))
    model = default_model if not request.model or request.model in OPENAI_MODELS else request.model
    native = {
        "base_model": model,
        "prompt": request.prompt,
        "task_config": {"image_width": width, "image_height": height, "num_images": request.n},
    }
    try:
        return parse_task(native), request
    except InvalidInput as exc:
        field = {
            "base_model": "model",
            "task_config.num_images": "n",
            "task_config.image_width": "size",
            "task_config.image_height": "size",
        }.get(exc.field, exc.field)
        value = request.size if field == "size" else exc.value
        raise InvalidInput(field, value, exc.reason) from None


def error_body(error: ApiError) -> dict[str, Any]:
    """`error` in OpenAI's shape: a 4xx is an ``invalid_request_error`` (401:
    ``authentication_error``, 429: ``rate_limit_error``), a 5xx an ``api_error``."""
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        error.status, "invalid_request_error" if error.status < 500 else "api_error"
    )
    return {"error": {"message": error.message, "type": kind, "param": error.field, "code": error.code}}
