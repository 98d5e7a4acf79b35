"""The SDCN request shapes (``POST /txt2img``, ``POST /img2img``), mapped onto a native task.

SDCN: prompt, negative_prompt, loras [[name, weight]], seed (-1 = random), sampler_name,
steps, cfg_scale, width, height, model; img2img adds init_image and denoising_strength
(and, here, an optional mask for inpainting). Response ``{"images": [base64 PNG]}`` or
``{"msg": "..."}``. Field names in errors are SDCN's, so the app sees its own names.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from stipple_common.errors import InvalidInput
from stipple_common.taskspec import TaskSpec, convert_strict, parse_task


class SdcnTxt2Img(msgspec.Struct, kw_only=True):
    prompt: str
    negative_prompt: str = ""
    loras: list[tuple[str, float]] = []
    seed: int = -1
    sampler_name: str | None = None
    steps: int = 25
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    model: str | None = None
    batch_size: int = 1


class SdcnImg2Img(SdcnTxt2Img, kw_only=True):
    init_image: Annotated[str, msgspec.Meta(min_length=1)]
    denoising_strength: float = 0.75
    mask: str = ""  # optional: inpaint where the mask is white


# native field -> SDCN field, to report errors under the name the app used
NATIVE_TO_SDCN = {
    "base_model": "model",
    "sampler": "sampler_name",
    "init_image": "init_image",
    "mask_image": "mask",
    "strength": "denoising_strength",
    "task_config.image_width": "width",
    "task_config.image_height": "height",
    "task_config.steps": "steps",
    "task_config.cfg": "cfg_scale",
    "task_config.seed": "seed",
    "task_config.num_images": "batch_size",
}


def _native(req: SdcnTxt2Img, default_model: str) -> dict[str, Any]:
    return {
        "base_model": req.model or default_model,
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "loras": [{"model": name, "weight": weight} for name, weight in req.loras],
        "sampler": req.sampler_name,
        "task_config": {
            "image_width": req.width,
            "image_height": req.height,
            "steps": req.steps,
            "cfg": req.cfg_scale,
            "seed": req.seed,
            "num_images": req.batch_size,
        },
    }


def _parse(native: dict[str, Any]) -> TaskSpec:
    try:
        return parse_task(native)
    except InvalidInput as exc:
        field = exc.field
        if field.startswith("loras["):
            field = field.split(".")[0]  # SDCN loras are [name, weight] pairs
        raise InvalidInput(NATIVE_TO_SDCN.get(field, field), exc.value, exc.reason) from None


def parse_sdcn_txt2img(raw: Any, default_model: str) -> TaskSpec:
    return _parse(_native(convert_strict(raw, SdcnTxt2Img), default_model))


def parse_sdcn_img2img(raw: Any, default_model: str) -> TaskSpec:
    req = convert_strict(raw, SdcnImg2Img)
    native = _native(req, default_model)
    native.update(
        kind="inpaint" if req.mask else "img2img",
        init_image=req.init_image,
        strength=req.denoising_strength,
        **({"mask_image": req.mask} if req.mask else {}),
    )
    return _parse(native)
