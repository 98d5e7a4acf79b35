"""Run Stable Diffusion tasks on diffusers, reproducibly.

`PipelineRunner.run(spec)` runs one canonical task: SD 1.5, 2.1 and SDXL through
diffusers' auto pipelines (txt2img, img2img, inpainting, each with or without ControlNet),
SDXL base + refiner as an ensemble of expert denoisers, the refiner alone on an image,
several LoRAs (loaded for the task, unloaded after it with no residue), a VAE override,
textual inversion, long and weighted prompts (compel), and the safety checker.

Every node must compute the same image for the same task, so that validators can compare
results. Hence: image i is drawn from its own CPU generator seeded with `seed + i`, one
image per call (batched calls differ in the last bits), a fresh scheduler per call, PNGs
without varying metadata, and `configure_determinism` holds every torch switch.

Loaded pipelines stay in memory in an LRU keyed by what was loaded (model, variant,
dtype, VAE, UNet); img2img, inpainting and ControlNet pipelines are made from a loaded one
with `from_pipe`, sharing its weights, and a refiner shares the base's VAE and second
text encoder.

A task's models are fetched (downloaded into the store, and pinned there) before the
runner's lock is taken: a slow download never holds the pipelines, and a cancelled task
stops its download (`run`'s `cancelled`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import platform
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import torch
from opentelemetry import trace
from PIL import Image

from stipple_common import checkpoints
from stipple_common.errors import InvalidInput, StippleError
from stipple_common.phash import image_phash
from stipple_common.taskspec import ModelRef, TaskSpec, canonical, check_spec, validation_error_to_invalid

from .annotators import Annotators
from .images import load_image, preprocess
from .metrics import RunnerMetrics
from .prompts import prompt_kwargs
from .schedulers import make_scheduler

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

Progress = Callable[[int, int], None]

_tracer = trace.get_tracer("stipple.node")  # the stage spans of a task (docs/observability.md)


class ModelResolver(Protocol):
    """Turns a model reference (repo id, URL, path) into a local path: the model store."""

    def resolve(
        self, ref: str, *, variant: str | None = None, kind: str = "model", cancelled: Callable[[], bool] | None = None
    ) -> Path: ...


class ModelNotFound(StippleError):
    """The task asks for a model this node does not have and cannot fetch."""

    code = "model_not_found"

    def __init__(self, model: str, available: list[str], field: str = "base_model") -> None:
        listed = ", ".join(available) if available else "none"
        super().__init__(f"{field}: model not available on this node; available: {listed} (got {model!r})")
        self.model = model
        self.available = available


class ModelLoadFailed(StippleError):
    """A model could not be loaded (missing or corrupt files, wrong kind of model)."""

    code = "model_load_failed"


class OutOfMemory(StippleError):
    code = "out_of_memory"


class SafetyCheckerUnavailable(StippleError):
    code = "safety_checker_unavailable"


@dataclass(frozen=True)
class GeneratedImage:
    """One output image with what validators compare."""

    png: bytes
    """PNG-encoded image, without metadata."""
    phash: str
    """`stipple_common.phash.image_phash`: the pHash the validator recomputes from the stored PNG."""
    seed: int
    """The seed this image was drawn from (task seed + its index)."""
    width: int
    height: int
    checkpoints: list[str] = field(default_factory=list)
    """`stipple_common.checkpoints`: digests of the latents after 1/4, 1/2 and 3/4 of the steps."""
    determinism: str = ""
    """`determinism_class`: what must be equal for another node's latents to be bit-identical."""
    summaries: list[str] = field(default_factory=list)
    """`stipple_common.checkpoints.summary` of the same latents: compared across classes."""


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


def determinism_class(device: str, dtype: torch.dtype) -> str:
    """What makes two nodes' floating point bit-identical: the device model (and on a GPU
    its driver and CUDA), torch, diffusers, the dtype, and on a CPU the thread count (it
    changes how reductions are split). Two nodes of one class compute the same latents bit
    for bit (stipple_common.checkpoints); nodes of two classes, only nearly. It is
    `platform_class(device)` and the dtype."""
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{platform_class(device)}; {dtype_name}"[: checkpoints.MAX_CLASS_LENGTH]


