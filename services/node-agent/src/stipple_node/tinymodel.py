"""A tiny Stable-Diffusion-1.5-shaped model, built locally with seeded random weights.

Tests, demos and CI need a real diffusers model folder without downloading gigabytes
(nothing can be fetched from the Hugging Face hub here). `make_tiny_model` builds one with
the SD 1.5 component classes and block layout (UNet2DConditionModel with cross-attention
down/up blocks, an AutoencoderKL that downsamples 8x, CLIPTextModel, CLIPTokenizer, PNDM
scheduler) but about 500 times fewer parameters (1.8 M), so a 64x64 image with 4 steps
renders in about 0.1 s on a 2-core CPU. Weights are random but deterministic for a given seed, so every
machine that builds the model gets the same images for the same task.

The CLIP tokenizer is generated too: a byte-level BPE vocabulary laid out like CLIP's
(bytes, bytes + "</w>", merges, then the two special tokens), with merges learned from a
small built-in English word list so that common prompt words become one or a few tokens.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stipple_common.errors import StippleError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

TINY_MODEL_NAME = "tiny-sd"
"""The name under which nodes and tests announce the tiny model."""

MODEL_INDEX = "model_index.json"

# Sizes. SD 1.5 is (320, 640, 1280, 1280) UNet channels, 768-wide CLIP, (128, 256, 512, 512) VAE.
UNET_CHANNELS = (32, 32, 64, 64)
UNET_HEADS = 2  # passed as `attention_head_dim`, which SD configs use to mean the number of heads
VAE_CHANNELS = (8, 16, 16, 16)
NORM_GROUPS = 8
TEXT_HIDDEN = 32
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_INTERMEDIATE = 64
MAX_TOKENS = 77
BPE_MERGES = 1000
"""At most this many merges are learned (the built-in word list runs out after 839); the
vocabulary is 512 byte tokens + the merge results + 2 special tokens (1353 in all)."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words the tokenizer's merges are learned from: common English plus typical prompt words.
_CORPUS_TEXT = """
a an the and or but of in on at to for with from by as into over under above below
is are was were be been being it its this that these those there here he she they we
you i me my our your his her their them who what which when where why how not no yes
all any some many much more most few very so too just only also than then now up down
out off again once each both other such own same new old big small large little long
short high low young good great best better bad beautiful pretty ugly dark light bright
portrait photo photograph painting drawing sketch illustration render rendering art
artwork artist style detailed details detail highly intricate sharp focus realistic
photorealistic hyperrealistic cinematic lighting studio soft hard dramatic volumetric
golden hour sunset sunrise night day morning evening sky cloud clouds sun moon star
stars space planet galaxy city street building buildings house castle tower bridge
road forest tree trees flower flowers garden grass field mountain mountains river lake
sea ocean beach water rain snow fire smoke fog mist storm winter summer spring autumn
man woman person people girl boy child children face eyes hair hand hands smile
wearing dress shirt hat armor helmet sword robot cat dog bird horse dragon fish animal
animals car ship boat train plane red green blue yellow orange purple pink black white
gray grey brown gold golden silver colorful color colors vibrant pastel neon glowing
oil watercolor digital concept fantasy science fiction futuristic cyberpunk steampunk
medieval ancient modern abstract minimalist surreal epic magical mysterious peaceful
trending artstation unreal engine octane masterpiece quality resolution wallpaper
background foreground landscape scene view wide angle close closeup shot camera lens
blurry blur noise grain low worst deformed distorted disfigured extra missing fingers
anime cartoon comic manga character characters design concept sculpture statue marble
wood wooden stone metal glass crystal paper fabric leather water ice reflection shadow
shadows sitting standing walking running flying looking holding playing reading cup
table chair room window door wall floor kitchen library temple church palace ruins
lantern candle lamp light lights glow magic wizard witch knight king queen princess
warrior soldier pirate astronaut robot alien monster creature ghost skull heart rose
"""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map from each byte to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_clip_vocab(
    words: list[str] | None = None, num_merges: int = BPE_MERGES
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-layout byte-level BPE vocabulary and merge list from `words`.

    Deterministic: the most frequent adjacent pair is merged first, ties broken by the
    pair's text. Stops early when every word is a single token. Every merge's two parts
    and its result are in the vocabulary, which transformers 5 requires.
    """
    byte_chars = bytes_to_unicode()
    tokens: list[str] = list(byte_chars.values())
    tokens += [c + END_OF_WORD for c in byte_chars.values()]
    counts = Counter(w.lower() for w in (words if words is not None else _CORPUS_TEXT.split()))
    # Each word as a list of symbols, the last one carrying the end-of-word marker (like CLIP).
    spelled: list[list[str]] = []
    weights: list[int] = []
    for word, count in sorted(counts.items()):
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        chars[-1] += END_OF_WORD
        spelled.append(chars)
        weights.append(count)

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, chars in enumerate(spelled):
        for pair in itertools.pairwise(chars):
            pair_counts[pair] += weights[i]
            where.setdefault(pair, set()).add(i)
    # Max-heap of (-count, pair); entries whose count is stale are skipped when popped.
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    known = set(tokens)
    while heap and len(merges) < num_merges:
        neg, best = heapq.heappop(heap)
        if pair_counts.get(best, 0) != -neg:  # stale entry
            continue
        merges.append(best)
        joined = best[0] + best[1]
        if joined not in known:
            known.add(joined)
            tokens.append(joined)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(best, ())):
            old = spelled[i]
            for pair in itertools.pairwise(old):
                pair_counts[pair] -= weights[i]
                changed.add(pair)
            new = _merge_pair(old, best)
            spelled[i] = new
            for pair in itertools.pairwise(new):
                pair_counts[pair] += weights[i]
                where.setdefault(pair, set()).add(i)
                changed.add(pair)
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
                where.pop(pair, None)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    """`word` with every adjacent occurrence of `pair` fused into one symbol."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def write_clip_tokenizer_files(directory: Path) -> int:
    """Write vocab.json and merges.txt (CLIP's file format) into `directory`; return the vocab size."""
    vocab, merges = build_clip_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


def make_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    """Build the tiny SD 1.5 model into `directory` (diffusers layout, safetensors) and return it.

    Idempotent and cheap to call again: a folder that already holds a model is returned as
    is. The model is written to a temporary sibling folder and renamed into place, so a
    reader (or a concurrent builder) never sees a half-written model. `directory` may
    exist already if it is empty.
    """

    def write(staging: Path) -> None:
        # vocab.json/merges.txt stay next to the tokenizer.json that save_pretrained adds, as in SD 1.5.
        vocab_size = write_clip_tokenizer_files(staging / "tokenizer")
        _build(seed, staging / "tokenizer", vocab_size).save_pretrained(staging, safe_serialization=True)

    return build_folder(directory, MODEL_INDEX, write)


def build_folder(directory: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """Run `write(staging)` in a temporary sibling of `directory` and rename it into place,
    so a reader (or a concurrent builder) never sees a half-written folder.

    `marker` is a file that `write` creates last and whose presence means "complete"; a
    folder holding it is returned as is. `directory` may exist already if it is empty.
    """
    directory = Path(directory)
    if (directory / marker).is_file():
        return directory
    if directory.is_dir() and any(directory.iterdir()):
        raise _not_empty(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    try:
        write(staging)
        if not (staging / marker).is_file():
            raise StippleError(f"building {directory.name} in {staging} wrote no {marker}")
        staging.chmod(0o755)  # mkdtemp makes it private; a model is an ordinary shared folder
        try:
            os.replace(staging, directory)  # atomic; replaces `directory` only if it is an empty folder
        except OSError:
            if (directory / marker).is_file():  # someone else finished first
                return directory
            raise _not_empty(directory) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _not_empty(directory: Path) -> StippleError:
    return StippleError(
        f"cannot create {directory.name} in {directory}: it exists, is not an empty folder and holds no model"
    )


def _build(seed: int, tokenizer_dir: Path, vocab_size: int) -> StableDiffusionPipeline:
    """The pipeline object with seeded random weights (torch.manual_seed before each part).

    diffusers and transformers are imported here, not at module level: they take seconds to import.
    """
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # Read from the CLIP-format files just written (paths, so the files themselves are what is tested).
    tokenizer = CLIPTokenizer(
        vocab=str(tokenizer_dir / "vocab.json"), merges=str(tokenizer_dir / "merges.txt"), model_max_length=MAX_TOKENS
    )
    if len(tokenizer) != vocab_size:
        raise StippleError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,  # latent side for a 64x64 image
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        attention_head_dim=UNET_HEADS,
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=NORM_GROUPS,
    )
    torch.manual_seed(seed)
    vae = tiny_vae(scaling_factor=0.18215)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
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
    # SD 1.5's own scheduler config.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
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


def tiny_vae(*, scaling_factor: float, force_upcast: bool = True) -> AutoencoderKL:
    """The tiny VAE layout (8x down, 4 latent channels), shared with the tiny zoo."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=NORM_GROUPS,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )
