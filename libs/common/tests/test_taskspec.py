import msgspec
import pytest

from stipple_common.errors import InvalidInput
from stipple_common.taskspec import SAMPLERS, TaskSpec, parse_task, resolve_seed

BASE = {"base_model": "tiny-sd", "prompt": "a fox"}


def test_minimal_task_gets_defaults():
    spec = parse_task(BASE)
    assert spec.base_model == "tiny-sd"
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
        image_width=64, image_height=128, steps=4, cfg=5.5, seed=7, num_images=2
    )


@pytest.mark.parametrize(
    ("body", "field", "value", "reason"),
    [
        ({**BASE, "task_config": {"steps": 0}}, "task_config.steps", 0, ">= 1"),
        ({**BASE, "task_config": {"steps": 151}}, "task_config.steps", 151, "<= 150"),
        ({**BASE, "task_config": {"image_width": 65}}, "task_config.image_width", 65, "multiple of 8"),
        ({**BASE, "task_config": {"image_height": 4096}}, "task_config.image_height", 4096, "<= 2048"),
        ({**BASE, "task_config": {"num_images": 9}}, "task_config.num_images", 9, "<= 8"),
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
