"""Download one file over HTTP(S): streamed, resumable, verified, atomic.

The bytes go to ``<dest>/.download.part``; a sidecar ``.download.part.json`` remembers the
URL and the server's validator (ETag or Last-Modified) so that a later call resumes with
``Range`` + ``If-Range`` instead of starting over. A server that ignores Range (answers 200)
or whose file changed is handled by starting again from byte 0. Only a complete file, with
the right sha256 when one is given, is renamed into place, so a crash never leaves a
half file where a model is expected.

Every failure is a typed StoreError: DownloadFailed (retryable for network errors,
timeouts, 5xx/408/429; not for 404/403 and other 4xx) or ChecksumMismatch, and never
retried: SourceRefused, DownloadTooLarge, DownloadTooSlow, DownloadCancelled.

The URL comes from an app, so nothing about it is trusted (docs/security.md, "Model
sources"):

- Every hop is checked against the operator's `SourcePolicy` (redirects are followed here,
  at most `MAX_REDIRECTS`, not by httpx), and the connection goes to an address that was
  checked: `_PinnedBackend` resolves the host itself, refuses it if any address is private,
  loopback, link-local and the like, and connects to the checked address; TLS still
  verifies the certificate against the host name (httpcore sends the URL's host as SNI).
  There is no second DNS lookup an attacker could answer differently.
- The size is limited while the bytes arrive, counted as they come off the wire
  (`iter_raw`): a Content-Length above the limit is refused before reading, a body with
  none (chunked) is cut when it passes the limit, and the disk budget is reserved as it
  grows. Compressed bodies are refused outright: the node asks for ``Accept-Encoding:
  identity`` and never decodes, so the bytes counted, hashed and written are the file's
  (model weights do not compress; a decoder would only add a decompression bomb).
- The whole download (DNS, connects, redirects, retries, body) has one time limit; a
  watchdog shuts the socket down when it passes or when the task is cancelled, so neither
  a trickling nor a silent server holds a node.
"""

from __future__ import annotations

import contextlib
import email.message
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpcore
import httpx
import structlog

from stipple_common.errors import InvalidInput
from stipple_common.sources import Resolver, SourcePolicy, check_url, default_policy, vet_addresses

from .errors import (
    ChecksumMismatch,
    DownloadCancelled,
    DownloadFailed,
    DownloadTooLarge,
    DownloadTooSlow,
    SourceRefused,
)
from .refs import public_url

log = structlog.get_logger("stipple.node.store")

PART_NAME = ".download.part"
META_NAME = ".download.part.json"
DEFAULT_NAME = "download.bin"
CHUNK_BYTES = 1 << 20
PROGRESS_INTERVAL_S = 0.5
RETRYABLE_STATUSES = frozenset({408, 425, 429})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
DEFAULT_TOTAL_TIMEOUT_S = 3600.0
WATCH_INTERVAL_S = 0.05
Cancelled = Callable[[], bool]
"""True once the download should stop (a cancelled task); polled, from another thread too."""


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
HoldCallback = Callable[[int], None]
"""Called while a file of unknown size streams in, with the bytes it has so far: raises when
that much could not fit even after evicting (the store raises DiskBudgetExceeded), and holds
it in the budget otherwise, evicting nothing (the full size is reserved when it is known)."""


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


