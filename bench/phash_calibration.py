"""Calibrate the validator's pHash threshold (STIPPLE_PHASH_THRESHOLD) by measurement.

Honest variation: the same task computed under different conditions an honest node may
have (another torch thread count, the image made inside a batch). Dishonest variation:
what a cheating node might return (another seed, fewer steps, another prompt). The
threshold must sit above every honest distance and below every dishonest one.

    python bench/phash_calibration.py [--pairs 20] [--size 128] [--steps 8]

Runs on the built-in tiny model (random weights, so its images are structured noise);
real-model figures need a GPU run of the same script with --model DIR.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
from pathlib import Path

import imagehash
import torch
from PIL import Image

from stipple_node.pipeline import PipelineRunner, configure_determinism
from stipple_node.tinymodel import make_tiny_model


def phash(png: bytes) -> imagehash.ImageHash:
    return imagehash.phash(Image.open(io.BytesIO(png)), hash_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", type=Path, default=None, help="a diffusers folder (default: the tiny model)")
    args = parser.parse_args()
    configure_determinism(1)
    folder = args.model or make_tiny_model(Path(tempfile.mkdtemp()) / "tiny-sd")
    runner = PipelineRunner({"m": folder})

    def run(seed: int, *, steps: int | None = None, prompt: str = "a lighthouse at dusk", n: int = 1) -> list[bytes]:
        images = runner.txt2img(
            model="m",
            prompt=prompt,
            negative_prompt="",
            width=args.size,
            height=args.size,
            steps=steps or args.steps,
            cfg=7.0,
            seed=seed,
            num_images=n,
        )
        return [image.png for image in images]

    honest: dict[str, list[int]] = {"threads 1 vs 2": [], "rerun": []}
    dishonest: dict[str, list[int]] = {"other seed": [], "fewer steps (-25%)": [], "other prompt": []}
    for seed in range(args.pairs):
        (base,) = run(seed)
        honest["rerun"].append(phash(base) - phash(run(seed)[0]))
        torch.set_num_threads(2)
        honest["threads 1 vs 2"].append(phash(base) - phash(run(seed)[0]))
        torch.set_num_threads(1)
        dishonest["other seed"].append(phash(base) - phash(run(seed + 10_000)[0]))
        fewer = max(1, args.steps * 3 // 4)
        dishonest["fewer steps (-25%)"].append(phash(base) - phash(run(seed, steps=fewer)[0]))
        dishonest["other prompt"].append(phash(base) - phash(run(seed, prompt="a red fox in snow")[0]))

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"model: {'tiny-sd' if args.model is None else args.model}, {args.size}px, {args.steps} steps, "
        f"{args.pairs} pairs"
    )
    print(f"{'variation':<22} {'min':>4} {'median':>7} {'max':>4}   (Hamming distance of 64-bit pHash)")
    for kind, table in (("honest", honest), ("dishonest", dishonest)):
        for name, values in table.items():
            print(f"{kind + ': ' + name:<32} {min(values):>4} {statistics.median(values):>7} {max(values):>4}")
    top_honest = max(max(v) for v in honest.values())
    low_dishonest = min(min(v) for v in dishonest.values())
    print(
        f"honest max {top_honest}, dishonest min {low_dishonest}: a threshold in [{top_honest}, {low_dishonest - 1}] "
        "separates them"
        if top_honest < low_dishonest
        else "honest and dishonest overlap: pHash alone cannot separate"
    )


if __name__ == "__main__":
    main()
