"""txt2img on the tiny model: output format, reproducibility, samplers, input checks."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imagehash
import pytest
import torch
from PIL import Image

from stipple_common import checkpoints
from stipple_common.errors import InvalidInput
from stipple_common.phash import hamming
from stipple_common.taskspec import SAMPLERS as TASK_SAMPLERS
from stipple_node.pipeline import (
    GeneratedImage,
    ModelLoadFailed,
    ModelNotFound,
    PipelineRunner,
    configure_determinism,
    platform_class,
)
from stipple_node.schedulers import SAMPLERS
from stipple_node.tinymodel import TINY_MODEL_NAME

# diffusers' schedulers call np.array(tensor, copy=False), which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

BASE: dict[str, Any] = {
    "model": TINY_MODEL_NAME,
    "prompt": "a red castle on a mountain at sunset",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 64,
    "steps": 4,
    "cfg": 7.0,
    "seed": 1234,
    "num_images": 1,
}


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> PipelineRunner:
    runner = PipelineRunner({TINY_MODEL_NAME: tiny_model_dir})
    runner.load(TINY_MODEL_NAME)
    return runner


def generate(runner: PipelineRunner, **changes: Any) -> list[GeneratedImage]:
    return runner.txt2img(**{**BASE, **changes})


def png_chunk_types(png: bytes) -> list[bytes]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    types, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        types.append(png[pos + 4 : pos + 8])
        pos += 12 + length
    return types


def test_returns_decodable_pngs_of_the_asked_size(runner: PipelineRunner) -> None:
    images = generate(runner, width=64, height=80, num_images=2)
    assert len(images) == 2
    for image in images:
        decoded = Image.open(io.BytesIO(image.png))
        assert decoded.format == "PNG"
        assert decoded.size == (64, 80) == (image.width, image.height)
        assert decoded.mode == "RGB"
        assert len(image.phash) == 16
        assert image.phash == str(imagehash.phash(decoded, hash_size=8))
        assert set(png_chunk_types(image.png)) == {b"IHDR", b"IDAT", b"IEND"}  # no metadata


def test_same_seed_gives_identical_bytes(runner: PipelineRunner) -> None:
    first, second = generate(runner), generate(runner)
    assert first[0].png == second[0].png
    assert first[0].phash == second[0].phash


def test_different_seed_gives_a_different_image(runner: PipelineRunner) -> None:
    a, b = generate(runner, seed=1), generate(runner, seed=2)
    assert a[0].png != b[0].png
    assert hamming(a[0].phash, b[0].phash) > 0


def test_image_i_uses_seed_plus_i(runner: PipelineRunner) -> None:
    images = generate(runner, seed=40, num_images=3)
    assert [image.seed for image in images] == [40, 41, 42]
    assert len({image.png for image in images}) == 3


def test_an_image_does_not_depend_on_the_batch(runner: PipelineRunner) -> None:
    batch = generate(runner, seed=7, num_images=2)
    alone = generate(runner, seed=8, num_images=1)
    assert batch[1].png == alone[0].png
    assert batch[1].phash == alone[0].phash


def test_progress_is_reported_after_each_step(runner: PipelineRunner) -> None:
    calls: list[tuple[int, int]] = []
    generate(runner, steps=3, sampler="Euler", progress=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_progress_counts_over_all_images(runner: PipelineRunner) -> None:
    calls: list[tuple[int, int]] = []
    generate(runner, steps=2, num_images=2, sampler="DDIM", progress=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_progress_with_the_default_pndm_scheduler(runner: PipelineRunner) -> None:
    # diffusers' PNDM (SD 1.5's default) runs one extra iteration: steps + 1 in all.
    calls: list[tuple[int, int]] = []
    generate(runner, steps=3, progress=lambda step, total: calls.append((step, total)))
    total = calls[-1][1]
    assert total in (3, 4)
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_sampler_names_match_the_task_format() -> None:
    assert set(SAMPLERS) == set(TASK_SAMPLERS)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_and_leaves_the_cached_pipeline_alone(runner: PipelineRunner, sampler: str) -> None:
    cached = runner.pipeline(TINY_MODEL_NAME)
    scheduler, config = cached.scheduler, dict(cached.config)
    images = generate(runner, steps=2, sampler=sampler)
    assert Image.open(io.BytesIO(images[0].png)).size == (64, 64)
    assert generate(runner, steps=2, sampler=sampler)[0].png == images[0].png  # no state carried over
    assert cached.scheduler is scheduler
    assert dict(cached.config) == config


def test_default_sampler_is_the_models_scheduler(runner: PipelineRunner) -> None:
    # The tiny model ships SD 1.5's PNDM config, so no sampler and "PNDM" compute the same.
    assert generate(runner, steps=2)[0].png == generate(runner, steps=2, sampler="PNDM")[0].png


@pytest.mark.parametrize(
    ("changes", "field", "shown"),
    [
        ({"width": 63}, "task_config.image_width", "63"),
        ({"height": 100}, "task_config.image_height", "100"),
        ({"width": 4096}, "task_config.image_width", "4096"),
        ({"steps": 0}, "task_config.steps", "0"),
        ({"steps": 2.5}, "task_config.steps", "2.5"),
        ({"num_images": 0}, "task_config.num_images", "0"),
        ({"num_images": 99}, "task_config.num_images", "99"),
        ({"cfg": -1.0}, "task_config.cfg", "-1.0"),
        ({"cfg": float("nan")}, "task_config.cfg", "nan"),
        ({"seed": -1}, "task_config.seed", "-1"),
        ({"sampler": "Heun++"}, "sampler", "'Heun++'"),
        ({"prompt": None}, "prompt", "None"),
        ({"negative_prompt": 3}, "negative_prompt", "3"),
        ({"prompt": "x" * 9000}, "prompt", "'xxx"),
        ({"sampler": ["Euler"]}, "sampler", "['Euler']"),
    ],
)
def test_bad_input_names_the_field_and_value(
    runner: PipelineRunner, changes: dict[str, Any], field: str, shown: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        generate(runner, **changes)
    assert caught.value.field == field
    assert caught.value.code == "invalid_input"
    assert field in str(caught.value)
    assert f"(got {shown}" in str(caught.value)


def test_unknown_model_lists_the_available_ones(runner: PipelineRunner) -> None:
    with pytest.raises(ModelNotFound) as caught:
        generate(runner, model="sd-xl-nope")
    assert caught.value.code == "model_not_found"
    assert "'sd-xl-nope'" in str(caught.value)
    assert "base_model" in str(caught.value)
    assert TINY_MODEL_NAME in str(caught.value)
    assert caught.value.available == [TINY_MODEL_NAME]


def test_model_names_and_lazy_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = PipelineRunner({"b": tiny_model_dir, "a": tmp_path / "missing"})
    assert runner.model_names == ["a", "b"]
    with pytest.raises(ModelNotFound):
        runner.load("c")
    with pytest.raises(ModelLoadFailed) as caught:
        runner.load("a")  # configured, but the folder holds no model: fails when first used
    assert caught.value.code == "model_load_failed"


@pytest.fixture
def restore_torch_settings() -> Iterator[None]:
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    yield
    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
    torch.set_float32_matmul_precision(saved[3])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[4], saved[5]


@pytest.mark.usefixtures("restore_torch_settings")
def test_configure_determinism_sets_the_switches() -> None:
    configure_determinism(1)
    configure_determinism(1)  # a second call (inter-op threads already fixed) is fine
    assert torch.get_num_threads() == 1
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.deterministic
    with pytest.raises(InvalidInput, match="threads"):
        configure_determinism(0)


def test_each_image_carries_its_checkpoints_and_the_nodes_determinism_class(runner: PipelineRunner) -> None:
    """The latents after 1/4, 1/2 and 3/4 of the steps, hashed: equal for equal work, and
    different where the work differs, even in a way the final image hides."""
    first, second = generate(runner, steps=8, num_images=2), generate(runner, steps=8, num_images=2)
    for image in first:
        assert len(image.checkpoints) == 3
        assert all(checkpoints.DIGEST.fullmatch(digest) for digest in image.checkpoints)
        assert len(set(image.checkpoints)) == 3  # the latents move between checkpoints
        assert image.determinism.startswith("cpu ")
        assert f"threads {torch.get_num_threads()}" in image.determinism
        assert f"torch {torch.__version__}" in image.determinism
        assert image.determinism == f"{platform_class('cpu')}; float32"  # the class it joins with, and the dtype
    assert [i.checkpoints for i in first] == [i.checkpoints for i in second]
    assert first[0].checkpoints != first[1].checkpoints  # another seed
    fewer = generate(runner, steps=6, num_images=1)[0]
    assert not set(fewer.checkpoints) & set(first[0].checkpoints)
    # the latents' summaries, for other classes: equal for equal work, far apart for fewer steps
    assert [i.summaries for i in first] == [i.summaries for i in second]
    assert all(len(i.summaries) == 3 and checkpoints.summaries_well_formed(i.summaries) is None for i in first)
    assert all(
        checkpoints.summary_distance(a, b) > 0.05 for a, b in zip(first[0].summaries, fewer.summaries, strict=True)
    )
    other_prompt = generate(runner, steps=8, num_images=1, prompt="a blue boat")[0]
    assert not set(other_prompt.checkpoints) & set(first[0].checkpoints)
    other_sampler = generate(runner, steps=8, num_images=1, sampler="DDIM")[0]
    assert other_sampler.checkpoints[1:] != first[0].checkpoints[1:]
