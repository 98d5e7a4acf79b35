import msgspec
import pytest

from stipple_common.errors import NO_VALUE, InvalidInput
from stipple_common.taskspec import (
    SAMPLERS,
    LoraSpec,
    ModelRef,
    SchedulerSpec,
    TaskConfig,
    TaskSpec,
    parse_task,
    resolve_seed,
)

BASE = {"base_model": "tiny-sd", "prompt": "a fox"}


def test_minimal_task_gets_defaults():
    spec = parse_task(BASE)
    assert spec.base_model == ModelRef(name="tiny-sd")
    assert spec.model_name == "tiny-sd"
    assert spec.task_config.image_width == 512
    assert spec.task_config.seed == -1
    assert spec.task_config.num_images == 1


def test_parses_json_bytes_and_every_field():
    body = msgspec.json.encode(
        {
            **BASE,
            "negative_prompt": "blurry",
            "sampler": "Euler a",
            "task_config": {"image_width": 64, "image_height": 128, "steps": 4, "cfg": 5.5, "seed": 7, "num_images": 2},
        }
    )
    spec = parse_task(body)
    assert spec.sampler == "Euler a"
    assert spec.task_config == spec.task_config.__class__(
        image_width=64, image_height=128, steps=4, cfg=5.5, seed=7, num_images=2, safety_checker=False
    )


@pytest.mark.parametrize(
    ("body", "field", "value", "reason"),
    [
        ({**BASE, "task_config": {"steps": 0}}, "task_config.steps", 0, ">= 1"),
        ({**BASE, "task_config": {"steps": 151}}, "task_config.steps", 151, "<= 150"),
        ({**BASE, "task_config": {"image_width": 65}}, "task_config.image_width", 65, "multiple of 8"),
        ({**BASE, "task_config": {"image_height": 4096}}, "task_config.image_height", 4096, "<= 2048"),
        ({**BASE, "task_config": {"num_images": 11}}, "task_config.num_images", 11, "<= 10"),
        ({**BASE, "task_config": {"seed": -2}}, "task_config.seed", -2, ">= -1"),
        ({**BASE, "task_config": {"cfg": "high"}}, "task_config.cfg", "high", "Expected `float`"),
        ({**BASE, "prompt": 5}, "prompt", 5, "Expected `str`"),
        ({**BASE, "sampler": "Warp 9"}, "sampler", "Warp 9", "unknown sampler"),
        ({**BASE, "base_model": "  "}, "base_model", "  ", "blank"),
    ],
)
def test_bad_values_name_field_and_value(body, field, value, reason):
    with pytest.raises(InvalidInput) as info:
        parse_task(body)
    err = info.value
    assert err.field == field
    assert err.value == value
    assert reason in err.reason
    assert field in err.message
    assert repr(value) in err.message
    assert err.to_dict()["value"] == value


def test_missing_and_unknown_fields_are_named():
    with pytest.raises(InvalidInput, match="base_model: required field is missing") as info:
        parse_task({"prompt": "x"})
    assert "value" not in info.value.to_dict()
    with pytest.raises(InvalidInput, match="task_config.image_widht: unknown field") as info:
        parse_task({**BASE, "task_config": {"image_widht": 64}})
    assert "image_width" in info.value.reason  # the message lists the known fields
    with pytest.raises(InvalidInput, match="colour: unknown field"):
        parse_task({**BASE, "colour": "red"})


def test_not_json_and_not_object():
    with pytest.raises(InvalidInput, match="not valid JSON"):
        parse_task(b"{nope")
    with pytest.raises(InvalidInput, match="expected a JSON object") as info:
        parse_task(b"[1, 2]")
    assert info.value.value == [1, 2]


def test_inside_the_network_unknown_fields_are_tolerated():
    """A newer gateway may add fields; an older node must still read the task."""
    newer = msgspec.json.encode({**BASE, "added_later": {"x": 1}})
    spec = msgspec.json.decode(newer, type=TaskSpec)
    assert spec.prompt == "a fox"


def test_resolve_seed_only_replaces_minus_one():
    assert resolve_seed(parse_task(BASE), 1234).task_config.seed == 1234
    fixed = parse_task({**BASE, "task_config": {"seed": 5}})
    assert resolve_seed(fixed, 1234).task_config.seed == 5


