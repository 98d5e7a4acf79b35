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

The blob intake computes these facts once, as it stores a node's image, and stores them
with the blob (stipple_common.pngfacts): a blob with facts is judged from its metadata
(`stat`, one small read) and its bytes are not read at all; one without (written by
something else than the intake) is read and judged from its bytes, with the same
outcomes in the same order.

The result is one entry per node: None when every image passed, else the first failure
(decide.py turns it into `bad_result`). Each image's outcome is counted in
``stipple_validator_blob_checks_total{outcome}``. A store that cannot be reached raises
`Transient`: the decision is retried, and no node is blamed for the store's trouble.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from stipple_common.aggregate import Task
from stipple_common.blobstore import BlobNotFound, BlobStore
from stipple_common.errors import StippleError, Transient
from stipple_common.messages import ImageResult
from stipple_common.pngfacts import METADATA_KEY, PngFacts, judge, png_facts

if TYPE_CHECKING:
    from .metrics import BlobCheckMetrics

BlobOutcome = Literal["ok", "missing", "too_large", "not_png", "sha256_mismatch", "phash_mismatch", "size_mismatch"]


@dataclass(frozen=True)
class ImageCheck:
    outcome: BlobOutcome
    detail: str = ""


OK = ImageCheck("ok")


def judge_facts(facts: PngFacts, image: ImageResult) -> ImageCheck:
    """Whether the blob `facts` describe is the PNG `image` describes."""
    outcome, detail = judge(facts, image.sha256, image.width, image.height, image.phash)
    return OK if outcome == "ok" else ImageCheck(outcome, detail)


def inspect_png(data: bytes, image: ImageResult) -> ImageCheck:
    """Whether `data` is the PNG `image` describes: its SHA-256, a PNG of its width and
    height, and its pHash. No more pixels than the revealed size are decoded. CPU work
    (hashing, decoding): run it in a worker thread."""
    return judge_facts(png_facts(data, max_pixels=image.width * image.height), image)


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
            info = await self.blobs.stat(image.key)
            if info is None:
                return ImageCheck("missing", "no blob under the key")
            if info.size > self.max_blob_bytes:
                return ImageCheck("too_large", f"{info.size} bytes, over the limit of {self.max_blob_bytes}")
            facts = PngFacts.decode(info.metadata.get(METADATA_KEY))
            if facts is not None:  # the intake's, from the bytes it stored: nothing to read
                return judge_facts(facts, image)
            try:
                data = await self.blobs.get(image.key)
            except BlobNotFound:
                return ImageCheck("missing", "no blob under the key")
            if len(data) > self.max_blob_bytes:  # replaced between the two reads
                return ImageCheck("too_large", f"{len(data)} bytes, over the limit of {self.max_blob_bytes}")
            return await asyncio.to_thread(inspect_png, data, image)
