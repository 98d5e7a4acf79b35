"""Perceptual hashes: how one is computed, and how two are compared. Hashes travel as hex
strings (imagehash's str()); two images are "the same" when the Hamming distance between
their hashes is at most a threshold that is configuration (VALIDATOR_PHASH_THRESHOLD),
calibrated by measurement."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def image_phash(image: Image.Image) -> str:
    """The pHash a node reports for an image and the validator recomputes from the stored
    PNG: ``imagehash.phash`` of the RGB image, hash_size 8, as 16 hex digits. One
    definition for both, so that an honest node's hash is always recomputed exactly.
    imagehash and Pillow are imported here, not at module load: only the services that
    hash images (node agent, validator) depend on them."""
    import imagehash

    return str(imagehash.phash(image.convert("RGB"), hash_size=8))


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex-encoded hashes of the same length."""
    if len(a) != len(b):
        raise ValueError(f"hashes differ in length: {a!r} vs {b!r}")
    return (int(a, 16) ^ int(b, 16)).bit_count()


def same_images(a: list[str], b: list[str], threshold: int) -> bool:
    """Two nodes' results agree when they have as many images and each pair is within threshold."""
    return len(a) == len(b) and all(hamming(x, y) <= threshold for x, y in zip(a, b, strict=True))
