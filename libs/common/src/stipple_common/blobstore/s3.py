"""Blob store over any S3-compatible server (MinIO, AWS S3) with the `minio` client.

The minio client is synchronous, so every call runs in a worker thread
(`asyncio.to_thread`). We build its urllib3 pool ourselves: minio's default waits up
to 5 minutes to connect and retries 5 times, which would stall a service for minutes
when the store is down instead of failing fast with `Transient`.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import DictType
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from urllib3.util import Retry, Timeout

from stipple_common.blobstore import BlobExists, BlobInfo, BlobNotFound, check_key
from stipple_common.errors import StippleError, Transient

T = TypeVar("T")

DEFAULT_RETRIES = 2
"""urllib3 retries per request (connect errors and 5xx). With backoff 0.2 s a dead
endpoint fails in well under a second once the connection is refused."""

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 60.0

_TRANSIENT_S3_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})
_BUCKET_ALREADY_OURS = frozenset({"BucketAlreadyOwnedByYou"})
TTL_RULE_ID = "stipple-ttl"
"""The id of the lifecycle rule `set_ttl` manages."""


class S3BlobStore:
    """`BlobStore` on one S3 bucket; keys are used as object names unchanged."""

    def __init__(self, client: Minio, http: urllib3.PoolManager, *, bucket: str, endpoint: str) -> None:
        self._client = client
        self._http = http
        self.bucket = bucket
        self.endpoint = endpoint

    @classmethod
    async def open(
        cls,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str = "us-east-1",
        retries: int = DEFAULT_RETRIES,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> S3BlobStore:
        """Connect and create ``bucket`` if missing (idempotent, safe against a concurrent creator).

        ``endpoint`` is ``host:port`` or an ``http(s)://host:port`` URL (the scheme then
        overrides ``secure``). Passing ``region`` spares minio a GetBucketLocation call.
        """
        host, secure = _parse_endpoint(endpoint, secure)
        http = urllib3.PoolManager(
            timeout=Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        try:
            client = Minio(
                host,
                access_key=access_key or None,
                secret_key=secret_key or None,
                secure=secure,
                region=region or None,
                http_client=http,
            )
        except ValueError as err:
            http.clear()
            raise StippleError(f"invalid S3 endpoint {endpoint!r}: {err}", code="invalid_config") from err
        store = cls(client, http, bucket=bucket, endpoint=host)
        try:
            await store._call(f"create bucket {bucket!r}", store._ensure_bucket)
        except BaseException:
            await store.close()
            raise
        return store

    def _ensure_bucket(self) -> None:
        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket)
        except S3Error as err:
            # Another service created it between our check and our create.
            if err.code not in _BUCKET_ALREADY_OURS:
                raise

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Upload ``data`` in one PUT (images are far below minio's 5 MiB multipart
        threshold); ``metadata`` as user metadata (``x-amz-meta-*``)."""
        check_key(key)
        user: DictType = {name.lower(): value for name, value in (metadata or {}).items()}
        await self._call(
            f"put {key!r}",
            lambda: self._client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                length=len(data),
                content_type=content_type,
                metadata=user or None,
            ),
        )

    async def put_new(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """`put` when the key holds nothing (a HEAD first): not atomic, as minio's client
        sends no ``If-None-Match``. The intake's keys hold a node's unguessable secret, so
        the only writer who could race is the node itself, and the later PUT wins whole."""
        if await self.stat(key) is not None:
            raise BlobExists(key, bucket=self.bucket)
        await self.put(key, data, content_type=content_type, metadata=metadata)

    async def get(self, key: str) -> bytes:
        """Download the whole object; `BlobNotFound` on NoSuchKey."""
        check_key(key)
        return await self._call(f"get {key!r}", lambda: self._get_sync(key), key=key)

    def _get_sync(self, key: str) -> bytes:
        response = self._client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    async def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when there is none (HEAD, no download)."""
        info = await self.stat(key)
        return None if info is None else info.size

    async def stat(self, key: str) -> BlobInfo | None:
        """The object's size and user metadata, or None when there is none (HEAD, no download)."""
        check_key(key)
        try:
            stat = await self._call(f"stat {key!r}", lambda: self._client.stat_object(self.bucket, key), key=key)
        except BlobNotFound:
            return None
        prefix = "x-amz-meta-"
        metadata = {
            name.lower().removeprefix(prefix): value
            for name, value in (stat.metadata or {}).items()
            if name.lower().startswith(prefix)
        }
        return BlobInfo(size=int(stat.size or 0), metadata=metadata)

    async def delete(self, key: str) -> None:
        """Delete the object; S3 answers 204 for missing keys too, so this is idempotent."""
        check_key(key)
        await self._call(f"delete {key!r}", lambda: self._client.remove_object(self.bucket, key))

    async def set_ttl(self, ttl_s: float | None) -> None:
        """Expire objects `ttl_s` after they were written with a bucket lifecycle rule of
        our own id (S3 counts whole days: rounded up, at least 1), or remove that rule with
        None/0. Other lifecycle rules of the bucket are kept."""
        await self._call("set the bucket lifecycle", lambda: self._set_ttl_sync(ttl_s))

    def _set_ttl_sync(self, ttl_s: float | None) -> None:
        current = self._client.get_bucket_lifecycle(self.bucket)
        rules = [rule for rule in (current.rules if current else []) if rule.rule_id != TTL_RULE_ID]
        if ttl_s:
            days = max(1, math.ceil(ttl_s / 86400))
            expiration = Expiration(days=days)
            rules.append(Rule(ENABLED, rule_filter=Filter(prefix=""), rule_id=TTL_RULE_ID, expiration=expiration))
        if rules:
            self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig(rules))
        elif current is not None:
            self._client.delete_bucket_lifecycle(self.bucket)

    async def close(self) -> None:
        """Close the pooled HTTP connections."""
        self._http.clear()

    async def _call(self, action: str, fn: Callable[[], T], *, key: str | None = None) -> T:
        """Run a blocking minio call in a thread and translate its errors into StippleErrors."""
        where = f"S3 {self.endpoint} bucket {self.bucket!r}"
        try:
            return await asyncio.to_thread(fn)
        except S3Error as err:
            if key is not None and err.code == "NoSuchKey":
                raise BlobNotFound(key, bucket=self.bucket) from None
            message = f"{where}: {action} failed: {err.code}: {err.message}"
            if err.code in _TRANSIENT_S3_CODES:
                raise Transient(message) from err
            raise StippleError(message, code="blob_store_error") from err
        except ServerError as err:
            raise Transient(f"{where}: {action} failed: HTTP {err.status_code}") from err
        except InvalidResponseError as err:
            raise StippleError(
                f"{where}: {action} failed: not an S3 response (is the endpoint right?): {err}",
                code="blob_store_error",
            ) from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise Transient(f"S3 endpoint {self.endpoint} unreachable: {action} failed: {reason}") from err
        except ValueError as err:  # minio validates bucket and object names client-side
            raise StippleError(f"{where}: {action} rejected: {err}", code="invalid_config") from err


def _parse_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` for minio, and whether to use TLS; accepts ``http(s)://host:port`` too."""
    if not endpoint:
        raise StippleError("S3 blob store needs an endpoint (host:port)", code="invalid_config")
    if "://" not in endpoint:
        return endpoint, secure
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise StippleError(
            f"invalid S3 endpoint {endpoint!r}: expected host:port or http(s)://host:port", code="invalid_config"
        )
    return parts.netloc, parts.scheme == "https"
