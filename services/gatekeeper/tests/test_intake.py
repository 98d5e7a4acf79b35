"""The blob intake on its own nats-server, driven by the nodes' client: what it stores
with each blob (the facts the validator judges, a content type of its own), and the
bound on blobs per node and task."""

from __future__ import annotations

import io
import random
import uuid

import nats
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from stipple_common.blobstore import open_blob_store
from stipple_common.blobstore.intake import IntakeClient, UploadRefused, blob_prefix
from stipple_common.pngfacts import METADATA_KEY, PngFacts, png_facts
from stipple_gatekeeper.intake import MAX_BLOBS_PER_TASK, Intake
from stipple_gatekeeper.metrics import IntakeMetrics

pytestmark = pytest.mark.integration

NODE = "0x" + "ab" * 20


def png(seed: int) -> bytes:
    image = Image.frombytes("RGB", (64, 64), random.Random(seed).randbytes(64 * 64 * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
async def intake(nats_url):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    blobs = await open_blob_store(backend="jetstream", js=js, bucket=f"intake-{uuid.uuid4().hex[:8]}")
    registry = CollectorRegistry()
    served = Intake(
        nc=nc, js=js, blobs=blobs, metrics=IntakeMetrics(registry), max_blob_bytes=1_000_000, check_assignment=False
    )
    subs = await served.serve()
    yield served, IntakeClient(nc, NODE), registry
    for sub in subs:
        await sub.unsubscribe()
    await nc.close()


async def test_a_blob_is_stored_with_its_facts_and_a_content_type_the_node_does_not_choose(intake):
    served, client, _ = intake
    prefix = blob_prefix(uuid.uuid4().hex, NODE)
    image = png(1)
    await client.put(prefix + "a/0.png", image, content_type="text/html")  # a node's choice: ignored
    await client.put(prefix + "a/1.png", b"<script>not a png</script>", content_type="image/png")
    stored = await served.blobs.stat(prefix + "a/0.png")
    assert stored is not None
    assert PngFacts.decode(stored.metadata[METADATA_KEY]) == png_facts(image, max_pixels=64 * 64)
    junk = await served.blobs.stat(prefix + "a/1.png")
    assert junk is not None
    facts = PngFacts.decode(junk.metadata[METADATA_KEY])
    assert facts is not None
    assert facts.error  # the validator judges it not_png without reading it
    info = {
        key: await served.blobs._obs.get_info(key)  # the content type as stored
        for key in (prefix + "a/0.png", prefix + "a/1.png")
    }
    assert info[prefix + "a/0.png"].headers["Content-Type"] == ["image/png"]
    assert info[prefix + "a/1.png"].headers["Content-Type"] == ["application/octet-stream"]


async def test_a_node_stores_a_bounded_number_of_blobs_per_task(intake):
    """Each blob costs the intake a decode and the store a write: a node cannot make it
    take more than MAX_BLOBS_PER_TASK for one task (another task is another count)."""
    _, client, registry = intake
    task, other = uuid.uuid4().hex, uuid.uuid4().hex
    for i in range(MAX_BLOBS_PER_TASK):
        await client.put(f"{blob_prefix(task, NODE)}k{i}/0.png", png(i))
    with pytest.raises(UploadRefused, match="too_many"):
        await client.put(f"{blob_prefix(task, NODE)}more/0.png", png(99))
    await client.put(f"{blob_prefix(other, NODE)}k/0.png", png(0))
    assert registry.get_sample_value("stipple_gatekeeper_uploads_total", {"outcome": "too_many"}) == 1


async def test_a_key_is_written_once_and_each_refused_rewrite_counts_against_the_node(intake):
    """A second upload to a stored key is refused (`exists`) and the first blob and its facts
    stay. The intake decoded the second one before the store refused it, so it counts
    against the node's MAX_BLOBS_PER_TASK like a stored blob: rewriting one key over and
    over costs the intake no more decodes than new keys would."""
    served, client, registry = intake
    task = uuid.uuid4().hex
    key = f"{blob_prefix(task, NODE)}k/0.png"
    first = png(1)
    await client.put(key, first)
    facts = (await served.blobs.stat(key)).metadata[METADATA_KEY]
    for attempt in range(MAX_BLOBS_PER_TASK - 1):
        with pytest.raises(UploadRefused, match="exists"):
            await client.put(key, png(100 + attempt))
    assert await served.blobs.get(key) == first
    assert (await served.blobs.stat(key)).metadata[METADATA_KEY] == facts
    with pytest.raises(UploadRefused, match="too_many"):  # refused before any decode now
        await client.put(key, png(99))
    assert registry.get_sample_value("stipple_gatekeeper_uploads_total", {"outcome": "exists"}) == (
        MAX_BLOBS_PER_TASK - 1
    )


async def test_the_same_bytes_again_under_a_stored_key_are_answered_as_stored(intake):
    """A node whose upload's answer was lost (the store slow or away: `store_unavailable`
    after the write went through) uploads again: the same bytes are answered as stored,
    with their digest, and nothing is written; other bytes under the key stay refused.
    Each counts against the node's blobs for the task, as a refused rewrite does."""
    served, client, registry = intake
    key = f"{blob_prefix(uuid.uuid4().hex, NODE)}k/0.png"
    image = png(7)
    first = await client.put(key, image)
    assert await client.put(key, image) == first == png_facts(image, max_pixels=64 * 64).sha256
    with pytest.raises(UploadRefused, match="exists"):
        await client.put(key, png(8))
    assert await served.blobs.get(key) == image
    repeated = registry.get_sample_value("stipple_gatekeeper_uploads_total", {"outcome": "repeated"})
    assert (repeated, registry.get_sample_value("stipple_gatekeeper_uploads_total", {"outcome": "exists"})) == (1, 1)
    assert served._stored[(key.split("/")[1], NODE)] == 3
