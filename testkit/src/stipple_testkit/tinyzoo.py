"""A zoo of tiny, locally built models around the tiny SD 1.5 model, for tests and demos.

`stipple_node.tinymodel` builds a tiny SD-1.5-shaped pipeline; this module adds what a node
also handles in real life, each in the on-disk format diffusers loads and with seeded random
weights (the same bytes on every machine for the same seed), small (pipelines 7-11 MB,
ControlNets 3-5 MB, LoRAs 150-350 kB, embeddings < 1 kB) and each built in under a second:

* `make_tiny_sdxl`: a StableDiffusionXLPipeline folder (two text encoders and tokenizers,
  the "text_time" added conditioning, 8x VAE, SDXL's Euler scheduler config).
* `make_tiny_sdxl_refiner`: an SDXL refiner folder (text_encoder_2/tokenizer_2 only,
  aesthetic-score conditioning) whose VAE and text_encoder_2 are the base's, so that it
  works with `make_tiny_sdxl` as an ensemble of expert denoisers.
* `make_tiny_controlnet`: a ControlNetModel for the tiny SD 1.5 model or the tiny SDXL.
* `make_tiny_lora`: a LoRA file (diffusers/PEFT keys or kohya-ss keys) for either base.
* `make_tiny_textual_inversion`: an embedding file (A1111 or diffusers layout; SDXL's
  clip_l/clip_g layout for the tiny SDXL).
* `make_tiny_vae`: another AutoencoderKL for the tiny SD 1.5 model.
* `make_tiny_sd15_inpaint`: the tiny SD 1.5 model with a 9-channel inpainting UNet.

`build_zoo(root)` builds all of them into `root/<name>`.

Every function is idempotent: an artifact that is already complete is returned at once. It
is written into a temporary sibling and renamed into place (`os.replace`), so a reader or a
concurrent builder never sees a half-written one. Building never disturbs the caller's
global torch RNG (it runs under `torch.random.fork_rng`).

Where a LoRA, ControlNet or embedding would be all zeros or tiny in a fresh initialisation
(LoRA's B matrices, ControlNet's zero convolutions), random values of a normal size are used
instead, so that each artifact visibly changes the image, as a trained one does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from stipple_common.errors import StippleError
from stipple_node import tinymodel
from stipple_node.tinymodel import MODEL_INDEX, TINY_MODEL_NAME, make_tiny_model, write_clip_tokenizer_files

if TYPE_CHECKING:
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

Base = Literal["sd15", "sdxl"]
LoraFormat = Literal["peft", "kohya"]
EmbeddingFormat = Literal["a1111", "diffusers"]

# Names under which `build_zoo` builds each artifact.
TINY_SDXL_NAME = "tiny-sdxl"
TINY_SDXL_REFINER_NAME = "tiny-sdxl-refiner"
TINY_CONTROLNET_SD15_NAME = "tiny-controlnet-sd15"
TINY_CONTROLNET_SDXL_NAME = "tiny-controlnet-sdxl"
TINY_LORA_SD15_NAME = "tiny-lora-sd15.safetensors"
TINY_LORA_SDXL_NAME = "tiny-lora-sdxl.safetensors"
TINY_LORA_SD15_KOHYA_NAME = "tiny-lora-sd15-kohya.safetensors"
TINY_LORA_SDXL_KOHYA_NAME = "tiny-lora-sdxl-kohya.safetensors"
TINY_TI_SD15_NAME = "tiny-ti-sd15.safetensors"
TINY_TI_SDXL_NAME = "tiny-ti-sdxl.safetensors"
TINY_VAE_NAME = "tiny-vae"
TINY_SD15_INPAINT_NAME = "tiny-sd-inpaint"

TI_TOKEN = "<stipple-cat>"
"""The token `build_zoo`'s textual-inversion embeddings are meant to be loaded under."""

ZOO_SEEDS: dict[str, int] = {
    TINY_MODEL_NAME: 0,
    TINY_SDXL_NAME: 0,
    TINY_SDXL_REFINER_NAME: 1,
    TINY_CONTROLNET_SD15_NAME: 2,
    TINY_CONTROLNET_SDXL_NAME: 2,
    TINY_LORA_SD15_NAME: 3,
    TINY_LORA_SDXL_NAME: 3,
    TINY_LORA_SD15_KOHYA_NAME: 3,
    TINY_LORA_SDXL_KOHYA_NAME: 3,
    TINY_TI_SD15_NAME: 4,
    TINY_TI_SDXL_NAME: 4,
    TINY_VAE_NAME: 5,
    TINY_SD15_INPAINT_NAME: 6,
}
"""The seed each artifact of `build_zoo` is built with (the functions' defaults)."""

