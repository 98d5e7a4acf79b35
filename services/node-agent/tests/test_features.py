"""Every feature of the task format, through the node's own runner, on tiny models.

Each test asserts the output's shape and determinism, and that the feature changes the
image (a feature that is silently ignored would pass a shape check alone)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import imagehash
import numpy as np
import pytest
import torch
from PIL import Image

from stipple_common.errors import InvalidInput, StippleError
from stipple_common.taskspec import parse_task
from stipple_node.annotators import PreprocessorUnavailable
from stipple_node.pipeline import (
    ModelLoadFailed,
    ModelNotFound,
    PipelineRunner,
    SafetyCheckerUnavailable,
)
from stipple_node.store import ModelStore
from stipple_testkit.tinyzoo import TI_TOKEN, build_zoo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def runner(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineRunner]:
    """Named base models; LoRAs, embeddings, VAEs and ControlNets by local path, through
    the node's real model store."""
    names = ("tiny-sd", "tiny-sdxl", "tiny-sdxl-refiner")
    with ModelStore(tmp_path_factory.mktemp("store"), budget_bytes=None) as store:
        yield PipelineRunner({name: zoo[name] for name in names}, store=store, cache_size=3)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pattern(size: int = 64) -> Image.Image:
    """A picture with edges: a white square and a diagonal on grey."""
    array = np.full((size, size, 3), 96, dtype=np.uint8)
    array[size // 4 : size * 3 // 4, size // 4 : size * 3 // 4] = 255
    for i in range(size):
        array[i, i] = 0
    return Image.fromarray(array)


def mask(size: int = 64) -> Image.Image:
    array = np.zeros((size, size), dtype=np.uint8)
    array[:, size // 2 :] = 255  # repaint the right half
    return Image.fromarray(array)


def task(model: str = "tiny-sd", **fields: object) -> dict[str, object]:
    config = {"image_width": 64, "image_height": 64, "steps": 3, "seed": 7, "num_images": 1}
    config.update(fields.pop("task_config", {}))  # type: ignore[arg-type]
    return {"base_model": model, "prompt": "a cat on a mat", "task_config": config, **fields}


def run(runner: PipelineRunner, **fields: object) -> list[bytes]:
    return [image.png for image in runner.run(parse_task(task(**fields)))]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def differ(a: bytes, b: bytes) -> float:
    """Mean absolute pixel difference (0-255)."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


def check_png(png: bytes, size: tuple[int, int] = (64, 64)) -> None:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.size == size


# ----------------------------------------------------------------------------- model families


def test_sdxl_txt2img_is_deterministic(runner: PipelineRunner) -> None:
    first = run(runner, model="tiny-sdxl", task_config={"num_images": 2, "image_width": 96})
    check_png(first[0], (96, 64))
    assert run(runner, model="tiny-sdxl", task_config={"num_images": 2, "image_width": 96}) == first
    assert first[0] != first[1]


def test_sdxl_with_refiner_as_ensemble_of_experts(runner: PipelineRunner) -> None:
    def refine(cutoff: int) -> list[bytes]:
        refiner = {"model": "tiny-sdxl-refiner", "denoising_cutoff": cutoff, "steps": 10}
        return run(runner, model="tiny-sdxl", refiner=refiner, task_config={"steps": 10})

    base_only = run(runner, model="tiny-sdxl", task_config={"steps": 10})
    refined = refine(50)
    check_png(refined[0])
    assert refined != base_only
    assert refine(50) == refined
    assert refine(90) != refined  # the cutoff decides where the refiner takes over


def test_refiner_alone_refines_an_image(runner: PipelineRunner) -> None:
    out = run(runner, model="tiny-sdxl-refiner", kind="img2img", init_image=data_url(pattern()), strength=0.5)
    check_png(out[0])


def test_a_refiner_cannot_make_an_image_from_nothing(runner: PipelineRunner) -> None:
    with pytest.raises(InvalidInput, match="is an SDXL refiner"):
        run(runner, model="tiny-sdxl-refiner")


def test_a_refiner_needs_an_sdxl_base(runner: PipelineRunner) -> None:
    with pytest.raises(InvalidInput, match="only with an SDXL base") as caught:
        run(runner, refiner={"model": "tiny-sdxl-refiner"})
    assert caught.value.field == "refiner"


# ----------------------------------------------------------------------------- img2img, inpaint


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_img2img_follows_the_init_image_more_at_low_strength(runner: PipelineRunner, model: str) -> None:
    init = data_url(pattern())
    gentle = run(runner, model=model, kind="img2img", init_image=init, strength=0.2, task_config={"steps": 10})
    strong = run(runner, model=model, kind="img2img", init_image=init, strength=0.9, task_config={"steps": 10})
    check_png(gentle[0])
    reference = io.BytesIO()
    pattern().save(reference, format="PNG")
    assert differ(gentle[0], reference.getvalue()) < differ(strong[0], reference.getvalue())
    assert run(runner, model=model, kind="img2img", init_image=init, strength=0.2, task_config={"steps": 10}) == gentle


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_inpainting_changes_the_masked_half_most(runner: PipelineRunner, model: str) -> None:
    init = pattern()
    out = run(runner, model=model, kind="inpaint", init_image=data_url(init), mask_image=data_url(mask()), strength=1.0)
    check_png(out[0])
    result = pixels(out[0])
    original = np.asarray(init, dtype=np.int16)
    kept = np.abs(result[:, :24] - original[:, :24]).mean()
    repainted = np.abs(result[:, 40:] - original[:, 40:]).mean()
    assert kept < repainted


def test_init_image_is_fitted_to_the_task_size(runner: PipelineRunner) -> None:
    out = run(runner, kind="img2img", init_image=data_url(pattern(100)), task_config={"image_width": 80})
    check_png(out[0], (80, 64))


# ----------------------------------------------------------------------------- ControlNet


@pytest.mark.parametrize(
    ("model", "controlnet"), [("tiny-sd", "tiny-controlnet-sd15"), ("tiny-sdxl", "tiny-controlnet-sdxl")]
)
def test_controlnet_canny_steers_the_image(
    runner: PipelineRunner, zoo: dict[str, Path], model: str, controlnet: str
) -> None:
    control = {
        "model": str(zoo[controlnet]),
        "image_dataurl": data_url(pattern()),
        "weight": 100,
        "preprocess": {"method": "canny", "args": {"low_threshold": 50, "high_threshold": 150}},
    }
    plain = run(runner, model=model)
    steered = run(runner, model=model, controlnet=control)
    check_png(steered[0])
    assert steered != plain
    assert run(runner, model=model, controlnet=control) == steered
    flipped = {**control, "image_dataurl": data_url(pattern().transpose(Image.Transpose.FLIP_LEFT_RIGHT))}
    assert run(runner, model=model, controlnet=flipped) != steered


@pytest.mark.parametrize("method", ["shuffle", "scribble_xdog", None])
def test_controlnet_with_img2img_and_opencv_preprocessors(runner: PipelineRunner, zoo: dict[str, Path], method) -> None:
    control = {
        "model": str(zoo["tiny-controlnet-sd15"]),
        "image_dataurl": data_url(pattern()),
        **({"preprocess": {"method": method}} if method else {}),
    }
    out = run(runner, kind="img2img", init_image=data_url(pattern()), controlnet=control)
    check_png(out[0])
    assert run(runner, kind="img2img", init_image=data_url(pattern()), controlnet=control) == out


def test_annotator_preprocessors_say_they_are_unavailable(runner: PipelineRunner, zoo: dict[str, Path]) -> None:
    control = {
        "model": str(zoo["tiny-controlnet-sd15"]),
        "image_dataurl": data_url(pattern()),
        "preprocess": {"method": "mediapipe_face"},
    }
    with pytest.raises(PreprocessorUnavailable, match="mediapipe_face"):
        run(runner, controlnet=control)


def test_bad_preprocess_args_name_the_field(runner: PipelineRunner, zoo: dict[str, Path]) -> None:
    control = {
        "model": str(zoo["tiny-controlnet-sd15"]),
        "image_dataurl": data_url(pattern()),
        "preprocess": {"method": "canny", "args": {"low_threshold": 999}},
    }
    with pytest.raises(InvalidInput) as caught:
        run(runner, controlnet=control)
    assert caught.value.field == "controlnet.preprocess.args.low_threshold"
    assert caught.value.value == 999


# ----------------------------------------------------------------------------- LoRA, VAE, TI


@pytest.mark.parametrize(
    ("model", "lora"), [("tiny-sd", "tiny-lora-sd15.safetensors"), ("tiny-sdxl", "tiny-lora-sdxl.safetensors")]
)
def test_loras_apply_with_their_weights_and_leave_no_residue(
    runner: PipelineRunner, zoo: dict[str, Path], model: str, lora: str
) -> None:
    before = run(runner, model=model)
    with_lora = run(runner, model=model, loras=[{"model": str(zoo[lora]), "weight": 1.0}])
    half = run(runner, model=model, loras=[{"model": str(zoo[lora]), "weight": 0.5}])
    assert with_lora != before
    assert half not in (before, with_lora)
    assert differ(half[0], before[0]) < differ(with_lora[0], before[0])
    crynux = run(runner, model=model, lora={"model": str(zoo[lora]), "weight": 100})
    assert crynux == with_lora  # Crynux's weight 100 is 1.0
    assert run(runner, model=model) == before  # unloaded without residue


def test_two_loras_at_once(runner: PipelineRunner, zoo: dict[str, Path]) -> None:
    lora = str(zoo["tiny-lora-sd15.safetensors"])
    one = run(runner, loras=[{"model": lora, "weight": 1.0}])
    two = run(runner, loras=[{"model": lora, "weight": 1.0}, {"model": lora, "weight": -0.5}])
    assert two != one
    check_png(two[0])


def test_vae_override(runner: PipelineRunner, zoo: dict[str, Path]) -> None:
    plain = run(runner)
    other = run(runner, vae=str(zoo["tiny-vae"]))
    check_png(other[0])
    assert other != plain
    assert run(runner) == plain  # the override is its own cache entry


def test_textual_inversion(runner: PipelineRunner, zoo: dict[str, Path]) -> None:
    prompt = f"a photo of {TI_TOKEN}"
    embedding = str(zoo["tiny-ti-sd15.safetensors"])
    with_ti = run(runner, prompt=prompt, textual_inversion=embedding, textual_inversion_token=TI_TOKEN)
    check_png(with_ti[0])
    assert with_ti != run(runner, prompt="a photo of")
    tokenizer = runner.pipeline("tiny-sd").tokenizer
    assert TI_TOKEN not in tokenizer.get_vocab()  # unloaded after the task
    assert run(runner, prompt=prompt, textual_inversion=embedding, textual_inversion_token=TI_TOKEN) == with_ti


# ----------------------------------------------------------------------------- prompts, schedulers


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_long_and_weighted_prompts(runner: PipelineRunner, model: str) -> None:
    long_prompt = ", ".join(["a cat on a mat in the sun with a hat"] * 12)  # far over 77 tokens
    long_out = run(runner, model=model, prompt=long_prompt)
    check_png(long_out[0])
    truncated_tail = run(runner, model=model, prompt=long_prompt + ", red dog")
    assert truncated_tail != long_out  # words past token 77 still count
    plain = run(runner, model=model, prompt="a cat on a mat")
    weighted = run(runner, model=model, prompt="a (cat:1.8) on a mat")
    assert weighted != plain
    assert run(runner, model=model, prompt="a (cat)1.8 on a mat") == weighted  # A1111 and compel syntax agree


def test_crynux_scheduler_object(runner: PipelineRunner) -> None:
    euler_a = run(
        runner, scheduler={"method": "EulerAncestralDiscreteScheduler", "args": {"timestep_spacing": "trailing"}}
    )
    check_png(euler_a[0])
    assert euler_a != run(runner, scheduler={"method": "DDIMScheduler"})


# ----------------------------------------------------------------------------- errors and caching


def test_safety_checker_without_a_model_is_a_typed_error(runner: PipelineRunner) -> None:
    with pytest.raises(SafetyCheckerUnavailable, match="task_config.safety_checker"):
        run(runner, task_config={"safety_checker": True})


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"loras": [{"model": "someone/nowhere-lora"}]}, "loras[0].model"),
        ({"vae": "someone/nowhere-vae"}, "vae"),
        ({"textual_inversion": "someone/nowhere-ti"}, "textual_inversion"),
        ({"base_model": "someone/nowhere-model"}, "base_model"),
    ],
)
def test_missing_models_name_their_field(runner: PipelineRunner, fields: dict[str, object], field: str) -> None:
    with pytest.raises(StippleError) as caught:
        run(runner, **fields)
    assert caught.value.code == "model_not_available"
    assert caught.value.message.startswith(f"{field}: ")
    assert "nowhere" in caught.value.message


def test_without_a_store_unknown_models_are_not_found(zoo: dict[str, Path]) -> None:
    runner = PipelineRunner({"tiny-sd": zoo["tiny-sd"]})
    with pytest.raises(ModelNotFound, match=r"loras\[0\].model: model not available on this node; available: tiny-sd"):
        run(runner, loras=[{"model": "x"}])


def test_a_corrupt_model_fails_its_task_and_the_next_task_runs(zoo: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    runner = PipelineRunner({"broken": broken, "tiny-sd": zoo["tiny-sd"]})
    with pytest.raises(ModelLoadFailed, match="cannot load model"):
        run(runner, model="broken")
    check_png(run(runner)[0])


def test_loaded_pipelines_are_kept_and_evicted_least_recently_used(zoo: dict[str, Path]) -> None:
    runner = PipelineRunner({"tiny-sd": zoo["tiny-sd"], "tiny-sdxl": zoo["tiny-sdxl"]}, cache_size=1)
    run(runner)
    first = runner.pipeline("tiny-sd")
    run(runner, task_config={"seed": 8})
    assert runner.pipeline("tiny-sd") is first  # a second task did not load it again
    assert runner.loaded() == ["tiny-sd"]
    run(runner, model="tiny-sdxl")
    assert runner.loaded() == ["tiny-sdxl"]


def tiny_safety_checker(folder: Path, *, flag_everything: bool) -> Path:
    """A tiny StableDiffusionSafetyChecker whose concept thresholds flag every image or none."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0 if flag_everything else 10.0)
        checker.special_care_embeds_weights.fill_(10.0)
    checker.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("flag_everything", [True, False])
def test_safety_checker_blacks_out_flagged_images(zoo: dict[str, Path], tmp_path: Path, flag_everything: bool) -> None:
    checker = tiny_safety_checker(tmp_path / "checker", flag_everything=flag_everything)
    runner = PipelineRunner({"tiny-sd": zoo["tiny-sd"]}, safety_checker=checker)
    checked = run(runner, task_config={"safety_checker": True})
    unchecked = run(runner)
    check_png(checked[0])
    if flag_everything:
        assert pixels(checked[0]).max() == 0
    else:
        assert checked == unchecked


def test_sd2_style_v_prediction_model(zoo: dict[str, Path], tmp_path: Path) -> None:
    """SD 2.x differs from 1.x at run time by v-prediction and a GELU text encoder: the
    tiny model's folder with SD 2.1's settings must run through the same code path."""
    import json
    import shutil

    sd2 = tmp_path / "tiny-sd2"
    shutil.copytree(zoo["tiny-sd"], sd2)
    scheduler = json.loads((sd2 / "scheduler" / "scheduler_config.json").read_text())
    scheduler.update(prediction_type="v_prediction", timestep_spacing="leading")
    (sd2 / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    encoder = json.loads((sd2 / "text_encoder" / "config.json").read_text())
    encoder["hidden_act"] = "gelu"
    (sd2 / "text_encoder" / "config.json").write_text(json.dumps(encoder))
    runner = PipelineRunner({"tiny-sd2": sd2, "tiny-sd": zoo["tiny-sd"]})
    assert runner.pipeline("tiny-sd2").scheduler.config.prediction_type == "v_prediction"
    v_pred = run(runner, model="tiny-sd2", sampler="Euler")
    check_png(v_pred[0])
    assert run(runner, model="tiny-sd2", sampler="Euler") == v_pred
    assert v_pred != run(runner, model="tiny-sd", sampler="Euler")


def test_a_single_file_checkpoint_as_base_model(zoo: dict[str, Path], tmp_path: Path) -> None:
    """An A1111/Civitai-style single .safetensors file, by path through the real store.
    Same weights as the folder (checked), so the same picture; not bit for bit, because
    the loaded tensors sit differently in memory and CPU kernels round differently
    (measured: 6e-7 in the UNet's output)."""
    from stipple_testkit.tinyzoo import save_single_file

    checkpoint = save_single_file(zoo["tiny-sd"], tmp_path / "tiny-sd-single.safetensors")
    with ModelStore(tmp_path / "store", budget_bytes=None) as store:
        runner = PipelineRunner({"tiny-sd": zoo["tiny-sd"]}, store=store)
        single = run(runner, model=str(checkpoint))
        check_png(single[0])
        assert run(runner, model=str(checkpoint)) == single
        folder = run(runner, model="tiny-sd")
        assert differ(single[0], folder[0]) < 1.0  # mean absolute difference, of 255
        assert (
            imagehash.phash(Image.open(io.BytesIO(single[0]))) - imagehash.phash(Image.open(io.BytesIO(folder[0]))) <= 2
        )
        pipe = runner.pipeline(str(checkpoint))
        for name in ("unet", "vae", "text_encoder"):
            ours, theirs = getattr(pipe, name).state_dict(), getattr(runner.pipeline("tiny-sd"), name).state_dict()
            assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_a_single_file_checkpoint_needs_a_folder_of_its_family(zoo: dict[str, Path], tmp_path: Path) -> None:
    from stipple_testkit.tinyzoo import save_single_file

    checkpoint = save_single_file(zoo["tiny-sd"], tmp_path / "sd.safetensors")
    with ModelStore(tmp_path / "store", budget_bytes=None) as store:
        runner = PipelineRunner({"tiny-sdxl": zoo["tiny-sdxl"]}, store=store)
        with pytest.raises(ModelLoadFailed, match="single-file sd checkpoint"):
            run(runner, model=str(checkpoint))


@pytest.mark.parametrize("method", ["scribble_hed", "softedge_hed", "softedge_hedsafe"])
def test_hed_annotators_load_their_weights_through_the_store(zoo: dict[str, Path], tmp_path: Path, method: str) -> None:
    """The HED network with random weights saved as ControlNetHED.pth is, is loaded by
    the store, and turns the picture into a control image."""
    from stipple_common.taskspec import Preprocess
    from stipple_node.annotators.hed import HedNetwork
    from stipple_node.images import preprocess

    torch.manual_seed(0)
    weights = tmp_path / "ControlNetHED.pth"
    torch.save(HedNetwork().state_dict(), weights)
    with ModelStore(tmp_path / "store", budget_bytes=None) as store:
        runner = PipelineRunner({"tiny-sd": zoo["tiny-sd"]}, store=store, annotator_weights={"hed": str(weights)})
        control = {
            "model": str(zoo["tiny-controlnet-sd15"]),
            "image_dataurl": data_url(pattern()),
            "preprocess": {"method": method},
        }
        out = run(runner, controlnet=control)
        check_png(out[0])
        assert run(runner, controlnet=control) == out
        canny = {**control, "preprocess": {"method": "canny"}}
        assert run(runner, controlnet=canny) != out
        edges = np.asarray(preprocess(pattern(), Preprocess(method=method), 0, runner._annotators))
        assert edges.shape == (64, 64, 3)
        if method.startswith("scribble"):
            assert set(np.unique(edges)) <= {0, 255}  # a scribble is black and white


def test_hed_without_weights_is_a_typed_error(zoo: dict[str, Path], tmp_path: Path) -> None:
    with ModelStore(tmp_path / "store", budget_bytes=None) as store:
        runner = PipelineRunner(
            {"tiny-sd": zoo["tiny-sd"]}, store=store, annotator_weights={"hed": str(tmp_path / "none.pth")}
        )
        control = {
            "model": str(zoo["tiny-controlnet-sd15"]),
            "image_dataurl": data_url(pattern()),
            "preprocess": {"method": "scribble_hed"},
        }
        with pytest.raises(StippleError) as caught:
            run(runner, controlnet=control)
        assert caught.value.message.startswith("controlnet.preprocess")


def test_out_of_gpu_memory_is_a_typed_error_and_frees_the_cache(
    zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: the diffusion call raises what CUDA raises; the runner must turn it
    into `out_of_memory`, drop its loaded pipelines, and run the next task."""
    from stipple_node.pipeline import OutOfMemory

    runner = PipelineRunner({"tiny-sd": zoo["tiny-sd"]})
    before = run(runner)
    assert runner.loaded() == ["tiny-sd"]

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner, "_one_image", exhausted)
    with pytest.raises(OutOfMemory, match="out of GPU memory") as caught:
        run(runner)
    assert caught.value.code == "out_of_memory"
    assert runner.loaded() == []
    monkeypatch.undo()
    assert run(runner) == before


def test_annotator_weights_setting_names_the_bad_entry() -> None:
    from stipple_common.settings import InvalidSettings
    from stipple_node.annotators import parse_weights

    assert parse_weights("hed=/w/hed.pth") == {"hed": "/w/hed.pth"}
    assert parse_weights("") == {}
    with pytest.raises(InvalidSettings, match="'nope=/x'"):
        parse_weights("hed=/w/hed.pth,nope=/x")
    with pytest.raises(InvalidSettings, match="'hed'"):
        parse_weights("hed")
