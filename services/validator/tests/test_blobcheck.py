"""The blob checks on their own, over an in-memory store: every outcome, the size bound
before any read, the PNG header read before any pixel, and a store that is away. Each
runs twice: with blobs stored as the blob intake stores them (with their facts: judged
without a read) and with bare blobs (read back and judged from their bytes)."""

import hashlib
import io
import struct
import zlib

import pytest
from msgspec.structs import replace
from prometheus_client import CollectorRegistry

from stipple_common.aggregate import NodeRun, Task
from stipple_common.blobstore import BlobInfo, BlobNotFound
from stipple_common.errors import StippleError, Transient
from stipple_common.messages import ImageResult
from stipple_common.pngfacts import METADATA_KEY, png_facts
from stipple_common.taskspec import MAX_SIDE, parse_task
from stipple_validator.blobcheck import BlobChecker, inspect_png
from stipple_validator.metrics import BlobCheckMetrics

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"image_width": 64, "image_height": 64}})


class MemoryStore:
    """A BlobStore in a dict, recording reads; `fail` makes every call raise it. With
    `intake`, a put stores the blob's facts with it, as the blob intake does."""

    def __init__(self, *, intake: bool = False):
        self.blobs: dict[str, bytes] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.reads: list[str] = []
        self.fail: Exception | None = None
        self.intake = intake

    async def put(self, key, data, *, content_type="application/octet-stream", metadata=None):
        if self.intake and metadata is None:
            metadata = {METADATA_KEY: png_facts(data, max_pixels=MAX_SIDE * MAX_SIDE).encode()}
        self.blobs[key] = data
        self.metadata[key] = dict(metadata or {})

    async def get(self, key):
        if self.fail:
            raise self.fail
        self.reads.append(key)
        if key not in self.blobs:
            raise BlobNotFound(key)
        return self.blobs[key]

    async def size(self, key):
        info = await self.stat(key)
        return None if info is None else info.size

    async def stat(self, key):
        if self.fail:
            raise self.fail
        return BlobInfo(len(self.blobs[key]), self.metadata[key]) if key in self.blobs else None

    async def delete(self, key):
        self.blobs.pop(key, None)

    async def close(self):
        pass


def image_for(png: bytes, *, phash: str, sha256: str | None = None, index=0, width=64, height=64) -> ImageResult:
    return ImageResult(
        index=index,
        key=f"tasks/t/n/s/{index}.png",
        phash=phash,
        seed=1 + index,
        width=width,
        height=height,
        sha256=sha256 if sha256 is not None else hashlib.sha256(png).hexdigest(),
    )


def task_of(**images: list[ImageResult]) -> Task:
    nodes = {node: NodeRun(node_id=node, status="revealed", images=list(imgs)) for node, imgs in images.items()}
    return Task(task_id="t", status="revealing", spec=SPEC, submitted_at=0.0, nodes=nodes)


@pytest.fixture(params=["intake", "bare"])
def store(request):
    return MemoryStore(intake=request.param == "intake")


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def checker(store, registry):
    return BlobChecker(store, max_blob_bytes=100_000, concurrency=4, metrics=BlobCheckMetrics(registry))


def counted(registry, outcome):
    return registry.get_sample_value("stipple_validator_blob_checks_total", {"outcome": outcome})


async def check_one(checker, store, blob: bytes | None, image: ImageResult):
    if blob is not None:
        await store.put(image.key, blob)
    why = (await checker.check(task_of(n=[image]), ["n"]))["n"]
    if store.intake:
        assert store.reads == [], "a blob stored with its facts was read back"
    return why


async def test_an_honest_image_passes(checker, store, registry, pictures):
    png = pictures.png(0)
    phash, sha256 = pictures.hashes(png)
    assert await check_one(checker, store, png, image_for(png, phash=phash, sha256=sha256)) is None
    assert counted(registry, "ok") == 1
    assert counted(registry, "sha256_mismatch") == 0  # every series exists from the start


async def test_a_missing_blob(checker, store, registry, pictures):
    why = await check_one(checker, store, None, image_for(b"", phash="0" * 16))
    assert why == "image 0 (tasks/t/n/s/0.png): missing: no blob under the key"
    assert counted(registry, "missing") == 1


