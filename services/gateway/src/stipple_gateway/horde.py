"""The AI Horde API (v2) under ``/api/v2``, mapped onto native tasks, so that code written for
the Horde (its `horde_sdk` client included) runs against Stipple unchanged but for the base
URL (``AI_HORDE_URL=http://<gateway>/api/``) and the API key.

Routes: ``POST generate/async`` (202 ``RequestAsync``: `id`, `kudos`, `message`), ``GET
generate/check/{id}`` (``RequestStatusCheck``), ``GET generate/status/{id}``
(``RequestStatusStable``: the same and the `generations`), ``DELETE generate/status/{id}``
(cancels, answers the status with `cancelled`), ``GET status/models``, ``GET
status/heartbeat``. A request id is a fresh version-4 UUID (the SDK parses them as such);
its task's id is derived from it one way (`task_id_of`: SHA-256), and the 202's `message`
names it (``GET /v1/tasks/<task id>`` is the same task). The two differ because the task id
is not a secret: the nodes that run the task are given it, and the pages show it to its
app, while the request id is what lets its holder check, read and cancel the request.

The request (Horde's ``GenerationInputStable``):

- `prompt`: Horde's ``positive###negative``: the text after the first ``###`` is the
  negative prompt.
- `params`: `sampler_name` (Horde's names, mapped onto A1111's: ``k_euler_a`` -> ``Euler
  a``, ``k_dpmpp_2m`` + `karras` -> ``DPM++ 2M Karras``, ...; ``k_dpm_fast``,
  ``k_dpm_adaptive``, ``k_dpmpp_2s_a``, ``k_dpmpp_sde`` and ``dpmsolver`` have no
  counterpart here and are refused), `karras` (refused with a sampler that has no Karras
  variant here), `cfg_scale` (0-30), `steps` (1-150), `width` / `height` (64-2048,
  multiples of 8: looser than the Horde's 64), `n` (1-10: image i uses seed + i, which is
  Horde's `seed_variation` 1), `seed` (a decimal integer, as a string or a number; empty:
  random. Text seeds are refused: the Horde's workers hash them, Stipple does not guess
  how), `denoising_strength` (img2img and inpainting; ignored without a source image, as
  the Horde does), `loras` (`name`, `model` strength; `clip` must equal the `model`
  strength, for Stipple applies one weight to both; `inject_trigger` and `is_version` are
  refused).
- `models`: the first that a live node serves (else the first any node has registered);
  none registered is 400 naming `models`; empty means the gateway's default model. A
  registered model with too few live nodes now is refused at once (503
  ``NoValidWorkers``): Stipple never queues what it cannot run, so a request it accepts
  starts possible, and `is_possible` turns false only when every live node serving its
  model has gone meanwhile.
- `source_image` (base64 PNG, JPEG or WebP; URLs are not fetched) with `source_processing`
  ``img2img`` (the default) or ``inpainting`` with `source_mask` (white is repainted; a mask
  in the image's alpha channel is not read). ``outpainting``, ``remix`` and
  `extra_source_images` are refused.
- `r2`: true (the default) answers each image as the gateway's URL
  ``/v1/tasks/{task_id}/images/{n}`` (with API keys on, fetching it needs ``Authorization:
  Bearer``); false answers base64 PNG (the Horde sends WebP; every Horde client decodes
  either). The choice is kept as the task's `source` (``horde`` / ``horde-base64``).
- `dry_run`: checked as a real request (fields, model, capacity), then ``{"kudos": 0}``.

Accepted at any value, because nothing observable changes here: `nsfw` (no Stipple node
censors), `replacement_filter` (Stipple filters no prompt), `extra_slow_workers`,
`allow_downgrade` (never downgraded), `disable_batching` (seeds are always exact),
`worker_blacklist` (qualifies `workers`), and in `params`: `post_processing_order`,
`hires_fix_denoising_strength`, `facefixer_strength` (they qualify refused features).

Accepted only at the value that means "off" (else 400 naming them): `censor_nsfw` false,
`trusted_workers` false, `slow_workers` true, `workers` empty, `shared` false, `webhook`
empty, `extra_source_images` empty; in `params`: `seed_variation` 1, `post_processing`
empty, `tiling`, `hires_fix`, `image_is_control`, `return_control_map`, `transparent`
false, `clip_skip` 1, `control_type`, `workflow`, `tis`, `extra_texts`, `special` empty.
Any other field is 400 naming it.

The status is honest: `waiting` / `processing` / `finished` count the request's images as
pending / running / done; `queue_position` is the dispatcher's place of the task (1 is
next; 0 once it runs), `wait_time` its estimate in seconds while queued (0 once a node
runs it: the dispatcher estimates only the queue), `is_possible` whether a live node
serves the model, `restarted` how many nodes were replaced, `kudos` 0 (the Horde layer
pays no fee). `done` is true once the task ended (`faulted` when the network aborted it,
`cancelled` when the app cancelled it). `worker_id` and `worker_name` are the id of the
node whose image was accepted. ``DELETE`` of a finished request answers its status.

``status/models`` lists the models live nodes serve, `count` the live nodes serving each;
`performance`, `queued`, `jobs` and `eta` are null: the dispatcher has no per-model figures.

Auth, as on the Horde: ``generate/async`` takes the ``apikey`` header, a Stipple API key's
secret. With keys off any key (the anonymous ``0000000000`` included) is no key; with keys on
a missing, anonymous or unknown key is 401. Check, status and delete take the request id
alone, as the Horde's do (and the SDK sends no key with them): the id is random (a fresh
version-4 UUID, 122 random bits), never given to a node nor shown anywhere but in the 202,
and whoever holds it may check, read and cancel the request. A task submitted through
another API is never reachable here: no request id leads to its id (a preimage of SHA-256),
and a task not submitted here is 404 even so. ``status/models`` and ``status/heartbeat``
are open too. Images answered as URLs (`r2`) are the native image route, which with keys
on needs ``Authorization: Bearer``: with keys on, clients that cannot send it ask for
base64 (`r2` false).

Errors in the Horde's shape: ``{"message", "rc"}``, and ``"errors": {field: message}`` for
a 400 about a field; `rc` is the Horde's return code where one fits (``InvalidAPIKey``,
``RequestNotFound``, ``UnsupportedSampler``, ``NoValidWorkers``, ...), else Stipple's code.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import inspect
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from stipple_common.aggregate import Task, replay
from stipple_common.errors import NO_VALUE, InvalidInput
from stipple_common.messages import NodeJoined
from stipple_common.taskspec import SAMPLERS, TaskSpec, convert_strict, parse_task

from .auth import ApiKey
from .errors import ApiError
from .events import read_task_events
from .tasks import TaskService

ANON_API_KEY = "0000000000"  # the Horde's anonymous key
SOURCE_URLS = "horde"  # the task's source when images are answered as URLs (r2)
SOURCE_BASE64 = "horde-base64"  # ... and as base64

# Horde sampler -> A1111 name (Stipple's); the others have no counterpart here
SAMPLER_NAMES = {
    "k_lms": "LMS",
    "k_heun": "Heun",
    "k_euler": "Euler",
    "k_euler_a": "Euler a",
    "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a",
    "k_dpmpp_2m": "DPM++ 2M",
    "lcm": "LCM",
    "DDIM": "DDIM",
}
UNSUPPORTED_SAMPLERS = ("k_dpm_fast", "k_dpm_adaptive", "k_dpmpp_2s_a", "k_dpmpp_sde", "dpmsolver")

# Stipple's error code (or the field at fault) -> the Horde's `rc`
RC_BY_CODE = {
    "unauthorized": "InvalidAPIKey",
    "anonymous": "AnonForbidden",
    "not_found": "RequestNotFound",
    "no_nodes": "NoValidWorkers",
    "unknown_model": "UnsupportedModel",
    "expired": "RequestExpired",
}
RC_BY_FIELD = {
    "prompt": "MissingPrompt",
    "models": "UnsupportedModel",
    "params.sampler_name": "UnsupportedSampler",
    "params.karras": "UnsupportedSampler",
    "params.width": "InvalidSize",
    "params.height": "InvalidSize",
    "source_mask": "SourceMaskUnnecessary",
}

# native field -> the Horde's, to name errors as the app sent them
_NATIVE_TO_HORDE = {
    "base_model": "models",
    "prompt": "prompt",
    "negative_prompt": "prompt",
    "sampler": "params.sampler_name",
    "strength": "params.denoising_strength",
    "init_image": "source_image",
    "mask_image": "source_mask",
    "loras": "params.loras",
    "task_config.cfg": "params.cfg_scale",
    "task_config.steps": "params.steps",
    "task_config.image_width": "params.width",
    "task_config.image_height": "params.height",
    "task_config.num_images": "params.n",
    "task_config.seed": "params.seed",
}
_NATIVE_LORA = re.compile(r"^loras\[(\d+)\]\.(model|weight|weight_file_name)$")
_LORA_FIELD = {"model": "name", "weight": "model", "weight_file_name": "name"}

# --------------------------------------------------------------------------- requests


class LoraInput(msgspec.Struct, kw_only=True):
    """One LoRA (the Horde's ``ModelPayloadLorasStable``)."""

    name: str
    model: float = 1.0  # strength on the UNet
    clip: float | None = None  # strength on the text encoder: must equal `model` here
    inject_trigger: str | None = None  # refused
    is_version: bool = False  # refused


class GenerationParams(msgspec.Struct, kw_only=True):
    """`params` (the Horde's ``ModelGenerationInputStable``), with the Horde's defaults."""

    sampler_name: str = "k_euler_a"
    cfg_scale: float = 7.5
    denoising_strength: float | None = None
    seed: str | int | None = None
    height: int = 512
    width: int = 512
    steps: int = 30
    n: int = 1
    karras: bool = False
    loras: list[LoraInput] | None = None
    # any value: they qualify features refused below
    post_processing_order: str | None = None
    hires_fix_denoising_strength: float | None = None
    facefixer_strength: float | None = None
    # only "off"
    seed_variation: int | None = None
    post_processing: list[str] | None = None
    tiling: bool = False
    hires_fix: bool = False
    clip_skip: int | None = None
    control_type: str | None = None
    image_is_control: bool = False
    return_control_map: bool = False
    tis: list[Any] | None = None
    extra_texts: list[Any] | None = None
    workflow: str | None = None
    transparent: bool = False
    special: dict[str, Any] | None = None


class GenerationInput(msgspec.Struct, kw_only=True):
    """The body of ``POST /api/v2/generate/async`` (the Horde's ``GenerationInputStable``);
    what each field does here is in the module docstring of horde.py and the README."""

    prompt: str
    params: GenerationParams | None = None
    models: list[str] | None = None
    r2: bool = True
    dry_run: bool = False
    source_image: str | None = None
    source_processing: str | None = None
    source_mask: str | None = None
    # any value: nothing observable changes here
    nsfw: bool = False
    replacement_filter: bool = True
    extra_slow_workers: bool = False
    allow_downgrade: bool = False
    disable_batching: bool = False
    worker_blacklist: bool | list[str] = False
    # only "off"
    censor_nsfw: bool = False
    trusted_workers: bool = False
    slow_workers: bool = True
    workers: list[str] | None = None
    shared: bool = False
    webhook: str | None = None
    extra_source_images: list[Any] | None = None


# field -> (the values that mean "off", why the others are refused)
_OFF_ONLY_TOP: dict[str, tuple[tuple[Any, ...], str]] = {
    "censor_nsfw": ((False,), "Stipple cannot report which images a safety checker censored"),
    "trusted_workers": ((False,), "Stipple has no trusted workers: every result is checked by validation"),
    "slow_workers": ((True,), "Stipple does not rank nodes by speed, so it cannot leave slow ones out"),
    "workers": ((None, []), "the dispatcher chooses the nodes; a task cannot name them"),
    "shared": ((False,), "Stipple shares no images with LAION"),
    "webhook": ((None, ""), "use the native API's webhook_url (POST /v1/tasks)"),
    "extra_source_images": ((None, []), "no Stipple task takes extra source images"),
}
_OFF_ONLY_PARAMS: dict[str, tuple[tuple[Any, ...], str]] = {
    "seed_variation": ((None, 1), "image i always uses seed + i here (seed_variation 1)"),
    "post_processing": ((None, []), "Stipple runs no post-processors"),
    "tiling": ((False,), "Stipple has no such feature"),
    "hires_fix": ((False,), "Stipple has no such feature"),
    "clip_skip": ((None, 1), "Stipple has no such feature"),
    "control_type": ((None, "", "none"), "ControlNet is the native API's (controlnet)"),
    "image_is_control": ((False,), "ControlNet is the native API's (controlnet)"),
    "return_control_map": ((False,), "ControlNet is the native API's (controlnet)"),
    "tis": ((None, []), "textual inversions are the native API's (textual_inversion)"),
    "extra_texts": ((None, []), "Stipple has no such feature"),
    "workflow": ((None, ""), "Stipple has no such feature"),
    "transparent": ((False,), "Stipple has no such feature"),
    "special": ((None, {}), "Stipple has no such feature"),
}


def _is_one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    """`value` is one of `allowed`, of the same type (so that 0 is not False, nor 1 True)."""
    return any(value == option and type(value) is type(option) for option in allowed)


def _check_off(obj: msgspec.Struct, rules: dict[str, tuple[tuple[Any, ...], str]], prefix: str) -> None:
    for name, (allowed, why) in rules.items():
        value = getattr(obj, name)
        if not _is_one_of(value, allowed):
            raise InvalidInput(f"{prefix}{name}", value, f"not supported: {why}")


def _sampler(params: GenerationParams) -> str:
    name = params.sampler_name
    if name in UNSUPPORTED_SAMPLERS or name not in SAMPLER_NAMES:
        raise InvalidInput(
            "params.sampler_name", name, f"not a sampler Stipple runs; supported: {', '.join(SAMPLER_NAMES)}"
        )
    sampler = SAMPLER_NAMES[name]
    if params.karras:
        if f"{sampler} Karras" not in SAMPLERS:
            with_karras = [h for h, a in SAMPLER_NAMES.items() if f"{a} Karras" in SAMPLERS]
            raise InvalidInput(
                "params.karras",
                True,
                f"sampler {name!r} has no Karras variant here; with karras: {', '.join(with_karras)}",
            )
        sampler = f"{sampler} Karras"
    return sampler


def _seed(value: str | int | None) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        return -1
    if isinstance(value, int):
        return value
    text = value.strip()
    if re.fullmatch(r"-?\d{1,20}", text):
        return int(text)
    raise InvalidInput("params.seed", value, "expected a decimal integer (Stipple does not hash text seeds)")


def _loras(loras: list[LoraInput]) -> list[dict[str, Any]]:
    out = []
    for i, lora in enumerate(loras):
        where = f"params.loras[{i}]"
        if lora.inject_trigger is not None:
            raise InvalidInput(
                f"{where}.inject_trigger", lora.inject_trigger, "not supported: Stipple injects no triggers"
            )
        if lora.is_version:
            raise InvalidInput(f"{where}.is_version", True, "not supported: Stipple does not look LoRAs up on CivitAI")
        clip = 1.0 if lora.clip is None else lora.clip
        if clip != lora.model:
            raise InvalidInput(
                f"{where}.clip",
                clip,
                f"Stipple applies one strength to the UNet and the text encoder: clip must equal model ({lora.model})",
            )
        out.append({"model": lora.name, "weight": lora.model})
    return out


def _native_field(field: str) -> str:
    lora = _NATIVE_LORA.match(field)
    if lora:
        return f"params.loras[{lora.group(1)}].{_LORA_FIELD[lora.group(2)]}"
    return _NATIVE_TO_HORDE.get(field, field)


class Parsed(msgspec.Struct, kw_only=True):
    """A Horde request as a native task, and what the answers need to remember."""

    spec: TaskSpec
    source: str  # SOURCE_URLS or SOURCE_BASE64
    dry_run: bool


def choose_model(names: list[str], known: set[str], live: list[NodeJoined], default: str) -> str:
    """The first of `names` a live node serves, else the first a node has registered; no
    names: `default`. InvalidInput naming `models` when no node has any of them."""
    if not names:
        return default
    for name in names:
        if any(node.serves(name) for node in live):
            return name
    for name in names:
        if name in known:
            return name
    available = ", ".join(sorted(known)) or "none (no node has registered)"
    raise InvalidInput("models", names, f"no node serves any of these models; available: {available}")


def parse_request(raw: Any, *, known: set[str], live: list[NodeJoined], default_model: str) -> Parsed:
    """The native task of a Horde ``generate/async`` body; InvalidInput names the Horde's field."""
    request = convert_strict(raw, GenerationInput)
    params = request.params or GenerationParams()
    _check_off(request, _OFF_ONLY_TOP, "")
    _check_off(params, _OFF_ONLY_PARAMS, "params.")
    if not request.prompt.strip():
        raise InvalidInput("prompt", request.prompt, "must not be empty")
    prompt, _, negative = request.prompt.partition("###")
    native: dict[str, Any] = {
        "base_model": choose_model(request.models or [], known, live, default_model),
        "prompt": prompt.strip(),
        "negative_prompt": negative.strip(),
        "sampler": _sampler(params),
        "loras": _loras(params.loras or []),
        "task_config": {
            "image_width": params.width,
            "image_height": params.height,
            "steps": params.steps,
            "cfg": params.cfg_scale,
            "seed": _seed(params.seed),
            "num_images": params.n,
        },
    }
    processing = request.source_processing
    if processing not in (None, "txt2img", "img2img", "inpainting"):
        raise InvalidInput("source_processing", processing, "supported: img2img, inpainting (and txt2img)")
    if request.source_image:
        if request.source_image.startswith(("http://", "https://")):
            raise InvalidInput("source_image", request.source_image, "send the image as base64: URLs are not fetched")
        if processing == "txt2img":
            raise InvalidInput("source_processing", processing, "a source_image needs img2img or inpainting")
        strength = 0.75 if params.denoising_strength is None else params.denoising_strength
        native.update(kind="img2img", init_image=request.source_image, strength=strength)
        if processing == "inpainting":
            if not request.source_mask:
                raise InvalidInput(
                    "source_mask", NO_VALUE, "required for inpainting: Stipple reads no mask from the alpha channel"
                )
            native.update(kind="inpaint", mask_image=request.source_mask)
        elif request.source_mask:
            raise InvalidInput("source_mask", "<image>", "only with source_processing inpainting")
    elif processing == "inpainting":
        raise InvalidInput("source_image", NO_VALUE, "required for source_processing inpainting")
    elif request.source_mask:
        raise InvalidInput("source_mask", "<image>", "only with a source_image")
    try:
        spec = parse_task(native)
    except InvalidInput as exc:
        raise InvalidInput(_native_field(exc.field), exc.value, exc.reason) from None
    return Parsed(spec=spec, source=SOURCE_URLS if request.r2 else SOURCE_BASE64, dry_run=request.dry_run)


# --------------------------------------------------------------------------- answers


class RequestAsync(msgspec.Struct, kw_only=True):
    """Accepted (202): the request id, its kudos, a message."""

    id: str
    kudos: float
    message: str = ""


class DryRun(msgspec.Struct, kw_only=True):
    """A `dry_run` request's answer (200): what it would cost."""

    kudos: float


class RequestStatusCheck(msgspec.Struct, kw_only=True):
    """A request's progress (the Horde's ``RequestStatusCheck``)."""

    finished: int  # images done
    processing: int  # images a node is computing
    restarted: int  # nodes replaced (timed out or failed) and their work given to others
    waiting: int  # images still queued
    done: bool  # the request ended: succeeded, aborted (`faulted`) or cancelled
    faulted: bool  # the network aborted it
    wait_time: int  # seconds the dispatcher estimates until it finishes, while queued; else 0
    queue_position: int  # its place in the dispatcher's queue, 1 next; 0 when not queued
    kudos: float  # always 0: the Horde layer pays no fee
    is_possible: bool  # a live node serves its model (or it has ended)


class GenerationStable(msgspec.Struct, kw_only=True):
    """One image (the Horde's ``GenerationStable``)."""

    img: str  # the gateway's URL of the PNG (r2), or the PNG in base64
    seed: str
    id: str
    censored: bool
    worker_id: str  # the node whose image was accepted
    worker_name: str
    model: str
    state: Literal["ok"] = "ok"


class RequestStatusStable(RequestStatusCheck, kw_only=True):
    """A request's progress and its images (the Horde's ``RequestStatusStable``)."""

    generations: list[GenerationStable]
    shared: bool = False
    cancelled: bool = False  # the app cancelled it (DELETE)


class ActiveModel(msgspec.Struct, kw_only=True):
    """A model live nodes serve (the Horde's ``ActiveModel``)."""

    name: str
    count: int  # live nodes serving it
    performance: float | None = None  # null: no per-model figures here
    queued: float | None = None
    jobs: float | None = None
    eta: int | None = None
    type: Literal["image"] = "image"


class Heartbeat(msgspec.Struct, kw_only=True):
    message: str
    version: str


class HordeError(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An error in the Horde's shape."""

    message: str
    rc: str
    errors: dict[str, str] | None = None  # a 400's field at fault, with the message


def error_body(error: ApiError) -> dict[str, Any]:
    """`error` in the Horde's shape: ``{"message", "rc", "errors"?}``."""
    rc = RC_BY_CODE.get(error.code) or (RC_BY_FIELD.get(error.field or "") if error.status == 400 else None)
    body: dict[str, Any] = {"message": error.message, "rc": rc or error.code}
    if error.status == 400 and error.field is not None:
        body["errors"] = {error.field: error.message}
    return body


def task_id_of(request_id: str) -> str:
    """The task id of a Horde request id (a UUID in any of the forms Python reads: with or
    without dashes, any case; ValueError for anything else): 32 hex digits of SHA-256 over
    the UUID's bytes, so that the task id, which nodes and pages see, does not give the
    request id away."""
    raw = uuid.UUID(request_id).bytes
    return hashlib.sha256(b"stipple-horde-request\n" + raw).hexdigest()[:32]


def image_id(task_id: str, index: int) -> str:
    """A stable version-4 UUID for image `index` of a task."""
    return str(uuid.UUID(bytes=hashlib.sha256(f"{task_id}/{index}".encode()).digest()[:16], version=4))


def node_of(key: str) -> str:
    """The node id in an image's blob key (``tasks/<task_id>/<node_id>/...``)."""
    parts = key.split("/")
    return parts[2] if len(parts) > 3 and parts[0] == "tasks" else ""


@functools.cache
def gateway_version() -> str:
    try:
        return importlib.metadata.version("stipple-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _json(body: Any, status_code: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status_code, media_type="application/json")


def _owner(request: Request) -> str:
    return getattr(request.state, "key_id", "")


class HordeRoutes:
    """The Horde handlers, each a thin translation to and from the task service.
    `read_json` reads a request body within the gateway's limits (Routes.read_json)."""

    def __init__(self, tasks: TaskService, read_json: Callable[[Request], Awaitable[Any]]) -> None:
        self.tasks = tasks
        self.read_json = read_json

    def authenticate(self, request: Request) -> ApiKey:
        """The API key whose secret the ``apikey`` header carries (``generate/async``, with keys on)."""
        secret = (request.headers.get("apikey") or "").strip()
        if not secret or secret == ANON_API_KEY:
            shown = "missing" if not secret else f"the anonymous key {ANON_API_KEY}"
            raise ApiError(
                401, "anonymous", f"apikey: this gateway needs an API key ({shown} is not one)", field="apikey"
            )
        try:
            return self.tasks.keys.authenticate(f"Bearer {secret}")
        except ApiError:
            raise ApiError(401, "unauthorized", "apikey: unknown API key", field="apikey") from None

    # ------------------------------------------------------------------ generate

    async def generate_async(self, request: Request) -> Response:
        try:
            raw = await self.read_json(request)
        except ApiError as exc:  # an empty body is 422 natively; the Horde answers 400
            if exc.status != 422:
                raise
            raise ApiError(400, exc.code, exc.message, field=exc.field) from None
        try:
            parsed = parse_request(
                raw,
                known=self.tasks.model_names(),
                live=self.tasks.directory.live(),
                default_model=self.tasks.settings.default_model,
            )
        except InvalidInput as exc:
            raise ApiError(400, exc.code, exc.message, field=exc.field, value=exc.value) from None
        try:
            if parsed.dry_run:
                self.tasks.check_capacity(parsed.spec, model_field="models")
                return _json(DryRun(kudos=0.0))
            owner = _owner(request)
            request_id = str(uuid.uuid4())  # random: what lets its holder check, read and delete it
            task_id = task_id_of(request_id)  # what the nodes are told: the request id cannot be found from it
            await self.tasks.submit(parsed.spec, parsed.source, task_id, owner=owner, model_field="models")
        except ApiError as exc:
            if exc.status != 422:  # unknown_model: a node left between our check and the submit
                raise
            raise ApiError(400, exc.code, exc.message, field=exc.field, value=exc.value) from None
        message = f"Stipple task {task_id}: GET /v1/tasks/{task_id} is its native view"
        return _json(RequestAsync(id=request_id, kudos=0.0, message=message), status_code=202)

    async def check(self, request: Request) -> Response:
        task = await self._task(request)
        return _json(await self._progress(task))

    async def status(self, request: Request) -> Response:
        if request.method == "DELETE":
            return await self.cancel(request)
        task = await self._task(request)
        return _json(await self._status(task, request))

    async def cancel(self, request: Request) -> Response:
        """Cancel a request not finished yet; a finished one answers its status as it is."""
        task = await self._task(request)
        try:
            await self.tasks.cancel(task.task_id, task.owner)
        except ApiError as exc:
            if exc.code != "already_finished":
                raise
        task = (await self.tasks.load_task(task.task_id, task.owner)).task
        return _json(await self._status(task, request))

    async def _task(self, request: Request) -> Task:
        """The request's task, whichever API key submitted it: as on the Horde, its random id
        is what lets its holder check, read and delete it. A task the other APIs submitted is
        404 as when there is none, keys on or off (no request id leads to its id anyway)."""
        request_id = request.path_params["id"]
        shown = request_id[:100]
        try:
            task_id = task_id_of(request_id)
        except ValueError:
            raise ApiError(
                404, "not_found", f"no request with id {shown!r} (ids are UUIDs)", field="id", value=shown
            ) from None
        stored = await read_task_events(self.tasks.js, task_id)
        task, _rejected = replay(s.event for s in stored)
        if task is None or task.source not in (SOURCE_URLS, SOURCE_BASE64):
            raise ApiError(404, "not_found", f"no request with id {shown!r}", field="id", value=shown)
        return self.tasks.fold(task_id, stored, task.owner).task

    async def _progress(self, task: Task) -> RequestStatusCheck:
        n = task.spec.task_config.num_images
        queue = await self.tasks.queue_status(task)
        pending = task.status == "pending"
        running = not pending and not task.finished
        possible = task.finished or any(node.serves(task.spec.model_name) for node in self.tasks.directory.live())
        return RequestStatusCheck(
            finished=n if task.status == "succeeded" else 0,
            processing=n if running else 0,
            restarted=task.reassignments,
            waiting=n if pending else 0,
            done=task.finished,
            faulted=task.status == "aborted",
            wait_time=round(queue.eta_s) if queue else 0,
            queue_position=queue.position + 1 if queue else 0,
            kudos=0.0,
            is_possible=possible,
        )

    async def _status(self, task: Task, request: Request) -> RequestStatusStable:
        progress = await self._progress(task)
        generations = []
        if task.status == "succeeded":
            base = str(request.base_url).rstrip("/")
            for image in task.images:
                if task.source == SOURCE_BASE64:
                    png = await self.tasks.image(task.task_id, image.index, task.owner)
                    img = base64.b64encode(png.png).decode()
                else:
                    img = f"{base}/v1/tasks/{task.task_id}/images/{image.index}"
                node = node_of(image.key)
                generations.append(
                    GenerationStable(
                        img=img,
                        seed=str(image.seed),
                        id=image_id(task.task_id, image.index),
                        censored=False,
                        worker_id=node,
                        worker_name=node,
                        model=task.spec.model_name,
                    )
                )
        return RequestStatusStable(
            **msgspec.structs.asdict(progress), generations=generations, cancelled=task.status == "cancelled"
        )

    # ------------------------------------------------------------------ status

    async def models(self, request: Request) -> Response:
        """The models live nodes serve, with how many serve each (`type`, `min_count`,
        `max_count` and `model_state` filter as on the Horde)."""
        query = request.query_params
        kind = query.get("type", "image")
        if kind not in ("image", "text"):
            raise ApiError(400, "invalid_input", f"type: expected image or text (got {kind!r})", field="type")
        state = query.get("model_state", "all")
        if state not in ("all", "known", "custom"):
            raise ApiError(
                400, "invalid_input", f"model_state: expected all, known or custom (got {state!r})", field="model_state"
            )
        bounds: dict[str, int] = {}
        for name in ("min_count", "max_count"):
            text = query.get(name)
            if text is not None:
                if not text.isdigit():
                    raise ApiError(400, "invalid_input", f"{name}: expected a whole number (got {text!r})", field=name)
                bounds[name] = int(text)
        live = self.tasks.directory.live()
        names: set[str] = set()
        if kind == "image" and state != "known":  # no Stipple model is in the Horde's model reference
            names = {model for node in live for model in (*node.models, *node.models_on_disk)}
        models = [ActiveModel(name=name, count=sum(node.serves(name) for node in live)) for name in sorted(names)]
        models = [
            m for m in models if bounds.get("min_count", 0) <= m.count and m.count <= bounds.get("max_count", m.count)
        ]
        return _json(models)

    async def heartbeat(self, request: Request) -> Response:
        return _json(Heartbeat(message="OK", version=gateway_version()))


# --------------------------------------------------------------------------- OpenAPI


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """`schema` with its references to `defs` replaced by what they name."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return _inline(defs[ref], defs)
        return {
            key: inspect.cleandoc(value) if key == "description" and isinstance(value, str) else _inline(value, defs)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


def _schema(kind: Any) -> dict[str, Any]:
    (schema,), defs = msgspec.json.schema_components([kind], ref_template="{name}")
    inlined: dict[str, Any] = _inline(schema, defs)
    return inlined


def openapi_paths() -> dict[str, Any]:
    """The Horde routes for the OpenAPI document (openapi.py), their schemas inline."""
    error = {"application/json": {"schema": _schema(HordeError)}}
    apikey = {
        "name": "apikey",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "A Stipple API key's secret when the gateway runs with STIPPLE_API_KEYS (the anonymous "
        f"{ANON_API_KEY} is refused then); ignored without keys. Only submitting takes one: as on the Horde, "
        "a request's random id is what lets its holder check, read and cancel it.",
    }
    request_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "The request id the 202 answered (a UUID, with or without dashes): the capability to "
        "check, read and cancel the request. Its task's id, which nodes are given, is derived from it one way.",
    }
    reasons = {
        400: "A field is invalid, unknown or not supported here; `errors` names it.",
        401: "API keys are on and `apikey` is missing, anonymous or unknown.",
        404: "No such request (`RequestNotFound`).",
        410: "The images expired (`RequestExpired`).",
        413: "The body is larger than STIPPLE_MAX_BODY_BYTES.",
        429: "The API key is over its rate limit; `Retry-After` says when to try again.",
        503: "Too few live nodes for the model (`NoValidWorkers`), or the message bus is unavailable.",
    }

    def answer(code: int, what: str, kind: Any, errors: list[int], *, keyed: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            str(code): {"description": what, "content": {"application/json": {"schema": _schema(kind)}}}
        }
        for status in sorted({*errors, *((401, 429) if keyed else ())}):
            out[str(status)] = {"description": reasons[status], "content": error}
        return out

    status = answer(200, "The request's progress and images.", RequestStatusStable, [404, 410, 503])
    return {
        "/api/v2/generate/async": {
            "post": {
                "summary": "AI Horde: submit an image generation (runs as a native task; docs in horde.py)",
                "operationId": "hordeGenerateAsync",
                "security": [],
                "parameters": [apikey],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _schema(GenerationInput)}},
                },
                "responses": {
                    **answer(202, "Accepted: the request id.", RequestAsync, [400, 413, 503], keyed=True),
                    "200": {
                        "description": "A `dry_run`: what it would cost.",
                        "content": {"application/json": {"schema": _schema(DryRun)}},
                    },
                },
            }
        },
        "/api/v2/generate/check/{id}": {
            "get": {
                "summary": "AI Horde: a request's progress, queue position and wait time",
                "operationId": "hordeGenerateCheck",
                "security": [],
                "parameters": [request_id],
                "responses": answer(200, "The request's progress.", RequestStatusCheck, [404, 503]),
            }
        },
        "/api/v2/generate/status/{id}": {
            "parameters": [request_id],
            "get": {
                "summary": "AI Horde: a request's progress and images",
                "operationId": "hordeGenerateStatus",
                "security": [],
                "responses": status,
            },
            "delete": {
                "summary": "AI Horde: cancel a request; answers its status (`cancelled`)",
                "operationId": "hordeGenerateCancel",
                "security": [],
                "responses": status,
            },
        },
        "/api/v2/status/models": {
            "get": {
                "summary": "AI Horde: the models live nodes serve, and how many serve each",
                "operationId": "hordeStatusModels",
                "security": [],
                "parameters": [
                    {"name": "type", "in": "query", "schema": {"type": "string", "enum": ["image", "text"]}},
                    {"name": "min_count", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "max_count", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {
                        "name": "model_state",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["all", "known", "custom"]},
                    },
                ],
                "responses": answer(200, "The models.", list[ActiveModel], [400]),
            }
        },
        "/api/v2/status/heartbeat": {
            "get": {
                "summary": "AI Horde: the gateway is up",
                "operationId": "hordeHeartbeat",
                "security": [],
                "responses": {
                    "200": {"description": "OK.", "content": {"application/json": {"schema": _schema(Heartbeat)}}}
                },
            }
        },
    }
