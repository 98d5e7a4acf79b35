"""The task format apps send, its limits, and its validation.

The native task JSON is a superset of Crynux's stable-diffusion-task (only the txt2img
subset for now). Validation happens at the gateway (422 for the app) and again at the
node (a typed error event), so both share this module. Every error names the field, the
value and what is allowed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from .errors import NO_VALUE, InvalidInput

MAX_SIDE = 2048
MAX_STEPS = 150
MAX_IMAGES = 8
MAX_PROMPT_CHARS = 8000
SEED_MAX = 2**32 - 1

SAMPLERS = ("Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "PNDM", "PLMS", "LMS")


class TaskConfig(msgspec.Struct, frozen=True, kw_only=True):
    image_width: Annotated[int, msgspec.Meta(ge=64, le=MAX_SIDE, multiple_of=8)] = 512
    image_height: Annotated[int, msgspec.Meta(ge=64, le=MAX_SIDE, multiple_of=8)] = 512
    steps: Annotated[int, msgspec.Meta(ge=1, le=MAX_STEPS)] = 25
    cfg: Annotated[float, msgspec.Meta(ge=0.0, le=30.0)] = 7.0
    seed: Annotated[int, msgspec.Meta(ge=-1, le=SEED_MAX)] = -1
    num_images: Annotated[int, msgspec.Meta(ge=1, le=MAX_IMAGES)] = 1


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A native task (schema version "1"). `seed` -1 means "pick one"; the gateway
    resolves it to a concrete seed before the task enters the network, so that every
    node computes the same image."""

    version: Literal["1"] = "1"
    kind: Literal["txt2img"] = "txt2img"
    base_model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    prompt: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
    negative_prompt: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)] = ""
    sampler: str | None = None
    task_config: TaskConfig = TaskConfig()


def reject_unknown_fields(raw: Any, struct_type: type[msgspec.Struct], prefix: str = "") -> None:
    """Strictness for external input only: an unknown field is an app's typo, so the
    gateway refuses it. Inside the network the same structs decode leniently, so that an
    older service can read a task written by a newer gateway."""
    if not isinstance(raw, dict):
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct_type)}
    for key, value in raw.items():
        field = fields.get(key)
        if field is None:
            raise InvalidInput(f"{prefix}{key}", NO_VALUE, f"unknown field; known fields: {', '.join(fields)}")
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            reject_unknown_fields(value, field.type, f"{prefix}{key}.")


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
    reason, _, where = text.rpartition(" - at `")
    if not _:
        reason, where = text, "$`"
    path = where.rstrip("`")
    field = prefix + path.removeprefix("$").lstrip(".")
    if reason.startswith("Object missing required field"):
        missing = reason.split("`")[1]
        field = f"{field}.{missing}".lstrip(".") if field else missing
        return InvalidInput(field, NO_VALUE, "required field is missing")
    return InvalidInput(field or "$", _lookup(raw, path), reason)


def check_spec(spec: TaskSpec) -> TaskSpec:
    """Checks that need more than one field or a list of allowed values."""
    if spec.sampler is not None and spec.sampler not in SAMPLERS:
        raise InvalidInput("sampler", spec.sampler, f"unknown sampler; allowed: {', '.join(SAMPLERS)}")
    if not spec.base_model.strip():
        raise InvalidInput("base_model", spec.base_model, "must not be blank")
    return spec


S = TypeVar("S", bound=msgspec.Struct)


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


def parse_task(body: bytes | str | dict[str, Any]) -> TaskSpec:
    """Decode and validate a task from JSON (or an already-parsed dict); raise InvalidInput."""
    try:
        raw = msgspec.json.decode(body) if isinstance(body, (bytes, str)) else body
    except msgspec.DecodeError as exc:
        raise InvalidInput("$", NO_VALUE, f"body is not valid JSON: {exc}") from None
    return check_spec(convert_strict(raw, TaskSpec))


def resolve_seed(spec: TaskSpec, random_seed: int) -> TaskSpec:
    """The same task with a concrete seed (seed -1 replaced by `random_seed`)."""
    if spec.task_config.seed != -1:
        return spec
    return msgspec.structs.replace(spec, task_config=msgspec.structs.replace(spec.task_config, seed=random_seed))
