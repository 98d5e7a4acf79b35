"""Download one file over HTTP(S): streamed, resumable, verified, atomic.

The bytes go to ``<dest>/.download.part``; a sidecar ``.download.part.json`` remembers the
URL and the server's validator (ETag or Last-Modified) so that a later call resumes with
``Range`` + ``If-Range`` instead of starting over. A server that ignores Range (answers 200)
or whose file changed is handled by starting again from byte 0. Only a complete file, with
the right sha256 when one is given, is renamed into place, so a crash never leaves a
half file where a model is expected.

Every failure is a typed StoreError: DownloadFailed (retryable for network errors,
timeouts, 5xx/408/429; not for 404/403 and other 4xx) or ChecksumMismatch.
"""

from __future__ import annotations

import contextlib
import email.message
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import structlog

from .errors import ChecksumMismatch, DownloadFailed
from .refs import public_url

log = structlog.get_logger("stipple.node.store")

PART_NAME = ".download.part"
META_NAME = ".download.part.json"
DEFAULT_NAME = "download.bin"
CHUNK_BYTES = 1 << 20
PROGRESS_INTERVAL_S = 0.5
RETRYABLE_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True)
class ProgressEvent:
    """How far one download is. `total_bytes` is None when the server does not say."""

    ref: str
    downloaded_bytes: int
    total_bytes: int | None
    done: bool


ProgressCallback = Callable[[ProgressEvent], None]
ReserveCallback = Callable[[int], None]
"""Called with the file's full size before bytes are written (or, when the server does not
send a size, once the download is complete and before it is moved into place); it raises
to refuse the file (the store raises DiskBudgetExceeded)."""


@dataclass(frozen=True)
class Downloaded:
    """A finished download."""

    path: Path
    size_bytes: int
    sha256: str


class ProgressReporter:
    """Sends ProgressEvents at most every `interval_s`, never going backwards, and a last
    one with done=True; draws a tqdm bar only when stderr is a terminal."""

    def __init__(
        self,
        ref: str,
        callback: ProgressCallback | None,
        *,
        interval_s: float = PROGRESS_INTERVAL_S,
        bar: bool | None = None,
        label: str = "",
    ) -> None:
        self.ref = ref
        self.callback = callback
        self.interval_s = interval_s
        self._last_sent_at: float | None = None
        self._last_sent_bytes = -1
        self._bar: Any = None
        self._bar_wanted = _stderr_is_tty() if bar is None else bar
        self._label = label

    def update(self, downloaded: int, total: int | None) -> None:
        """Report `downloaded` bytes if enough time passed since the last event."""
        self._draw(downloaded, total)
        now = time.monotonic()
        if self._last_sent_at is not None and now - self._last_sent_at < self.interval_s:
            return
        if downloaded < self._last_sent_bytes:  # restarted from 0: stay quiet until we pass the old mark
            return
        self._send(ProgressEvent(self.ref, downloaded, total, False), now)

    def finish(self, downloaded: int, total: int | None) -> None:
        """The final event (done=True), always sent."""
        self._draw(downloaded, total)
        self._send(ProgressEvent(self.ref, downloaded, total, True), time.monotonic())
        self.close()

    def close(self) -> None:
        """Remove the terminal bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _send(self, event: ProgressEvent, now: float) -> None:
        self._last_sent_at = now
        self._last_sent_bytes = event.downloaded_bytes
        if self.callback is None:
            return
        try:
            self.callback(event)
        except Exception:  # a broken progress sink must not break the download
            log.exception("progress_callback_failed", ref=self.ref)

    def _draw(self, downloaded: int, total: int | None) -> None:
        if not self._bar_wanted:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=downloaded, unit="B", unit_scale=True, unit_divisor=1024, desc=self._label
            )
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.update(downloaded - self._bar.n)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def make_client(timeout_s: float, *, user_agent: str = "stipple-node") -> httpx.Client:
    """An httpx client with connect, read, write and pool timeouts, following redirects
    (Civitai answers with a redirect to a signed storage URL)."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=True,
        headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
    )


def file_name_from(response: httpx.Response, url: str) -> str:
    """The name to give the file: Content-Disposition's, else the last part of the URL path.

    The name is made safe: no folders, no leading dot, no control characters.
    """
    disposition = response.headers.get("content-disposition")
    if disposition:
        message = email.message.Message()
        message["content-disposition"] = disposition
        name = _safe_name(message.get_filename() or "")
        if name:
            return name
    for candidate in (str(response.url), url):
        name = _safe_name(unquote(urlsplit(candidate).path.rsplit("/", 1)[-1]))
        if name:
            return name
    return DEFAULT_NAME


