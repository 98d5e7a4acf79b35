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

One definition for the nodes that compute checkpoints and the validator that checks their
shape: `steps` (which callback steps are hashed), `digest` (the hash of one latent tensor's
bytes) and `well_formed`.
"""

from __future__ import annotations

import hashlib
import math
import re

FRACTIONS = (0.25, 0.5, 0.75)
"""Where in the schedule the latents are hashed (after this share of the steps)."""

DIGEST = re.compile(r"[0-9a-f]{32}")
"""A checkpoint digest: the first 128 bits of SHA-256, as 32 lower-case hex digits."""

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