def test_every_sampler_name_is_accepted():
    for name in SAMPLERS:
        assert parse_task({**BASE, "sampler": name}).sampler == name


# --------------------------------------------------------------------------- Crynux compatibility

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
DATA_URL = "data:image/png;base64," + PNG_1PX

CRYNUX_TASK = {
    "version": "2.5.0",
    "base_model": {"name": "stabilityai/stable-diffusion-xl-base-1.0", "variant": "fp16"},
    "dtype": "float16",
    "unet": "",
    "prompt": "a cat, best quality",
    "negative_prompt": "lowres",
    "lora": {"model": "https://civitai.com/api/download/models/178048", "weight_file_name": "", "weight": 80},
    "controlnet": {
        "model": "diffusers/controlnet-canny-sdxl-1.0",
        "image_dataurl": DATA_URL,
        "weight": 70,
        "preprocess": {"method": "canny", "args": {"low_threshold": 100, "high_threshold": 200}},
    },
    "scheduler": {"method": "EulerAncestralDiscreteScheduler", "args": {"timestep_spacing": "trailing"}},
    "vae": "madebyollin/sdxl-vae-fp16-fix",
    "refiner": {
        "model": "stabilityai/stable-diffusion-xl-refiner-1.0",
        "variant": "fp16",
        "denoising_cutoff": 80,
        "steps": 10,
    },
    "textual_inversion": "",
    "task_config": {
        "image_width": 1024,
        "image_height": 1024,
        "steps": 30,
        "seed": 99975892,
        "num_images": 10,
        "safety_checker": False,
        "cfg": 5,
    },
}


def test_a_crynux_task_is_accepted_as_it_is_and_canonicalized():
    spec = parse_task(CRYNUX_TASK)
    assert spec.base_model == ModelRef(name="stabilityai/stable-diffusion-xl-base-1.0", variant="fp16")
    assert spec.lora is None  # moved into loras
    assert [(lo.model, lo.weight) for lo in spec.loras] == [("https://civitai.com/api/download/models/178048", 0.8)]
    assert spec.controlnet.weight == 0.7
    assert spec.controlnet.preprocess.args == {"low_threshold": 100, "high_threshold": 200}
    assert spec.refiner.denoising_cutoff == 0.8
    assert spec.scheduler.method == "EulerAncestralDiscreteScheduler"
    assert spec.task_config.num_images == 10


def test_canonical_specs_survive_the_network_unchanged():
    """Encode and decode again (as a node does): fractions must not be divided twice."""
    spec = parse_task(CRYNUX_TASK)
    again = msgspec.json.decode(msgspec.json.encode(spec), type=TaskSpec)
    assert again == spec
    from stipple_common.taskspec import canonical, check_spec

    assert canonical(check_spec(again)) == spec


@pytest.mark.parametrize(("given", "expected"), [(70, 0.7), (100, 1.0), (1, 0.01), (0.5, 0.5), (1.0, 1.0), (50.0, 0.5)])
def test_crynux_fractions(given, expected):
    spec = parse_task({**BASE, "lora": {"model": "x", "weight": given}})
    assert spec.loras[0].weight == pytest.approx(expected)


def test_plain_base_model_string_and_several_loras():
    spec = parse_task(
        {
            **BASE,
            "loras": [{"model": "a", "weight": 0.6}, {"model": "b", "weight": -1.5}],
            "lora": {"model": "c", "weight": 100},
        }
    )
    assert [(lo.model, lo.weight) for lo in spec.loras] == [("c", 1.0), ("a", 0.6), ("b", -1.5)]