class _PinnedBackend(httpcore.NetworkBackend):
    """httpcore's network backend that connects only to checked addresses.

    httpcore hands `connect_tcp` the URL's host; this resolves it (with the injectable
    `resolver`), refuses it unless every address is allowed (`vet_addresses`), and connects
    to those addresses, never resolving again. TLS (SNI, certificate) still uses the host name.
    """

    def __init__(self, sources: SourcePolicy, resolver: Resolver | None) -> None:
        self._sources = sources
        self._resolver = resolver
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = vet_addresses(host, port, self._sources, resolver=self._resolver, timeout_s=timeout)
        failure: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not model sources")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def make_client(
    timeout_s: float,
    *,
    sources: SourcePolicy | None = None,
    resolver: Resolver | None = None,
    user_agent: str = "stipple-node",
) -> httpx.Client:
    """An httpx client with connect, read, write and pool timeouts that connects only to
    addresses `sources` allows (`_PinnedBackend`). It does not follow redirects (`download`
    does, checking each hop) and ignores proxy variables (a proxy would connect for us)."""
    transport = httpx.HTTPTransport(trust_env=False)
    transport._pool = httpcore.ConnectionPool(  # the documented way to use a network backend
        ssl_context=httpx.create_ssl_context(trust_env=False),
        network_backend=_PinnedBackend(sources or default_policy(), resolver),
    )
    return httpx.Client(
        transport=transport,
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
    )


