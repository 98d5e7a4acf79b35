"""Run txt2img on local diffusers models, reproducibly.

Every node must compute the same image for the same task, so that validators can compare
results. Hence: image i of a task is drawn from its own CPU generator seeded with
`seed + i` (it depends on nothing else: not the batch size, not the device's RNG), each
call gets a fresh scheduler (no state leaks from one task into the next), the PNG carries
no varying metadata, and `configure_determinism` holds every torch switch in one place.
"""

from __future__ import annotations

import copy
import io
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import imagehash
import torch
from PIL import Image

from stipple_common.errors import InvalidInput, StippleError
from stipple_common.taskspec import MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, SEED_MAX

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

MIN_SIDE = 64
MAX_CFG = 30.0

# AUTOMATIC1111 sampler names -> (diffusers scheduler class, config overrides). The overrides
# are explicit so that a model whose default scheduler uses Karras sigmas does not turn
# "DPM++ 2M" into "DPM++ 2M Karras".
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++ 2M": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
}


class ModelNotFound(StippleError):
    """The task asks for a model this node does not have."""

    code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        listed = ", ".join(available) if available else "none"
        super().__init__(f"base_model: model not available on this node; available: {listed} (got {model!r})")
        self.model = model
        self.available = available


class ModelLoadFailed(StippleError):
    """A configured model folder could not be loaded (missing or corrupt files)."""

    code = "model_load_failed"


@dataclass(frozen=True)
class GeneratedImage:
    """One output image with what validators compare."""

    png: bytes
    """PNG-encoded image, without metadata."""
    phash: str
    """`imagehash.phash(image, hash_size=8)` as 16 hex digits."""
    seed: int
    """The seed this image was drawn from (task seed + its index)."""
    width: int
    height: int


def configure_determinism(threads: int) -> None:
    """Set every torch switch that affects reproducibility, for the whole process.

    Thread counts change how CPU reductions are split (and so the rounding); TF32 and
    cuDNN autotuning change GPU results from run to run.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidInput("threads", threads, "must be an integer >= 1")
    # Must be set before CUDA initialises to make cuBLAS deterministic; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # only settable once per process, before any inter-op work
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class PipelineRunner:
    """Loads diffusers text-to-image pipelines on demand and runs tasks on them.

    `models` maps a model name (as tasks spell `base_model`) to a local folder written by
    `save_pretrained`. A model is loaded the first time it is used (or by `load`) and then
    kept. Calls share the loaded weights; each call works on a shallow copy of the pipeline
    with its own scheduler, so the cached pipeline is never changed by a task.
    """

    def __init__(self, models: dict[str, Path], *, device: str = "cpu", dtype: torch.dtype | None = None) -> None:
        """`dtype` defaults to float16 on CUDA and float32 elsewhere."""
        self._paths = {name: Path(path) for name, path in models.items()}
        self._device = device
        self._dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        self._loaded: dict[str, DiffusionPipeline] = {}
        self._load_lock = threading.Lock()

    @property
    def model_names(self) -> list[str]:
        """Names of the models this runner can serve, sorted."""
        return sorted(self._paths)

    def load(self, model: str) -> None:
        """Load `model` now (a no-op if it is loaded already); raise ModelNotFound or ModelLoadFailed."""
        self._pipeline(model)

    def _pipeline(self, model: str) -> DiffusionPipeline:
        """The cached pipeline for `model`, loading it on first use."""
        if model not in self._paths:
            raise ModelNotFound(model, self.model_names)
        with self._load_lock:
            pipe = self._loaded.get(model)
            if pipe is None:
                pipe = self._load_from_disk(self._paths[model])
                self._loaded[model] = pipe
        return pipe

    def _load_from_disk(self, path: Path) -> DiffusionPipeline:
        from diffusers import AutoPipelineForText2Image
        from diffusers.utils import deprecation_utils, is_accelerate_available

        # Newer diffusers take `dtype` and deprecate `torch_dtype`; older ones know only `torch_dtype`.
        dtype_arg = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(
                path,
                local_files_only=True,
                # Without accelerate, diffusers warns on every load unless this is off.
                low_cpu_mem_usage=is_accelerate_available(),
                **{dtype_arg: self._dtype},
            )
        except Exception as exc:  # diffusers raises OSError, ValueError, EnvironmentError, KeyError...
            raise ModelLoadFailed(f"cannot load model from {path}: {exc}") from exc
        pipe.to(self._device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def txt2img(
        self,
        *,
        model: str,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        steps: int,
        cfg: float,
        seed: int,
        num_images: int,
        sampler: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[GeneratedImage]:
        """Generate `num_images` images; image i uses seed `seed + i`.

        Images are computed one after the other, each from its own CPU generator seeded
        with `seed + i`, so an image is bit-identical whatever `num_images` is.
        `progress(step, total)` is called after each denoising step, counting over all the
        images: total = num_images x the iterations per image, which is `steps` for most
        samplers and `steps + 1` for PNDM/PLMS (diffusers repeats one timestep to warm up
        its multistep formula). Raises InvalidInput (naming the task field and the value)
        or ModelNotFound before any work is done.
        """
        _validate(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg,
            seed=seed,
            num_images=num_images,
            sampler=sampler,
        )
        pipe = self._pipeline(model)
        images: list[GeneratedImage] = []
        for index in range(num_images):
            # One image per call: on CPU and GPU alike, kernels give results that differ in the
            # last bits with the batch size, which some samplers amplify into visible pixel
            # differences. Batch-of-one calls make image i depend on seed + i alone.
            run = copy.copy(pipe)  # shares the weights; only this copy gets the fresh scheduler
            run.scheduler = _make_scheduler(pipe.scheduler, sampler)
            with torch.inference_mode():
                result = run(
                    prompt=prompt,
                    negative_prompt=negative_prompt,
                    width=width,
                    height=height,
                    num_inference_steps=steps,
                    guidance_scale=float(cfg),
                    num_images_per_prompt=1,
                    generator=[torch.Generator("cpu").manual_seed(seed + index)],
                    output_type="pil",
                    callback_on_step_end=_step_callback(progress, index, num_images),
                    callback_on_step_end_tensor_inputs=[],
                )
            images.append(_encode(result.images[0], seed + index))
        return images


def _step_callback(
    progress: Callable[[int, int], None] | None, index: int, num_images: int
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A diffusers `callback_on_step_end` reporting progress over all images (this is image `index`)."""

    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if progress is not None:
            per_image = pipe.num_timesteps
            progress(index * per_image + step + 1, num_images * per_image)
        return tensors

    return on_step_end


