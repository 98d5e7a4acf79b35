"""Blob-store contract, run against both backends on real servers.

`BlobStoreContract` holds the tests; each subclass supplies ``open_store``, an async
callable that opens a new store on one bucket unique to the test. JetStream runs on the
session nats-server; S3 runs on moto's HTTP server (no MinIO here), driven by the same
minio client production uses.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import nats
import nats.errors
import pytest
from minio import Minio
from nats.js.errors import BucketNotFoundError

from stipple_common.blobstore import BlobExists, BlobNotFound, BlobStore, open_blob_store
from stipple_common.blobstore.jetstream import JetStreamBlobStore
from stipple_common.errors import StippleError, Transient

pytestmark = pytest.mark.integration

OpenStore = Callable[[], Awaitable[BlobStore]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _key() -> str:
    return f"tasks/{uuid.uuid4()}/node-{uuid.uuid4().hex[:8]}/0.png"


class BlobStoreContract:
    """Behaviour every BlobStore must have. Not collected itself (no Test prefix)."""

    @pytest.fixture
    async def store(self, open_store: OpenStore) -> BlobStore:
        return await open_store()

    async def test_is_a_blob_store(self, store: BlobStore) -> None:
        assert isinstance(store, BlobStore)

    @pytest.mark.parametrize("size", [0, 1, 100_000, 1_000_003], ids=["empty", "1B", "100KB", "1MB"])
    async def test_round_trip(self, store: BlobStore, size: int) -> None:
        data = os.urandom(size)
        key = _key()
        await store.put(key, data, content_type="image/png")
        assert await store.get(key) == data

    async def test_keys_with_slashes_are_distinct(self, store: BlobStore) -> None:
        base = f"tasks/{uuid.uuid4()}"
        keys = [f"{base}/node-a/0.png", f"{base}/node-a/1.png", f"{base}/node-b/0.png", f"{base}/node-a"]
        for i, key in enumerate(keys):
            await store.put(key, f"blob {i}".encode())
        for i, key in enumerate(keys):
            assert await store.get(key) == f"blob {i}".encode()

    async def test_overwrite_replaces(self, store: BlobStore) -> None:
        key = _key()
        await store.put(key, os.urandom(600_000))
        await store.put(key, b"second")
        assert await store.get(key) == b"second"

    async def test_get_missing_raises_naming_the_key(self, store: BlobStore) -> None:
        key = _key()
        with pytest.raises(BlobNotFound) as info:
            await store.get(key)
        assert key in str(info.value)
        assert info.value.key == key
        assert info.value.code == "blob_not_found"
        assert not info.value.retryable
        assert isinstance(info.value, StippleError)

    async def test_delete_then_get_raises(self, store: BlobStore) -> None:
        key = _key()
        await store.put(key, b"x" * 1000)
        await store.delete(key)
        with pytest.raises(BlobNotFound, match="tasks/"):
            await store.get(key)

    async def test_delete_missing_is_fine(self, store: BlobStore) -> None:
        key = _key()
        await store.delete(key)
        await store.put(key, b"x")
        await store.delete(key)
        await store.delete(key)

    async def test_put_after_delete(self, store: BlobStore) -> None:
        key = _key()
        await store.put(key, b"first")
        await store.delete(key)
        await store.put(key, b"again")
        assert await store.get(key) == b"again"

    async def test_two_stores_on_one_bucket_share_objects(self, open_store: OpenStore) -> None:
        # Opened concurrently on a bucket that does not exist yet: both race to create it.
        a, b = await asyncio.gather(open_store(), open_store())
        key = _key()
        await a.put(key, b"from a")
        assert await b.get(key) == b"from a"
        await b.delete(key)
        with pytest.raises(BlobNotFound):
            await a.get(key)
        c = await open_store()  # binds to the existing bucket
        await c.put(key, b"from c")
        assert await a.get(key) == b"from c"

    async def test_stat_gives_the_size_and_the_metadata_it_was_put_with(self, store: BlobStore) -> None:
        key, bare = _key(), _key()
        facts = "1;" + "a" * 64 + ";64;64;c3c3c3c3c3c3c3c3;"
        await store.put(key, b"x" * 1000, content_type="image/png", metadata={"Stipple-Png": facts})
        await store.put(bare, b"y" * 10)
        info = await store.stat(key)
        assert info is not None
        assert (info.size, dict(info.metadata)) == (1000, {"stipple-png": facts})  # keys come back lowercase
        assert await store.size(key) == 1000
        bare_info = await store.stat(bare)
        assert bare_info is not None
        assert (bare_info.size, dict(bare_info.metadata)) == (10, {})
        assert await store.stat(_key()) is None
        await store.delete(key)
        assert await store.stat(key) is None

    @pytest.mark.parametrize("size", [0, 1_000, 700_000], ids=["empty", "1KB", "700KB"])
    async def test_put_new_writes_a_key_once(self, store: BlobStore, size: int) -> None:
        key = _key()
        data = os.urandom(size)
        facts = "1;" + "b" * 64 + ";64;64;c3c3c3c3c3c3c3c3;"
        await store.put_new(key, data, content_type="image/png", metadata={"Stipple-Png": facts})
        assert await store.get(key) == data
        info = await store.stat(key)
        assert info is not None
        assert (info.size, dict(info.metadata)) == (size, {"stipple-png": facts})
        with pytest.raises(BlobExists) as refused:
            await store.put_new(key, b"second", metadata={"Stipple-Png": "forged"})
        assert key in str(refused.value)
        assert refused.value.code == "blob_exists"
        assert not refused.value.retryable
        assert await store.get(key) == data  # the first blob, whole, with its metadata
        again = await store.stat(key)
        assert again is not None
        assert dict(again.metadata) == {"stipple-png": facts}

    async def test_empty_key_is_rejected(self, store: BlobStore) -> None:
        with pytest.raises(StippleError) as info:
            await store.put("", b"x")
        assert info.value.code == "invalid_key"


class TestJetStreamBlobStore(BlobStoreContract):
    @pytest.fixture
    async def open_store(self, nats_url: str) -> AsyncIterator[OpenStore]:
        bucket = f"test-{uuid.uuid4().hex}"
        clients: list[nats.NATS] = []
        stores: list[BlobStore] = []

        async def _open() -> BlobStore:
            client = await nats.connect(nats_url)
            clients.append(client)
            store = await open_blob_store(backend="jetstream", js=client.jetstream(), bucket=bucket)
            stores.append(store)
            return store

        yield _open
        for store in stores:
            await store.close()
        if clients:
            try:
                await clients[0].jetstream().delete_object_store(bucket)
            except Exception:  # the test may have closed the connection
                pass
        for client in clients:
            if not client.is_closed:
                await client.close()

    async def test_content_type_kept_in_headers(self, store: BlobStore, nc: nats.NATS) -> None:
        key = _key()
        await store.put(key, b"png bytes", content_type="image/png")
        obs = await nc.jetstream().object_store(store.bucket)  # type: ignore[attr-defined]
        info = await obs.get_info(key)
        assert info.name == key
        assert info.headers == {"Content-Type": ["image/png"]}

    async def test_put_new_racers_for_one_key_leave_one_blob_and_no_stray_chunks(self, nc: nats.NATS) -> None:
        """Atomic on JetStream: the meta message is published only if its subject is empty.
        Each racer's chunks go to its own subject; the losers' are purged, so the bucket
        holds exactly the winner's chunks and meta. Small chunks: each blob is several."""
        js = nc.jetstream()
        bucket = f"test-{uuid.uuid4().hex}"
        store = await JetStreamBlobStore.open(js, bucket, chunk_size=1_000)
        try:
            key = _key()
            blobs = [os.urandom(3_500) for _ in range(8)]
            results = await asyncio.gather(*(store.put_new(key, blob) for blob in blobs), return_exceptions=True)
            won = [i for i, result in enumerate(results) if result is None]
            assert len(won) == 1, results
            assert all(isinstance(result, BlobExists) for i, result in enumerate(results) if i != won[0])
            assert await store.get(key) == blobs[won[0]]
            state = (await js.stream_info(f"OBJ_{bucket}", subjects_filter=">")).state
            assert state.messages == 4 + 1  # 3,500 bytes in chunks of 1,000, and one meta message
            assert len(state.subjects or {}) == 2  # one chunk subject, one meta subject
        finally:
            await js.delete_object_store(bucket)

    async def test_put_new_blobs_read_back_through_nats_py_and_a_deleted_key_stays_written(
        self, store: BlobStore, nc: nats.NATS
    ) -> None:
        """The meta put_new writes is nats-py's own object layout (size, chunks, digest are
        checked by its get), and a delete's tombstone keeps the key written."""
        key = _key()
        data = os.urandom(300_000)
        await store.put_new(key, data, content_type="image/png")
        obs = await nc.jetstream().object_store(store.bucket)  # type: ignore[attr-defined]
        info = await obs.get_info(key)
        assert (info.name, info.size, info.headers["Content-Type"]) == (key, len(data), ["image/png"])
        assert (await obs.get(key)).data == data
        await store.delete(key)
        with pytest.raises(BlobExists):
            await store.put_new(key, b"again")

    async def test_put_new_whose_meta_answer_is_lost_keeps_the_chunks_it_stored(self, nc: nats.NATS) -> None:
        """The meta is stored but its acknowledgement never comes (a slow or electing
        cluster): the put fails as unavailable, and the stored object must stay whole: its
        chunks are not purged, and a second put_new of the key is refused."""
        js = nc.jetstream()
        bucket = f"test-{uuid.uuid4().hex}"
        store = await JetStreamBlobStore.open(js, bucket, chunk_size=1_000)
        publish = js.publish

        async def answer_lost(subject: str, payload: bytes = b"", **kwargs: Any) -> Any:
            ack = await publish(subject, payload, **kwargs)
            if ".M." in subject:  # the meta message: stored, then its answer lost
                raise nats.errors.TimeoutError
            return ack

        try:
            key, data = _key(), os.urandom(3_500)
            js.publish = answer_lost  # type: ignore[method-assign]
            with pytest.raises(Transient):
                await store.put_new(key, data)
            js.publish = publish  # type: ignore[method-assign]
            assert await store.get(key) == data
            with pytest.raises(BlobExists):
                await store.put_new(key, b"other")
        finally:
            js.publish = publish  # type: ignore[method-assign]
            await js.delete_object_store(bucket)

    async def test_create_race_with_other_config_binds(self, nc: nats.NATS) -> None:
        # Another service created the bucket (with another config) between our lookup and our create.
        js = nc.jetstream()
        bucket = f"test-{uuid.uuid4().hex}"
        await js.create_object_store(bucket, description="someone else's config")

        class LateJs:
            calls = 0

            def __getattr__(self, name: str) -> object:
                return getattr(js, name)

            async def object_store(self, name: str) -> object:
                LateJs.calls += 1
                if LateJs.calls == 1:
                    raise BucketNotFoundError
                return await js.object_store(name)

        try:
            store = await JetStreamBlobStore.open(LateJs(), bucket)  # type: ignore[arg-type]
            assert LateJs.calls == 2
            await store.put("k", b"v")
            assert await store.get("k") == b"v"
        finally:
            await js.delete_object_store(bucket)

    async def test_get_whose_chunks_vanish_times_out_as_transient(self, nc: nats.NATS) -> None:
        # A concurrent overwrite or delete purges the chunks a get is waiting for; nats-py would wait forever.
        js = nc.jetstream()
        bucket = f"test-{uuid.uuid4().hex}"
        store = await JetStreamBlobStore.open(js, bucket, timeout_s=0.5)
        try:
            await store.put("k", b"v" * 1000)
            info = await (await js.object_store(bucket)).get_info("k")
            await js.purge_stream(f"OBJ_{bucket}", subject=f"$O.{bucket}.C.{info.nuid}")
            with pytest.raises(Transient):
                await store.get("k")
        finally:
            await js.delete_object_store(bucket)

    async def test_closed_connection_is_transient(self, nats_url: str) -> None:
        client = await nats.connect(nats_url)
        bucket = f"test-{uuid.uuid4().hex}"
        js = client.jetstream()
        store = await open_blob_store(backend="jetstream", js=js, bucket=bucket)
        await js.delete_object_store(bucket)
        await client.close()
        with pytest.raises(Transient) as info:
            await store.get(_key())
        assert info.value.retryable


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 over real HTTP on 127.0.0.1, shared by the session (buckets are per test)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