class _Guard:
    """The whole download's time limit and its cancellation: checked between chunks, and
    by a watchdog that shuts the socket down under a read that waits (see `watching`)."""

    def __init__(self, shown: str, limit_s: float, cancelled: Cancelled | None) -> None:
        self.shown = shown
        self.limit_s = limit_s
        self.deadline = time.monotonic() + limit_s
        self.cancelled = cancelled
        self.fired: DownloadFailed | None = None
        """What made the watchdog cut the socket: a body that then "ends" is not complete."""

    def problem(self) -> DownloadFailed | None:
        if self.cancelled is not None and self.cancelled():
            return DownloadCancelled(self.shown)
        if time.monotonic() >= self.deadline:
            return DownloadTooSlow(self.shown, self.limit_s)
        return None

    def check(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise problem

    def timeout(self, per_operation_s: float) -> httpx.Timeout:
        """Per-operation timeouts, none past the deadline."""
        return httpx.Timeout(max(min(per_operation_s, self.deadline - time.monotonic()), 0.001))

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.check()
            time.sleep(min(left, WATCH_INTERVAL_S))
        self.check()

    @contextlib.contextmanager
    def watching(self, response: httpx.Response) -> Iterator[None]:
        """While the block runs, shut `response`'s socket down once the limit passes or the
        task is cancelled: a blocked read then fails at once, and `check` says why."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(WATCH_INTERVAL_S):
                problem = self.problem()
                if problem is not None:
                    self.fired = problem
                    _shut_down(response)
                    return

        watcher = threading.Thread(target=watch, name="download-watchdog", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def _shut_down(response: httpx.Response) -> None:
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


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
    hold: HoldCallback | None = None,
    sources: SourcePolicy | None = None,
    max_bytes: int | None = None,
    total_timeout_s: float = DEFAULT_TOTAL_TIMEOUT_S,
    cancelled: Cancelled | None = None,
) -> Downloaded:
    """Download `url` into `dest_dir` (one file per folder) and return where it landed.

    Resumes a ``.download.part`` left by an earlier call. Retries retryable failures
    `retries` times, resuming each time, with exponential backoff. The caller serialises
    calls for the same `dest_dir` (the store holds a per-URL lock).

    `sources` (default: STIPPLE_MODEL_SOURCES) is checked on every hop; a given `client`
    must come from `make_client` with the same policy (it checks the addresses). The file may
    have at most `max_bytes`; everything, retries included, must finish within
    `total_timeout_s`; `cancelled` is polled and stops the download when it says so.
    `timeout_s` bounds each connect and read.
    """
    shown = public_url(url)
    sources = sources or default_policy()
    guard = _Guard(shown, total_timeout_s, cancelled)
    dest_dir.mkdir(parents=True, exist_ok=True)
    own_client = client is None
    http = client or make_client(timeout_s, sources=sources)
    reporter = ProgressReporter(shown, progress, label=shown.rsplit("/", 1)[-1])
    call = _Call(http, url, shown, dest_dir, sha256, reporter, reserve, hold, timeout_s, sources, max_bytes, guard)
    try:
        for attempt in range(retries + 1):
            try:
                return _attempt(call)
            except DownloadFailed as exc:
                if not exc.retryable or attempt == retries:
                    raise
                delay = backoff_s * 2**attempt
                log.warning("download_retry", url=shown, attempt=attempt + 1, delay_s=delay, cause=exc.cause)
                guard.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        reporter.close()
        if own_client:
            http.close()


class _StartOver(Exception):
    """The part file cannot be resumed (stale, or the server resumed elsewhere): start at 0."""


@dataclass(frozen=True)
class _Call:
    """What every try of one download shares."""

    http: httpx.Client
    url: str
    shown: str
    dest_dir: Path
    sha256: str | None
    reporter: ProgressReporter
    reserve: ReserveCallback | None
    hold: HoldCallback | None
    timeout_s: float
    sources: SourcePolicy
    max_bytes: int | None
    guard: _Guard

    @property
    def part(self) -> Path:
        return self.dest_dir / PART_NAME

    @property
    def meta_path(self) -> Path:
        return self.dest_dir / META_NAME


def _attempt(call: _Call) -> Downloaded:
    """One try: resume (or start) the download; if the part cannot be resumed, start over once."""
    try:
        return _request(call)
    except _StartOver:
        _discard(call.part, call.meta_path)
        return _request(call)


def _request(call: _Call) -> Downloaded:
    """One request: resume or start, stream to the part file, verify, move into place."""
    part, meta_path, shown = call.part, call.meta_path, call.shown
    meta = _read_meta(meta_path, shown)
    offset = part.stat().st_size if meta is not None and part.exists() else 0
    if offset == 0:
        _discard(part, meta_path)
    headers = {}
    if offset and meta is not None:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    with _network_errors(call), _open(call, headers) as response:
        if response.status_code == 416 and offset and meta is not None:
            return _after_416(call, response, meta, offset)
        _raise_for_status(response, shown)
        offset, total = _start_position(response, shown, offset)
        if total is not None and call.max_bytes is not None and total > call.max_bytes:
            _discard(part, meta_path)
            raise DownloadTooLarge(shown, f"the server announces {total} bytes; the limit is {call.max_bytes}")
        if offset == 0:
            _discard(part, meta_path)
        resumed_name = meta.get("name") if offset and meta is not None else None
        name = resumed_name or file_name_from(response, call.url)  # a 206 may lack Content-Disposition
        if total is not None and call.reserve is not None:
            _reserve_or_discard(call.reserve, total, part, meta_path)
        _write_meta(meta_path, shown, response, total, name)
        log.info("download_started", url=shown, offset=offset, total_bytes=total, file=name)
        hasher = _hash_file(part) if offset else hashlib.sha256()
        with call.guard.watching(response):
            size = _stream_to(call, response, hasher, offset, total)
    if total is not None and size != total:
        raise DownloadFailed(shown, f"the server sent {size} of {total} bytes")
    return _finish(
        part,
        meta_path,
        call.dest_dir / name,
        shown,
        size,
        hasher.hexdigest(),
        call.sha256,
        call.reporter,
        call.reserve,
        total,
    )


@contextlib.contextmanager
def _open(call: _Call, headers: dict[str, str]) -> Iterator[httpx.Response]:
    """GET the URL, following at most MAX_REDIRECTS redirects by hand: each hop's URL is
    checked against the policy (and its host's addresses when the client connects)."""
    url = call.url
    for hop in range(MAX_REDIRECTS + 1):
        call.guard.check()
        try:
            check_url(url, call.sources, field="url")
        except InvalidInput as exc:
            what = "redirect to " + public_url(url) if hop else "URL"
            raise SourceRefused(call.shown, f"{what}: {exc.reason}") from None
        with call.http.stream("GET", url, headers=headers, timeout=call.guard.timeout(call.timeout_s)) as response:
            location = response.headers.get("location")
            if response.status_code not in REDIRECT_STATUSES or not location:
                yield response
                return
            url = str(response.url.join(location))
            log.info("download_redirect", url=call.shown, to=public_url(url), status=response.status_code)
    raise DownloadFailed(call.shown, f"more than {MAX_REDIRECTS} redirects", retryable=False)


def _after_416(call: _Call, response: httpx.Response, meta: dict[str, Any], offset: int) -> Downloaded:
    """Range not satisfiable: the part is already complete, or it is stale (start over)."""
    part, meta_path, shown = call.part, call.meta_path, call.shown
    total = _content_range_total(response.headers.get("content-range", ""))
    if total != offset or not meta.get("name"):
        log.info("download_restart", url=shown, reason="range not satisfiable", had=offset, total_bytes=total)
        raise _StartOver
    if call.reserve is not None:
        _reserve_or_discard(call.reserve, total, part, meta_path)
    digest = _hash_file(part).hexdigest()
    return _finish(
        part, meta_path, call.dest_dir / meta["name"], shown, offset, digest, call.sha256, call.reporter, None, total
    )


def _reserve_or_discard(reserve: ReserveCallback, size: int, part: Path, meta_path: Path) -> None:
    """Ask for room for `size` bytes; when refused, drop the part too (it is outside the budget)."""
    try:
        reserve(size)
    except Exception:
        _discard(part, meta_path)
        raise


def _start_position(response: httpx.Response, shown: str, offset: int) -> tuple[int, int | None]:
    """Where the body starts and the file's full size (None if unknown)."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):
        raise DownloadFailed(
            shown, f"the server sent Content-Encoding {encoding!r}; nodes accept only identity", retryable=False
        )
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
    total = int(length) if length and length.isdigit() else None
    return 0, total


def _stream_to(call: _Call, response: httpx.Response, hasher: Any, offset: int, total: int | None) -> int:
    """Append the body to the part file, hashing and reporting as it goes; return its size.

    Bytes are counted as they come off the wire (`iter_raw`: nothing is decoded). The file
    is cut when it passes `max_bytes` or the size the server announced, and when the server
    announced none, `hold` checks the disk budget as the file grows.
    """
    part, meta_path, shown, reporter = call.part, call.meta_path, call.shown, call.reporter
    size = offset
    limits = [x for x in (call.max_bytes, total) if x is not None]
    limit = min(limits) if limits else None
    reporter.update(size, total)
    try:
        with open(part, "ab" if offset else "wb", buffering=CHUNK_BYTES) as out:
            for chunk in response.iter_raw():
                size += len(chunk)
                if limit is not None and size > limit:
                    _discard(part, meta_path)
                    which = f"the limit of {call.max_bytes} bytes" if limit == call.max_bytes else f"{total} announced"
                    raise DownloadTooLarge(shown, f"the body passed {which} while downloading")
                if total is None and call.hold is not None:
                    _reserve_or_discard(call.hold, size, part, meta_path)
                out.write(chunk)
                hasher.update(chunk)
                reporter.update(size, total)
                call.guard.check()
            if call.guard.fired is not None:  # the socket was cut: a body without a length seems to end
                raise call.guard.fired
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
def _network_errors(call: _Call) -> Iterator[None]:
    """Turn httpx's transport errors into DownloadFailed (retryable) naming the cause; when
    the time limit passed or the task was cancelled (the watchdog cut the socket), say that."""
    shown = call.shown
    try:
        yield
    except InvalidInput as exc:  # from _PinnedBackend: the host or one of its addresses is refused
        raise SourceRefused(shown, f"{exc.value}: {exc.reason}") from None
    except httpx.TimeoutException as exc:
        call.guard.check()
        what = type(exc).__name__.replace("Timeout", "").lower() or "request"
        raise DownloadFailed(shown, f"{what} timed out after {call.timeout_s:g} s") from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        call.guard.check()
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