def ddim(**args):
    return {"scheduler": {"method": "DDIMScheduler", "args": args}}


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"version": "3.0.0"}, "version", "unknown version"),
        ({"kind": "video"}, "kind", "unknown kind"),
        ({"scheduler": {"method": "MagicScheduler"}}, "scheduler.method", "unknown scheduler"),
        ({"scheduler": {"method": "DDIMScheduler"}, "sampler": "Euler"}, "sampler", "not both"),
        (  # a node would allocate this many timesteps: about 30 GB
            {"scheduler": {"method": "DDIMScheduler", "args": {"num_train_timesteps": 10**9}}},
            "scheduler.args.num_train_timesteps",
            "must be from 1 to 1000",
        ),
        (
            {"scheduler": {"method": "DDIMScheduler", "args": {"trained_betas": [0.1] * 100_000}}},
            "scheduler.args.trained_betas",
            "not a scheduler argument Stipple takes",
        ),
        (
            {"scheduler": {"method": "DDIMScheduler", "args": {"__class__": "os.system"}}},
            "scheduler.args.__class__",
            "not a scheduler argument",
        ),
        (
            ddim(solver_order=2.5),
            "scheduler.args.solver_order",
            "integer",
        ),
        (
            ddim(solver_order=True),
            "scheduler.args.solver_order",
            "integer",
        ),
        (
            ddim(beta_end="0.1"),
            "scheduler.args.beta_end",
            "a number",
        ),
        (ddim(beta_end=5.0), "scheduler.args.beta_end", "from"),
        (
            ddim(clip_sample=1),
            "scheduler.args.clip_sample",
            "true or false",
        ),
        (
            {"scheduler": {"method": "DDIMScheduler", "args": {"timestep_spacing": "sideways"}}},
            "scheduler.args.timestep_spacing",
            "allowed: linspace",
        ),
        ({"lora": {"model": "x", "weight": 0}}, "lora.weight", ">= 1 (got 0)"),
        ({"lora": {"model": "x", "weight": 101}}, "lora.weight", "<= 100"),
        ({"loras": [{"model": "x", "weight": 9}]}, "loras[0].weight", "<= 4.0"),
        ({"loras": [{"model": "x", "wieght": 1}]}, "loras[0].wieght", "unknown field"),
        ({"loras": [{"model": ""}]}, "loras[0].model", "length >= 1"),
        ({"refiner": {"model": "r", "steps": 0}}, "refiner.steps", ">= 1"),
        ({"dtype": "int8"}, "dtype", "Invalid enum value 'int8'"),
        (
            {"controlnet": {"model": "c", "image_dataurl": "data:text/plain;base64,aGk="}},
            "controlnet.image_dataurl",
            "expected a data URL",
        ),
        ({"controlnet": {"model": "c", "image_dataurl": "%%%"}}, "controlnet.image_dataurl", "not valid base64"),
        ({"controlnet": {"model": "c", "image_dataurl": "aGVsbG8="}}, "controlnet.image_dataurl", "not a PNG"),
        (
            {"controlnet": {"model": "c", "image_dataurl": DATA_URL, "preprocess": {"method": "xray"}}},
            "controlnet.preprocess.method",
            "unknown preprocessor",
        ),
        ({"kind": "img2img"}, "init_image", "required for kind 'img2img'"),
        ({"kind": "inpaint", "init_image": DATA_URL}, "mask_image", "required for kind 'inpaint'"),
        ({"init_image": DATA_URL}, "init_image", "only for kind img2img or inpaint"),
        ({"kind": "img2img", "init_image": DATA_URL, "mask_image": DATA_URL}, "mask_image", "only for kind 'inpaint'"),
        ({"kind": "img2img", "init_image": DATA_URL, "strength": 1.5}, "strength", "<= 1.0"),
    ],
)
def test_beyond_txt2img_bad_input_is_named(extra, field, words):
    with pytest.raises(InvalidInput) as info:
        parse_task({**BASE, **extra})
    assert info.value.field == field
    assert words in info.value.message


def test_img2img_and_inpaint_accept_images():
    img = parse_task({**BASE, "kind": "img2img", "init_image": DATA_URL, "strength": 0.4})
    assert img.kind == "img2img"
    assert img.strength == 0.4
    bare = parse_task({**BASE, "kind": "inpaint", "init_image": PNG_1PX, "mask_image": DATA_URL})
    assert bare.kind == "inpaint"


