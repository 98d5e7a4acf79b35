"""The AUTOMATIC1111 web UI API under ``/sdapi/v1``, mapped onto a native task, so that code
written for A1111 (its `webuiapi` client included) runs against Stipple unchanged but for
the host.

`txt2img` and `img2img` take A1111's fields. Clients send every field of A1111's form
whether they use it or not, so each field that Stipple has no counterpart for is accepted
only at the value that means "off" in A1111 (`NEUTRAL`: `enable_hr` false, `tiling`
false, `subseed_strength` 0, no scripts, ...) and refused with 400 naming it otherwise:
never ignored silently. Fields that matter only when another is on (the `hr_*` fields
without `enable_hr`, a subseed at strength 0) are accepted as they are.

- `prompt` may carry A1111's ``<lora:name:weight>`` tags: they become the task's LoRAs.
- `sampler_name` (or the older `sampler_index`) is an A1111 sampler name; `scheduler`
  ``automatic`` keeps it, ``karras`` asks for its Karras variant.
- `batch_size` x `n_iter` images; `override_settings.sd_model_checkpoint` picks the model,
  else the one ``POST /sdapi/v1/options`` set for this API key, else the default model.
- `img2img`: `init_images` (one), `mask` (white is repainted: inpainting),
  `denoising_strength`. Inpainting always repaints on the whole picture (A1111's
  `inpaint_full_res` and `mask_blur` are accepted at any value and have no effect).

`loras` lists the LoRAs a prompt can name in a tag: those live nodes hold in their model
stores (their announcements' `loras_on_disk`), each named by its reference (a Hugging Face
repo id or a URL), which is also what the tag takes. Any other reference works in a tag as
well: a node fetches it first.

`progress` and `interrupt` act on the caller's (its API key's) running txt2img or img2img,
as A1111's act on its one job: the progress is the step of the node furthest along (no
preview images), and an interrupted request answers 200 with no images (a node returns no
partial result).

Answers as A1111 writes them: ``{"images": [base64 PNG], "parameters": {...}, "info": "<JSON
string>"}``, `info` with `seed`, `all_seeds`, `prompt` and the task id.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from stipple_common.errors import InvalidInput
from stipple_common.taskspec import SAMPLERS, TaskSpec, parse_task

from .sdcn import NATIVE_TO_SDCN

LORA_TAG = re.compile(r"<lora:([^:>]+):([-+]?\d*\.?\d+)>")

# field -> the values that mean "off" in A1111 (accepted, and nothing to do)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "enable_hr": (False, None),
    "styles": ([], None),
    "subseed_strength": (0, 0.0, None),
    "seed_resize_from_h": (0, -1, None),
    "seed_resize_from_w": (0, -1, None),
    "restore_faces": (False, None),
    "tiling": (False, None),
    "eta": (None, 0, 0.0, 1, 1.0),  # the sampler's own default
    "s_churn": (0, 0.0, None),
    "s_tmax": (0, 0.0, None),
    "s_tmin": (0, 0.0, None),
    "s_noise": (1, 1.0, None),
    "script_name": (None, ""),
    "script_args": ([], None),
    "alwayson_scripts": ({}, None),
    "resize_mode": (0, None),
    "inpainting_fill": (0, 1, None),  # 1 (original): what a diffusers inpainting pipeline starts from
    "inpainting_mask_invert": (0, None),
    "initial_noise_multiplier": (1, 1.0, None),
    "image_cfg_scale": (None, 1.5, 0, 0.0),  # instruct-pix2pix only
    "include_init_images": (False, None),
    "refiner_checkpoint": (None, ""),
}
# fields with no effect here that any value may take
FREE = {
    "do_not_save_samples",
    "do_not_save_grid",
    "save_images",
    "override_settings_restore_afterwards",
    "subseed",
    "firstphase_width",
    "firstphase_height",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "mask_blur",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "refiner_switch_at",
    "send_images",
}
TXT2IMG_FIELDS = {
    "prompt",
    "negative_prompt",
    "seed",
    "sampler_name",
    "sampler_index",
    "scheduler",
    "batch_size",
    "n_iter",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "override_settings",
    "denoising_strength",  # txt2img: the hires pass's, off with enable_hr
}
IMG2IMG_FIELDS = TXT2IMG_FIELDS | {"init_images", "mask"}
SCHEDULERS = ("automatic", "karras")

# native field -> A1111's, to report errors under the app's names: SDCN's shape is A1111's,
# but for where the model is named and A1111's list of init images
_NATIVE_TO_A1111 = {
    **NATIVE_TO_SDCN,
    "base_model": "override_settings.sd_model_checkpoint",
    "init_image": "init_images",
}


def _check_fields(raw: dict[str, Any], known: set[str]) -> None:
    for field, value in raw.items():
        if field in known or field in FREE:
            continue
        if field in NEUTRAL:
            if value in NEUTRAL[field]:
                continue
            raise InvalidInput(field, value, "not supported by Stipple: only the value that turns it off is accepted")
        raise InvalidInput(field, value, "not an AUTOMATIC1111 field Stipple supports")


def _sampler(raw: dict[str, Any]) -> str | None:
    name = raw.get("sampler_name") or raw.get("sampler_index")
    scheduler = str(raw.get("scheduler") or "automatic").lower()
    if scheduler not in SCHEDULERS:
        raise InvalidInput("scheduler", raw.get("scheduler"), f"supported: {', '.join(SCHEDULERS)}")
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidInput("sampler_name", name, "expected a sampler name")
    if scheduler == "karras" and not name.endswith(" Karras"):
        if f"{name} Karras" not in SAMPLERS:
            raise InvalidInput("scheduler", raw.get("scheduler"), f"sampler {name!r} has no Karras variant here")
        name = f"{name} Karras"
    return name


def split_loras(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """A1111's ``<lora:name:weight>`` tags out of the prompt, as native LoRAs."""
    loras = [{"model": name, "weight": float(weight)} for name, weight in LORA_TAG.findall(prompt)]
    return LORA_TAG.sub("", prompt).strip(), loras


