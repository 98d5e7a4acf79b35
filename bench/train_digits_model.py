"""Train a tiny text-conditioned Stable Diffusion model on rendered digits (for validation_matrix.py).

Random weights hide cheats: a randomly initialised model barely conditions on its prompt
or its step count, so a node that skips steps or swaps the prompt returns almost the same
image (bench/RESULTS.md, "pHash threshold calibration"). To measure validation, the bench
needs a model whose output depends on the prompt and on the sampling the way a real one's
does. This script trains one, seeded, in about 5 CPU minutes (one torch thread):

- data: the digits 0-9 rendered from 8 of the TrueType fonts that matplotlib ships
  (DejaVu, STIX, Computer Modern; matplotlib is a dev dependency), each drawn 40 times
  with a seeded random size, rotation and shift, 32x32 grey, 3200 images. (scikit-learn's
  8x8 digits would do as well, but scikit-learn is not in the project's environment.)
- model: Stable Diffusion 1.5's component classes, as `stipple_node.tinymodel` builds them,
  smaller: an AutoencoderKL (4x down, 4 latent channels, so 32x32 images have 8x8x4
  latents), a UNet2DConditionModel with cross-attention, a CLIPTextModel and the
  tinymodel's CLIP tokenizer (16 tokens), and SD 1.5's PNDM scheduler config.
- training: the autoencoder first (MSE plus a small KL term; its scaling factor is set
  to 1/std of the latents, as SD's 0.18215 was), then UNet and text encoder together on
  SD's noise-prediction loss with SD 1.5's beta schedule, on the prompt "a digit N",
  dropped to "" 10 % of the time so that classifier-free guidance works. An exponential
  moving average of the weights is what is saved.
- output: `full/` (the trained model) and `half/` (the same run's snapshot halfway
  through the denoiser's training: "another model" for the bench) as diffusers folders
  (`save_pretrained`), `train.json` (settings, losses, times, the prompt check) and
  `samples-full.png`, `samples-half.png` (a row per prompt, a column per seed), under
  `.stipple/bench/digits-sd/` (ignored by git).
- the prompt check (20 PNDM steps, CFG 7.5, 10 seeds per prompt): a small classifier
  trained on the same rendered digits labels the model's images; the fraction labelled
  with the prompted digit says whether prompts matter. So does the median pHash distance
  between two prompts at one seed, against that between two seeds at one prompt.

    .venv/bin/python bench/train_digits_model.py [--out DIR] [--seed 0] [--force]

validation_matrix.py calls `ensure_model()`, which trains only when the folder is missing
(or was written by an older version of this script: FORMAT).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from stipple_node.tinymodel import (
    NORM_GROUPS,
    TEXT_HEADS,
    TEXT_HIDDEN,
    TEXT_INTERMEDIATE,
    TEXT_LAYERS,
    build_folder,
    write_clip_tokenizer_files,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".stipple" / "bench" / "digits-sd"
MARKER = "train.json"
FORMAT = 1  # bump when the data, the architecture or the training changes: a stale folder is rebuilt

IMAGE = 32
LATENT = 8  # the autoencoder downsamples 4x
MAX_TOKENS = 16  # "a digit 7" is 6 tokens with BOS/EOS; SD's 77 would only cost time here
PROMPT = "a digit {}"
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
    "cmss10.ttf",
    "cmr10.ttf",
)
SD15_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def prompt(digit: int) -> str:
    return PROMPT.format(digit)


# ---------------------------------------------------------------------------------- data


def render_digits(seed: int, variants: int) -> tuple[np.ndarray, np.ndarray]:
    """Every digit in every font `variants` times, randomly sized, rotated and shifted:
    (N, 32, 32) float32 in [0, 1] (white digit on black) and the (N,) digit labels."""
    import matplotlib

    folder = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name in FONTS:
        for digit in range(10):
            for _ in range(variants):
                font = ImageFont.truetype(str(folder / name), int(rng.integers(44, 57)))
                canvas = Image.new("L", (96, 96), 0)
                ImageDraw.Draw(canvas).text((48, 48), str(digit), fill=255, font=font, anchor="mm")
                shift = (float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4)))
                canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, translate=shift)
                small = canvas.crop((16, 16, 80, 80)).resize((IMAGE, IMAGE), Image.BOX)
                images.append(np.asarray(small, dtype=np.float32) / 255.0)
                labels.append(digit)
    return np.stack(images), np.array(labels)


def to_pixels(grey: np.ndarray) -> torch.Tensor:
    """(N, 32, 32) in [0, 1] to the (N, 3, 32, 32) [-1, 1] RGB tensors the autoencoder sees."""
    x = torch.from_numpy(grey).unsqueeze(1) * 2 - 1
    return x.expand(-1, 3, -1, -1).contiguous()


def to_grey(images: list[Image.Image]) -> np.ndarray:
    """PIL images as (N, 32, 32) float32 in [0, 1] (what the classifier reads)."""
    return np.stack([np.asarray(i.convert("L").resize((IMAGE, IMAGE), Image.BOX), np.float32) / 255 for i in images])


# ---------------------------------------------------------------------------------- model


def tokenizer_and_parts(folder: Path, seed: int) -> tuple[Any, Any, Any, Any]:
    """The tokenizer (CLIP layout, the tinymodel's vocabulary) and freshly initialised
    autoencoder, UNet and text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=MAX_TOKENS
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=NORM_GROUPS,
        sample_size=IMAGE,
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=1,
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=NORM_GROUPS,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=TEXT_INTERMEDIATE,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=TEXT_HEADS,
            max_position_embeddings=MAX_TOKENS,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return tokenizer, vae, unet, text_encoder


def sd_pipeline(tokenizer: Any, vae: Any, unet: Any, text_encoder: Any) -> Any:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(**SD15_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train_vae(vae: Any, pixels: torch.Tensor, steps: int, generator: torch.Generator, log: list[float]) -> float:
    """Fit the autoencoder; set and return its scaling factor (1/std of the latents)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 3e-3)
        batch = pixels[torch.randint(0, len(pixels), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = (vae.decode(z).sample - batch).pow(2).mean() + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log.append(round(loss.item(), 5))
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return scaling


class Ema:
    """Exponential moving average of a module's parameters (with diffusers' warm-up)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.998) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            ema.lerp_(p, 1 - decay)