# --------------------------------------------------------------------------- Crynux's defaults
#
# Crynux's defaults, from crynux-ai/stable-diffusion-task at 17cd393976c9020d5d2a339c0b3452e0e952774b
# (the task format 2.5.0), sd_task/task_args/inference_task/task_args.py:
#   TaskConfig: image_width 512, image_height 512, steps 1, seed 0, num_images 6, safety_checker True, cfg 5
#   InferenceTaskArgs: version "2.5.0", dtype "auto", unet "", negative_prompt "", lora None,
#     controlnet None, scheduler DPMSolverMultistep() (method "DPMSolverMultistepScheduler", args None),
#     vae "", refiner None, textual_inversion ""; base_model {"name", "variant": None}
#   LoraArgs: weight_file_name "", weight 100;  RefinerArgs: variant None, denoising_cutoff 80, steps 20
# and schema/stable-diffusion-inference-task.json at 1c3cd8c9649287e1efe703462e396b1707c538bb (the same,
# and ControlnetArgs: variant None, weight 70, preprocess None). Only base_model, prompt and
# task_config are required there.
#
# A task as Crynux's examples write one, cut down to what Crynux requires and the version that makes
# it a Crynux task: crynux-ai/stable-diffusion-task, examples/sdxl_turbo_lora_hf.py at
# 3591f976f5d4bc1714e884badf222aabcdc375c2 writes
#   "version": "2.0.0", "base_model": {"name": "stabilityai/sdxl-turbo"}, ... "prompt": prompt, ...
#   "task_config": {"num_images": 9, "steps": 1, "cfg": 0}
CRYNUX_MINIMAL = {
    "version": "2.0.0",
    "base_model": {"name": "stabilityai/sdxl-turbo"},
    "prompt": "toy_face of a hacker with a hoodie, pixel art",
    "task_config": {},
}
CRYNUX_CONFIG = TaskConfig(
    image_width=512, image_height=512, steps=1, seed=0, num_images=6, safety_checker=True, cfg=5.0
)


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0", "2.1.0", "2.5.0"])
def test_a_minimal_crynux_task_gets_every_default_crynux_gives_it(version):
    spec = parse_task({**CRYNUX_MINIMAL, "version": version})
    assert spec.version == version
    assert spec.base_model == ModelRef(name="stabilityai/sdxl-turbo", variant=None)
    assert spec.dtype == "auto"
    assert spec.unet == ""
    assert spec.negative_prompt == ""
    assert spec.lora is None
    assert spec.loras == []
    assert spec.controlnet is None
    assert spec.scheduler == SchedulerSpec(method="DPMSolverMultistepScheduler", args=None)
    assert spec.sampler is None
    assert spec.vae == ""
    assert spec.refiner is None
    assert spec.textual_inversion == ""
    assert spec.task_config == CRYNUX_CONFIG
    assert resolve_seed(spec, 1234).task_config.seed == 0  # Crynux's seed 0 is a seed, not "pick one"


def test_crynux_defaults_inside_its_lora_controlnet_and_refiner():
    spec = parse_task(
        {
            **CRYNUX_MINIMAL,
            "lora": {"model": "CiroN2022/toy-face"},
            "controlnet": {"model": "diffusers/controlnet-canny-sdxl-1.0", "image_dataurl": DATA_URL},
            "refiner": {"model": "stabilityai/stable-diffusion-xl-refiner-1.0"},
        }
    )
    assert spec.loras == [LoraSpec(model="CiroN2022/toy-face", weight_file_name="", weight=1.0)]  # 100
    assert (spec.controlnet.variant, spec.controlnet.weight, spec.controlnet.preprocess) == (None, 0.7, None)  # 70
    assert (spec.refiner.variant, spec.refiner.denoising_cutoff, spec.refiner.steps) == (None, 0.8, 20)  # 80


def test_what_a_crynux_task_gives_wins_over_crynux_defaults():
    spec = parse_task(
        {
            **CRYNUX_MINIMAL,
            "scheduler": {"method": "EulerAncestralDiscreteScheduler", "args": {"timestep_spacing": "trailing"}},
            "task_config": {"num_images": 9, "steps": 1, "cfg": 0},  # as examples/sdxl_turbo_lora_hf.py
        }
    )
    assert spec.scheduler.method == "EulerAncestralDiscreteScheduler"
    assert spec.task_config == msgspec.structs.replace(CRYNUX_CONFIG, num_images=9, cfg=0.0)
    with_sampler = parse_task({**CRYNUX_MINIMAL, "sampler": "Euler a"})  # Stipple's extension instead
    assert (with_sampler.sampler, with_sampler.scheduler) == ("Euler a", None)
    without_config = parse_task({key: value for key, value in CRYNUX_MINIMAL.items() if key != "task_config"})
    assert without_config.task_config == CRYNUX_CONFIG  # Crynux requires it; here it may be left out


