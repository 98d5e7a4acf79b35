"""AUTOMATIC1111 requests, translated to native tasks (a1111.py): no NATS."""

import json

import pytest

from stipple_common.errors import InvalidInput
from stipple_gateway.a1111 import parse_request, result, split_loras

PNG = (  # a 1x1 PNG
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
)


def test_lora_tags_leave_the_prompt_and_become_loras():
    prompt, loras = split_loras("a fox <lora:fur:0.6> in snow <lora:snow-style:1>")
    assert prompt == "a fox  in snow"
    assert loras == [{"model": "fur", "weight": 0.6}, {"model": "snow-style", "weight": 1.0}]


def test_a_webuiapi_payload_with_its_off_values_becomes_the_native_task():
    raw = {
        "prompt": "a fox <lora:fur:0.5>",
        "negative_prompt": "blur",
        "seed": 3,
        "sampler_name": "DPM++ 2M",
        "scheduler": "karras",
        "batch_size": 2,
        "n_iter": 2,
        "steps": 12,
        "cfg_scale": 6.5,
        "width": 128,
        "height": 64,
        "enable_hr": False,
        "hr_scale": 2,
        "denoising_strength": 0.7,
        "styles": [],
        "subseed": -1,
        "subseed_strength": 0,
        "tiling": False,
        "eta": 1.0,
        "s_noise": 1,
        "override_settings": {"sd_model_checkpoint": "sd15"},
        "script_args": [],
        "alwayson_scripts": {},
        "send_images": True,
    }
    spec = parse_request(raw, img2img=False, model="tiny-sd")
    assert spec.model_name == "sd15"
    assert spec.sampler == "DPM++ 2M Karras"
    assert spec.task_config.num_images == 4  # batch_size x n_iter
    assert (spec.task_config.image_width, spec.task_config.image_height, spec.task_config.steps) == (128, 64, 12)
    assert [lora.model for lora in spec.loras] == ["fur"]
    assert parse_request({"prompt": "p"}, img2img=False, model="tiny-sd").model_name == "tiny-sd"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"prompt": "p", "enable_hr": True}, "enable_hr"),
        ({"prompt": "p", "restore_faces": True}, "restore_faces"),
        ({"prompt": "p", "script_name": "x/y/z plot"}, "script_name"),
        ({"prompt": "p", "alwayson_scripts": {"controlnet": {}}}, "alwayson_scripts"),
        ({"prompt": "p", "subseed_strength": 0.3}, "subseed_strength"),
        ({"prompt": "p", "made_up": 1}, "made_up"),
        ({"prompt": "p", "scheduler": "exponential"}, "scheduler"),
        ({"prompt": "p", "sampler_name": "DDIM", "scheduler": "karras"}, "scheduler"),
        (
            {"prompt": "p", "override_settings": {"CLIP_stop_at_last_layers": 2}},
            "override_settings.CLIP_stop_at_last_layers",
        ),
        ({"prompt": "p", "width": 63}, "width"),
        ({"prompt": "p", "n_iter": 0}, "n_iter"),
        ({"prompt": "p", "sampler_name": "Euler z"}, "sampler_name"),
    ],
)
def test_what_stipple_cannot_do_is_refused_naming_the_a1111_field(raw, field):
    with pytest.raises(InvalidInput) as caught:
        parse_request(raw, img2img=False, model="tiny-sd")
    assert caught.value.field == field


def test_img2img_takes_one_init_image_and_a_mask_makes_it_inpainting():
    spec = parse_request({"prompt": "p", "init_images": [PNG], "denoising_strength": 0.4}, img2img=True, model="m")
    assert (spec.kind, spec.strength) == ("img2img", 0.4)
    painted = parse_request({"prompt": "p", "init_images": [PNG], "mask": PNG}, img2img=True, model="m")
    assert painted.kind == "inpaint"
    with pytest.raises(InvalidInput) as caught:
        parse_request({"prompt": "p", "init_images": [PNG, PNG]}, img2img=True, model="m")
    assert caught.value.field == "init_images"
    with pytest.raises(InvalidInput) as txt:  # txt2img takes no image
        parse_request({"prompt": "p", "init_images": [PNG]}, img2img=False, model="m")
    assert txt.value.field == "init_images"


def test_the_answer_carries_info_as_a_json_string_as_a1111_writes_it():
    spec = parse_request({"prompt": "a fox", "seed": 5, "batch_size": 2}, img2img=False, model="tiny-sd")
    answer = result(["AA=="], {"prompt": "a fox", "init_images": ["big"]}, spec, "t1", [5, 6])
    info = json.loads(answer["info"])
    assert (info["seed"], info["all_seeds"], info["task_id"]) == (5, [5, 6], "t1")
    assert answer["parameters"] == {"prompt": "a fox"}  # the input images are not echoed back