def train_denoiser(
    tokenizer: Any,
    unet: Any,
    text_encoder: Any,
    latents: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    log: list[float],
    at_half: Any,
) -> tuple[Any, Any]:
    """SD's noise-prediction objective; returns the EMA copies of UNet and text encoder.
    `at_half(unet, text_encoder)` gets the EMA copies halfway through."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(**SD15_BETAS)
    texts = [prompt(d) for d in range(10)] + [""]
    ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    ema_unet, ema_text = Ema(unet), Ema(text_encoder)
    unet.train()
    text_encoder.train()
    batch_size = 64
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3)
        index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        which = labels[index].clone()
        which[torch.rand(batch_size, generator=generator) < 0.1] = 10  # the empty prompt
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch_size,), generator=generator)
        states = text_encoder(ids)[0][which]
        prediction = unet(noise_schedule.add_noise(x0, noise, t), t, states).sample
        loss = (prediction - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        if step % 50 == 0 or step == steps - 1:
            log.append(round(loss.item(), 5))
        if step + 1 == steps // 2:
            at_half(ema_unet.shadow, ema_text.shadow)
    return ema_unet.shadow, ema_text.shadow


# ---------------------------------------------------------------------------------- the prompt check


def train_classifier(grey: np.ndarray, labels: np.ndarray, seed: int) -> torch.nn.Module:
    """A small MLP digit classifier on 32x32 grey images (to label generated images)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(IMAGE * IMAGE, 256), torch.nn.ReLU())
    model.append(torch.nn.Linear(256, 10))
    x, y = torch.from_numpy(grey), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(1500):
        index = torch.randint(0, len(x), (128,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def classify(model: torch.nn.Module, grey: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(grey)).argmax(1).numpy()


def prompt_check(folder: Path, classifier: torch.nn.Module, seeds: int = 10, steps: int = 20) -> dict[str, Any]:
    """Generate `seeds` images per prompt (PNDM, CFG 7.5, as the bench does). How often the
    classifier reads the prompted digit, and the median pHash distance between two prompts
    at one seed against two seeds at one prompt. Writes samples-<folder>.png beside the
    model (a row per digit, a column per seed)."""
    import itertools

    from diffusers import StableDiffusionPipeline

    from stipple_common.phash import hamming, image_phash

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    rows, hits, confusion = [], 0, np.zeros((10, 10), dtype=int)
    hashes: list[list[str]] = []
    for digit in range(10):
        images = []
        for seed in range(seeds):
            images.append(
                pipe(
                    prompt(digit),
                    negative_prompt="",
                    num_inference_steps=steps,
                    guidance_scale=7.5,
                    height=IMAGE,
                    width=IMAGE,
                    generator=torch.Generator("cpu").manual_seed(seed),
                ).images[0]
            )
        hashes.append([image_phash(image) for image in images])
        for label in classify(classifier, to_grey(images)):
            confusion[digit, label] += 1
            hits += int(label == digit)
        rows.append(np.concatenate([np.asarray(i.convert("L")) for i in images], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).resize((IMAGE * seeds * 2, IMAGE * 20), Image.NEAREST).save(
        folder.parent / f"samples-{folder.name}.png"
    )
    across_prompts = [
        hamming(hashes[a][s], hashes[b][s]) for s in range(seeds) for a, b in itertools.combinations(range(10), 2)
    ]
    across_seeds = [hamming(h[s], h[t]) for h in hashes for s, t in itertools.combinations(range(seeds), 2)]
    return {
        "images": 10 * seeds,
        "read_as_prompted": hits / (10 * seeds),
        "confusion": confusion.tolist(),
        "phash_median_other_prompt_same_seed": float(np.median(across_prompts)),
        "phash_median_other_seed_same_prompt": float(np.median(across_seeds)),
    }


# ---------------------------------------------------------------------------------- build


def quiet() -> None:
    """No progress bars or load chatter from diffusers and transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def train(
    out: Path, *, seed: int = 0, vae_steps: int = 500, unet_steps: int = 1500, threads: int = 1
) -> dict[str, Any]:
    """Train into `out` (full/, half/, samples-*.png, then train.json last)."""
    quiet()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    cpu_started = time.process_time()
    grey, labels = render_digits(seed, variants=40)
    held_out, held_labels = render_digits(seed + 1000, variants=8)
    pixels = to_pixels(grey)
    generator = torch.Generator().manual_seed(seed)
    tokenizer, vae, unet, text_encoder = tokenizer_and_parts(out / "tokenizer-files", seed)
    report: dict[str, Any] = {
        "format": FORMAT,
        "seed": seed,
        "data": f"{len(grey)} rendered digits ({len(FONTS)} matplotlib fonts x 10 digits x 40), {IMAGE}x{IMAGE}",
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "threads": threads,
        "parameters": {
            "vae": sum(p.numel() for p in vae.parameters()),
            "unet": sum(p.numel() for p in unet.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        },
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    vae_log: list[float] = []
    report["vae_scaling_factor"] = train_vae(vae, pixels, vae_steps, generator, vae_log)
    report["vae_loss"] = vae_log
    with torch.no_grad():
        posterior = [vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)]
        latents = torch.cat(posterior) * vae.config.scaling_factor
    vae.requires_grad_(False)
    report["vae_seconds"] = round(time.perf_counter() - started, 1)

    def save(unet_: Any, text_: Any, name: str) -> None:
        sd_pipeline(tokenizer, vae, copy.deepcopy(unet_), copy.deepcopy(text_)).save_pretrained(
            out / name, safe_serialization=True
        )

    unet_log: list[float] = []
    unet, text_encoder = train_denoiser(
        tokenizer,
        unet,
        text_encoder,
        latents,
        torch.from_numpy(labels),
        unet_steps,
        generator,
        unet_log,
        lambda u, t: save(u, t, "half"),
    )
    save(unet, text_encoder, "full")
    shutil.rmtree(out / "tokenizer-files")
    report["unet_loss"] = unet_log
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    report["train_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    classifier = train_classifier(grey, labels, seed)
    report["classifier_held_out_accuracy"] = float((classify(classifier, held_out) == held_labels).mean())
    report["prompt_check"] = {name: prompt_check(out / name, classifier) for name in ("full", "half")}
    (out / MARKER).write_text(json.dumps(report, indent=1) + "\n")
    return report


def ensure_model(directory: Path = DEFAULT_DIR, *, force: bool = False, **options: Any) -> Path:
    """The trained model folder (full/ and half/ inside), trained first when missing or stale."""
    directory = Path(directory)
    marker = directory / MARKER
    if marker.is_file() and not force and json.loads(marker.read_text()).get("format") == FORMAT:
        return directory
    if marker.is_file():  # ours, but stale or to be rebuilt
        shutil.rmtree(directory)
    print(f"training the digits model into {directory} (a few CPU minutes) ...", flush=True)
    return build_folder(directory, MARKER, lambda staging: train(staging, **options))


def summarise(report: dict[str, Any]) -> None:
    check = report["prompt_check"]
    print(
        f"trained in {report['train_seconds']} s ({report['train_cpu_seconds']} CPU s), "
        f"parameters {report['parameters']}, last losses vae {report['vae_loss'][-1]} unet {report['unet_loss'][-1]}"
    )
    for name, what in (("full", "the model"), ("half", "the half-trained snapshot")):
        c = check[name]
        print(
            f"prompt check, {what}: the classifier (held-out accuracy {report['classifier_held_out_accuracy']:.3f}) "
            f"reads the prompted digit in {c['read_as_prompted']:.0%} of {c['images']} images; median pHash "
            f"distance, another prompt at the same seed {c['phash_median_other_prompt_same_seed']:g} bits, "
            f"another seed with the same prompt {c['phash_median_other_seed_same_prompt']:g} bits"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible, kind to shared cores)")
    parser.add_argument("--force", action="store_true", help="retrain even if the folder holds a model")
    args = parser.parse_args()
    folder = ensure_model(
        args.out,
        force=args.force,
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        threads=args.threads,
    )
    summarise(json.loads((folder / MARKER).read_text()))
    print(f"model: {folder / 'full'}, half-trained snapshot: {folder / 'half'}, samples: {folder}/samples-*.png")


if __name__ == "__main__":
    main()