class TestS3BlobStore(BlobStoreContract):
    @pytest.fixture
    async def open_store(self, s3_endpoint: str) -> AsyncIterator[OpenStore]:
        bucket = f"test-{uuid.uuid4().hex[:20]}"
        stores: list[BlobStore] = []

        async def _open() -> BlobStore:
            store = await open_blob_store(
                backend="s3",
                js=None,
                bucket=bucket,
                s3_endpoint=s3_endpoint,
                s3_access_key="testing",
                s3_secret_key="testing-secret",
            )
            stores.append(store)
            return store

        yield _open
        for store in stores:
            await store.close()

    async def test_content_type_and_key_stored_as_is(self, store: BlobStore, s3_endpoint: str) -> None:
        key = _key()
        await store.put(key, b"png bytes", content_type="image/png")
        client = Minio(s3_endpoint, access_key="testing", secret_key="testing-secret", secure=False)
        bucket = store.bucket  # type: ignore[attr-defined]
        stat = await asyncio.to_thread(client.stat_object, bucket, key)
        assert stat.content_type == "image/png"
        names = await asyncio.to_thread(lambda: [o.object_name for o in client.list_objects(bucket, recursive=True)])
        assert names == [key]

    async def test_sees_objects_written_by_another_client(self, store: BlobStore, s3_endpoint: str) -> None:
        key = _key()
        client = Minio(s3_endpoint, access_key="testing", secret_key="testing-secret", secure=False)
        bucket = store.bucket  # type: ignore[attr-defined]
        await asyncio.to_thread(client.put_object, bucket, key, io.BytesIO(b"abc"), 3)
        assert await store.get(key) == b"abc"

    async def test_url_endpoint_is_accepted(self, s3_endpoint: str) -> None:
        store = await open_blob_store(
            backend="s3",
            js=None,
            bucket=f"test-{uuid.uuid4().hex[:20]}",
            s3_endpoint=f"http://{s3_endpoint}",
            s3_access_key="testing",
            s3_secret_key="testing-secret",
        )
        try:
            await store.put("a/b", b"1")
            assert await store.get("a/b") == b"1"
        finally:
            await store.close()


async def test_factory_rejects_unknown_backend() -> None:
    with pytest.raises(StippleError) as info:
        await open_blob_store(backend="gcs", js=None, bucket="stipple-images")
    assert info.value.code == "invalid_config"
    assert "'gcs'" in str(info.value)
    assert "'jetstream'" in str(info.value)
    assert "'s3'" in str(info.value)


async def test_factory_jetstream_needs_js() -> None:
    with pytest.raises(StippleError, match="jetstream") as info:
        await open_blob_store(backend="jetstream", js=None, bucket="stipple-images")
    assert info.value.code == "invalid_config"


async def test_s3_on_closed_port_is_transient_and_fast() -> None:
    endpoint = f"127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(Transient) as info:
        await open_blob_store(backend="s3", js=None, bucket="stipple-images", s3_endpoint=endpoint)
    assert time.monotonic() - started < 5
    assert info.value.retryable
    assert endpoint in str(info.value)
