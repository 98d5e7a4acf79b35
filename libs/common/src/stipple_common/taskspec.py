"""The task format apps send, its limits, and its validation.

The native task JSON is a superset of Crynux's stable-diffusion-task (versions 1.0.0 to
2.5.0): a Crynux task is accepted as it is, and means what it means on Crynux. Beyond it:
several LoRAs, img2img and inpainting inputs, AUTOMATIC1111 sampler names, and seed -1 for
"pick one".

`version` tells the two apart. A task that names one of Crynux's versions gets Crynux's
defaults for what it leaves out (`CRYNUX_TASK_CONFIG`, `CRYNUX_SCHEDULER`: one step, seed
0, six images, the safety checker on, cfg 5, DPMSolverMultistepScheduler); any other task
is native and gets the defaults of the structs below (25 steps, a random seed, one image),
which the OpenAI layer, for one, relies on. Crynux's own default version is 2.5.0, so a
Crynux task without a `version` reads here as a native one: the one case the two formats
cannot be told apart (docs/api.md, "Crynux compatibility").

Parsing has two steps. `parse_task` decodes external JSON strictly (unknown fields
are refused and named), checks every constraint, and *canonicalizes*: `base_model`
becomes a `ModelRef`, Crynux's single `lora` joins `loras`, and 1-100 integer
fractions become floats. Only canonical specs travel inside the network, so nodes never
see two spellings of one thing. `check_spec` holds the cross-field checks; the node runs
it again, because a node trusts nobody.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from PIL import Image, UnidentifiedImageError

from .errors import NO_VALUE, InvalidInput

MAX_SIDE = 2048
MAX_STEPS = 150
MAX_IMAGES = 10
MAX_LORAS = 8
MAX_PROMPT_CHARS = 8000
MAX_IMAGE_BYTES = 8 * 1024 * 1024  # decoded size of one input image
# pixels of one input image, read from its header before anything decodes it: 8 MB of PNG
# may hold gigapixels (a decompression bomb); inputs are fitted to the task's size anyway
MAX_INPUT_SIDE = 4096
MAX_INPUT_PIXELS = MAX_INPUT_SIDE * MAX_INPUT_SIDE
SEED_MAX = 2**32 - 1

CRYNUX_VERSIONS = ("1.0.0", "2.0.0", "2.1.0", "2.5.0")
# Crynux's defaults for a task in its format (one naming a Crynux version): its whole task_config
# (steps, seed, num_images, safety_checker and cfg differ from the native defaults) and its
# scheduler; every other field's default is the same in both (docs/api.md has the table). From
# crynux-ai/stable-diffusion-task, sd_task/task_args/inference_task/task_args.py (`TaskConfig`,
# `InferenceTaskArgs.scheduler`) at 17cd393976c9020d5d2a339c0b3452e0e952774b, where the default
# version is 2.5.0. Crynux requires `task_config`; here it may be left out as well.
CRYNUX_TASK_CONFIG: dict[str, Any] = {
    "image_width": 512,
    "image_height": 512,
    "steps": 1,
    "seed": 0,
    "num_images": 6,
    "safety_checker": True,
    "cfg": 5.0,
}
CRYNUX_SCHEDULER: dict[str, Any] = {"method": "DPMSolverMultistepScheduler", "args": None}
VERSIONS = ("1", *CRYNUX_VERSIONS)
KINDS = ("txt2img", "img2img", "inpaint")

# AUTOMATIC1111 sampler names; the node maps them to diffusers schedulers.
SAMPLERS = (
    "Euler",
    "Euler a",
    "Heun",
    "DDIM",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "DPM2",
    "DPM2 a",
    "UniPC",
    "LCM",
    "PNDM",
    "PLMS",
    "LMS",
    "LMS Karras",
)
# diffusers scheduler classes a task may name (Crynux's `scheduler.method` and more).
SCHEDULERS = (
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler",
)
# ControlNet preprocessors by name (Crynux's list). `OPENCV_PREPROCESSORS` need no
# model; the others need annotator weights from the model store.
OPENCV_PREPROCESSORS = ("canny", "shuffle", "scribble_xdog")
ANNOTATOR_PREPROCESSORS = (
    "scribble_hed",
    "softedge_hed",
    "scribble_hedsafe",
    "softedge_hedsafe",
    "depth_midas",
    "mlsd",
    "openpose",
    "openpose_face",
    "openpose_faceonly",
    "openpose_full",
    "openpose_hand",
    "dwpose",
    "scribble_pidinet",
    "softedge_pidinet",
    "scribble_pidisafe",
    "softedge_pidisafe",
    "normal_bae",
    "lineart_coarse",
    "lineart_realistic",
    "lineart_anime",
    "depth_zoe",
    "depth_leres",
    "depth_leres++",
    "mediapipe_face",
)
PREPROCESSORS = OPENCV_PREPROCESSORS + ANNOTATOR_PREPROCESSORS

Text = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
Ref = Annotated[str, msgspec.Meta(max_length=2000)]
NonEmptyRef = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
# Crynux writes fractions as integers 1-100 (70 = 0.7); floats <= 1 are taken as they are.
Fraction = Annotated[int, msgspec.Meta(gt=0, le=100)] | Annotated[float, msgspec.Meta(gt=0, le=100)]


def to_fraction(value: float) -> float:
    """Crynux's rule: an integer, or anything above 1, is a percentage."""
    return value / 100.0 if isinstance(value, int) or value > 1 else float(value)


