"""GPU throughput: real SD 1.5 and SDXL architectures (random weights), fp16, it/s for the
node's runner and for bare diffusers in the same run. Needs a CUDA GPU (the device tool).

    python bench/gpu_throughput.py [--steps 20] [--runs 3]

Random weights make noise, but they cost exactly what trained weights cost. The
tokenizer is the generated one from the tiny model (its vocabulary size does not change
the UNet's cost, which dominates).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stipple_common.taskspec import parse_task
from stipple_node.pipeline import PipelineRunner, configure_determinism
from stipple_node.tinymodel import write_clip_tokenizer_files


def full_vae(scaling_factor: float):
    """SD's VAE architecture (the same for SD 1.5 and SDXL, but for the latent scale)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        scaling_factor=scaling_factor,
    )


def clip_config(vocab: int, *, hidden: int, layers: int, heads: int, **extra: int):
    """A CLIP text encoder of SD's sizes (CLIP-L: 768/12/12; OpenCLIP bigG: 1280/32/20)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        **extra,
    )


def build(kind: str, folder: Path) -> Path:
    """A full-size SD 1.5 or SDXL pipeline with random weights, saved with save_pretrained."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tok_dir = folder.parent / f"{folder.name}-tokenizer"
    vocab = write_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(
        vocab_file=str(tok_dir / "vocab.json"), merges_file=str(tok_dir / "merges.txt"), model_max_length=77
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if kind == "sd15":
        text = CLIPTextModel(clip_config(vocab, hidden=768, layers=12, heads=12))
        unet = UNet2DConditionModel(cross_attention_dim=768)
        vae = full_vae(0.18215)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        text = CLIPTextModel(clip_config(vocab, hidden=768, layers=12, heads=12))
        text_2 = CLIPTextModelWithProjection(clip_config(vocab, hidden=1280, layers=32, heads=20, projection_dim=1280))
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = full_vae(0.13025)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text,
            text_encoder_2=text_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    pipe.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_throughput: no CUDA GPU here; run it on a GPU machine (bench/README.md)")
    configure_determinism(1)
    root = Path(tempfile.mkdtemp(prefix="stipple-gpu-"))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, {args.steps} steps")
    for kind, size in (("sd15", 512), ("sdxl", 1024)):
        folder = build(kind, root / kind)
        runner = PipelineRunner({kind: folder}, device="cuda", dtype=torch.float16)
        bare = runner.pipeline(kind)
        task = parse_task(
            {
                "base_model": kind,
                "prompt": "a lighthouse at dusk",
                "sampler": "Euler",
                "task_config": {"image_width": size, "image_height": size, "steps": args.steps, "seed": 1},
            }
        )
        runner.run(task)  # warm-up (compile kernels, allocate)
        node, plain = [], []
        for _ in range(args.runs):
            torch.cuda.synchronize()
            started = time.perf_counter()
            bare(
                prompt="a lighthouse at dusk",
                width=size,
                height=size,
                num_inference_steps=args.steps,
                generator=torch.Generator("cpu").manual_seed(1),
            )
            torch.cuda.synchronize()
            plain.append(args.steps / (time.perf_counter() - started))
            started = time.perf_counter()
            runner.run(task)
            torch.cuda.synchronize()
            node.append(args.steps / (time.perf_counter() - started))
        b, n = statistics.median(plain), statistics.median(node)
        print(f"{kind} {size}x{size}: bare {b:.2f} it/s, node {n:.2f} it/s, node/bare {n / b:.3f}")


if __name__ == "__main__":
    main()
