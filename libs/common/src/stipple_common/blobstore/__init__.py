"""Blob stores: where nodes put generated images and the gateway reads them back.

Two backends behind one small async interface:

- ``jetstream``: the JetStream object store of the NATS cluster we already run (no extra
  server; the default for ``stipple up`` and small networks).
- ``s3``: any S3-compatible store (MinIO, AWS S3) through the ``minio`` client, for
  networks whose images outgrow the NATS disks.

Keys are opaque strings with ``/`` allowed, e.g. ``tasks/<task_id>/<node_id>/0.png``;
both backends use them as-is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from stipple_common.errors import StippleError

if TYPE_CHECKING:
    from nats.js import JetStreamContext

__all__ = [
    "BACKENDS",
    "BlobExists",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "check_key",
    "open_blob_store",
    "set_ttl",
]

BACKENDS = ("jetstream", "s3")
"""The values ``open_blob_store(backend=...)`` accepts."""


class _KeyError(StippleError):
    """An error about one key, naming it (and its bucket when known). Not retryable."""

    template = "{key}{where}"  # (StippleError's `message` is the text made from it)

    def __init__(self, key: str, *, bucket: str | None = None) -> None:
        where = f" in bucket {bucket!r}" if bucket else ""
        super().__init__(self.template.format(key=repr(key), where=where))
        self.key = key
        self.bucket = bucket


class BlobNotFound(_KeyError):
    """No blob under this key (never written, or deleted)."""

    code = "blob_not_found"
    template = "blob not found: {key}{where}"


class BlobExists(_KeyError):
    """A blob is stored under this key already (`BlobStore.put_new`)."""

    code = "blob_exists"
    template = "a blob is stored under {key}{where} already; it is written once"


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob's size and the metadata it was put with (keys lowercase)."""

    size: int
    metadata: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class BlobStore(Protocol):
    """What services need from a blob store: put, get, delete whole blobs by key.

    Failures that may pass on their own (store unreachable, timeouts) raise
    `stipple_common.errors.Transient`; everything else raises a `StippleError`.
    """

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store ``data`` under ``key``, replacing any previous blob there, with
        ``metadata`` (lowercase keys of letters, digits and ``-``; printable ASCII values)."""
        ...

    async def put_new(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """`put`, only when nothing was stored under ``key`` before; `BlobExists` otherwise.
        Atomic on JetStream (of writers racing for one key exactly one wins); on S3 a
        HEAD and then the PUT."""
        ...

    async def get(self, key: str) -> bytes:
        """The whole blob under ``key``; raises `BlobNotFound` naming the key if there is none."""
        ...

    async def size(self, key: str) -> int | None:
        """The size of the blob under ``key`` without reading it; None when there is none."""
        ...

    async def stat(self, key: str) -> BlobInfo | None:
        """The size and metadata of the blob under ``key`` without reading it; None when there is none."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the blob under ``key``; a missing key is not an error (deletes are idempotent)."""
        ...

    async def close(self) -> None:
        """Release what the store holds (HTTP pools). Does not close a NATS connection it was given."""
        ...


def check_key(key: str) -> str:
    """Reject keys no backend can store (empty, or not a string) before any I/O."""
    if not isinstance(key, str) or not key:
        raise StippleError(f"blob key must be a non-empty string (got {key!r})", code="invalid_key")
    return key


async def set_ttl(store: BlobStore, ttl_s: float | None) -> None:
    """Make the store delete blobs `ttl_s` seconds after they were written (None or 0:
    never): the object-store bucket's max_age, or an S3 lifecycle rule (whole days)."""
    setter = getattr(store, "set_ttl", None)
    if setter is None:
        raise StippleError(f"{type(store).__name__} cannot expire blobs", code="invalid_config")
    await setter(ttl_s)


async def open_blob_store(
    *,
    backend: str,
    js: JetStreamContext | None,
    bucket: str,
    s3_endpoint: str = "",
    s3_access_key: str = "",
    s3_secret_key: str = "",
    s3_secure: bool = False,
    s3_region: str = "us-east-1",
    replicas: int = 1,
) -> BlobStore:
    """Open the blob store the settings ask for, creating its bucket if missing.

    Safe to call from several services at once: bucket creation is idempotent.
    ``s3_endpoint`` is ``host:port``; an ``http://`` or ``https://`` URL is accepted too and
    its scheme then decides ``secure``. ``replicas``: the JetStream bucket's, as the
    streams' (``STIPPLE_STREAM_REPLICAS``): an R1 bucket on a cluster is lost with its server.
    """
    if backend == "jetstream":
        if js is None:
            raise StippleError("blob store backend 'jetstream' needs a JetStream context (js)", code="invalid_config")
        from stipple_common.blobstore.jetstream import JetStreamBlobStore

        return await JetStreamBlobStore.open(js, bucket, replicas=replicas)
    if backend == "s3":
        from stipple_common.blobstore.s3 import S3BlobStore

        return await S3BlobStore.open(
            endpoint=s3_endpoint,
            access_key=s3_access_key,
            secret_key=s3_secret_key,
            bucket=bucket,
            secure=s3_secure,
            region=s3_region,
        )
    allowed = ", ".join(repr(b) for b in BACKENDS)
    raise StippleError(f"unknown blob store backend {backend!r}; allowed: {allowed}", code="invalid_config")
