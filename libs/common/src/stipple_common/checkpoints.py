"""Checkpoints: what a node commits to beyond its final images, so that skipped work shows.

A node hashes each image's latents after fixed fractions of its denoising schedule
(`FRACTIONS`: 1/4, 1/2 and 3/4 of the steps of the first phase, the base model's) and
commits to those digests with its images (stipple_common.commitment). Two nodes of one
*determinism class* (same device model, driver and CUDA, torch, diffusers, dtype, and on a
CPU the thread count: what makes floating point bit-identical) compute the same latents
bit for bit, so their checkpoints must be equal: a node that ran fewer steps, another
scheduler, another prompt or another model has other latents at 1/4 of the way, even
where its final image lands within the pHash threshold of the honest one (bench/RESULTS.md,
"Validation matrix"). Across classes latents differ in their last bits, and results are
compared by pHash alone (docs/validation.md says what that leaves open).

Across classes, each checkpoint also carries a *summary* of the latents: the latents
average-pooled to at most `SUMMARY_SIDE` x `SUMMARY_SIDE` per channel, float16, base64
(`summary`). Two classes' summaries differ by rounding; a node that skipped steps, or ran
another prompt, seed or model, moves them far more. `summary_distance` (relative L2) is
compared against a tolerance measured by bench/validation_matrix.py, not guessed.

One definition for the nodes that compute checkpoints and the validator that checks their
shape: `steps` (which callback steps are hashed), `digest` (the hash of one latent tensor's
bytes), `summary`, `summary_distance` and `well_formed`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re

import numpy as np

FRACTIONS = (0.25, 0.5, 0.75)
"""Where in the schedule the latents are hashed (after this share of the steps)."""

DIGEST = re.compile(r"[0-9a-f]{32}")
"""A checkpoint digest: the first 128 bits of SHA-256, as 32 lower-case hex digits."""

SUMMARY_SIDE = 8
"""A summary pools each latent channel to at most this many cells a side."""

MAX_SUMMARY_CHARS = 4 * 8 * 8 * 2 * 4 // 3 + 4  # 4 channels x 8 x 8 float16, in base64
"""The longest summary a reveal may carry (SD latents have 4 channels)."""

MAX_CLASS_LENGTH = 200
"""A determinism class is a short description; a longer one is malformed."""


def steps(num_steps: int) -> list[int]:
    """The 0-based callback step indexes after which the latents are hashed, one per fraction:
    after ceil(f * n) steps (at least the first step, at most the last). With fewer steps
    than fractions some coincide, and the same latents are hashed twice: there is always
    one digest per fraction."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return [min(num_steps, max(1, math.ceil(round(f * num_steps, 6)))) - 1 for f in FRACTIONS]


def digest(data: bytes) -> str:
    """The digest of one checkpoint: the latents of one image as float32 bytes, C order."""
    return hashlib.sha256(data).hexdigest()[:32]


def well_formed(checkpoints: list[str]) -> str | None:
    """Why a revealed image's checkpoints are not one digest per fraction, or None."""
    if len(checkpoints) != len(FRACTIONS):
        return f"{len(checkpoints)} checkpoints, expected {len(FRACTIONS)} (after {', '.join(map(str, FRACTIONS))})"
    for checkpoint in checkpoints:
        if not DIGEST.fullmatch(checkpoint):
            return f"checkpoint {checkpoint[:40]!r} is not 32 lower-case hex digits"
    return None


def summaries_well_formed(summaries: list[str]) -> str | None:
    """Why a revealed image's summaries are not one summary per fraction, or None. An image
    may carry none (then it agrees with another class's result on nothing)."""
    if not summaries:
        return None
    if len(summaries) != len(FRACTIONS):
        return f"{len(summaries)} summaries, expected none or {len(FRACTIONS)}"
    for text in summaries:
        if decode_summary(text) is None:
            return f"summary {text[:40]!r} is not base64 of float16 values (at most {MAX_SUMMARY_CHARS} characters)"
    return None


def summary(latents: np.ndarray) -> str:
    """The summary of one image's latents (channels x height x width, or with a leading
    batch axis of 1): each channel average-pooled to at most SUMMARY_SIDE cells a side
    (cells of equal size; a side not divisible keeps its first whole cells), float16
    little-endian, base64."""
    array = np.asarray(latents, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"latents of shape {array.shape}: expected (channels, height, width)")
    channels, height, width = array.shape
    cells_h, cells_w = min(SUMMARY_SIDE, height), min(SUMMARY_SIDE, width)
    step_h, step_w = height // cells_h, width // cells_w
    cropped = array[:, : cells_h * step_h, : cells_w * step_w]
    pooled = cropped.reshape(channels, cells_h, step_h, cells_w, step_w).mean(axis=(2, 4))
    return base64.b64encode(pooled.astype("<f2").tobytes()).decode()


def decode_summary(text: str) -> np.ndarray | None:
    """A summary's values (float32), or None when it is not one."""
    if not text or len(text) > MAX_SUMMARY_CHARS:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw or len(raw) % 2:
        return None
    values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    return values if np.all(np.isfinite(values)) else None


def summary_distance(a: str, b: str) -> float:
    """The relative L2 distance ||a - b|| / ||a|| of two summaries; infinite when either is
    not a summary or their shapes differ."""
    x, y = decode_summary(a), decode_summary(b)
    if x is None or y is None or x.shape != y.shape:
        return math.inf
    norm = float(np.linalg.norm(x))
    return float(np.linalg.norm(x - y)) / norm if norm > 0 else (0.0 if not np.any(y) else math.inf)
