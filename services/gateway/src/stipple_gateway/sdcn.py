"""The SDCN request shape (``POST /txt2img``), mapped onto a native task.

SDCN: prompt, negative_prompt, loras [[name, weight]], seed (-1 = random), sampler_name,
steps, cfg_scale, width, height, model. Response ``{"images": [base64 PNG]}`` or
``{"msg": "..."}``. Field names in errors are SDCN's, so the app sees its own names.
"""

from __future__ import annotations

from typing import Any

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


# native field -> SDCN field, to report errors under the name the app used
_NATIVE_TO_SDCN = {
    "base_model": "model",
    "sampler": "sampler_name",
    "task_config.image_width": "width",
    "task_config.image_height": "height",
    "task_config.steps": "steps",
    "task_config.cfg": "cfg_scale",
    "task_config.seed": "seed",
    "task_config.num_images": "batch_size",
}


def parse_sdcn_txt2img(raw: Any, default_model: str) -> TaskSpec:
    req = convert_strict(raw, SdcnTxt2Img)
    if req.loras:
        raise InvalidInput("loras", raw.get("loras"), "LoRA is not supported yet; send an empty list")
    native = {
        "base_model": req.model or default_model,
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
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
    try:
        return parse_task(native)
    except InvalidInput as exc:
        field = _NATIVE_TO_SDCN.get(exc.field, exc.field)
        raise InvalidInput(field, exc.value, exc.reason) from None