def _safe_name(name: str) -> str:
    name = re.split(r"[/\\]", name.strip())[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip().lstrip(".")
    return name[:200]


def download(
    url: str,
    dest_dir: Path,
    *,
    sha256: str | None = None,
    client: httpx.Client | None = None,
    timeout_s: float = 30.0,
    retries: int = 2,
    backoff_s: float = 0.5,
    progress: ProgressCallback | None = None,
    reserve: ReserveCallback | None = None,
) -> Downloaded:
    """Download `url` into `dest_dir` (one file per folder) and return where it landed.

    Resumes a ``.download.part`` left by an earlier call. Retries retryable failures
    `retries` times, resuming each time, with exponential backoff. The caller serialises
    calls for the same `dest_dir` (the store holds a per-URL lock).
    """
    shown = public_url(url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    own_client = client is None
    http = client or make_client(timeout_s)
    reporter = ProgressReporter(shown, progress, label=shown.rsplit("/", 1)[-1])
    try:
        for attempt in range(retries + 1):
            try:
                return _attempt(http, url, shown, dest_dir, sha256, reporter, reserve, timeout_s)
            except DownloadFailed as exc:
                if not exc.retryable or attempt == retries:
                    raise
                delay = backoff_s * 2**attempt
                log.warning("download_retry", url=shown, attempt=attempt + 1, delay_s=delay, cause=exc.cause)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        reporter.close()
        if own_client:
            http.close()


class _StartOver(Exception):
    """The part file cannot be resumed (stale, or the server resumed elsewhere): start at 0."""


def _attempt(
    http: httpx.Client,
    url: str,
    shown: str,
    dest_dir: Path,
    sha256: str | None,
    reporter: ProgressReporter,
    reserve: ReserveCallback | None,
    timeout_s: float,
) -> Downloaded:
    """One try: resume (or start) the download; if the part cannot be resumed, start over once."""
    args = (http, url, shown, dest_dir, sha256, reporter, reserve, timeout_s)
    try:
        return _request(*args)
    except _StartOver:
        _discard(dest_dir / PART_NAME, dest_dir / META_NAME)
        return _request(*args)


def _request(
    http: httpx.Client,
    url: str,
    shown: str,
    dest_dir: Path,
    sha256: str | None,
    reporter: ProgressReporter,
    reserve: ReserveCallback | None,
    timeout_s: float,
) -> Downloaded:
    """One request: resume or start, stream to the part file, verify, move into place."""
    part, meta_path = dest_dir / PART_NAME, dest_dir / META_NAME
    meta = _read_meta(meta_path, shown)
    offset = part.stat().st_size if meta is not None and part.exists() else 0
    if offset == 0:
        _discard(part, meta_path)
    headers = {}
    if offset and meta is not None:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    with _network_errors(shown, timeout_s), http.stream("GET", url, headers=headers) as response:
        if response.status_code == 416 and offset and meta is not None:
            return _after_416(response, shown, dest_dir, meta, sha256, reporter, reserve, offset)
        _raise_for_status(response, shown)
        offset, total = _start_position(response, shown, offset)
        if offset == 0:
            _discard(part, meta_path)
        resumed_name = meta.get("name") if offset and meta is not None else None
        name = resumed_name or file_name_from(response, url)  # a 206 may lack Content-Disposition
        if total is not None and reserve is not None:
            _reserve_or_discard(reserve, total, part, meta_path)
        _write_meta(meta_path, shown, response, total, name)
        log.info("download_started", url=shown, offset=offset, total_bytes=total, file=name)
        hasher = _hash_file(part) if offset else hashlib.sha256()
        size = _stream_to(part, response, shown, hasher, offset, total, reporter)
    if total is not None and size != total:
        raise DownloadFailed(shown, f"the server sent {size} of {total} bytes")
    return _finish(part, meta_path, dest_dir / name, shown, size, hasher.hexdigest(), sha256, reporter, reserve, total)


def _after_416(
    response: httpx.Response,
    shown: str,
    dest_dir: Path,
    meta: dict[str, Any],
    sha256: str | None,
    reporter: ProgressReporter,
    reserve: ReserveCallback | None,
    offset: int,
) -> Downloaded:
    """Range not satisfiable: the part is already complete, or it is stale (start over)."""
    part, meta_path = dest_dir / PART_NAME, dest_dir / META_NAME
    total = _content_range_total(response.headers.get("content-range", ""))
    if total != offset or not meta.get("name"):
        log.info("download_restart", url=shown, reason="range not satisfiable", had=offset, total_bytes=total)
        raise _StartOver
    if reserve is not None:
        _reserve_or_discard(reserve, total, part, meta_path)
    digest = _hash_file(part).hexdigest()
    return _finish(part, meta_path, dest_dir / meta["name"], shown, offset, digest, sha256, reporter, None, total)


def _reserve_or_discard(reserve: ReserveCallback, size: int, part: Path, meta_path: Path) -> None:
    """Ask for room for `size` bytes; when refused, drop the part too (it is outside the budget)."""
    try:
        reserve(size)
    except Exception:
        _discard(part, meta_path)
        raise


def _start_position(response: httpx.Response, shown: str, offset: int) -> tuple[int, int | None]:
    """Where the body starts and the file's full size (None if unknown)."""
    encoded = response.headers.get("content-encoding", "identity").lower() not in ("identity", "")
    if response.status_code == 206 and offset:
        start, total = _content_range(response.headers.get("content-range", ""))
        if start == offset:
            return offset, total
        log.warning("download_restart", url=shown, reason="server resumed at another byte", had=offset, got=start)
        raise _StartOver
    if response.status_code != 200:
        raise DownloadFailed(shown, f"unexpected HTTP status {response.status_code}", retryable=False)
    if offset:
        log.info("download_restart", url=shown, reason="server ignored Range or the file changed", had=offset)
    length = response.headers.get("content-length")
    total = int(length) if length and length.isdigit() and not encoded else None
    return 0, total


def _stream_to(
    part: Path,
    response: httpx.Response,
    shown: str,
    hasher: Any,
    offset: int,
    total: int | None,
    reporter: ProgressReporter,
) -> int:
    """Append the body to `part`, hashing and reporting as it goes; return the part's size."""
    size = offset
    reporter.update(size, total)
    try:
        with open(part, "ab" if offset else "wb", buffering=CHUNK_BYTES) as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
                reporter.update(size, total)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:  # disk full, permissions: trying again will not help
        raise DownloadFailed(shown, f"cannot write {part}: {exc}", retryable=False) from exc
    return size


def _finish(
    part: Path,
    meta_path: Path,
    final: Path,
    shown: str,
    size: int,
    actual: str,
    expected: str | None,
    reporter: ProgressReporter,
    reserve: ReserveCallback | None,
    total: int | None,
) -> Downloaded:
    """Verify the checksum, account for the size if it was unknown, and rename into place."""
    if expected is not None and actual != expected:
        _discard(part, meta_path)
        log.warning("download_checksum_mismatch", url=shown, expected=expected, actual=actual)
        raise ChecksumMismatch(shown, expected, actual)
    if total is None and reserve is not None:
        _reserve_or_discard(reserve, size, part, meta_path)
    os.replace(part, final)
    _fsync_dir(final.parent)
    meta_path.unlink(missing_ok=True)
    reporter.finish(size, size)
    log.info("download_done", url=shown, file=str(final), size_bytes=size, sha256=actual)
    return Downloaded(final, size, actual)


def _raise_for_status(response: httpx.Response, shown: str) -> None:
    status = response.status_code
    if status < 400:
        return
    retryable = status >= 500 or status in RETRYABLE_STATUSES
    reason = response.reason_phrase or "error"
    raise DownloadFailed(shown, f"HTTP {status} {reason}", retryable=retryable, status=status)


@contextlib.contextmanager
def _network_errors(shown: str, timeout_s: float) -> Iterator[None]:
    """Turn httpx's transport errors into DownloadFailed (retryable) naming the cause."""
    try:
        yield
    except httpx.TimeoutException as exc:
        what = type(exc).__name__.replace("Timeout", "").lower() or "request"
        raise DownloadFailed(shown, f"{what} timed out after {timeout_s:g} s") from exc
    except httpx.TransportError as exc:
        raise DownloadFailed(shown, f"{type(exc).__name__}: {exc}") from exc
    except httpx.InvalidURL as exc:
        raise DownloadFailed(shown, f"invalid URL: {exc}", retryable=False) from exc


def _content_range(value: str) -> tuple[int, int | None]:
    """(first byte, full size or None) from 'bytes 100-199/200'."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value)
    if not match:
        return -1, None
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _content_range_total(value: str) -> int | None:
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value)
    return int(match.group(1)) if match else None


def _read_meta(meta_path: Path, shown: str) -> dict[str, Any] | None:
    """The sidecar of a part file, if it belongs to this URL."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("url") == shown and meta.get("resumable") else None


def _write_meta(meta_path: Path, shown: str, response: httpx.Response, total: int | None, name: str) -> None:
    encoded = response.headers.get("content-encoding", "identity").lower() not in ("identity", "")
    etag = response.headers.get("etag")
    validator = etag if etag and not etag.startswith("W/") else response.headers.get("last-modified")
    meta = {"url": shown, "validator": validator, "total": total, "name": name, "resumable": not encoded}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)


def _hash_file(path: Path) -> Any:
    hasher = hashlib.sha256()
    with open(path, "rb") as src:
        while block := src.read(CHUNK_BYTES):
            hasher.update(block)
    return hasher


def _discard(part: Path, meta_path: Path) -> None:
    part.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