def parse_request(raw: Any, *, img2img: bool, model: str) -> TaskSpec:
    """The native task of an A1111 txt2img or img2img request; `model` is the model in
    force for the caller (options, else the default). InvalidInput names A1111's field."""
    if not isinstance(raw, dict):
        raise InvalidInput("$", raw, "expected a JSON object")
    _check_fields(raw, IMG2IMG_FIELDS if img2img else TXT2IMG_FIELDS)
    overrides = raw.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise InvalidInput("override_settings", overrides, "expected an object")
    for key in overrides:
        if key != "sd_model_checkpoint":
            raise InvalidInput(f"override_settings.{key}", overrides[key], "only sd_model_checkpoint is supported")
    prompt = raw.get("prompt", "")
    if not isinstance(prompt, str):
        raise InvalidInput("prompt", prompt, "expected a string")
    prompt, loras = split_loras(prompt)
    batch, iterations = raw.get("batch_size", 1), raw.get("n_iter", 1)
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise InvalidInput("n_iter", iterations, "expected an integer of at least 1")
    count = batch * iterations if isinstance(batch, int) and not isinstance(batch, bool) else batch
    native: dict[str, Any] = {
        "base_model": overrides.get("sd_model_checkpoint") or model,
        "prompt": prompt,
        "negative_prompt": raw.get("negative_prompt", ""),
        "loras": loras,
        "sampler": _sampler(raw),
        "task_config": {
            "image_width": raw.get("width", 512),
            "image_height": raw.get("height", 512),
            "steps": raw.get("steps", 20),
            "cfg": raw.get("cfg_scale", 7.0),
            "seed": raw.get("seed", -1),
            "num_images": count,
        },
    }
    if img2img:
        images = raw.get("init_images") or []
        if not isinstance(images, list) or len(images) != 1:
            count = len(images) if isinstance(images, list) else images
            raise InvalidInput("init_images", count, "expected a list of exactly one image")
        native.update(init_image=images[0], strength=raw.get("denoising_strength", 0.75), kind="img2img")
        if raw.get("mask"):
            native.update(kind="inpaint", mask_image=raw["mask"])
    try:
        return parse_task(native)
    except InvalidInput as exc:
        field = _NATIVE_TO_A1111.get(exc.field, exc.field)
        raise InvalidInput(field, exc.value, exc.reason) from None


def error_body(error: Any) -> dict[str, Any]:
    """An error as A1111 (FastAPI) answers one: ``{"error", "detail"}``, and the field."""
    body: dict[str, Any] = {"error": error.code, "detail": error.message}
    if error.field is not None:
        body["field"] = error.field
    return body


def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]


def schedulers() -> list[dict[str, Any]]:
    return [
        {"name": name, "label": name.capitalize(), "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name in SCHEDULERS
    ]


def sd_models(names: list[str]) -> list[dict[str, Any]]:
    return [
        {"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
        for name in names
    ]


def loras(refs: list[str]) -> list[dict[str, Any]]:
    """A1111's ``GET /sdapi/v1/loras``: name, alias and path are all the reference a tag
    names (the files are on the nodes, not here), and there is no metadata to show."""
    return [{"name": ref, "alias": ref, "path": ref, "metadata": {}} for ref in refs]


def result(
    images: list[str], raw: dict[str, Any], spec: TaskSpec, task_id: str, seeds: list[int], *, interrupted: bool = False
) -> dict[str, Any]:
    """A1111's answer: the images, the request's parameters and `info` as a JSON string
    (`interrupted`: ``POST /sdapi/v1/interrupt`` cancelled it, and there are no images)."""
    info = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "seed": seeds[0] if seeds else spec.task_config.seed,
        "all_seeds": seeds,
        "width": spec.task_config.image_width,
        "height": spec.task_config.image_height,
        "steps": spec.task_config.steps,
        "cfg_scale": spec.task_config.cfg,
        "sampler_name": spec.sampler,
        "sd_model_name": spec.model_name,
        "task_id": task_id,
        "interrupted": interrupted,
    }
    parameters = {key: value for key, value in raw.items() if key not in ("init_images", "mask")}
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def progress(
    task_id: str | None, started: float, step: int = 0, total: int = 0, eta_s: float | None = None
) -> dict[str, Any]:
    """A1111's ``GET /sdapi/v1/progress`` for the caller's running txt2img / img2img
    (`task_id`), or idle (None): `progress` 0..1 from the step of the node furthest along,
    `eta_relative` from the dispatcher's estimate while queued, else from the step rate."""
    fraction = step / total if total > 0 else 0.0
    if eta_s is None:
        elapsed = max(0.0, time.time() - started)
        eta_s = elapsed / fraction - elapsed if fraction > 0 else 0.0
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": f"task {task_id}" if task_id else "",
        "job_count": 1 if task_id else 0,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(started)) if task_id else "0",
        "job_no": 0,
        "sampling_step": step,
        "sampling_steps": total,
    }
    return {
        "progress": round(fraction, 4),
        "eta_relative": round(eta_s, 3),
        "state": state,
        "current_image": None,  # nodes send no previews
        "textinfo": None,
        "current_task": task_id,
    }
