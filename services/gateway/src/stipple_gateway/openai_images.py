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

``POST /v1/images/edits`` (multipart, as OpenAI's client sends it) is inpainting: `image`
(one PNG; ``image[]`` with one file is the same), `mask` (a PNG of the image's size whose
fully transparent pixels mark the area to paint; without it, the image's own transparent
pixels do, as on OpenAI), `prompt`, `n`, `size` (default: the image's own size),
`response_format`, `model`, `user`. The masked area is painted anew (strength 1). An image
or mask is decoded only after its header's size is checked against the task's limits (no
decompression bombs), and a mask with nothing to paint is refused.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any, Literal

import msgspec
from PIL import Image

from stipple_common.errors import InvalidInput
from stipple_common.taskspec import MAX_SIDE, TaskSpec, convert_strict, parse_task

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


EDIT_FIELDS = ("prompt", "model", "n", "size", "response_format", "user")  # and the files: image, mask


def _png(field: str, data: bytes) -> Image.Image:
    """`data` as an RGBA image, refused naming `field` unless it is a PNG within the task's
    size limits: the size is read from the header before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise InvalidInput(field, image.format or "unknown", "expected a PNG file")
            width, height = image.size
            if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
                raise InvalidInput(field, f"{width}x{height}", f"each side must be 1 to {MAX_SIDE} pixels")
            return image.convert("RGBA")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(field, f"<{len(data)} bytes>", f"not a readable PNG ({exc})") from None


def _data_url(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def parse_edit(
    fields: dict[str, str], files: dict[str, list[bytes]], default_model: str
) -> tuple[TaskSpec, ImageGenerationRequest]:
    """The native inpainting task of an OpenAI image edit: `fields` are the form's text
    fields, `files` its files by field name. InvalidInput names the OpenAI field."""
    for name in files:
        if name not in ("image", "image[]", "mask"):
            raise InvalidInput(name, "<file>", "not a file field of an image edit (image, mask)")
    for name in fields:
        if name not in EDIT_FIELDS:
            raise InvalidInput(name, fields[name], "not supported by Stipple's image edits")
    images = files.get("image", []) + files.get("image[]", [])
    if len(images) != 1:
        raise InvalidInput("image", len(images), "expected exactly one image file")
    if len(files.get("mask", [])) > 1:
        raise InvalidInput("mask", len(files["mask"]), "expected at most one mask file")
    image = _png("image", images[0])
    mask_source = _png("mask", files["mask"][0]) if files.get("mask") else image
    if mask_source.size != image.size:
        raise InvalidInput(
            "mask",
            f"{mask_source.size[0]}x{mask_source.size[1]}",
            f"must be the image's size, {image.width}x{image.height}",
        )
    # OpenAI: fully transparent is painted; Stipple's mask: white is repainted
    mask = mask_source.getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)
    if mask.getbbox() is None:
        field = "mask" if files.get("mask") else "image"
        raise InvalidInput(
            field, "<no transparent pixel>", "nothing to paint: mark the area with fully transparent pixels"
        )
    raw: dict[str, Any] = dict(fields)
    if "n" in raw:  # a form's fields are text
        try:
            raw["n"] = int(raw["n"])
        except ValueError:
            raise InvalidInput("n", raw["n"], "expected an integer") from None
    raw.setdefault("size", f"{image.width}x{image.height}")
    spec, request = parse_generation(raw, default_model)
    native = msgspec.to_builtins(spec)
    native.update(
        kind="inpaint",
        init_image=_data_url(image.convert("RGB")),
        mask_image=_data_url(mask),
        strength=1.0,
    )
    return parse_task(native), request


def error_body(error: ApiError) -> dict[str, Any]:
    """`error` in OpenAI's shape: a 4xx is an ``invalid_request_error`` (401:
    ``authentication_error``, 429: ``rate_limit_error``), a 5xx an ``api_error``."""
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        error.status, "invalid_request_error" if error.status < 500 else "api_error"
    )
    return {"error": {"message": error.message, "type": kind, "param": error.field, "code": error.code}}