def _make_scheduler(base: SchedulerMixin, sampler: str | None) -> SchedulerMixin:
    """A fresh scheduler for one call: the model's own kind, or the named sampler, built from the model's config."""
    if sampler is None:
        return type(base).from_config(base.config)
    import diffusers

    class_name, overrides = SAMPLERS[sampler]
    scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config(base.config, **overrides)


def _encode(image: Image.Image, seed: int) -> GeneratedImage:
    """PNG bytes (no text chunks, fixed compression, so equal pixels give equal bytes) and the perceptual hash."""
    image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return GeneratedImage(
        png=buffer.getvalue(),
        phash=str(imagehash.phash(image, hash_size=8)),
        seed=seed,
        width=image.width,
        height=image.height,
    )


def _validate(
    *,
    prompt: Any,
    negative_prompt: Any,
    width: Any,
    height: Any,
    steps: Any,
    cfg: Any,
    seed: Any,
    num_images: Any,
    sampler: Any,
) -> None:
    """Check every argument; errors name the task field (as in the task JSON) and the value."""
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise InvalidInput(field, text, "must be a string")
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidInput(field, text, f"must be at most {MAX_PROMPT_CHARS} characters, not {len(text)}")
    _check_int("task_config.image_width", width, MIN_SIDE, MAX_SIDE, multiple_of=8)
    _check_int("task_config.image_height", height, MIN_SIDE, MAX_SIDE, multiple_of=8)
    _check_int("task_config.steps", steps, 1, MAX_STEPS)
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
        raise InvalidInput("task_config.cfg", cfg, "must be a finite number")
    if not 0.0 <= cfg <= MAX_CFG:
        raise InvalidInput("task_config.cfg", cfg, f"must be between 0 and {MAX_CFG:g}")
    _check_int("task_config.seed", seed, 0, SEED_MAX)
    _check_int("task_config.num_images", num_images, 1, MAX_IMAGES)
    if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLERS):
        raise InvalidInput("sampler", sampler, f"unknown sampler; allowed: {', '.join(SAMPLERS)}")


def _check_int(field: str, value: Any, low: int, high: int, *, multiple_of: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, value, "must be an integer")
    if not low <= value <= high or (multiple_of is not None and value % multiple_of):
        step = f"a multiple of {multiple_of} " if multiple_of is not None else ""
        raise InvalidInput(field, value, f"must be {step}between {low} and {high}")