# SD 1.5 sizes: those of tinymodel.
SD15_TEXT_HIDDEN = tinymodel.TEXT_HIDDEN

# SDXL sizes. SDXL has (320, 640, 1280) UNet channels with (1, 2, 10) transformer layers,
# CLIP ViT-L (768) + OpenCLIP ViT-bigG (1280, projected to 1280) text encoders, 256-wide
# time-id embeddings and a (128, 256, 512, 512) VAE. The two tiny text encoders have
# different widths, as the real ones do, so that mixing them up fails loudly.
XL_UNET_CHANNELS = (32, 32, 64)
XL_UNET_HEADS = (2, 2, 4)
XL_TRANSFORMER_LAYERS = (1, 1, 2)
XL_TEXT_HIDDEN = 32  # text_encoder (CLIP ViT-L in SDXL)
XL_TEXT2_HIDDEN = 48  # text_encoder_2 (OpenCLIP ViT-bigG in SDXL), projection_dim too
XL_TIME_EMBED = 8  # addition_time_embed_dim
XL_LAYERS_PER_BLOCK = 2  # as SDXL (and its refiner)
XL_CROSS_ATTENTION = XL_TEXT_HIDDEN + XL_TEXT2_HIDDEN
XL_VAE_SCALING = 0.13025
# The refiner (SDXL: (384, 768, 1536, 1536) channels, 4 transformer layers, text_encoder_2 only).
XL_REFINER_CHANNELS = (32, 32, 64, 64)
XL_REFINER_HEADS = (2, 2, 4, 4)
CONTROLNET_COND_CHANNELS = (8, 8, 16, 16)
"""ControlNet's conditioning-image encoder (real ones: (16, 32, 96, 256)); 4 entries = 8x down."""
CONTROLNET_COND_GAIN = 16.0
"""Scale of the conditioning encoder's last conv: its output then has about the size of the UNet's conv_in features."""

LORA_STRENGTH = 1.0
"""Size of a tiny LoRA's update relative to the weight it adapts (1.0: about the same)."""


# -- building helpers -------------------------------------------------------------------


_build_folder = tinymodel.build_folder