async def test_a_blob_over_the_limit_is_not_even_read(checker, store, registry, pictures):
    blob = pictures.png(0) + b"\0" * 100_000
    why = await check_one(checker, store, blob, image_for(blob, phash="0" * 16))
    assert "too_large: 112" in why
    assert "over the limit of 100000" in why
    assert store.reads == []
    assert counted(registry, "too_large") == 1


async def test_other_bytes_than_the_revealed_hash(checker, store, registry, pictures):
    """The node reports the honest hashes of picture 0 but stored picture 1."""
    honest = pictures.png(0)
    phash, sha256 = pictures.hashes(honest)
    why = await check_one(checker, store, pictures.png(1), image_for(honest, phash=phash, sha256=sha256))
    assert "sha256_mismatch" in why
    assert counted(registry, "sha256_mismatch") == 1


async def test_a_revealed_phash_that_is_not_the_stored_images(checker, store, registry, pictures):
    """The node stored picture 1 (and reveals its SHA-256) but claims picture 0's pHash,
    to agree with the others."""
    stored = pictures.png(1)
    claimed, _ = pictures.hashes(pictures.png(0))
    why = await check_one(checker, store, stored, image_for(stored, phash=claimed))
    assert "phash_mismatch" in why
    assert counted(registry, "phash_mismatch") == 1


async def test_not_a_png(checker, store, registry, pictures):
    jpeg = io.BytesIO()
    pictures.image(0).save(jpeg, format="JPEG")
    for blob in (b"hello, not an image", jpeg.getvalue(), pictures.png(0)[:200]):
        why = await check_one(checker, store, blob, image_for(blob, phash="0" * 16))
        assert "not_png" in why
    assert counted(registry, "not_png") == 3


async def test_dimensions_other_than_revealed(checker, store, registry, pictures):
    png = pictures.png(0, width=72)
    why = await check_one(checker, store, png, image_for(png, phash=pictures.hashes(png)[0]))
    assert "size_mismatch: the PNG is 72x64, not 64x64" in why
    assert counted(registry, "size_mismatch") == 1


def huge_header(png: bytes, width: int, height: int) -> bytes:
    """`png` with its IHDR claiming another size (CRC fixed): a decompression bomb's header."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


@pytest.mark.parametrize(("side", "outcome"), [(9_000, "size_mismatch"), (100_000, "not_png")])
def test_a_huge_header_is_refused_before_any_pixel_is_decoded(pictures, side, outcome):
    """81 Mpixel (under Pillow's own bomb limit): refused on the header's size; 10 Gpixel:
    Pillow refuses to open it. Neither is decoded (that would take seconds and gigabytes)."""
    bomb = huge_header(pictures.png(0), side, side)
    assert inspect_png(bomb, image_for(bomb, phash="0" * 16)).outcome == outcome


async def test_per_node_the_first_failing_image_is_the_reason(checker, store, pictures):
    revealed = {}
    for node in ("a", "b"):
        revealed[node] = []
        for index in range(3):
            png = pictures.png(index)
            phash, sha256 = pictures.hashes(png)
            image = replace(image_for(png, phash=phash, sha256=sha256, index=index), key=f"tasks/t/{node}/{index}.png")
            revealed[node].append(image)
            await store.put(image.key, png)
    await store.put("tasks/t/a/2.png", pictures.png(8))  # a's images 1 and 2 are not what it revealed
    await store.put("tasks/t/a/1.png", pictures.png(9))
    checked = await checker.check(task_of(**revealed), ["a", "b"])
    assert len(store.reads) == (0 if store.intake else 6)
    assert checked["b"] is None
    assert checked["a"].startswith("image 1 (tasks/t/a/1.png): sha256_mismatch: the stored bytes hash to ")


async def test_a_store_that_is_away_is_transient_and_blames_nobody(checker, store, registry, pictures):
    png = pictures.png(0)
    phash, sha256 = pictures.hashes(png)
    task = task_of(n=[image_for(png, phash=phash, sha256=sha256)])
    await store.put("tasks/t/n/s/0.png", png)
    store.fail = Transient("object store unavailable")
    with pytest.raises(Transient):
        await checker.check(task, ["n"])
    store.fail = StippleError("odd store error", code="blob_store_error")
    with pytest.raises(Transient, match="odd store error"):  # retried, never a verdict
        await checker.check(task, ["n"])
    assert counted(registry, "ok") == 0