class ModelRef(msgspec.Struct, frozen=True, kw_only=True):
    """A model: a name nodes advertise, a Hugging Face repo id, a local path or a URL."""

    name: NonEmptyRef
    variant: str | None = None


class LoraSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One LoRA. `weight` is the plain scale (A1111's <lora:name:weight>), -4 to 4."""

    model: NonEmptyRef
    weight_file_name: Ref = ""
    weight: Annotated[float, msgspec.Meta(ge=-4.0, le=4.0)] = 1.0


class CrynuxLora(msgspec.Struct, frozen=True, kw_only=True):
    """Crynux's single LoRA, whose weight is a fraction (100 = 1.0)."""

    model: NonEmptyRef
    weight_file_name: Ref = ""
    weight: Fraction = 100


class Preprocess(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    args: dict[str, Any] | None = None


class ControlNetSpec(msgspec.Struct, frozen=True, kw_only=True):
    model: NonEmptyRef
    variant: str | None = None
    image_dataurl: Annotated[str, msgspec.Meta(min_length=1)]
    weight: Fraction = 70
    preprocess: Preprocess | None = None


class SchedulerSpec(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    args: dict[str, Any] | None = None


class RefinerSpec(msgspec.Struct, frozen=True, kw_only=True):
    model: NonEmptyRef
    variant: str | None = None
    denoising_cutoff: Fraction = 80  # where the base hands over to the refiner
    steps: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20


class TaskConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The defaults here are the native ones: a task that names a Crynux version gets
    Crynux's instead (1 step, seed 0, 6 images, the safety checker on, cfg 5)."""

    image_width: Annotated[int, msgspec.Meta(ge=64, le=MAX_SIDE, multiple_of=8)] = 512
    image_height: Annotated[int, msgspec.Meta(ge=64, le=MAX_SIDE, multiple_of=8)] = 512
    steps: Annotated[int, msgspec.Meta(ge=1, le=MAX_STEPS)] = 25
    cfg: Annotated[float, msgspec.Meta(ge=0.0, le=30.0)] = 7.0
    seed: Annotated[int, msgspec.Meta(ge=-1, le=SEED_MAX)] = -1
    num_images: Annotated[int, msgspec.Meta(ge=1, le=MAX_IMAGES)] = 1
    safety_checker: bool = False


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A Stable Diffusion task. Seed -1 means "pick one": the gateway resolves it to a
    concrete seed before the task enters the network, so every node computes the same
    image. Image i of a task uses seed + i."""

    version: str = "1"
    kind: str = "txt2img"
    base_model: ModelRef | NonEmptyRef
    dtype: Literal["float16", "bfloat16", "float32", "auto"] = "auto"
    unet: Ref = ""
    prompt: Text
    negative_prompt: Text = ""
    lora: CrynuxLora | None = None  # Crynux's one LoRA; canonical specs move it into `loras`
    loras: Annotated[list[LoraSpec], msgspec.Meta(max_length=MAX_LORAS)] = []
    controlnet: ControlNetSpec | None = None
    scheduler: SchedulerSpec | None = None  # a diffusers class (Crynux), or:
    sampler: str | None = None  # an AUTOMATIC1111 sampler name
    vae: Ref = ""
    refiner: RefinerSpec | None = None
    textual_inversion: Ref = ""
    textual_inversion_token: Annotated[str, msgspec.Meta(max_length=100)] = ""  # default: the file's own, else its name
    init_image: str = ""  # data URL (img2img, inpaint)
    mask_image: str = ""  # data URL (inpaint): white is repainted
    strength: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.75  # img2img/inpaint denoising
    task_config: TaskConfig = TaskConfig()

    @property
    def model(self) -> ModelRef:
        return self.base_model if isinstance(self.base_model, ModelRef) else ModelRef(name=self.base_model)

    @property
    def model_name(self) -> str:
        """The name nodes advertise and the dispatcher matches."""
        return self.model.name


S = TypeVar("S", bound=msgspec.Struct)


def _lookup(raw: Any, path: str) -> Any:
    """The value at a msgspec error path like ``$.task_config.steps`` or ``$.x[0]``."""
    node = raw
    if path in ("$", ""):
        return raw
    for part in path.removeprefix("$").replace("[", ".[").split("."):
        if not part:
            continue
        try:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return NO_VALUE
    return node


def validation_error_to_invalid(err: msgspec.ValidationError, raw: Any, *, prefix: str = "") -> InvalidInput:
    """Turn a msgspec error ("Expected `int` <= 150 - at `$.task_config.steps`") into an
    InvalidInput that names the field and carries the value the app sent."""
    text = str(err)
    reason, found, where = text.rpartition(" - at `")
    if not found:
        reason, where = text, "$`"
    path = where.rstrip("`")
    field = prefix + path.removeprefix("$").lstrip(".")
    if reason.startswith("Object missing required field"):
        missing = reason.split("`")[1]
        field = f"{field}.{missing}".lstrip(".") if field else missing
        return InvalidInput(field, NO_VALUE, "required field is missing")
    return InvalidInput(field or "$", _lookup(raw, path), reason)


def _struct_types(annotation: Any) -> list[type[msgspec.Struct]]:
    """The Struct types inside an annotation (through Optional, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return [annotation]
    found: list[type[msgspec.Struct]] = []
    for arg in getattr(annotation, "__args__", ()) or getattr(annotation, "__metadata__", ()):
        found.extend(_struct_types(arg))
    return list(dict.fromkeys(found))


@functools.cache
def _fields(struct_type: type[msgspec.Struct]) -> dict[str, tuple[type[msgspec.Struct], ...]]:
    """A struct's field names (as encoded) and the struct types each may hold: computed
    once per type (it was most of the gateway's time per request)."""
    return {f.encode_name: tuple(_struct_types(f.type)) for f in msgspec.structs.fields(struct_type)}


def reject_unknown_fields(raw: Any, struct_type: type[msgspec.Struct], prefix: str = "") -> None:
    """Strictness for external input only: an unknown field is an app's typo, so the
    gateway refuses it. Inside the network the same structs decode leniently, so that an
    older service can read a task written by a newer gateway."""
    if not isinstance(raw, dict):
        return
    fields = _fields(struct_type)
    for key, value in raw.items():
        inner = fields.get(key)
        if inner is None:
            raise InvalidInput(f"{prefix}{key}", NO_VALUE, f"unknown field; known fields: {', '.join(fields)}")
        if len(inner) == 1:
            if isinstance(value, list):
                for i, item in enumerate(value):
                    reject_unknown_fields(item, inner[0], f"{prefix}{key}[{i}].")
            else:
                reject_unknown_fields(value, inner[0], f"{prefix}{key}.")


def convert_strict(raw: Any, struct_type: type[S]) -> S:
    """External input (already parsed JSON) to `struct_type`, strictly: an object, no
    unknown fields, every constraint met; else InvalidInput naming field and value."""
    if not isinstance(raw, dict):
        raise InvalidInput("$", raw, "expected a JSON object")
    reject_unknown_fields(raw, struct_type)
    try:
        return msgspec.convert(raw, struct_type)
    except msgspec.ValidationError as exc:
        raise validation_error_to_invalid(exc, raw) from None


_DATA_URL = re.compile(r"^data:(image/(?:png|jpeg|jpg|webp));base64,(.*)$", re.DOTALL)
_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"RIFF": "webp"}

# An input image the gateway put in the blob store because the task would not fit a NATS
# message: the field holds this reference instead of the data URL, and the node fetches the
# bytes (`blob_key`) and checks them against the digest (docs/protocol.md, "Large inputs").
# Only the gateway writes one: an app's is refused (`decode_data_url`), so an app can never
# point a task at an input another app stored.
BLOB_REF_PREFIX = "blob:sha256:"
_BLOB_REF = re.compile(r"blob:sha256:([0-9a-f]{64})")
INPUT_BLOB_PREFIX = "inputs/"
# the fields that hold an input image, as errors name them
INPUT_IMAGE_FIELDS = ("init_image", "mask_image", "controlnet.image_dataurl")


def blob_ref(digest: str) -> str:
    """The reference to the input whose bytes have SHA-256 `digest` (64 lowercase hex digits)."""
    if not _BLOB_REF.fullmatch(BLOB_REF_PREFIX + digest):
        raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
    return BLOB_REF_PREFIX + digest


def is_blob_ref(value: str) -> bool:
    """Whether `value` claims to be a blob reference (well formed or not)."""
    return value.startswith("blob:")


def parse_blob_ref(field: str, value: str) -> str:
    """The digest of a blob reference, exactly ``blob:sha256:<64 lowercase hex>`` and nothing
    else (no spaces, no other algorithm, no upper case); else InvalidInput naming `field`."""
    match = _BLOB_REF.fullmatch(value)
    if match is None:
        raise InvalidInput(field, value, f"not a blob reference: expected {BLOB_REF_PREFIX}<64 lowercase hex digits>")
    return match.group(1)


def blob_key(digest: str) -> str:
    """Where the blob store keeps the input with this digest (content-addressed)."""
    return INPUT_BLOB_PREFIX + digest


def input_images(spec: TaskSpec) -> dict[str, str]:
    """The task's input images that are set, by field (`INPUT_IMAGE_FIELDS`): data URLs or references."""
    found = {"init_image": spec.init_image, "mask_image": spec.mask_image}
    if spec.controlnet is not None:
        found["controlnet.image_dataurl"] = spec.controlnet.image_dataurl
    return {field: value for field, value in found.items() if value}


def with_input_images(spec: TaskSpec, images: dict[str, str]) -> TaskSpec:
    """The same task with the input images in `images` (by field) replaced."""
    changes: dict[str, Any] = {k: v for k, v in images.items() if k in ("init_image", "mask_image")}
    if "controlnet.image_dataurl" in images and spec.controlnet is not None:
        changes["controlnet"] = msgspec.structs.replace(
            spec.controlnet, image_dataurl=images["controlnet.image_dataurl"]
        )
    return msgspec.structs.replace(spec, **changes)


def image_media_type(data: bytes) -> str:
    """The media type of PNG, JPEG or WebP bytes (by their magic), else application/octet-stream."""
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return f"image/{kind}"
    return "application/octet-stream"


def decode_data_url(field: str, value: str) -> bytes:
    """The bytes of an image data URL (or bare base64), checked to be PNG, JPEG or WebP."""
    if is_blob_ref(value.strip()):
        raise InvalidInput(
            field,
            value,
            "blob references are written by the gateway for inputs it stored itself; send the image as a data URL",
        )
    match = _DATA_URL.match(value.strip())
    payload = match.group(2) if match else value.strip()
    if not match and value.strip().startswith("data:"):
        raise InvalidInput(field, value, "expected a data URL of image/png, image/jpeg or image/webp in base64")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidInput(field, value, f"image is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(field, value, "not valid base64") from None
    return check_image_bytes(field, data)


def check_image_bytes(field: str, data: bytes) -> bytes:
    """`data` if it is a PNG, JPEG or WebP of at most `MAX_IMAGE_BYTES` and `MAX_INPUT_SIDE`
    a side, read from its header only; else InvalidInput naming `field`."""
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(field, len(data), f"image is larger than {MAX_IMAGE_BYTES} bytes")
    if not any(data.startswith(magic) for magic in _MAGIC):
        raise InvalidInput(field, "<image>", "not a PNG, JPEG or WebP image")
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: no pixel is decoded here
            width, height = image.size
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked as it opens
        raise InvalidInput(field, "<image>", f"each side must be at most {MAX_INPUT_SIDE} pixels ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(field, "<image>", f"cannot read the image's header: {exc}") from None
    if width > MAX_INPUT_SIDE or height > MAX_INPUT_SIDE:
        raise InvalidInput(field, f"{width}x{height}", f"each side must be at most {MAX_INPUT_SIDE} pixels")
    return data


def canonical(spec: TaskSpec) -> TaskSpec:
    """One spelling for each thing: ModelRef, Crynux's `lora` moved into `loras` (its
    fraction weight made a scale), fractions as floats <= 1."""
    loras = list(spec.loras)
    if spec.lora is not None:
        lora = spec.lora
        loras.insert(
            0, LoraSpec(model=lora.model, weight_file_name=lora.weight_file_name, weight=to_fraction(lora.weight))
        )
    controlnet = spec.controlnet
    if controlnet is not None:
        controlnet = msgspec.structs.replace(controlnet, weight=to_fraction(controlnet.weight))
    refiner = spec.refiner
    if refiner is not None:
        refiner = msgspec.structs.replace(refiner, denoising_cutoff=to_fraction(refiner.denoising_cutoff))
    return msgspec.structs.replace(
        spec, base_model=spec.model, lora=None, loras=loras, controlnet=controlnet, refiner=refiner
    )


# The scheduler arguments a task may set, each with what it may be: a config value of
# diffusers' schedulers, never the size of what a node allocates unchecked
# (`num_train_timesteps` of 10^9 once asked a node for about 30 GB).
SCHEDULER_BOOL_ARGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "lower_order_final",
    "euler_at_final",
    "rescale_betas_zero_snr",
    "clip_sample",
    "set_alpha_to_one",
    "skip_prk_steps",
    "thresholding",
)
SCHEDULER_CHOICE_ARGS: dict[str, tuple[str, ...]] = {
    "algorithm_type": ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++", "deis"),
    "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
}
SCHEDULER_INT_ARGS: dict[str, tuple[int, int]] = {
    "solver_order": (1, 3),
    "steps_offset": (0, 1),
    "num_train_timesteps": (1, 1000),  # what SD models are trained with: the most a node allocates
    "original_inference_steps": (1, MAX_STEPS),
}
SCHEDULER_FLOAT_ARGS: dict[str, tuple[float, float]] = {
    "beta_start": (1e-6, 0.1),
    "beta_end": (1e-4, 0.5),
    "timestep_scaling": (0.0, 100.0),
    "clip_sample_range": (0.0, 10.0),
    "sample_max_value": (0.0, 10.0),
    "dynamic_thresholding_ratio": (0.0, 1.0),
}
SCHEDULER_ARGS = (*SCHEDULER_BOOL_ARGS, *SCHEDULER_CHOICE_ARGS, *SCHEDULER_INT_ARGS, *SCHEDULER_FLOAT_ARGS)


def check_scheduler_args(args: dict[str, Any]) -> None:
    """Each of `args` is a scheduler argument Stipple takes, with a value of its kind."""
    for key, value in args.items():
        field = f"scheduler.args.{key}"
        if key in SCHEDULER_BOOL_ARGS:
            if not isinstance(value, bool):
                raise InvalidInput(field, value, "expected true or false")
        elif key in SCHEDULER_CHOICE_ARGS:
            if value not in SCHEDULER_CHOICE_ARGS[key]:
                raise InvalidInput(field, value, f"allowed: {', '.join(SCHEDULER_CHOICE_ARGS[key])}")
        elif key in SCHEDULER_INT_ARGS or key in SCHEDULER_FLOAT_ARGS:
            integral = key in SCHEDULER_INT_ARGS
            low, high = SCHEDULER_INT_ARGS[key] if integral else SCHEDULER_FLOAT_ARGS[key]
            number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            if number is None or (integral and not isinstance(number, int)) or not math.isfinite(number):
                raise InvalidInput(field, value, "expected an integer" if integral else "expected a number")
            if not low <= number <= high:
                raise InvalidInput(field, value, f"must be from {low} to {high}")
        else:
            allowed = ", ".join(SCHEDULER_ARGS)
            raise InvalidInput(field, value, f"not a scheduler argument Stipple takes; allowed: {allowed}")


def check_spec(spec: TaskSpec) -> TaskSpec:
    """Checks that need more than one field, a list of allowed values, or image decoding."""
    if spec.version not in VERSIONS:
        raise InvalidInput("version", spec.version, f"unknown version; allowed: {', '.join(VERSIONS)}")
    if spec.kind not in KINDS:
        raise InvalidInput("kind", spec.kind, f"unknown kind; allowed: {', '.join(KINDS)}")
    if not spec.model_name.strip():
        raise InvalidInput("base_model", spec.model_name, "must not be blank")
    if not math.isfinite(spec.task_config.cfg):  # JSON has no NaN, but Python callers do
        raise InvalidInput("task_config.cfg", spec.task_config.cfg, "must be a finite number")
    if spec.sampler is not None and spec.sampler not in SAMPLERS:
        raise InvalidInput("sampler", spec.sampler, f"unknown sampler; allowed: {', '.join(SAMPLERS)}")
    if spec.scheduler is not None:
        if spec.scheduler.method not in SCHEDULERS:
            raise InvalidInput(
                "scheduler.method", spec.scheduler.method, f"unknown scheduler; allowed: {', '.join(SCHEDULERS)}"
            )
        if spec.sampler is not None:
            raise InvalidInput("sampler", spec.sampler, "give either sampler or scheduler, not both")
        check_scheduler_args(spec.scheduler.args or {})
    if spec.lora is not None and len(spec.loras) >= MAX_LORAS:
        raise InvalidInput("loras", len(spec.loras) + 1, f"at most {MAX_LORAS} LoRAs in all")
    if spec.controlnet is not None:
        decode_data_url("controlnet.image_dataurl", spec.controlnet.image_dataurl)
        method = spec.controlnet.preprocess.method if spec.controlnet.preprocess else None
        if method is not None and method not in PREPROCESSORS:
            raise InvalidInput(
                "controlnet.preprocess.method", method, f"unknown preprocessor; allowed: {', '.join(PREPROCESSORS)}"
            )
    if spec.refiner is not None and spec.controlnet is not None and spec.kind != "txt2img":
        raise InvalidInput("refiner", spec.refiner.model, "a refiner with ControlNet works only for txt2img")
    if spec.kind == "txt2img":
        for name in ("init_image", "mask_image"):
            if getattr(spec, name):
                raise InvalidInput(name, "<image>", f"only for kind img2img or inpaint (kind is {spec.kind!r})")
    else:
        if not spec.init_image:
            raise InvalidInput("init_image", NO_VALUE, f"required for kind {spec.kind!r}")
        decode_data_url("init_image", spec.init_image)
        if spec.kind == "inpaint":
            if not spec.mask_image:
                raise InvalidInput("mask_image", NO_VALUE, "required for kind 'inpaint'")
            decode_data_url("mask_image", spec.mask_image)
        elif spec.mask_image:
            raise InvalidInput("mask_image", "<image>", "only for kind 'inpaint'")
    return spec


def with_crynux_defaults(raw: Any) -> Any:
    """A task in Crynux's format (it names a Crynux version) with Crynux's defaults written
    in where it leaves a field out; any other input as it is. The scheduler's default yields
    to an AUTOMATIC1111 `sampler`, which a task may give instead."""
    if not isinstance(raw, dict) or raw.get("version") not in CRYNUX_VERSIONS:
        return raw
    filled = dict(raw)
    config = raw.get("task_config", {})
    if isinstance(config, dict):  # anything else is refused as it is, naming the field
        filled["task_config"] = {**CRYNUX_TASK_CONFIG, **config}
    if "scheduler" not in raw and raw.get("sampler") is None:
        filled["scheduler"] = dict(CRYNUX_SCHEDULER)
    return filled


def parse_task(body: bytes | str | dict[str, Any]) -> TaskSpec:
    """Decode, validate and canonicalize a task from JSON (or a parsed dict); raise InvalidInput.
    A task in Crynux's format gets Crynux's defaults (`with_crynux_defaults`)."""
    try:
        raw = msgspec.json.decode(body) if isinstance(body, (bytes, str)) else body
    except msgspec.DecodeError as exc:
        raise InvalidInput("$", NO_VALUE, f"body is not valid JSON: {exc}") from None
    return canonical(check_spec(convert_strict(with_crynux_defaults(raw), TaskSpec)))


def resolve_seed(spec: TaskSpec, random_seed: int) -> TaskSpec:
    """The same task with a concrete seed (seed -1 replaced by `random_seed`)."""
    if spec.task_config.seed != -1:
        return spec
    return msgspec.structs.replace(spec, task_config=msgspec.structs.replace(spec.task_config, seed=random_seed))
