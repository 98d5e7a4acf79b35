"""Validation matrix: honest variations against cheats, per check, over many seeds.

What a validator can compare between two nodes' results of one task:
- pHash: the Hamming distance between the final images' 64-bit pHashes
  (`stipple_common.phash`, what the validator compares today, at most 6 bits by default);
- checkpoints: the latents after 1/4, 1/2 and 3/4 of the denoising loop, captured with
  diffusers' `callback_on_step_end`, compared (a) exactly (sha256 of the image and of each
  tensor as computed: the check within one class of identical hardware and settings) and
  (b) with a tolerance, across classes: the relative L2 distance ||a - b|| / ||a|| of the
  latents (the validator needs the latents themselves for this), and, as something small
  enough to sit in a commitment, the Hamming distance of a 256-bit sign hash (the signs of
  256 fixed random projections of the flattened latent, a SimHash), and the distance of
  the latents' *summaries* (`stipple_common.checkpoints.summary`: each channel average-
  pooled to at most 8x8, float16; `summary_distance`, a relative L2): what a node reveals
  per checkpoint and the validator compares across classes, with pHash, at a tolerance.
  The checkpoints are taken where the node takes them (`stipple_common.checkpoints.steps`
  of the pipeline's loop), and the summaries are computed by those same functions. (The
  digits model's latents are 8x8 already, so here a summary is the latents in float16:
  this bench measures the tolerance, not what pooling SD's 64x64 latents would lose.)

Honest variations (the same task, computed as an honest node might): an exact re-run,
2 torch threads against 1, bfloat16 and float16 against float32, and the classic
attention code (diffusers' AttnProcessor, CLIP's eager attention) against
scaled_dot_product_attention. Cheats: another seed; 10 %, 25 % and 50 % fewer steps;
another prompt; another model (the same training run's half-trained snapshot); half the
resolution, upscaled; another scheduler (DDIM for PNDM, and Euler ancestral); a random
image. A cheat commits the checkpoints of what it computed, at the same fractions of its
own loop (fewer steps: after 1/4 of its steps), upscaled to the task's latent size where
it ran smaller; the random image commits random latents.

Thresholds come from the honest distances only, per tolerance tier: the largest honest
distance seen on the calibration half of the seeds (the even ones), times --margin (2).
Tier [fp32/fp16] is set by every honest variation but bfloat16; tier [+bf16] by all of
them. The summary tolerances are chosen the same way, and the rule "pHash within the
threshold and every checkpoint's summary within its tolerance" is reported per tier, with
the tier's pHash threshold and with the validator's default (6 bits). False rejects are
counted on the held-out half (seeds no threshold saw); false accepts on every seed
(cheats never set a threshold). Where no event was seen, the 95 % upper bound is the rule
of three, 3/n; otherwise the exact (Clopper-Pearson) one-sided 95 % bound. Nothing here
can show a rate below about 3/n.

The model is the tiny text-conditioned one that bench/train_digits_model.py trains (first
when missing, about 5 CPU minutes): random weights would hide the cheats. Its images are
32x32 with 8x8x4 latents; tasks run 20 PNDM steps at CFG 7.5, prompt "a digit N" with N =
seed mod 10. Each run follows the node's conventions (stipple_node.pipeline):
`configure_determinism(1)`, one image per call from a CPU generator seeded with the task
seed, a fresh scheduler per call from `stipple_node.schedulers.make_scheduler`,
torch.inference_mode.

The baseline: the same pipeline called bare (no callback), timed in the same run,
interleaved; the ratio is the cost of capturing and hashing the checkpoints.

    .venv/bin/python bench/validation_matrix.py [--seeds 60] [--json PATH]

About 4-7 s per seed on the 2 shared cores of the development machine, so the default
takes 4-7 minutes. The 2-thread variation runs on every 3rd seed only (--threads-every):
on cores that other work shares, one 2-thread run costs as much as 10 to 50 others.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.stats import beta
from train_digits_model import IMAGE, LATENT, MARKER, ensure_model, prompt, quiet, summarise

from stipple_common import checkpoints
from stipple_common.phash import hamming, image_phash
from stipple_node.pipeline import configure_determinism
from stipple_node.schedulers import make_scheduler

FRACTIONS = checkpoints.FRACTIONS  # (0.25, 0.5, 0.75)
CHECKPOINTS = ("1/4", "1/2", "3/4")
SIGN_BITS = 256
THREADS = "torch threads 2 (ref 1)"
PHASH_CONFIGURED = 6  # the validator's default (ValidatorSettings.phash_threshold)


@dataclass
class Run:
    """What a node computed for one image: the image and the latents at the checkpoints."""

    image: Image.Image
    phash: str
    image_sha: str
    latents: list[torch.Tensor]  # float32 copies, one per checkpoint
    latent_sha: list[str]  # sha256 of each checkpoint's tensor as computed (its own dtype)
    summaries: list[str]  # checkpoints.summary of each checkpoint's latents, as a node reveals them


@dataclass
class Distances:
    seeds: list[int] = field(default_factory=list)  # the seeds this variation ran on, in order
    phash: list[int] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)  # image and every checkpoint bit-identical
    rel_l2: list[list[float]] = field(default_factory=lambda: [[] for _ in FRACTIONS])
    sign: list[list[int]] = field(default_factory=lambda: [[] for _ in FRACTIONS])
    summary: list[list[float]] = field(default_factory=lambda: [[] for _ in FRACTIONS])  # summary_distance


def tensor_sha(tensor: torch.Tensor) -> str:
    t = tensor.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy()).hexdigest()


StepEnd = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def capture(into: dict[int, torch.Tensor], wanted: list[int]) -> StepEnd:
    """Keep the latents after the loop iterations the node hashes (`checkpoints.steps` of the
    pipeline's loop length, which for PNDM is one more than the steps asked for); `wanted`
    receives those iteration indexes, one per fraction (some coincide in a short loop)."""

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if not wanted:
            wanted.extend(checkpoints.steps(int(pipe.num_timesteps)))
        if i in wanted:
            into[i] = tensors["latents"].detach().clone()
        return tensors

    return on_step_end


def generate(
    pipe: Any,
    *,
    text: str,
    seed: int,
    steps: int,
    cfg: float,
    size: int = IMAGE,
    sampler: str | None = None,
    with_checkpoints: bool = True,
) -> Run:
    """One image the node's way, with its checkpoints (or, with_checkpoints=False, a bare call)."""
    task_pipe = copy.copy(pipe)  # shares the weights; only the copy gets the fresh scheduler
    task_pipe.scheduler = make_scheduler(pipe.scheduler, sampler=sampler, spec=None)
    captured: dict[int, torch.Tensor] = {}
    wanted: list[int] = []
    extra: dict[str, Any] = {}
    if with_checkpoints:
        extra = {"callback_on_step_end": capture(captured, wanted), "callback_on_step_end_tensor_inputs": ["latents"]}
    with torch.inference_mode():
        image = task_pipe(
            text,
            negative_prompt="",
            num_inference_steps=steps,
            guidance_scale=cfg,
            height=size,
            width=size,
            num_images_per_prompt=1,
            generator=torch.Generator("cpu").manual_seed(seed),
            **extra,
        ).images[0]
    latents = [captured[k] for k in wanted]
    if size != IMAGE:  # a low-resolution cheat commits its latents and image upscaled to the task's size
        image = image.resize((IMAGE, IMAGE), Image.BICUBIC)
        latents = [torch.nn.functional.interpolate(x.float(), size=(LATENT, LATENT), mode="nearest") for x in latents]
    return finish(image, latents)


def finish(image: Image.Image, latents: list[torch.Tensor]) -> Run:
    image = image.convert("RGB")
    png = io.BytesIO()
    image.save(png, format="PNG", optimize=False, compress_level=6)
    return Run(
        image=image,
        phash=image_phash(image),
        image_sha=hashlib.sha256(png.getvalue()).hexdigest(),
        latents=[x.float() for x in latents],
        latent_sha=[tensor_sha(x) for x in latents],
        summaries=[checkpoints.summary(x.float().numpy()) for x in latents],
    )


def random_run(seed: int) -> Run:
    """The cheapest cheat: a random image, random latents for the checkpoints."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(seed)
    return finish(image, [torch.randn((1, 4, LATENT, LATENT), generator=generator) for _ in FRACTIONS])


_PROJECTION = torch.randn((4 * LATENT * LATENT, SIGN_BITS), generator=torch.Generator().manual_seed(20261206))


def sign_hash(latent: torch.Tensor) -> int:
    bits = (latent.reshape(-1) @ _PROJECTION) > 0
    return int("".join("1" if b else "0" for b in bits.tolist()), 2)


def compare(seed: int, ref: Run, other: Run, into: Distances) -> None:
    into.seeds.append(seed)
    into.phash.append(hamming(ref.phash, other.phash))
    into.exact.append(ref.image_sha == other.image_sha and ref.latent_sha == other.latent_sha)
    for k, (a, b) in enumerate(zip(ref.latents, other.latents, strict=True)):
        into.rel_l2[k].append(float((a - b).norm() / a.norm()))
        into.sign[k].append((sign_hash(a) ^ sign_hash(b)).bit_count())
    for k, (a, b) in enumerate(zip(ref.summaries, other.summaries, strict=True)):
        into.summary[k].append(checkpoints.summary_distance(a, b))


# ---------------------------------------------------------------------------------- variations


def variations(pipes: dict[str, Any], steps: int, cfg: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """name -> (seed, digit) -> Run, for the honest variations and the cheats."""

    def run(pipe: str = "fp32", **kw: Any) -> Callable[[int, int], Run]:
        def make(seed: int, digit: int) -> Run:
            options = {"text": prompt(digit), "seed": seed, "steps": steps, "cfg": cfg, **kw}
            return generate(pipes[pipe], **options)

        return make

    def threads(n: int) -> Callable[[int, int], Run]:
        def make(seed: int, digit: int) -> Run:
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                return run()(seed, digit)
            finally:
                torch.set_num_threads(before)

        return make

    def other_prompt(seed: int, digit: int) -> Run:
        return generate(pipes["fp32"], text=prompt((digit + 1 + seed % 9) % 10), seed=seed, steps=steps, cfg=cfg)

    def other_seed(seed: int, digit: int) -> Run:
        return generate(pipes["fp32"], text=prompt(digit), seed=seed + 1_000_003, steps=steps, cfg=cfg)

    honest: dict[str, Any] = {
        "exact re-run": run(),
        THREADS: threads(2),
        "bfloat16 (ref float32)": run("bf16"),
    }
    if "fp16" in pipes:
        honest["float16 (ref float32)"] = run("fp16")
    honest["classic attention (ref SDPA)"] = run("classic")
    cheats: dict[str, Any] = {
        "another seed": other_seed,
        "10 % fewer steps": run(steps=round(steps * 0.9)),
        "25 % fewer steps": run(steps=round(steps * 0.75)),
        "50 % fewer steps": run(steps=round(steps * 0.5)),
        "another prompt": other_prompt,
        "another model (half-trained)": run("half"),
        "half resolution, upscaled": run(size=IMAGE // 2),
        "another scheduler (DDIM)": run(sampler="DDIM"),
        "another scheduler (Euler a)": run(sampler="Euler a"),
        "random image": lambda seed, digit: random_run(seed),
    }
    return honest, cheats


def load_pipes(model: Path) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor

    def load(folder: Path, **kw: Any) -> Any:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipes = {"fp32": load(model / "full"), "half": load(model / "half")}
    pipes["bf16"] = copy.deepcopy(pipes["fp32"]).to(torch.bfloat16)
    fp16 = copy.deepcopy(pipes["fp32"]).to(torch.float16)
    try:
        generate(fp16, text=prompt(0), seed=0, steps=4, cfg=5.0)
        pipes["fp16"] = fp16
    except (RuntimeError, NotImplementedError) as exc:
        print(f"float16 not measured: this CPU build cannot run the pipeline in float16 ({exc})")
    classic = copy.deepcopy(pipes["fp32"])
    classic.unet.set_attn_processor(AttnProcessor())
    try:
        classic.text_encoder.set_attn_implementation("eager")
    except AttributeError:  # an older transformers
        classic.text_encoder.config._attn_implementation = "eager"
    pipes["classic"] = classic
    return pipes


# ---------------------------------------------------------------------------------- statistics


def upper95(events: int, n: int) -> float:
    """One-sided 95 % upper bound on a rate: rule of three at zero, else Clopper-Pearson."""
    if n == 0 or events == n:
        return 1.0
    return min(1.0, 3 / n) if events == 0 else float(beta.ppf(0.95, events + 1, n - events))


def rate(events: int, n: int) -> str:
    bound = upper95(events, n)
    return f"{events}/{n} (≤ {bound:.1%})" if events == 0 else f"{events}/{n} = {events / n:.1%} (≤ {bound:.0%})"


def spread(values: list[float], digits: int = 0) -> str:
    if not values:
        return "-"
    q = np.percentile(values, [0, 50, 95, 100])
    return " / ".join(f"{v:.{digits}f}" if digits else f"{v:.0f}" for v in q)


def spread_sci(values: list[float]) -> str:
    q = np.percentile(values, [0, 50, 95, 100])
    return " / ".join("0" if v == 0 else f"{v:.1e}" for v in q)


@dataclass
class Thresholds:
    """One tolerance tier: the thresholds set by one set of honest variations."""

    name: str
    honest: list[str]  # the honest variations that set it
    phash: int
    rel_l2: list[float]
    sign: list[int]
    summary: list[float]  # checkpoints.summary_distance, per fraction


def choose(name: str, honest: dict[str, Distances], calibration: list[int], margin: float) -> Thresholds:
    """margin x the largest honest distance on the calibration seeds (hashes: rounded up, at least 1 bit)."""

    wanted = set(calibration)

    def top(get: Callable[[Distances], list[Any]]) -> float:
        return max(max(v for v, seed in zip(get(d), d.seeds, strict=True) if seed in wanted) for d in honest.values())

    return Thresholds(
        name=name,
        honest=list(honest),
        phash=max(1, math.ceil(margin * top(lambda d: d.phash))),
        rel_l2=[margin * top(lambda d, k=k: d.rel_l2[k]) for k in range(len(FRACTIONS))],
        sign=[max(1, math.ceil(margin * top(lambda d, k=k: d.sign[k]))) for k in range(len(FRACTIONS))],
        summary=[margin * top(lambda d, k=k: d.summary[k]) for k in range(len(FRACTIONS))],
    )


Rule = Callable[[Distances, int], bool]


def rules(tiers: list[Thresholds]) -> dict[str, Rule]:
    """The checks a validator could run, each as accept(distances, seed index)."""

    def phash_at(limit: int) -> Rule:
        return lambda d, i: d.phash[i] <= limit

    def latents(th: Thresholds) -> Rule:
        return lambda d, i: all(d.rel_l2[k][i] <= th.rel_l2[k] for k in range(len(FRACTIONS)))

    def signs(th: Thresholds) -> Rule:
        return lambda d, i: all(d.sign[k][i] <= th.sign[k] for k in range(len(FRACTIONS)))

    def both(th: Thresholds) -> Rule:
        return lambda d, i: phash_at(th.phash)(d, i) and latents(th)(d, i)

    table: dict[str, Rule] = {f"pHash ≤ {PHASH_CONFIGURED} (today)": phash_at(PHASH_CONFIGURED)}
    for th in tiers:
        table[f"pHash ≤ {th.phash} [{th.name}]"] = phash_at(th.phash)
        table[f"checkpoints, rel. L2 [{th.name}]"] = latents(th)
        table[f"checkpoints, sign hash [{th.name}]"] = signs(th)
        table[f"pHash + checkpoints [{th.name}]"] = both(th)
    table["bit-identical (one class)"] = lambda d, i: d.exact[i]
    return table


def summary_rules(tiers: list[Thresholds]) -> dict[str, Rule]:
    """The check across classes with what a node reveals: pHash within a threshold and every
    checkpoint's summary within its tolerance (with the tier's pHash threshold, and with the
    validator's default), and the summaries alone."""

    def summaries(th: Thresholds) -> Rule:
        return lambda d, i: all(d.summary[k][i] <= th.summary[k] for k in range(len(FRACTIONS)))

    def with_phash(limit: int, th: Thresholds) -> Rule:
        return lambda d, i: d.phash[i] <= limit and summaries(th)(d, i)

    table: dict[str, Rule] = {}
    for th in tiers:
        table[f"summary [{th.name}]"] = summaries(th)
        table[f"pHash ≤ {th.phash} + summary [{th.name}]"] = with_phash(th.phash, th)
        if th.phash != PHASH_CONFIGURED:
            table[f"pHash ≤ {PHASH_CONFIGURED} + summary [{th.name}]"] = with_phash(PHASH_CONFIGURED, th)
    return table


def worst_ratio(d: Distances, th: Thresholds, cheat: bool) -> float:
    """How near a variation comes to the other side of the summary rule, per seed the largest
    distance / tolerance over the checkpoints (the rule accepts below 1): for an honest
    variation the largest over seeds (1 or more: some seed rejected), for a cheat the
    smallest (below 1: some seed accepted)."""
    ratios = [
        max(d.summary[k][i] / th.summary[k] if th.summary[k] > 0 else math.inf for k in range(len(FRACTIONS)))
        for i in range(len(d.seeds))
    ]
    return min(ratios) if cheat else max(ratios)


# ---------------------------------------------------------------------------------- main


def timing(pipe: Any, steps: int, cfg: float, repeats: int) -> tuple[float, float]:
    """Median seconds per image without and with checkpoint capture (interleaved)."""
    bare, captured = [], []
    generate(pipe, text=prompt(0), seed=0, steps=steps, cfg=cfg)  # warm-up
    for r in range(repeats):
        for with_checkpoints, into in ((False, bare), (True, captured)):
            started = time.perf_counter()
            generate(pipe, text=prompt(r % 10), seed=r, steps=steps, cfg=cfg, with_checkpoints=with_checkpoints)
            into.append(time.perf_counter() - started)
    return statistics.median(bare), statistics.median(captured)


def markdown_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def report_summaries(
    honest: dict[str, Distances],
    cheats: dict[str, Distances],
    tiers: list[Thresholds],
    calibration: list[int],
    args: argparse.Namespace,
) -> None:
    """Across classes: the summaries' distances, tolerances, false accepts and false rejects."""
    checks = summary_rules(tiers)
    print("Across classes: latent summaries (checkpoints.summary_distance)")
    print()
    for th in tiers:
        print(
            f"Tier [{th.name}], set by {', '.join(th.honest)}: summary "
            + ", ".join(f"@{c} ≤ {v:.2e}" for c, v in zip(CHECKPOINTS, th.summary, strict=True))
            + f"; pHash ≤ {th.phash} bits"
        )
    print(
        f"(each tolerance: {args.margin:g} x the largest honest summary distance "
        f"on the {len(calibration)} calibration seeds, the even ones)"
    )
    print()
    print(
        "Summary distance to the reference, min / median / p95 / max over all seeds; the largest (honest) "
        "or smallest (cheat) per checkpoint; worst distance/tolerance: per seed the largest over the checkpoints, "
        "then the largest seed (honest; ≥ 1: rejected) or the smallest (cheat; < 1: accepted), all seeds"
    )
    print()
    rows = []
    for kind, table in (("honest", honest), ("cheat", cheats)):
        for name, d in table.items():
            extreme = max if kind == "honest" else min
            rows.append(
                [f"{kind}: {name}"]
                + [spread_sci(d.summary[k]) for k in range(len(FRACTIONS))]
                + [" / ".join(f"{extreme(d.summary[k]):.2e}" for k in range(len(FRACTIONS)))]
                + [f"{worst_ratio(d, th, cheat=kind == 'cheat'):.3g}" for th in tiers]
            )
    header = ["variation", *(f"summary @{c}" for c in CHECKPOINTS), "max (honest) / min (cheat) @1/4, 1/2, 3/4"]
    markdown_table([*header, *(f"worst distance/tolerance [{th.name}]" for th in tiers)], rows)
    print()
    print(f"false accept, summaries: cheats accepted, on every seed (n = {args.seeds} per cheat)")
    print()
    rows = [
        [name] + [rate(sum(check(d, i) for i in range(len(d.seeds))), len(d.seeds)) for check in checks.values()]
        for name, d in cheats.items()
    ]
    markdown_table(["cheat", *checks], rows)
    print()
    print("false reject, summaries: honest results rejected, on the held-out (odd) seeds only")
    print()
    rows = []
    for name, d in honest.items():
        held_out = [i for i, seed in enumerate(d.seeds) if seed % 2]
        rows.append([name] + [rate(sum(not check(d, i) for i in held_out), len(held_out)) for check in checks.values()])
    markdown_table(["honest variation", *checks], rows)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=60, help="tasks (seed s asks for the digit s %% 10)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--margin", type=float, default=2.0, help="threshold = margin x largest honest distance")
    parser.add_argument("--model", type=Path, default=None, help="a trained folder (default: train or reuse)")
    parser.add_argument(
        "--threads-every",
        type=int,
        default=3,
        help="run the 2-thread variation on every Nth seed only (on shared cores it costs 10-50 runs' time)",
    )
    parser.add_argument("--timing-repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="write every distance here")
    args = parser.parse_args()
    quiet()
    configure_determinism(1)
    started = time.perf_counter()
    model = args.model or ensure_model()
    summarise(json.loads((model / MARKER).read_text()))
    pipes = load_pipes(model)
    honest_runs, cheat_runs = variations(pipes, args.steps, args.cfg)
    honest = {name: Distances() for name in honest_runs}
    cheats = {name: Distances() for name in cheat_runs}
    seconds: dict[str, list[float]] = {name: [] for name in ["reference", *honest_runs, *cheat_runs]}
    for seed in range(args.seeds):
        digit = seed % 10
        t0 = time.perf_counter()
        ref = generate(pipes["fp32"], text=prompt(digit), seed=seed, steps=args.steps, cfg=args.cfg)
        seconds["reference"].append(time.perf_counter() - t0)
        for table, runs in ((honest, honest_runs), (cheats, cheat_runs)):
            for name, make in runs.items():
                if name == THREADS and seed % args.threads_every:
                    continue
                t0 = time.perf_counter()
                other = make(seed, digit)
                seconds[name].append(time.perf_counter() - t0)
                compare(seed, ref, other, table[name])
        if (seed + 1) % 10 == 0:
            print(f"  {seed + 1}/{args.seeds} seeds, {time.perf_counter() - started:.0f} s", flush=True)
    bare, captured = timing(pipes["fp32"], args.steps, args.cfg, args.timing_repeats)

    calibration = list(range(0, args.seeds, 2))
    narrow = {k: v for k, v in honest.items() if not k.startswith("bfloat16")}
    tiers = [choose("fp32/fp16", narrow, calibration, args.margin), choose("+bf16", honest, calibration, args.margin)]
    checks = rules(tiers)

    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}; model {model}; {IMAGE}x{IMAGE}, {args.steps} PNDM steps, CFG {args.cfg:g}, "
        f"{args.seeds} seeds; checkpoints after {', '.join(CHECKPOINTS)} of the steps"
    )
    print()
    print("Distances to the reference run, min / median / p95 / max over all seeds; ms: mean time per image:")
    print()
    rows = []
    for kind, table in (("honest", honest), ("cheat", cheats)):
        for name, d in table.items():
            signs = [max(d.sign[k][i] for k in range(len(FRACTIONS))) for i in range(len(d.phash))]
            rows.append(
                [f"{kind}: {name}", spread(d.phash), f"{sum(d.exact)}/{len(d.exact)}"]
                + [spread_sci(d.rel_l2[k]) for k in range(len(FRACTIONS))]
                + [spread(signs), f"{1000 * statistics.mean(seconds[name]):.0f}"]
            )
    header = ["variation", "pHash (bits)", "bit-identical"] + [f"rel. L2 @{c}" for c in CHECKPOINTS]
    markdown_table([*header, "sign hash, worst ckpt (bits)", "ms"], rows)
    print(f"(reference run: {1000 * statistics.mean(seconds['reference']):.0f} ms per image)")
    print()
    for th in tiers:
        print(
            f"Tier [{th.name}], set by {', '.join(th.honest)}: pHash ≤ {th.phash} bits; rel. L2 "
            + ", ".join(f"@{c} ≤ {v:.2e}" for c, v in zip(CHECKPOINTS, th.rel_l2, strict=True))
            + "; sign hash "
            + ", ".join(f"@{c} ≤ {v}" for c, v in zip(CHECKPOINTS, th.sign, strict=True))
            + " bits"
        )
    print(
        f"(each threshold: {args.margin:g} x the largest honest distance on the {len(calibration)} calibration "
        "seeds, the even ones; hash thresholds rounded up, at least 1 bit)"
    )
    print()
    print(f"false accept: cheats accepted, on every seed (n = {args.seeds} per cheat); 95 % upper bound in brackets")
    print()
    rows = []
    for name, d in cheats.items():
        rows.append(
            [name] + [rate(sum(check(d, i) for i in range(len(d.seeds))), len(d.seeds)) for check in checks.values()]
        )
    markdown_table(["cheat", *checks], rows)
    print()
    print(
        "false reject: honest results rejected, on the held-out (odd) seeds only "
        f"(the 2-thread variation ran on 1 seed in {args.threads_every})"
    )
    print()
    rows = []
    for name, d in honest.items():
        held_out = [i for i, seed in enumerate(d.seeds) if seed % 2]
        rows.append([name] + [rate(sum(not check(d, i) for i in held_out), len(held_out)) for check in checks.values()])
    markdown_table(["honest variation", *checks], rows)
    print()
    report_summaries(honest, cheats, tiers, calibration, args)
    print(
        f"Cost of the checkpoints: {captured * 1000:.1f} ms per image with capture and hashing against "
        f"{bare * 1000:.1f} ms for the bare diffusers call (baseline, same run, median of {args.timing_repeats}, "
        f"interleaved): ratio {captured / bare:.3f}"
    )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "seeds": args.seeds,
                    "steps": args.steps,
                    "cfg": args.cfg,
                    "tiers": [th.__dict__ for th in tiers],
                    "honest": {k: v.__dict__ for k, v in honest.items()},
                    "cheats": {k: v.__dict__ for k, v in cheats.items()},
                    "seconds": seconds,
                    "seconds_per_image": {"bare": bare, "with_checkpoints": captured},
                }
            )
        )


if __name__ == "__main__":
    main()