def platform_class(device: str) -> str:
    """The determinism class but the dtype: what a node announces when it joins."""
    import diffusers

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        name = torch.cuda.get_device_name(index)
        capability = ".".join(map(str, torch.cuda.get_device_capability(index)))
        hardware = f"{name} sm{capability} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()}"
    else:
        hardware = f"cpu {platform.machine()} {_cpu_model()} threads {torch.get_num_threads()}"
    described = f"{hardware}; torch {torch.__version__}; diffusers {diffusers.__version__}"
    return described[: checkpoints.MAX_CLASS_LENGTH - 12]  # room for the dtype


@functools.cache
def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, read once): its vector units decide the last bits."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def model_family(path: Path) -> str:
    """The family ("sd" for 1.x/2.x, "sdxl", "sdxl_refiner"): from a folder's
    model_index.json, or from the tensor names of a single-file checkpoint."""
    if path.is_file():
        return single_file_family(path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadFailed(f"{path} is not a diffusers model folder: {exc}") from None
    name = index.get("_class_name", "")
    if "XL" in name:
        return "sdxl_refiner" if index.get("text_encoder", [None])[0] is None else "sdxl"
    return "sd"


def single_file_family(path: Path) -> str:
    """The family of an original-layout (A1111/Civitai) checkpoint, from its tensor names."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = set(handle.keys())
        else:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
            keys = set(checkpoint.get("state_dict", checkpoint))
    except Exception as exc:
        raise ModelLoadFailed(f"base_model: cannot read checkpoint {path.name}: {exc}") from exc
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl_refiner"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd"
    raise ModelLoadFailed(f"base_model: {path.name} is not a Stable Diffusion checkpoint this node knows")


@dataclass
class _Loaded:
    pipe: Any
    family: str


class PipelineRunner:
    """Loads pipelines on demand (kept in an LRU) and runs tasks on them.

    `models` maps the model names this node advertises to local folders written by
    `save_pretrained`. Any other reference (a Hugging Face repo id, a URL, a path) goes
    through `store` when one is given. Not thread-safe by design: a node runs one task at a
    time, and the lock makes a second caller wait.
    """

    def __init__(
        self,
        models: dict[str, Path],
        *,
        store: ModelResolver | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        cache_size: int = 2,
        safety_checker: Path | None = None,
        annotator_weights: dict[str, str] | None = None,
    ) -> None:
        """`dtype` defaults to float16 on CUDA and float32 elsewhere (a task's `dtype` is
        honoured on CUDA; CPUs always compute in float32)."""
        self._paths = {name: Path(path) for name, path in models.items()}
        self._store = store
        self._device = device
        self._dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        self._cache: OrderedDict[tuple[Any, ...], _Loaded] = OrderedDict()
        self._cache_size = max(1, cache_size)
        self._controlnets: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._safety_checker_path = safety_checker
        self._safety: tuple[Any, Any] | None = None
        self._lock = threading.RLock()
        self._fetched: dict[tuple[str, str | None, str], Path] = {}  # this run's prefetched models (under the lock)
        resolve = (lambda ref: self._resolve(ref, None, "controlnet.preprocess", kind="annotator")) if store else None
        self._annotators = Annotators(resolve, annotator_weights)
        self.metrics = RunnerMetrics(loaded=lambda: len(self._cache))

    # ------------------------------------------------------------------ models

    @property
    def model_names(self) -> list[str]:
        """Names of the models this runner advertises, sorted."""
        return sorted(self._paths)

    def loaded(self) -> list[str]:
        """What is in memory now, by name or reference."""
        return sorted({str(key[0]) for key in self._cache})

    def load(self, model: str) -> None:
        """Load `model` now (a no-op if it is loaded already)."""
        self.pipeline(model)

    def pipeline(self, model: str) -> DiffusionPipeline:
        """The cached base pipeline of a model, loaded on first use (tasks never change it)."""
        return self._base(ModelRef(name=model), vae="", unet="", dtype=self._dtype).pipe

    def _resolve(
        self,
        ref: str,
        variant: str | None,
        field: str,
        kind: str = "model",
        cancelled: Callable[[], bool] | None = None,
    ) -> Path:
        if ref in self._paths:
            return self._paths[ref]
        if (ref, variant, kind) in self._fetched:
            return self._fetched[(ref, variant, kind)]
        if self._store is None:
            raise ModelNotFound(ref, self.model_names, field)
        try:
            if cancelled is not None:
                return self._store.resolve(ref, variant=variant, kind=kind, cancelled=cancelled)
            return self._store.resolve(ref, variant=variant, kind=kind)
        except StippleError as exc:  # name the task field the reference came from
            if not exc.message.startswith(f"{field}:"):
                exc.message = f"{field}: {exc.message}"
                exc.args = (exc.message,)
            raise

    def _dtype_for(self, spec: TaskSpec) -> torch.dtype:
        if not self._device.startswith("cuda") or spec.dtype == "auto":
            return self._dtype
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[spec.dtype]

    def _base(self, model: ModelRef, *, vae: str, unet: str, dtype: torch.dtype) -> _Loaded:
        """The text-to-image pipeline of a model (with VAE/UNet overrides), from the LRU or loaded."""
        key = (model.name, model.variant, str(dtype), vae, unet)
        with self._lock:
            if key in self._cache:
                self.metrics.pipeline_cache.labels("hit").inc()
                self._cache.move_to_end(key)
                return self._cache[key]
            self.metrics.pipeline_cache.labels("miss").inc()
            path = self._resolve(model.name, model.variant, "base_model")
            started = time.perf_counter()
            try:
                loaded = self._load(path, model.variant, vae=vae, unet=unet, dtype=dtype)
            except BaseException:
                self.metrics.model_loads.labels("failed").inc()
                raise
            self.metrics.model_loads.labels("loaded").inc()
            self.metrics.model_load_seconds.observe(time.perf_counter() - started)
            self._cache[key] = loaded
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
                if self._device.startswith("cuda"):
                    torch.cuda.empty_cache()
            return loaded

    def _load(self, path: Path, variant: str | None, *, vae: str, unet: str, dtype: torch.dtype) -> _Loaded:
        from diffusers import AutoencoderKL, AutoPipelineForImage2Image, AutoPipelineForText2Image, UNet2DConditionModel

        family = model_family(path)
        common: dict[str, Any] = {"local_files_only": True, _DTYPE_ARG: dtype}
        if family.startswith("sdxl"):
            # Not saved in model_index.json: by default diffusers watermarks SDXL output when the
            # invisible-watermark package happens to be installed, and nodes would then disagree.
            common["add_watermarker"] = False
        if variant:
            common["variant"] = variant
        parts: dict[str, Any] = {}
        try:
            if vae:
                vae_path = self._resolve(vae, None, "vae")
                parts["vae"] = AutoencoderKL.from_pretrained(vae_path, local_files_only=True, **{_DTYPE_ARG: dtype})
            if unet:
                unet_path = self._resolve(unet, None, "unet")
                parts["unet"] = UNet2DConditionModel.from_pretrained(
                    unet_path, local_files_only=True, **{_DTYPE_ARG: dtype}
                )
            if path.is_file():
                pipe = self._load_single_file(path, family, common, parts)
            else:
                auto = AutoPipelineForImage2Image if family == "sdxl_refiner" else AutoPipelineForText2Image
                pipe = auto.from_pretrained(path, **common, **parts)
        except StippleError:
            raise
        except Exception as exc:  # diffusers raises OSError, ValueError, KeyError, ...
            raise ModelLoadFailed(f"cannot load model from {path}: {exc}") from exc
        pipe.to(self._device)
        pipe.set_progress_bar_config(disable=True)
        return _Loaded(pipe, family)

    def _load_single_file(self, path: Path, family: str, common: dict[str, Any], parts: dict[str, Any]) -> Any:
        """An original-layout checkpoint, converted by diffusers. Its component configs come
        from a diffusers folder of the same family that this node serves (nothing is fetched)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        config = next((p for p in self._paths.values() if p.is_dir() and model_family(p) == family), None)
        if config is None:
            raise ModelLoadFailed(
                f"base_model: {path.name} is a single-file {family} checkpoint; loading one needs a diffusers "
                f"folder of the same family among this node's models (STIPPLE_MODELS) for its configuration"
            )
        pipeline_class = {
            "sd": StableDiffusionPipeline,
            "sdxl": StableDiffusionXLPipeline,
            "sdxl_refiner": StableDiffusionXLImg2ImgPipeline,
        }[family]
        options = {k: v for k, v in common.items() if k != "variant"}
        return pipeline_class.from_single_file(str(path), config=str(config), **options, **parts)

    def _controlnet(self, ref: str, variant: str | None, dtype: torch.dtype) -> Any:
        from diffusers import ControlNetModel

        key = (ref, variant, str(dtype))
        with self._lock:
            if key not in self._controlnets:
                path = self._resolve(ref, variant, "controlnet.model", kind="controlnet")
                try:
                    model = ControlNetModel.from_pretrained(path, local_files_only=True, **{_DTYPE_ARG: dtype})
                except Exception as exc:
                    raise ModelLoadFailed(f"controlnet.model: cannot load ControlNet from {path}: {exc}") from exc
                self._controlnets[key] = model.to(self._device)
                while len(self._controlnets) > self._cache_size:
                    self._controlnets.popitem(last=False)
            self._controlnets.move_to_end(key)
            return self._controlnets[key]

    # ------------------------------------------------------------------ running

    def txt2img(
        self,
        *,
        model: str,
        prompt: Any,
        negative_prompt: Any,
        width: Any,
        height: Any,
        steps: Any,
        cfg: Any,
        seed: Any,
        num_images: Any,
        sampler: Any = None,
        progress: Progress | None = None,
    ) -> list[GeneratedImage]:
        """A plain txt2img task from keyword arguments (tests and benchmarks)."""
        raw = {
            "base_model": model,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "sampler": sampler,
            "task_config": {
                "image_width": width,
                "image_height": height,
                "steps": steps,
                "cfg": cfg,
                "seed": seed,
                "num_images": num_images,
            },
        }
        try:
            spec = msgspec.convert(raw, TaskSpec)
        except msgspec.ValidationError as exc:
            raise validation_error_to_invalid(exc, raw) from None
        return self.run(canonical(spec), progress)

    def run(
        self, spec: TaskSpec, progress: Progress | None = None, cancelled: Callable[[], bool] | None = None
    ) -> list[GeneratedImage]:
        """Run a task; image i uses seed + i. Raises InvalidInput (naming the field and
        value), ModelNotFound, ModelLoadFailed, OutOfMemory, or the store's errors, before
        or instead of producing images; never leaves LoRAs or embeddings behind.

        The task's models are fetched first, without the lock (`_fetch`); a download stops
        with DownloadCancelled once `cancelled()` is true."""
        spec = check_spec(spec)
        _check_node_side(spec)
        with contextlib.ExitStack() as pins:
            fetched = self._fetch(spec, cancelled, pins)
            with self._lock:
                self._fetched = fetched
                try:
                    return self._run(spec, progress)
                except torch.cuda.OutOfMemoryError as exc:
                    self._cache.clear()
                    torch.cuda.empty_cache()
                    raise OutOfMemory(f"out of GPU memory: {exc}") from exc
                finally:
                    self._fetched = {}

    def _fetch(
        self, spec: TaskSpec, cancelled: Callable[[], bool] | None, pins: contextlib.ExitStack
    ) -> dict[tuple[str, str | None, str], Path]:
        """Resolve (download) every model the task names through the store, before the lock,
        pinning each until `pins` closes; the run then finds them here. What this node serves
        by name needs no store."""
        wanted: list[tuple[str, str | None, str, str]] = [(spec.model_name, spec.model.variant, "base_model", "model")]
        wanted += [(spec.vae, None, "vae", "model"), (spec.unet, None, "unet", "model")]
        if spec.controlnet is not None:
            wanted.append((spec.controlnet.model, spec.controlnet.variant, "controlnet.model", "controlnet"))
        if spec.refiner is not None:
            wanted.append((spec.refiner.model, spec.refiner.variant, "refiner.model", "model"))
        wanted += [(lora.model, None, f"loras[{i}].model", "lora") for i, lora in enumerate(spec.loras)]
        wanted.append((spec.textual_inversion, None, "textual_inversion", "embedding"))
        fetched: dict[tuple[str, str | None, str], Path] = {}
        for ref, variant, name, kind in wanted:
            if not ref or ref in self._paths or self._store is None or (ref, variant, kind) in fetched:
                continue
            path = self._resolve(ref, variant, name, kind, cancelled)
            pin, unpin = getattr(self._store, "pin", None), getattr(self._store, "unpin", None)
            if pin is not None and unpin is not None and pin(path):
                pins.callback(unpin, path)
            fetched[(ref, variant, kind)] = path
        return fetched

    def _run(self, spec: TaskSpec, progress: Progress | None) -> list[GeneratedImage]:
        config = spec.task_config
        dtype = self._dtype_for(spec)
        with _tracer.start_as_current_span("node.load_model", attributes={"stipple.model": spec.model_name}) as span:
            base = self._base(spec.model, vae=spec.vae, unet=spec.unet, dtype=dtype)
            if base.family == "sdxl_refiner" and spec.kind == "txt2img":
                raise InvalidInput(
                    "base_model", spec.model_name, "is an SDXL refiner: use kind img2img to refine an image"
                )
            pipe = self._task_pipeline(base, spec, dtype)
            refiner = self._refiner(spec, base, dtype) if spec.refiner else None
            span.set_attribute("stipple.model_family", base.family)
        size = (config.image_width, config.image_height)
        inputs: dict[str, Any] = {}
        if spec.kind != "txt2img":
            inputs["image"] = load_image("init_image", spec.init_image, size)
            inputs["strength"] = spec.strength
        if spec.kind == "inpaint":
            inputs["mask_image"] = load_image("mask_image", spec.mask_image, size, mode="L")
        if spec.controlnet is not None:
            control = preprocess(
                load_image("controlnet.image_dataurl", spec.controlnet.image_dataurl, size),
                spec.controlnet.preprocess,
                config.seed,
                self._annotators,
            )
            inputs["control_image" if spec.kind != "txt2img" else "image"] = control
            inputs["controlnet_conditioning_scale"] = spec.controlnet.weight
        tracker = _ProgressTracker(progress, config.num_images)
        images = []
        digests: list[list[str]] = []  # per image, its checkpoints
        summaries: list[list[str]] = []  # per image, its checkpoints' summaries
        with self.metrics.denoise_seconds.time(), self._adapters(pipe, spec):
            prompts = prompt_kwargs(pipe, base.family, spec.prompt, spec.negative_prompt)
            for index in range(config.num_images):
                seed = config.seed + index
                attributes = {"stipple.image": index, "stipple.seed": seed, "stipple.steps": config.steps}
                with _tracer.start_as_current_span("node.denoise", attributes=attributes):
                    image = self._one_image(pipe, spec, prompts, inputs, refiner, seed, tracker.for_image(index))
                images.append(image)
                digests.append(tracker.checkpoints(index))
                summaries.append(tracker.summaries(index))
        if config.safety_checker:
            with _tracer.start_as_current_span("node.safety_check"):
                images = self._safety_check(images)
        with _tracer.start_as_current_span("node.encode", attributes={"stipple.images": len(images)}):
            determinism = determinism_class(self._device, dtype)
            return [
                _encode(image, config.seed + i, digests[i], determinism, summaries[i]) for i, image in enumerate(images)
            ]

    def _task_pipeline(self, base: _Loaded, spec: TaskSpec, dtype: torch.dtype) -> Any:
        """The pipeline for the task's kind, sharing the base's weights, with a fresh scheduler."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        extra: dict[str, Any] = {}
        if spec.controlnet is not None:
            extra["controlnet"] = self._controlnet(spec.controlnet.model, spec.controlnet.variant, dtype)
        if spec.textual_inversion:
            # An embedding changes the tokenizer and the text encoder, and unloading it does not
            # restore every bit (measured: later plain prompts came out different). So the task
            # gets its own copies of both, and the cached ones are never touched.
            for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"):
                if getattr(base.pipe, name, None) is not None:
                    extra[name] = copy.deepcopy(getattr(base.pipe, name))
        auto = {
            "txt2img": AutoPipelineForText2Image,
            "img2img": AutoPipelineForImage2Image,
            "inpaint": AutoPipelineForInpainting,
        }[spec.kind]
        if not extra and isinstance(base.pipe, _auto_classes(auto)):
            pipe = copy.copy(base.pipe)  # shares the weights; only this copy gets the fresh scheduler
        else:
            try:
                pipe = auto.from_pipe(base.pipe, **extra, **{_DTYPE_ARG: dtype})
            except Exception as exc:
                raise ModelLoadFailed(f"base_model: cannot run {spec.kind} on {spec.model_name!r}: {exc}") from exc
            pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = make_scheduler(base.pipe.scheduler, sampler=spec.sampler, spec=spec.scheduler)
        return pipe

    def _refiner(self, spec: TaskSpec, base: _Loaded, dtype: torch.dtype) -> Any:
        from diffusers import AutoPipelineForImage2Image

        assert spec.refiner is not None
        if base.family != "sdxl":
            raise InvalidInput("refiner", spec.refiner.model, "a refiner works only with an SDXL base model")
        key = ("refiner", spec.refiner.model, spec.refiner.variant, str(dtype), id(base.pipe))
        with self._lock:
            if key not in self._cache:
                path = self._resolve(spec.refiner.model, spec.refiner.variant, "refiner.model")
                if model_family(path) not in ("sdxl_refiner", "sdxl"):
                    raise InvalidInput("refiner.model", spec.refiner.model, "is not an SDXL model")
                shared = {"vae": base.pipe.vae, "text_encoder_2": base.pipe.text_encoder_2}
                try:
                    pipe = AutoPipelineForImage2Image.from_pretrained(
                        path, local_files_only=True, add_watermarker=False, **shared, **{_DTYPE_ARG: dtype}
                    )
                except Exception as exc:
                    raise ModelLoadFailed(f"refiner.model: cannot load refiner from {path}: {exc}") from exc
                pipe.to(self._device)
                pipe.set_progress_bar_config(disable=True)
                self._cache[key] = _Loaded(pipe, "sdxl_refiner")
                while len(self._cache) > self._cache_size + 1:
                    self._cache.popitem(last=False)
            refiner = copy.copy(self._cache[key].pipe)
        refiner.scheduler = make_scheduler(refiner.scheduler, sampler=spec.sampler, spec=spec.scheduler)
        return refiner

    @contextlib.contextmanager
    def _adapters(self, pipe: Any, spec: TaskSpec) -> Iterator[None]:
        """LoRAs (unloaded afterwards) and the textual-inversion embedding for one task."""
        names: list[str] = []
        try:
            for i, lora in enumerate(spec.loras):
                path = self._resolve(lora.model, None, f"loras[{i}].model", kind="lora")
                folder, weight_name = (path.parent, path.name) if path.is_file() else (path, lora.weight_file_name)
                try:
                    pipe.load_lora_weights(
                        str(folder), weight_name=weight_name or None, adapter_name=f"stipple_lora_{i}"
                    )
                except Exception as exc:
                    raise ModelLoadFailed(f"loras[{i}].model: cannot load LoRA {lora.model!r}: {exc}") from exc
                names.append(f"stipple_lora_{i}")  # never a substring of a parameter name
            if names:
                pipe.set_adapters(names, adapter_weights=[lora.weight for lora in spec.loras])
            if spec.textual_inversion:  # into the task's own copies (see _task_pipeline): nothing to undo
                path = self._resolve(spec.textual_inversion, None, "textual_inversion", kind="embedding")
                _load_embedding(pipe, path, spec)
            yield
        finally:
            if names:
                pipe.unload_lora_weights()

    def _one_image(
        self,
        pipe: Any,
        spec: TaskSpec,
        prompts: dict[str, Any],
        inputs: dict[str, Any],
        refiner: Any,
        seed: int,
        on_step: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]],
    ) -> Image.Image:
        config = spec.task_config
        call: dict[str, Any] = {
            **prompts,
            **inputs,
            "num_inference_steps": config.steps,
            "guidance_scale": float(config.cfg),
            "num_images_per_prompt": 1,
            "generator": torch.Generator("cpu").manual_seed(seed),
            "callback_on_step_end": on_step,
            "callback_on_step_end_tensor_inputs": ["latents"],
        }
        if spec.kind == "txt2img":
            call["width"], call["height"] = config.image_width, config.image_height
        ensemble = refiner is not None and spec.controlnet is None and spec.kind == "txt2img"
        assert spec.refiner is not None or refiner is None
        with torch.inference_mode():
            if ensemble:
                cutoff = spec.refiner.denoising_cutoff  # type: ignore[union-attr]
                latents = pipe(**call, denoising_end=cutoff, output_type="latent").images
                return refiner(
                    prompt=spec.prompt,
                    negative_prompt=spec.negative_prompt,
                    image=latents,
                    num_inference_steps=spec.refiner.steps,  # type: ignore[union-attr]
                    denoising_start=cutoff,
                    guidance_scale=float(config.cfg),
                    generator=torch.Generator("cpu").manual_seed(seed),
                    callback_on_step_end=on_step,
                    callback_on_step_end_tensor_inputs=["latents"],
                ).images[0]
            image = pipe(**call, output_type="pil").images[0]
            if refiner is not None:  # with ControlNet (or img2img): the refiner polishes the finished image
                image = refiner(
                    prompt=spec.prompt,
                    negative_prompt=spec.negative_prompt,
                    image=image,
                    num_inference_steps=spec.refiner.steps,  # type: ignore[union-attr]
                    guidance_scale=float(config.cfg),
                    generator=torch.Generator("cpu").manual_seed(seed),
                    callback_on_step_end=on_step,
                    callback_on_step_end_tensor_inputs=["latents"],
                ).images[0]
            return image

    def _safety_check(self, images: list[Image.Image]) -> list[Image.Image]:
        """Black out images the safety checker flags (as diffusers and Crynux do)."""
        import numpy as np

        checker, extractor = self._safety_models()
        features = extractor(images, return_tensors="pt").pixel_values.to(self._device)
        arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        with torch.inference_mode():
            _checked, flagged = checker(images=arrays, clip_input=features.to(checker.dtype))
        return [Image.new("RGB", image.size) if flag else image for image, flag in zip(images, flagged, strict=True)]

    def _safety_models(self) -> tuple[Any, Any]:
        if self._safety is None:
            if self._safety_checker_path is None:
                raise SafetyCheckerUnavailable(
                    "task_config.safety_checker: this node has no safety checker model (STIPPLE_SAFETY_CHECKER)"
                )
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import CLIPImageProcessor

            path = self._safety_checker_path
            try:
                checker = StableDiffusionSafetyChecker.from_pretrained(path, local_files_only=True).to(self._device)
                extractor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
            except Exception as exc:
                raise SafetyCheckerUnavailable(f"task_config.safety_checker: cannot load {path}: {exc}") from exc
            self._safety = (checker, extractor)
        return self._safety


GENERIC_EMBEDDING_KEYS = frozenset({"emb_params", "string_to_param", "*", "clip_l", "clip_g"})


def _load_embedding(pipe: Any, path: Path, spec: TaskSpec) -> None:
    """Load a textual-inversion embedding into every text encoder it has vectors for.
    The token is the task's, else the one the file names, else the file's name
    (A1111's convention: `easynegative.safetensors` is `easynegative`)."""
    from safetensors.torch import load_file

    field = "textual_inversion"
    try:
        tensors = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(str(path), weights_only=True)
    except Exception as exc:
        raise ModelLoadFailed(f"{field}: cannot read embedding {spec.textual_inversion!r}: {exc}") from exc
    if "string_to_param" in tensors:  # A1111 .pt layout
        tensors = {"emb_params": next(iter(tensors["string_to_param"].values()))}
    keys = set(tensors)
    token = spec.textual_inversion_token or (path.stem if keys <= GENERIC_EMBEDDING_KEYS else next(iter(keys)))
    targets: list[tuple[Any, Any, Any]] = []
    if "clip_l" in keys or "clip_g" in keys:  # SDXL: one set of vectors per text encoder
        if getattr(pipe, "text_encoder_2", None) is None:
            raise InvalidInput(field, spec.textual_inversion, "is an SDXL embedding; the base model is not SDXL")
        targets = [
            (pipe.text_encoder, pipe.tokenizer, tensors["clip_l"]),
            (pipe.text_encoder_2, pipe.tokenizer_2, tensors["clip_g"]),
        ]
    else:
        if getattr(pipe, "text_encoder", None) is None:
            raise InvalidInput(field, spec.textual_inversion, "this model has no first text encoder")
        targets = [(pipe.text_encoder, pipe.tokenizer, next(iter(tensors.values())))]
    try:
        for text_encoder, tokenizer, vectors in targets:
            pipe.load_textual_inversion(vectors, token=token, text_encoder=text_encoder, tokenizer=tokenizer)
    except Exception as exc:
        raise ModelLoadFailed(f"{field}: cannot load embedding {spec.textual_inversion!r}: {exc}") from exc


def _auto_classes(auto: Any) -> tuple[type, ...]:
    """The pipeline classes an auto pipeline maps to (to reuse a loaded one as it is)."""
    from diffusers.pipelines import auto_pipeline

    mapping = {
        "AutoPipelineForText2Image": auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
        "AutoPipelineForImage2Image": auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        "AutoPipelineForInpainting": auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
    }[auto.__name__]
    return tuple(mapping.values())


def _check_node_side(spec: TaskSpec) -> None:
    """What the gateway settles before a task reaches a node."""
    config = spec.task_config
    if config.seed < 0:
        raise InvalidInput(
            "task_config.seed", config.seed, "must be resolved to 0..4294967295 before it reaches a node"
        )


class _ProgressTracker:
    """Step progress over all images and phases (base, refiner) of a task, and each image's
    checkpoints (stipple_common.checkpoints: its latents hashed after 1/4, 1/2 and 3/4 of the
    first phase's steps).

    The total is known per phase only once it starts, so it is estimated from the first
    image and can grow once, when a refiner phase begins."""

    def __init__(self, progress: Progress | None, num_images: int) -> None:
        self.progress = progress
        self.num_images = num_images
        self.done = 0
        self.per_image = 0
        self.phase_steps: dict[int, int] = {}
        self._first_phase: dict[int, int] = {}  # image -> id of the pipeline that ran first
        self._digests: dict[int, dict[int, str]] = {}  # image -> step -> digest of its latents
        self._summaries: dict[int, dict[int, str]] = {}  # image -> step -> summary of its latents
        self._steps: dict[int, list[int]] = {}  # image -> the steps hashed (checkpoints.steps)

    def checkpoints(self, index: int) -> list[str]:
        """The image's checkpoint digests, one per fraction (empty if it ran no step)."""
        digests = self._digests.get(index, {})
        if not digests:
            return []
        return [digests[step] for step in self._steps.get(index, []) if step in digests]

    def summaries(self, index: int) -> list[str]:
        """The image's checkpoint summaries (checkpoints.summary), one per fraction."""
        summaries = self._summaries.get(index, {})
        return [summaries[step] for step in self._steps.get(index, []) if step in summaries]

    def for_image(self, index: int) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if index == 0 and id(pipe) not in self.phase_steps:
                self.phase_steps[id(pipe)] = int(pipe.num_timesteps)
                self.per_image = sum(self.phase_steps.values())
            first = self._first_phase.setdefault(index, id(pipe))
            if first == id(pipe):
                wanted = self._steps.setdefault(index, checkpoints.steps(int(pipe.num_timesteps)))
                if step in wanted and "latents" in tensors:
                    latents = tensors["latents"].detach().to(device="cpu", dtype=torch.float32).contiguous()
                    self._digests.setdefault(index, {})[step] = checkpoints.digest(latents.numpy().tobytes())
                    self._summaries.setdefault(index, {})[step] = checkpoints.summary(latents.numpy())
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, max(self.done, self.num_images * self.per_image))
            return tensors

        return on_step_end


def _dtype_arg() -> str:
    """Newer diffusers take `dtype` and deprecate `torch_dtype`; older ones know only `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


_DTYPE_ARG = _dtype_arg()


def _encode(
    image: Image.Image, seed: int, checkpoints: list[str], determinism: str, summaries: list[str] | None = None
) -> GeneratedImage:
    """PNG bytes (no text chunks, fixed compression, so equal pixels give equal bytes) and the perceptual hash."""
    image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return GeneratedImage(
        png=buffer.getvalue(),
        phash=image_phash(image),
        seed=seed,
        width=image.width,
        height=image.height,
        checkpoints=checkpoints,
        determinism=determinism,
        summaries=summaries or [],
    )