def _build_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(temporary file)` next to `path` and rename it into place; an existing file is kept."""
    path = Path(path)
    if path.is_file():
        return path
    if path.exists():
        raise StippleError(f"cannot create {path}: it exists and is not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.building-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    staging = Path(name)
    try:
        write(staging)
        staging.chmod(0o644)
        os.replace(staging, path)  # atomic; a concurrent builder writes the same bytes
    finally:
        staging.unlink(missing_ok=True)
    return path


@contextmanager
def _seeded() -> Iterator[Callable[[int], object]]:
    """Yield `torch.manual_seed`, restoring the caller's CPU RNG state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        yield torch.manual_seed


def _check_base(base: str) -> None:
    if base not in ("sd15", "sdxl"):
        raise ValueError(f"base must be 'sd15' or 'sdxl', got {base!r}")


# -- components ---------------------------------------------------------------------------
# diffusers and transformers are imported inside functions: they take seconds to import.


def _sd15_unet(in_channels: int = 4) -> UNet2DConditionModel:
    """tinymodel's UNet (same config; `in_channels=9` for inpainting)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tinymodel.UNET_CHANNELS,
        layers_per_block=1,
        attention_head_dim=tinymodel.UNET_HEADS,
        cross_attention_dim=tinymodel.TEXT_HIDDEN,
        norm_num_groups=tinymodel.NORM_GROUPS,
    )


def _vae(scaling_factor: float, *, force_upcast: bool = True) -> AutoencoderKL:
    """tinymodel's VAE layout (8x down, 4 latent channels)."""
    return tinymodel.tiny_vae(scaling_factor=scaling_factor, force_upcast=force_upcast)


def _sdxl_unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,  # latent side of the default 64x64 image
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=XL_UNET_CHANNELS,
        layers_per_block=XL_LAYERS_PER_BLOCK,
        transformer_layers_per_block=XL_TRANSFORMER_LAYERS,
        attention_head_dim=XL_UNET_HEADS,
        cross_attention_dim=XL_CROSS_ATTENTION,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_EMBED,
        # pooled text_encoder_2 output + 6 time ids (original size, crop top-left, target size)
        projection_class_embeddings_input_dim=XL_TEXT2_HIDDEN + 6 * XL_TIME_EMBED,
        norm_num_groups=tinymodel.NORM_GROUPS,
    )


def _sdxl_refiner_unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=XL_REFINER_CHANNELS,
        layers_per_block=XL_LAYERS_PER_BLOCK,
        transformer_layers_per_block=1,
        attention_head_dim=XL_REFINER_HEADS,
        cross_attention_dim=XL_TEXT2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_EMBED,
        # pooled text_encoder_2 output + 5 time ids (original size, crop top-left, aesthetic score)
        projection_class_embeddings_input_dim=XL_TEXT2_HIDDEN + 5 * XL_TIME_EMBED,
        norm_num_groups=tinymodel.NORM_GROUPS,
    )


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's scheduler config."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


def _tokenizer(folder: Path, *, pad_token: str | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer read from the generated vocab.json/merges.txt in `folder`."""
    from transformers import CLIPTokenizer

    vocab_size = write_clip_tokenizer_files(folder)
    extra = {"pad_token": pad_token} if pad_token is not None else {}
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=tinymodel.MAX_TOKENS,
        **extra,
    )
    if len(tokenizer) != vocab_size:
        raise StippleError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    return tokenizer


def _text_encoder(
    tokenizer: CLIPTokenizer, hidden: int, *, act: str, projection: bool
) -> CLIPTextModel | CLIPTextModelWithProjection:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=tinymodel.TEXT_LAYERS,  # SDXL uses the penultimate layer's output: at least 2
        num_attention_heads=tinymodel.TEXT_HEADS,
        max_position_embeddings=tinymodel.MAX_TOKENS,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _sdxl_text_encoder_2(
    seed_fn: Callable[[int], object], base_seed: int, folder: Path
) -> tuple[CLIPTokenizer, CLIPTextModelWithProjection]:
    """tokenizer_2 and text_encoder_2 of the tiny SDXL built with `base_seed` (the refiner shares them)."""
    # SDXL's tokenizer_2 pads with "!" (id 0) where tokenizer pads with <|endoftext|>.
    tokenizer_2 = _tokenizer(folder, pad_token="!")
    seed_fn(base_seed + 2)
    text_encoder_2 = _text_encoder(tokenizer_2, XL_TEXT2_HIDDEN, act="gelu", projection=True)
    return tokenizer_2, text_encoder_2


def _sdxl_pipeline(seed: int, staging: Path) -> StableDiffusionXLPipeline:
    from diffusers import StableDiffusionXLPipeline

    with _seeded() as seed_fn:
        tokenizer = _tokenizer(staging / "tokenizer")
        tokenizer_2, text_encoder_2 = _sdxl_text_encoder_2(seed_fn, seed, staging / "tokenizer_2")
        seed_fn(seed)
        unet = _sdxl_unet()
        seed_fn(seed)
        vae = _vae(XL_VAE_SCALING)
        seed_fn(seed + 1)
        text_encoder = _text_encoder(tokenizer, XL_TEXT_HIDDEN, act="quick_gelu", projection=False)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _sdxl_refiner_pipeline(seed: int, base_seed: int, staging: Path) -> StableDiffusionXLImg2ImgPipeline:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    with _seeded() as seed_fn:
        tokenizer_2, text_encoder_2 = _sdxl_text_encoder_2(seed_fn, base_seed, staging / "tokenizer_2")
        seed_fn(base_seed)
        vae = _vae(XL_VAE_SCALING)  # the base's VAE: the refiner denoises the base's latents
        seed_fn(seed)
        unet = _sdxl_refiner_unet()
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sdxl_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


# -- public builders ----------------------------------------------------------------------


def make_tiny_sdxl(directory: Path, *, seed: int = ZOO_SEEDS[TINY_SDXL_NAME]) -> Path:
    """Build a tiny StableDiffusionXLPipeline folder into `directory` and return it.

    Loads with `AutoPipelineForText2Image` / `AutoPipelineForImage2Image` /
    `AutoPipelineForInpainting.from_pretrained(directory)`; renders 64x64 by default.
    """

    def write(staging: Path) -> None:
        _sdxl_pipeline(seed, staging).save_pretrained(staging, safe_serialization=True)

    return _build_folder(Path(directory), MODEL_INDEX, write)


def make_tiny_sdxl_refiner(
    directory: Path, *, seed: int = ZOO_SEEDS[TINY_SDXL_REFINER_NAME], base_seed: int = ZOO_SEEDS[TINY_SDXL_NAME]
) -> Path:
    """Build a tiny SDXL refiner (StableDiffusionXLImg2ImgPipeline folder) into `directory`.

    Like SDXL's refiner it has only text_encoder_2/tokenizer_2 and takes an aesthetic score;
    its VAE and text_encoder_2 are bit-identical to those of `make_tiny_sdxl(seed=base_seed)`,
    so `refiner(image=base_latents, denoising_start=f)` continues `base(..., denoising_end=f,
    output_type="latent")`.
    """

    def write(staging: Path) -> None:
        _sdxl_refiner_pipeline(seed, base_seed, staging).save_pretrained(staging, safe_serialization=True)

    return _build_folder(Path(directory), MODEL_INDEX, write)


def make_tiny_controlnet(
    directory: Path, *, base: Base = "sd15", seed: int = ZOO_SEEDS[TINY_CONTROLNET_SD15_NAME]
) -> Path:
    """Build a ControlNetModel folder for the tiny SD 1.5 model (`base="sd15"`) or the tiny SDXL.

    Its zero convolutions have random weights, so the control image changes the output.
    """
    _check_base(base)

    def write(staging: Path) -> None:
        import torch
        from diffusers import ControlNetModel

        with torch.device("meta"):  # only the config is used
            unet = _sd15_unet() if base == "sd15" else _sdxl_unet()
        with _seeded() as seed_fn:
            seed_fn(seed)
            controlnet: ControlNetModel = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=CONTROLNET_COND_CHANNELS, load_weights_from_unet=False
            )
            _randomize_zero_convs(controlnet)
        controlnet.save_pretrained(staging, safe_serialization=True)

    return _build_folder(Path(directory), "config.json", write)


def _randomize_zero_convs(controlnet: ControlNetModel) -> None:
    """Give a fresh ControlNet's zero convolutions (and its conditioning encoder) weights of a
    normal size, so that the control image shapes the output as in a trained ControlNet.

    PyTorch's default conv init shrinks the control image's signal about tenfold per layer
    (and its random biases swamp it), so the encoder gets He-initialised weights and no
    biases, and its output is scaled to about the size of the UNet's first features.
    """
    import torch

    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for module in embedding.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                torch.nn.init.zeros_(module.bias)
        embedding.conv_out.weight.mul_(CONTROLNET_COND_GAIN)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="linear")
            torch.nn.init.zeros_(conv.bias)


def make_tiny_vae(directory: Path, *, seed: int = ZOO_SEEDS[TINY_VAE_NAME]) -> Path:
    """Build an AutoencoderKL folder that fits the tiny SD 1.5 model (same layout and scaling) but has other weights."""

    def write(staging: Path) -> None:
        with _seeded() as seed_fn:
            seed_fn(seed)
            vae = _vae(0.18215, force_upcast=True)
        vae.save_pretrained(staging, safe_serialization=True)

    return _build_folder(Path(directory), "config.json", write)


def make_tiny_sd15_inpaint(directory: Path, *, seed: int = ZOO_SEEDS[TINY_SD15_INPAINT_NAME]) -> Path:
    """Build the tiny SD 1.5 model with a 9-channel UNet (latents + mask + masked-image latents),
    as in SD 1.5's inpainting model; its model_index names StableDiffusionInpaintPipeline.

    Text encoder, tokenizer and VAE are those of `make_tiny_model(seed=0)`.
    """

    def write(staging: Path) -> None:
        make_tiny_model(staging / "model")
        for child in (staging / "model").iterdir():
            child.rename(staging / child.name)
        (staging / "model").rmdir()
        shutil.rmtree(staging / "unet")
        with _seeded() as seed_fn:
            seed_fn(seed)
            unet = _sd15_unet(in_channels=9)
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        index_path = staging / MODEL_INDEX
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["_class_name"] = "StableDiffusionInpaintPipeline"
        index_path.unlink()  # written last again: its presence means "complete"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return _build_folder(Path(directory), MODEL_INDEX, write)


_ONE_METADATA_KEY = {"format": "pt"}
"""safetensors writes its metadata map in a random order, so a file with two or more metadata
entries is not byte-for-byte reproducible; hence just the one that `save_pretrained` writes."""


def _lora_targets(base: Base) -> dict[str, list[tuple[str, int, int]]]:
    """{component: [(module name, in_features, out_features)]} that a typical LoRA adapts:
    the UNet's attention projections and the text encoders' self-attention projections."""
    import torch

    with torch.device("meta"):
        unet = _sd15_unet() if base == "sd15" else _sdxl_unet()
    unet_targets = [
        (name, module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if ".transformer_blocks." in name and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    ]

    def text(hidden: int) -> list[tuple[str, int, int]]:
        return [
            (f"text_model.encoder.layers.{i}.self_attn.{proj}", hidden, hidden)
            for i in range(tinymodel.TEXT_LAYERS)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        ]

    if base == "sd15":
        return {"unet": unet_targets, "text_encoder": text(SD15_TEXT_HIDDEN)}
    return {"unet": unet_targets, "text_encoder": text(XL_TEXT_HIDDEN), "text_encoder_2": text(XL_TEXT2_HIDDEN)}


def _kohya_unet_name(name: str, base: Base) -> str:
    """kohya-ss's name for a diffusers UNet module: diffusers names for SD 1.x (kohya trains
    those on the diffusers UNet), the original "sgm" names (input_blocks.N.1...) for SDXL."""
    if base == "sdxl":
        layers_per_block = XL_LAYERS_PER_BLOCK
        parts = name.split(".")
        if parts[0] == "down_blocks":  # down_blocks.<b>.attentions.<l>.<rest>
            index = 1 + int(parts[1]) * (layers_per_block + 1) + int(parts[3])
            name = f"input_blocks.{index}.1." + ".".join(parts[4:])
        elif parts[0] == "up_blocks":
            index = int(parts[1]) * (layers_per_block + 1) + int(parts[3])
            name = f"output_blocks.{index}.1." + ".".join(parts[4:])
        else:  # mid_block.attentions.0.<rest>
            name = "middle_block.1." + ".".join(parts[3:])
    return "lora_unet_" + name.replace(".", "_")


def make_tiny_lora(
    path: Path,
    *,
    base: Base = "sd15",
    rank: int = 4,
    seed: int = ZOO_SEEDS[TINY_LORA_SD15_NAME],
    fmt: LoraFormat = "peft",
    strength: float = LORA_STRENGTH,
) -> Path:
    """Write a LoRA .safetensors for the tiny SD 1.5 model or the tiny SDXL to `path`.

    It adapts every UNet attention projection (to_q/k/v/out.0) and the text encoders'
    self-attention projections. `fmt="peft"`: diffusers' own keys ("unet.<module>.lora_A.weight",
    "text_encoder.<module>.lora_B.weight"; scale 1). `fmt="kohya"`: kohya-ss/A1111 keys
    ("lora_unet_<module>.lora_down.weight", "lora_te_..." / "lora_te1_"/"lora_te2_" for SDXL,
    ".alpha" = rank) with the same weights, so both formats give the same images.
    Load with `pipe.load_lora_weights(path.parent, weight_name=path.name)`.
    """
    _check_base(base)
    if fmt not in ("peft", "kohya"):
        raise ValueError(f"fmt must be 'peft' or 'kohya', got {fmt!r}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")

    def write(staging: Path) -> None:
        import torch
        from safetensors.torch import save_file

        targets = _lora_targets(base)
        tensors: dict[str, torch.Tensor] = {}
        with _seeded() as seed_fn:
            seed_fn(seed)
            for component, modules in targets.items():
                for name, fan_in, fan_out in modules:
                    # B @ A has entries of about strength / sqrt(fan_in), like the weight it is added to.
                    down = torch.randn(rank, fan_in) / fan_in**0.5
                    up = torch.randn(fan_out, rank) * (strength / rank**0.5)
                    if fmt == "peft":
                        tensors[f"{component}.{name}.lora_A.weight"] = down
                        tensors[f"{component}.{name}.lora_B.weight"] = up
                    else:
                        if component == "unet":
                            key = _kohya_unet_name(name, base)
                        else:
                            prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
                            key = ("lora_te_" if base == "sd15" else prefix) + name.replace(".", "_")
                        tensors[f"{key}.lora_down.weight"] = down
                        tensors[f"{key}.lora_up.weight"] = up
                        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging), metadata=_ONE_METADATA_KEY)

    return _build_file(Path(path), write)


def make_tiny_textual_inversion(
    path: Path,
    *,
    token: str = TI_TOKEN,
    base: Base = "sd15",
    vectors: int = 2,
    fmt: EmbeddingFormat = "a1111",
    seed: int = ZOO_SEEDS[TINY_TI_SD15_NAME],
) -> Path:
    """Write a textual-inversion embedding (.safetensors) of `vectors` tokens to `path`.

    SD 1.5, `fmt="a1111"`: {"emb_params": [vectors, 32]} (A1111's safetensors layout; the
    token is not stored, the caller names it). `fmt="diffusers"`: {token: [vectors, 32]} (what
    diffusers' training script saves). Load with `pipe.load_textual_inversion(path, token=token)`.
    SDXL: {"clip_l": [vectors, 32], "clip_g": [vectors, 48]} (the SDXL embedding layout, `fmt`
    is ignored); load each into its text encoder (see `load_sdxl_textual_inversion`).
    """
    _check_base(base)
    if fmt not in ("a1111", "diffusers"):
        raise ValueError(f"fmt must be 'a1111' or 'diffusers', got {fmt!r}")
    if vectors < 1:
        raise ValueError(f"vectors must be at least 1, got {vectors}")

    def write(staging: Path) -> None:
        import torch
        from safetensors.torch import save_file

        with _seeded() as seed_fn:
            seed_fn(seed)
            # Norm about 1 per vector: larger than the tiny CLIP's token embeddings (std 0.02 per
            # dimension), so that the learned "concept" is clearly visible.
            if base == "sd15":
                embedding = torch.randn(vectors, SD15_TEXT_HIDDEN) / SD15_TEXT_HIDDEN**0.5
                tensors = {"emb_params" if fmt == "a1111" else token: embedding}
            else:
                clip_l = torch.randn(vectors, XL_TEXT_HIDDEN) / XL_TEXT_HIDDEN**0.5
                clip_g = torch.randn(vectors, XL_TEXT2_HIDDEN) / XL_TEXT2_HIDDEN**0.5
                tensors = {"clip_l": clip_l, "clip_g": clip_g}
        save_file(tensors, str(staging), metadata=_ONE_METADATA_KEY)

    return _build_file(Path(path), write)


def load_sdxl_textual_inversion(pipe: object, path: Path, token: str) -> None:
    """Load an SDXL embedding file ({"clip_l", "clip_g"}) into both text encoders of `pipe`."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    pipe.load_textual_inversion(  # type: ignore[attr-defined]
        state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    pipe.load_textual_inversion(  # type: ignore[attr-defined]
        state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )


ZOO_NAMES: tuple[str, ...] = tuple(ZOO_SEEDS)


def build_zoo(root: Path) -> dict[str, Path]:
    """Build every artifact of `ZOO_NAMES` into `root/<name>`, with its seed from `ZOO_SEEDS`; return {name: path}."""
    root = Path(root)
    builders: dict[str, Callable[[Path, int], Path]] = {
        TINY_MODEL_NAME: lambda p, seed: make_tiny_model(p, seed=seed),
        TINY_SDXL_NAME: lambda p, seed: make_tiny_sdxl(p, seed=seed),
        TINY_SDXL_REFINER_NAME: lambda p, seed: make_tiny_sdxl_refiner(
            p, seed=seed, base_seed=ZOO_SEEDS[TINY_SDXL_NAME]
        ),
        TINY_CONTROLNET_SD15_NAME: lambda p, seed: make_tiny_controlnet(p, base="sd15", seed=seed),
        TINY_CONTROLNET_SDXL_NAME: lambda p, seed: make_tiny_controlnet(p, base="sdxl", seed=seed),
        TINY_LORA_SD15_NAME: lambda p, seed: make_tiny_lora(p, base="sd15", seed=seed),
        TINY_LORA_SDXL_NAME: lambda p, seed: make_tiny_lora(p, base="sdxl", seed=seed),
        TINY_LORA_SD15_KOHYA_NAME: lambda p, seed: make_tiny_lora(p, base="sd15", fmt="kohya", seed=seed),
        TINY_LORA_SDXL_KOHYA_NAME: lambda p, seed: make_tiny_lora(p, base="sdxl", fmt="kohya", seed=seed),
        TINY_TI_SD15_NAME: lambda p, seed: make_tiny_textual_inversion(p, base="sd15", seed=seed),
        TINY_TI_SDXL_NAME: lambda p, seed: make_tiny_textual_inversion(p, base="sdxl", seed=seed),
        TINY_VAE_NAME: lambda p, seed: make_tiny_vae(p, seed=seed),
        TINY_SD15_INPAINT_NAME: lambda p, seed: make_tiny_sd15_inpaint(p, seed=seed),
    }
    return {name: builders[name](root / name, ZOO_SEEDS[name]) for name in ZOO_NAMES}


# --------------------------------------------------------------------------- single-file checkpoints

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION_TO_LDM = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _unet_key_to_ldm(key: str, layers: int, up_attentions: set[int]) -> str:
    """One diffusers UNet key in the original (LDM) layout: the inverse of diffusers'
    `convert_ldm_unet_checkpoint` for SD 1.x/2.x UNets."""
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    parts = key.split(".")
    stride = layers + 1
    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{block * stride + index + 1}.0.{_rename(rest, _RESNET_TO_LDM)}"
        if kind == "attentions":
            return f"input_blocks.{block * stride + index + 1}.1.{rest}"
        return f"input_blocks.{block * stride + stride}.0.op.{parts[-1]}"  # downsamplers.0.conv.*
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_rename(rest, _RESNET_TO_LDM)}"
        return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{block * stride + index}.0.{_rename(rest, _RESNET_TO_LDM)}"
        if kind == "attentions":
            return f"output_blocks.{block * stride + index}.1.{rest}"
        slot = 2 if block in up_attentions else 1
        return f"output_blocks.{block * stride + layers}.{slot}.conv.{parts[-1]}"  # upsamplers.0.conv.*
    raise ValueError(f"no LDM name for UNet key {key!r}")


def _vae_key_to_ldm(key: str, num_up: int) -> str:
    """One diffusers VAE key in the original layout (inverse of `convert_ldm_vae_checkpoint`)."""
    parts = key.split(".")
    side = parts[0]
    if len(parts) == 2 or parts[1] in ("conv_in", "conv_out", "quant_conv", "post_quant_conv"):
        return key
    if parts[1] == "conv_norm_out":
        return f"{side}.norm_out.{parts[-1]}"
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
        return f"{side}.mid.attn_1.{_rename('.'.join(parts[4:]), _VAE_ATTENTION_TO_LDM)}"
    block = int(parts[2])
    if parts[1] == "down_blocks":
        if parts[3] == "resnets":
            rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            return f"encoder.down.{block}.block.{parts[4]}.{rest}"
        return f"encoder.down.{block}.downsample.conv.{parts[-1]}"
    ldm_block = num_up - 1 - block
    if parts[3] == "resnets":
        rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"decoder.up.{ldm_block}.block.{parts[4]}.{rest}"
    return f"decoder.up.{ldm_block}.upsample.conv.{parts[-1]}"


def _rename(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def save_single_file(folder: Path, path: Path) -> Path:
    """Write an SD 1.x/2.x diffusers folder as one original-layout (LDM) .safetensors
    checkpoint, the format AUTOMATIC1111 and Civitai use, so that single-file loading
    can be tested without a download."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    layers = unet.config.layers_per_block
    up_attentions = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        tensors["model.diffusion_model." + _unet_key_to_ldm(key, layers, up_attentions)] = value
    for key, value in vae.state_dict().items():
        ldm = _vae_key_to_ldm(key, len(vae.config.up_block_types))
        if ".attn_1." in ldm and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        tensors["first_stage_model." + ldm] = value
    for key, value in text.state_dict().items():
        # transformers 5 drops the `text_model.` level from CLIPTextModel's own names
        full = key if key.startswith("text_model.") else "text_model." + key
        tensors["cond_stage_model.transformer." + full] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path
