"""What the control plane learns of a node's PNG once, as it stores it, so that the
validator judges a reveal from a small record instead of reading the image back.

The blob intake (the gatekeeper) has every byte of a node's image in hand when it stores
it. It computes the image's `PngFacts` there: the SHA-256 of the bytes, the PNG's width
and height from its header, and its pHash (``stipple_common.phash.image_phash``, the
node's own function), or why it is not a decodable PNG. They are stored with the blob as
one metadata entry (`METADATA_KEY`). Nodes cannot write the blob store, nor its metadata:
only the intake writes what they upload, once per key.

The validator then reads the blob's metadata (one small read) and `judge`s each revealed
image against the facts, exactly as it would judge the bytes: the same outcomes, in the
same order. A blob without facts (written by something else than the intake, or facts of
another `VERSION`) is read back and judged from its bytes, as before. Moving the decode
to the intake also moves the work from the one active validator to the intakes, which
share a queue group and scale out.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Literal

from stipple_common.phash import image_phash

VERSION = "1"
METADATA_KEY = "stipple-png"  # lowercase: S3 metadata keys come back lowercased

PngOutcome = Literal["ok", "not_png", "sha256_mismatch", "phash_mismatch", "size_mismatch"]


@dataclass(frozen=True)
class PngFacts:
    """The facts of one stored blob; `error` is why it is not a decodable PNG ("" when it
    is), `width` and `height` are 0 when not even its header could be read."""

    sha256: str
    width: int = 0
    height: int = 0
    phash: str = ""
    error: str = ""

    def encode(self) -> str:
        """One line of printable ASCII (S3 and NATS headers carry nothing else)."""
        error = self.error.encode("ascii", "replace").decode().replace("\n", " ")[:200]
        return f"{VERSION};{self.sha256};{self.width};{self.height};{self.phash};{error}"

    @classmethod
    def decode(cls, text: str | None) -> PngFacts | None:
        """The facts in `text`, or None when there are none this code reads (another
        version, or anything malformed): the caller then judges the bytes."""
        if not text:
            return None
        parts = text.split(";", 5)
        if len(parts) != 6 or parts[0] != VERSION:
            return None
        _, sha256, width, height, phash, error = parts
        if not (width.isdigit() and height.isdigit() and len(sha256) == 64):
            return None
        return cls(sha256=sha256, width=int(width), height=int(height), phash=phash, error=error)


def png_facts(data: bytes, *, max_pixels: int) -> PngFacts:
    """The facts of `data`. CPU work (hashing, decoding): run it in a worker thread. A PNG
    whose header claims more than `max_pixels` is not decoded (a decompression bomb)."""
    from PIL import Image

    digest = hashlib.sha256(data).hexdigest()
    width = height = 0
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as png:
            width, height = png.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                return PngFacts(digest, width, height, error=f"{width}x{height} is over {max_pixels} pixels")
            png.load()
            phash = image_phash(png)
    except Exception as exc:  # Pillow raises many types for bad input (OSError, SyntaxError, ValueError, ...)
        return PngFacts(digest, width, height, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    return PngFacts(digest, width, height, phash)


def judge(facts: PngFacts, sha256: str, width: int, height: int, phash: str) -> tuple[PngOutcome, str]:
    """Whether the blob the facts describe is the PNG a node revealed (its SHA-256, size
    and pHash): the outcome and why, in the order the checks run on the bytes."""
    if facts.sha256 != sha256:
        return "sha256_mismatch", f"the stored bytes hash to {facts.sha256}, the node revealed {sha256}"
    if facts.width and (facts.width, facts.height) != (width, height):
        return "size_mismatch", f"the PNG is {facts.width}x{facts.height}, not {width}x{height}"
    if facts.error:
        return "not_png", f"not a decodable PNG: {facts.error}"
    if facts.phash != phash:
        return "phash_mismatch", f"the stored PNG's pHash is {facts.phash}, the node revealed {phash}"
    return "ok", ""
