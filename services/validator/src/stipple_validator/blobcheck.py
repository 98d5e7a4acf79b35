"""What the validator recomputes from the stored blobs before it decides.

A node's reveal claims, per image, a blob key, the SHA-256 of the PNG stored there, its
width and height and its pHash. Before the decision the validator reads every image of
every candidate result (a reveal that opened its commitment and is well-formed:
decide.candidates), concurrently, and for each one:

1. bounds its size before reading it (`size(key)`, at most `max_blob_bytes`): `missing`,
   `too_large`;
2. hashes the bytes: `sha256_mismatch` when they are not what the node committed to;
3. decodes them as a PNG and nothing else (Pillow, in a worker thread): `not_png`; the
   dimensions are read from the header and must be the revealed ones before a pixel is
   decoded (the pixel limit: the task's own size): `size_mismatch`;
4. recomputes the pHash with the node's own function (`stipple_common.phash.image_phash`)
   and requires it to equal the revealed one exactly: `phash_mismatch`.

The result is one entry per node: None when every image passed, else the first failure
(decide.py turns it into `bad_result`). Each image's outcome is counted in
``stipple_validator_blob_checks_total{outcome}``. A store that cannot be reached raises
`Transient`: the decision is retried, and no node is blamed for the store's trouble.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from PIL import Image

from stipple_common.aggregate import Task
from stipple_common.blobstore import BlobNotFound, BlobStore
from stipple_common.errors import StippleError, Transient
from stipple_common.messages import ImageResult
from stipple_common.phash import image_phash

if TYPE_CHECKING:
    from .metrics import BlobCheckMetrics

BlobOutcome = Literal["ok", "missing", "too_large", "not_png", "sha256_mismatch", "phash_mismatch", "size_mismatch"]


@dataclass(frozen=True)
class ImageCheck:
    outcome: BlobOutcome
    detail: str = ""


OK = ImageCheck("ok")


def inspect_png(data: bytes, image: ImageResult) -> ImageCheck:
    """Whether `data` is the PNG `image` describes: its SHA-256, a PNG of its width and
    height, and its pHash. CPU work (hashing, decoding): run it in a worker thread."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != image.sha256:
        return ImageCheck("sha256_mismatch", f"the stored bytes hash to {digest}, the node revealed {image.sha256}")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as png:
            if png.size != (image.width, image.height):  # read from the header: nothing decoded yet
                width, height = png.size
                return ImageCheck("size_mismatch", f"the PNG is {width}x{height}, not {image.width}x{image.height}")
            png.load()
            phash = image_phash(png)
    except Exception as exc:  # Pillow raises many types for bad input (OSError, SyntaxError, ValueError, ...)
        return ImageCheck("not_png", f"not a decodable PNG: {type(exc).__name__}: {str(exc)[:200]}")
    if phash != image.phash:
        return ImageCheck("phash_mismatch", f"the stored PNG's pHash is {phash}, the node revealed {image.phash}")
    return OK


class BlobChecker:
    """Reads candidate results' blobs and checks them against their reveals (see above)."""

    def __init__(self, blobs: BlobStore, *, max_blob_bytes: int, concurrency: int, metrics: BlobCheckMetrics) -> None:
        self.blobs = blobs
        self.max_blob_bytes = max_blob_bytes
        self.concurrency = concurrency
        self.metrics = metrics

    async def check(self, task: Task, nodes: Iterable[str]) -> dict[str, str | None]:
        """Per node of `nodes`: None when each image it revealed is what it stored, else
        why not (its first failing image). Raises Transient when the store is away."""
        checked: dict[str, str | None] = {node: None for node in nodes}
        images = [
            (node, image)
            for node in checked
            for image in sorted(task.nodes[node].images, key=lambda image: image.index)
        ]
        slots = asyncio.Semaphore(self.concurrency)
        results = await asyncio.gather(*(self._check_image(image, slots) for _, image in images))
        for (node, image), result in zip(images, results, strict=True):
            self.metrics.checks.labels(result.outcome).inc()
            if result.outcome != "ok" and checked[node] is None:
                checked[node] = f"image {image.index} ({image.key}): {result.outcome}: {result.detail}"
        return checked

    async def _check_image(self, image: ImageResult, slots: asyncio.Semaphore) -> ImageCheck:
        try:
            return await self._read_and_inspect(image, slots)
        except StippleError as exc:  # the store's trouble, not the node's (its keys were screened): retry
            if exc.retryable:
                raise
            raise Transient(f"blob store: reading {image.key!r}: {exc.message}") from exc

    async def _read_and_inspect(self, image: ImageResult, slots: asyncio.Semaphore) -> ImageCheck:
        async with slots:
            size = await self.blobs.size(image.key)
            if size is None:
                return ImageCheck("missing", "no blob under the key")
            if size > self.max_blob_bytes:
                return ImageCheck("too_large", f"{size} bytes, over the limit of {self.max_blob_bytes}")
            try:
                data = await self.blobs.get(image.key)
            except BlobNotFound:
                return ImageCheck("missing", "no blob under the key")
            if len(data) > self.max_blob_bytes:  # replaced between the two reads
                return ImageCheck("too_large", f"{len(data)} bytes, over the limit of {self.max_blob_bytes}")
            return await asyncio.to_thread(inspect_png, data, image)
