"""Blob store over the JetStream object store (bucket = stream ``OBJ_<bucket>``).

Object names may contain ``/``: nats-py base64-encodes them into the meta subject, so
keys like ``tasks/<task_id>/<node_id>/0.png`` are stored as-is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors as js_errors
from nats.js.api import Header, ObjectInfo, ObjectMeta, ObjectMetaOptions, ObjectStoreConfig
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)
from nats.nuid import NUID

from stipple_common import bus
from stipple_common.blobstore import BlobExists, BlobInfo, BlobNotFound, check_key
from stipple_common.errors import JS_STREAM_CONFIG_MISMATCH, JS_WRONG_LAST_SEQUENCE, StippleError, Transient

if TYPE_CHECKING:
    from nats.js import JetStreamContext

DEFAULT_CHUNK_SIZE = 256 * 1024
"""Chunk (one JetStream message) size. nats-py's default is 128 KiB; 256 KiB halves the
round trips for a ~1 MB image while staying far below the server's max_payload (1 MiB by
default)."""

DEFAULT_TIMEOUT_S = 30.0
"""Upper bound on one put/get/delete. nats-py's object get waits on an ordered consumer with
no timeout of its own: if the chunks vanish under it (a concurrent overwrite or delete
purges them) it would wait forever."""

_TRANSIENT_NATS_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,  # includes nats.errors.TimeoutError and asyncio's timeout
    nats.errors.NoRespondersError,  # JetStream not (yet) available
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    js_errors.ServiceUnavailableError,
    js_errors.ServerError,
    js_errors.NoStreamResponseError,
    js_errors.DigestMismatchError,  # read raced an overwrite
)


class JetStreamBlobStore:
    """`BlobStore` on one JetStream object-store bucket.

    Borrows the caller's JetStream context: `close` does not close the NATS connection.
    The content type is kept in the object's headers as ``{"Content-Type": [value]}``
    (list values, the shape the Go client's ``nats.Header`` expects).
    """

    def __init__(
        self,
        obs: ObjectStore,
        bucket: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        js: JetStreamContext | None = None,
    ) -> None:
        self._obs = obs
        self._js = js
        self.bucket = bucket
        self._chunk_size = chunk_size
        self._timeout_s = timeout_s
        self._nuid = NUID()  # `put_new`'s chunk subjects, as nats-py's client names them

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        bucket: str,
        *,
        replicas: int = 1,
        ttl_s: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> JetStreamBlobStore:
        """Bind to ``bucket``, creating it if missing.

        Idempotent and race-safe: if another service creates the bucket between our
        lookup and our create, the server either returns the existing stream (same
        config) or refuses with "different configuration", and we then bind to theirs.
        ``replicas`` and ``ttl_s`` apply only when this call creates the bucket.
        """

        async def step() -> ObjectStore:  # (`bus.settling`: replicas that start together make it at once)
            try:
                return await js.object_store(bucket)
            except js_errors.InvalidBucketNameError:
                raise StippleError(
                    f"invalid JetStream object-store bucket name {bucket!r}: use letters, digits, '-' and '_'",
                    code="invalid_config",
                ) from None
            except js_errors.BucketNotFoundError:
                pass
            config = ObjectStoreConfig(description="Stipple blobs", replicas=replicas, ttl=ttl_s)
            try:
                return await js.create_object_store(bucket, config=config)
            except js_errors.BadRequestError as err:
                if err.err_code != JS_STREAM_CONFIG_MISMATCH:
                    raise
                return await js.object_store(bucket)

        with _nats_errors(f"open object store {bucket!r}"):
            obs = await bus.settling(step, what=f"object store {bucket}")
        return cls(obs, bucket, chunk_size=chunk_size, timeout_s=timeout_s, js=js)

    def _context(self) -> JetStreamContext:
        """The JetStream context `open` was given (the bucket's stream, beyond nats-py's object API)."""
        if self._js is None:
            raise StippleError(
                f"object store {self.bucket!r} was opened without its JetStream context", code="invalid_config"
            )
        return self._js

    async def set_ttl(self, ttl_s: float | None) -> None:
        """Delete objects `ttl_s` seconds after they were written (the bucket stream's
        ``max_age``), or never with None/0. Applies to an existing bucket too."""
        js = self._context()
        stream = f"OBJ_{self.bucket}"
        with _nats_errors(f"set the TTL of object store {self.bucket!r}"):
            config = (await js.stream_info(stream)).config
            max_age = float(ttl_s or 0.0)
            if float(config.max_age or 0.0) != max_age:
                config.max_age = max_age
                if max_age and (config.duplicate_window or 0.0) > max_age:
                    config.duplicate_window = max_age  # the server wants it within max_age
                await js.update_stream(config)

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store ``data`` under ``key``; nats-py purges the previous chunks of that key.
        ``metadata`` goes into the object's meta message, as headers."""
        check_key(key)
        headers = _object_headers(content_type, metadata)
        meta = ObjectMeta(name=key, headers=headers, options=ObjectMetaOptions(max_chunk_size=self._chunk_size))
        with _nats_errors(f"put {key!r} in object store {self.bucket!r}"):
            async with asyncio.timeout(self._timeout_s):
                await self._obs.put(key, data, meta=meta)

    async def put_new(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """`put` when nothing was ever stored under ``key``, atomically: the chunks go to a
        fresh subject, then the object's meta message is published with
        ``Nats-Expected-Last-Subject-Sequence: 0``, which the server refuses when the meta
        subject holds a message (an object, or a deleted one's tombstone). The loser of a
        race gets `BlobExists` and its chunks are purged (as a put's that failed before its meta
        went out; one whose meta went out unanswered keeps them: the meta may be stored and
        point to them). Nothing is read first (nats-py's
        `put` reads the old meta to purge its chunks): one publish per chunk and one for
        the meta, in nats-py's own layout (its subject and digest templates, its ObjectInfo),
        so its readers read these objects as their own."""
        check_key(key)
        js = self._context()
        headers = _object_headers(content_type, metadata)
        nuid = self._nuid.next().decode()
        chunks = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=nuid)
        meta_subject = OBJ_META_PRE_TEMPLATE.format(
            bucket=self.bucket, obj=base64.urlsafe_b64encode(key.encode()).decode()
        )
        info = ObjectInfo(
            name=key,
            bucket=self.bucket,
            nuid=nuid,
            size=len(data),
            mtime=datetime.now(UTC).isoformat(),
            chunks=(len(data) + self._chunk_size - 1) // self._chunk_size,
            digest=OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()),
            headers=headers,
            options=ObjectMetaOptions(max_chunk_size=self._chunk_size),
        )
        expect_none = {Header.ROLLUP.value: MSG_ROLLUP_SUBJECT, Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: "0"}
        meta_sent = False
        with _nats_errors(f"put {key!r} in object store {self.bucket!r}"):
            try:
                async with asyncio.timeout(self._timeout_s):
                    for start in range(0, len(data), self._chunk_size):
                        await js.publish(chunks, data[start : start + self._chunk_size])
                    meta_sent = True
                    await js.publish(meta_subject, json.dumps(info.as_dict()).encode(), headers=expect_none)
            except Exception as err:  # (a cancelled put leaves its chunks, as nats-py's does)
                refused = err if isinstance(err, js_errors.APIError) else None  # the server's answer: not stored
                if refused or not meta_sent:  # else the meta may be stored without its answer: keep what it points to
                    with contextlib.suppress(Exception):  # the chunks nothing points to (best effort)
                        await js.purge_stream(OBJ_STREAM_TEMPLATE.format(bucket=self.bucket), subject=chunks)
                if refused is not None and refused.err_code == JS_WRONG_LAST_SEQUENCE:
                    raise BlobExists(key, bucket=self.bucket) from None
                raise

    async def get(self, key: str) -> bytes:
        """The whole object; `BlobNotFound` if it was never written or was deleted."""
        check_key(key)
        with _nats_errors(f"get {key!r} from object store {self.bucket!r}"):
            try:
                async with asyncio.timeout(self._timeout_s):
                    result = await self._obs.get(key)
            except js_errors.ObjectNotFoundError:
                raise BlobNotFound(key, bucket=self.bucket) from None
        return bytes(result.data or b"")

    async def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when there is none (its meta message only)."""
        info = await self.stat(key)
        return None if info is None else info.size

    async def stat(self, key: str) -> BlobInfo | None:
        """The object's size and metadata, or None when there is none (its meta message only)."""
        check_key(key)
        with _nats_errors(f"stat {key!r} in object store {self.bucket!r}"):
            try:
                async with asyncio.timeout(self._timeout_s):
                    info = await self._obs.get_info(key)
            except js_errors.ObjectNotFoundError:
                return None
        if info.deleted:
            return None
        metadata = {}
        for name, values in (info.headers or {}).items():  # a header's values are a list
            value = values[0] if isinstance(values, list) and values else values
            if name.lower() != "content-type" and isinstance(value, str):
                metadata[name.lower()] = value
        return BlobInfo(size=int(info.size or 0), metadata=metadata)

    async def delete(self, key: str) -> None:
        """Delete the object (leaves a small tombstone meta message); missing keys are ignored."""
        check_key(key)
        with _nats_errors(f"delete {key!r} from object store {self.bucket!r}"):
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._obs.delete(key)
            except js_errors.ObjectNotFoundError:
                pass

    async def close(self) -> None:
        """Nothing to release: the NATS connection belongs to the caller."""


def _object_headers(content_type: str, metadata: Mapping[str, str] | None) -> dict[str, list[str]]:
    """An object's headers: its content type and `metadata` (lowercase keys), each a list as
    the Go client's ``nats.Header`` expects."""
    return {"Content-Type": [content_type], **{name.lower(): [value] for name, value in (metadata or {}).items()}}


@contextmanager
def _nats_errors(action: str) -> Iterator[None]:
    """Turn nats-py errors into StippleErrors: connection trouble is `Transient`."""
    try:
        yield
    except StippleError:
        raise
    except _TRANSIENT_NATS_ERRORS as err:
        raise Transient(f"JetStream object store unavailable: {action}: {_describe(err)}") from err
    except nats.errors.Error as err:
        raise StippleError(
            f"JetStream object store error: {action}: {_describe(err)}", code="blob_store_error"
        ) from err


def _describe(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