def test_native_tasks_keep_their_own_defaults():
    """No Crynux version, no Crynux defaults: the OpenAI layer, for one, sends no steps or seed.
    Crynux's own default version is 2.5.0, but a task without `version` is native here: so
    is the task of crynux-ai/stable-diffusion-task's examples/sd15.py (at
    09e5fe02fdf1e97d77206168a3329ea88e85bc64), written before Crynux had versions."""
    native = TaskConfig(
        image_width=512, image_height=512, steps=25, cfg=7.0, seed=-1, num_images=1, safety_checker=False
    )
    for body in (BASE, {**BASE, "version": "1"}, {**BASE, "task_config": {}}):
        spec = parse_task(body)
        assert spec.task_config == native
        assert spec.scheduler is None  # the model's own
    sd15 = parse_task(
        {
            "base_model": "runwayml/stable-diffusion-v1-5",
            "prompt": "best quality, 1girl",
            "negative_prompt": "paintings, sketches",
            "task_config": {"num_images": 9, "safety_checker": False},
        }
    )
    assert sd15.version == "1"
    assert sd15.task_config == msgspec.structs.replace(native, num_images=9)


@pytest.mark.parametrize(
    ("task_config", "field", "value"),
    [
        ("fast", "task_config", "fast"),
        ({"steps": 0}, "task_config.steps", 0),
        ({"seed": -2}, "task_config.seed", -2),
        ({"num_images": 11}, "task_config.num_images", 11),
        ({"colour": "red"}, "task_config.colour", NO_VALUE),
    ],
)
def test_bad_input_in_a_crynux_task_is_named_as_the_app_sent_it(task_config, field, value):
    with pytest.raises(InvalidInput) as info:
        parse_task({**CRYNUX_MINIMAL, "task_config": task_config})
    assert info.value.field == field
    assert info.value.value == value


def test_every_allowed_scheduler_argument_is_one_diffusers_schedulers_take():
    """The allowlist names real config keys (a typo would refuse a valid task forever), and
    a task may set each at an allowed value."""
    import inspect

    import diffusers

    from stipple_common.taskspec import SCHEDULER_ARGS, SCHEDULERS

    known = {
        name for method in SCHEDULERS for name in inspect.signature(getattr(diffusers, method).__init__).parameters
    }
    assert set(SCHEDULER_ARGS) <= known, set(SCHEDULER_ARGS) - known
    args = {"use_karras_sigmas": True, "num_train_timesteps": 1000, "beta_end": 0.012, "algorithm_type": "dpmsolver++"}
    spec = parse_task({**BASE, "scheduler": {"method": "DPMSolverMultistepScheduler", "args": args}})
    assert spec.scheduler is not None
    assert spec.scheduler.args == args


def _png_claiming(width: int, height: int) -> str:
    """A real 8x8 PNG whose header says it is `width` x `height` (a decompression bomb's
    header: what is checked before any pixel is decoded)."""
    import base64
    import io
    import struct
    import zlib

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC, so only the size is a lie
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


@pytest.mark.parametrize("field", ["init_image", "mask_image"])
def test_an_input_image_of_too_many_pixels_is_refused_from_its_header(field):
    body = {**BASE, "kind": "inpaint", "init_image": DATA_URL, "mask_image": DATA_URL}
    body[field] = _png_claiming(5000, 4000)
    with pytest.raises(InvalidInput) as refused:
        parse_task(body)
    assert refused.value.field == field
    assert refused.value.value == "5000x4000"
    assert "at most 4096 pixels" in refused.value.reason
    body[field] = _png_claiming(100_000, 100_000)  # past Pillow's own bomb limit: it refuses to open it
    with pytest.raises(InvalidInput) as bomb:
        parse_task(body)
    assert bomb.value.field == field
    assert "at most 4096 pixels" in bomb.value.reason
    assert "decompression bomb" in bomb.value.reason
    body[field] = _png_claiming(4096, 4096)  # at the limit: the header passes (the node then decodes it)
    parse_task(body)
