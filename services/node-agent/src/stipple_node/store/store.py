"""The node's model store: turns a model reference into a local path, within a disk budget.

References are Hugging Face repo ids, local folders and files given by the operator, and
http(s) URLs (Civitai and the like). What the store downloads lives under its root and is
listed in an index (`index.py`) with its size and when it was last used; before a new
download the least recently used entries are evicted until it fits. Entries in use by a
running task are pinned and never evicted; local paths are the operator's and are never
counted or touched.

One ModelStore owns its root (a lock file refuses a second one, in this process or
another): the index in memory is then the truth, and is written through on every change.
`resolve` is synchronous and thread-safe (the node calls it from a worker thread); two
threads resolving the same URL or repo download it once.

What may be fetched is the operator's `SourcePolicy` (STIPPLE_MODEL_SOURCES): every URL and
repo id is checked against it before anything else, cached or not (a node trusts no
gateway), and `download` checks every redirect and address again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import httpx
import structlog

from stipple_common.errors import InvalidInput, StippleError
from stipple_common.sources import Resolver, SourcePolicy, check_reference, default_policy, url_sha256

from ..metrics import StoreMetrics
from . import hf
from .download import DEFAULT_TOTAL_TIMEOUT_S, Cancelled, ProgressCallback, download, make_client
from .errors import (
    ChecksumMismatch,
    DiskBudgetExceeded,
    DownloadFailed,
    ModelNotAvailable,
    SourceRefused,
    StoreError,
    StoreLocked,
)
from .index import Entry, load_index, save_index
from .refs import check_sha256, check_variant, classify, hf_key, local_path, public_url, url_key

log = structlog.get_logger("stipple.node.store")

_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class StoredModel:
    """One thing the store holds, for the node's announcement of what is on disk."""

    ref: str
    """The repo id, or the URL without credentials."""
    path: Path
    size_bytes: int
    last_used: float
    """Unix time of the last `resolve`."""
    kind: str
    source: str
    """"hf" or "url"."""


class ModelStore:
    """Resolves model references to local paths; downloads and evicts within `budget_bytes`.

    `budget_bytes=None` means no limit (nothing is ever evicted). `hf_offline=True` (the
    default, as nodes run) never contacts the Hugging Face hub: a repo must already be in
    ``<root>/hf``. `progress` receives download progress (URLs). `http_timeout_s` bounds
    connecting and each read; `retries` is how many more times a retryable download failure
    is tried (resuming) before resolve raises.

    `sources` says what may be fetched (default: STIPPLE_MODEL_SOURCES, whose own default
    allows Hugging Face ids and no URL; `resolver` replaces DNS in tests). A URL download
    may take `download_timeout_s` in all and be at most `max_download_bytes` (None: only the
    budget limits it, also while a body of unknown size streams in).
    """

    def __init__(
        self,
        root: Path,
        *,
        budget_bytes: int | None,
        hf_offline: bool = True,
        progress: ProgressCallback | None = None,
        http_timeout_s: float = 30,
        retries: int = 2,
        backoff_s: float = 0.5,
        sources: SourcePolicy | None = None,
        resolver: Resolver | None = None,
        download_timeout_s: float = DEFAULT_TOTAL_TIMEOUT_S,
        max_download_bytes: int | None = None,
    ) -> None:
        if download_timeout_s <= 0:
            raise InvalidInput("download_timeout_s", download_timeout_s, "must be > 0")
        if max_download_bytes is not None and max_download_bytes < 0:
            raise InvalidInput("max_download_bytes", max_download_bytes, "must be >= 0, or None for no limit")
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or budget_bytes < 0):
            raise InvalidInput("budget_bytes", budget_bytes, "must be a number of bytes >= 0, or None for no limit")
        if http_timeout_s <= 0:
            raise InvalidInput("http_timeout_s", http_timeout_s, "must be > 0")
        self.root = Path(root).expanduser().absolute()
        self.budget_bytes = budget_bytes
        self.hf_offline = hf_offline
        self.http_timeout_s = float(http_timeout_s)
        self._progress = progress
        self._retries = retries
        self._backoff_s = backoff_s
        self.sources = sources or default_policy()
        self._resolver = resolver
        self.download_timeout_s = float(download_timeout_s)
        self.max_download_bytes = max_download_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._owner = filelock.FileLock(self.root / ".owner.lock", timeout=0)
        try:
            self._owner.acquire()
        except filelock.Timeout:
            raise StoreLocked(str(self.root)) from None
        self._lock = threading.RLock()
        self._entries = load_index(self.root)
        self._pins: Counter[str] = Counter()
        self._reserved: dict[str, int] = {}
        self._ref_locks: dict[str, threading.Lock] = {}
        self._client: httpx.Client | None = None
        self._local_sums: dict[tuple[str, int, int], str] = {}
        self._last_touch = 0.0
        self._closed = False
        self.metrics = StoreMetrics(used_bytes=lambda: self.used_bytes)
        log.info("store_opened", root=str(self.root), entries=len(self._entries), used_bytes=self.used_bytes)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP client and release the root (another ModelStore may open it then)."""
        with self._lock:
            self._closed = True
            if self._client is not None:
                self._client.close()
                self._client = None
            self._owner.release()

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------

    def resolve(
        self,
        ref: str,
        *,
        variant: str | None = None,
        kind: str = "model",
        sha256: str | None = None,
        cancelled: Cancelled | None = None,
    ) -> Path:
        """The local path of `ref`, downloading it if needed; marks it used (LRU).

        Local folders and files are returned as given (a file is checked against `sha256`
        when one is given; a URL may carry it as ``#sha256=<hex>``). `variant` applies to
        Hugging Face repos only ("fp16" fetches ``*.fp16.safetensors``). A URL download stops
        with DownloadCancelled once `cancelled()` is true. Raises InvalidInput for a bad
        reference, SourceRefused for one the source policy refuses, and a StoreError
        otherwise. The path may be evicted once this returns; use `use` (or `using`) to keep
        it while a task runs.
        """
        return self._resolve(ref, variant=variant, kind=kind, sha256=sha256, pin=False, cancelled=cancelled)

    @contextlib.contextmanager
    def use(
        self,
        ref: str,
        *,
        variant: str | None = None,
        kind: str = "model",
        sha256: str | None = None,
        cancelled: Cancelled | None = None,
    ) -> Iterator[Path]:
        """Resolve `ref` and pin it until the block ends (no window where it can be evicted)."""
        path = self._resolve(ref, variant=variant, kind=kind, sha256=sha256, pin=True, cancelled=cancelled)
        try:
            yield path
        finally:
            self.unpin(path)

    @contextlib.contextmanager
    def using(self, path: Path) -> Iterator[Path]:
        """Pin the stored entry holding `path` until the block ends (a no-op for local paths)."""
        self.pin(path)
        try:
            yield path
        finally:
            self.unpin(path)

    def pin(self, path: Path) -> bool:
        """Keep the entry holding `path` from eviction; pins count. False if the store does
        not hold `path` (an operator's local path, which is never evicted anyway)."""
        with self._lock:
            entry = self._entry_for(path)
            if entry is None:
                return False
            self._pins[entry.key] += 1
            return True

    def unpin(self, path: Path) -> None:
        """Undo one `pin` of the entry holding `path`."""
        with self._lock:
            entry = self._entry_for(path)
            if entry is not None and self._pins[entry.key] > 0:
                self._pins[entry.key] -= 1
                if not self._pins[entry.key]:
                    del self._pins[entry.key]

    def inventory(self) -> list[StoredModel]:
        """What the store holds, sorted by ref."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.ref)
            return [
                StoredModel(e.ref, self.root / e.path, e.size_bytes, e.last_used, e.kind, e.source) for e in entries
            ]

    @property
    def used_bytes(self) -> int:
        """Bytes of the stored entries plus those reserved by downloads under way."""
        with self._lock:
            return sum(e.size_bytes for e in self._entries.values()) + sum(self._reserved.values())

    # -- resolution ------------------------------------------------------------------

    def _resolve(
        self, ref: str, *, variant: str | None, kind: str, sha256: str | None, pin: bool, cancelled: Cancelled | None
    ) -> Path:
        """`_lookup`, counted in the store's metrics (hit, download, local, error)."""
        source = "url"
        self.metrics.begin()
        try:
            source = {"local_dir": "local", "local_file": "local", "hf": "hf"}.get(classify(ref), "url")
            path = self._lookup(ref, variant=variant, kind=kind, sha256=sha256, pin=pin, cancelled=cancelled)
        except BaseException:
            self.metrics.finish(source, error=True)
            raise
        self.metrics.finish(source)
        return path

    def _lookup(
        self, ref: str, *, variant: str | None, kind: str, sha256: str | None, pin: bool, cancelled: Cancelled | None
    ) -> Path:
        if self._closed:
            raise StoreError(f"model store {self.root} is closed (resolving {ref!r})")
        ref_kind = classify(ref)
        variant = check_variant(variant)
        sha256 = check_sha256(sha256)
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise InvalidInput("kind", kind, "must be a lower-case word like 'model', 'lora' or 'embedding'")
        if ref_kind == "local_dir" or ref_kind == "local_file":
            return self._resolve_local(ref, is_file=ref_kind == "local_file", sha256=sha256)
        if ref_kind == "hf":
            if sha256 is not None:
                raise InvalidInput("sha256", sha256, "applies to single files (URLs, local files), not to repos")
            self._check_source(ref, None, f"hf://{ref}")
            return self._resolve_hf(ref, kind=kind, variant=variant, pin=pin)
        self._check_source(ref, sha256, public_url(ref))
        sha256 = sha256 or check_sha256(url_sha256(ref))
        return self._resolve_url(ref, kind=kind, sha256=sha256, pin=pin, cancelled=cancelled)

    def _check_source(self, ref: str, sha256: str | None, shown: str) -> None:
        """SourceRefused unless the operator's policy allows `ref` (before any cache lookup)."""
        try:
            check_reference(ref, sha256, self.sources, field="model")
        except InvalidInput as exc:
            raise SourceRefused(shown, exc.reason) from None

    def _resolve_local(self, ref: str, *, is_file: bool, sha256: str | None) -> Path:
        """An operator's path: checked to exist, returned as is, never counted or evicted."""
        path = local_path(ref)
        if is_file and not path.is_file():
            raise ModelNotAvailable(ref, f"no file at {path}")
        if not is_file and not path.is_dir():
            raise ModelNotAvailable(ref, f"no folder at {path}")
        if sha256 is not None:
            if not is_file:
                raise InvalidInput("sha256", sha256, "applies to single files (URLs, local files), not to folders")
            actual = self._local_sha256(path)
            if actual != sha256:
                raise ChecksumMismatch(str(path), sha256, actual)
        return path

    def _local_sha256(self, path: Path) -> str:
        """sha256 of a local file, remembered while its size and mtime stay the same."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._local_sums:
            hasher = hashlib.sha256()
            with open(path, "rb") as src:
                while block := src.read(1 << 20):
                    hasher.update(block)
            self._local_sums[key] = hasher.hexdigest()
        return self._local_sums[key]

    def _resolve_url(self, url: str, *, kind: str, sha256: str | None, pin: bool, cancelled: Cancelled | None) -> Path:
        """A stored download of `url`, or a new one (resuming a partial one)."""
        key, shown = url_key(url), public_url(url)
        with self._ref_lock(key):
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and (self.root / entry.path).is_file():
                    if sha256 is None or entry.sha256 == sha256:
                        return self._touch(entry, pin)
                    if self._pins[key]:
                        raise ChecksumMismatch(shown, sha256, entry.sha256 or "unknown")
                    log.info("store_replacing", ref=shown, had_sha256=entry.sha256, want_sha256=sha256)
                if entry is not None:
                    self._remove(entry)
            folder = self.root / "files" / key
            try:
                done = download(
                    url,
                    folder,
                    sha256=sha256,
                    client=self._http(),
                    timeout_s=self.http_timeout_s,
                    retries=self._retries,
                    backoff_s=self._backoff_s,
                    progress=self._progress,
                    reserve=lambda size: self._reserve(key, shown, size),
                    hold=lambda size: self._hold(key, shown, size),
                    sources=self.sources,
                    max_bytes=self.max_download_bytes,
                    total_timeout_s=self.download_timeout_s,
                    cancelled=cancelled,
                )
                self.metrics.downloaded("url", done.size_bytes)
                with self._lock:
                    for other in folder.iterdir():  # an older file of this URL under another name
                        if other.is_file() and other != done.path and not other.name.startswith("."):
                            other.unlink()
                    entry = Entry(
                        key=key,
                        ref=shown,
                        source="url",
                        kind=kind,
                        path=self._relative(done.path),
                        evict_path=self._relative(folder),
                        size_bytes=done.size_bytes,
                        last_used=0.0,
                        sha256=done.sha256,
                    )
                    self._entries[key] = entry
                    return self._touch(entry, pin)
            finally:
                with self._lock:
                    self._reserved.pop(key, None)

    def _resolve_hf(self, repo_id: str, *, kind: str, variant: str | None, pin: bool) -> Path:
        """A Hugging Face snapshot in ``<root>/hf``: from the cache when offline, else fetched."""
        key = hf_key(repo_id)
        cache = self.root / "hf"
        with self._ref_lock(key):
            with self._lock:
                entry = self._entries.get(key)
                known = entry.files.get(variant or "") if entry is not None else None
            try:
                if self._hub_offline():
                    path, files = self._hf_from_cache(repo_id, cache, kind, variant, known), known
                else:
                    path, files = self._hf_fetch(repo_id, key, cache, kind, variant)
                if kind == "model" and not (path / "model_index.json").is_file():
                    raise ModelNotAvailable(repo_id, f"the snapshot at {path} has no model_index.json")
                with self._lock:
                    return self._record_hf(key, repo_id, kind, variant, path, files, pin)
            finally:
                with self._lock:
                    self._reserved.pop(key, None)

    def _hub_offline(self) -> bool:
        from huggingface_hub import constants

        return self.hf_offline or bool(constants.HF_HUB_OFFLINE)

    def _hf_from_cache(
        self, repo_id: str, cache: Path, kind: str, variant: str | None, known: list[str] | None
    ) -> Path:
        """The cached snapshot, without any network call; ModelNotAvailable if it is not there."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        allow, ignore = (known, None) if known else hf.offline_patterns(kind, variant)
        try:
            folder = snapshot_download(
                repo_id, cache_dir=cache, local_files_only=True, allow_patterns=allow, ignore_patterns=ignore
            )
        except LocalEntryNotFoundError as exc:
            detail = "the cached copy is incomplete" if "incomplete" in str(exc) else "it is not in the local cache"
            raise ModelNotAvailable(
                repo_id,
                f"{detail} ({cache}) and this node runs offline (Hugging Face downloads are off); "
                f"fetch it beforehand with `hf download {repo_id} --cache-dir {cache}`",
            ) from None
        return Path(folder)

    def _hf_fetch(self, repo_id: str, key: str, cache: Path, kind: str, variant: str | None) -> tuple[Path, list[str]]:
        """List the repo, pick the files a node needs, make room for them, download them."""
        from huggingface_hub import snapshot_download

        try:
            listing = snapshot_download(repo_id, cache_dir=cache, dry_run=True, etag_timeout=self.http_timeout_s)
            infos = {info.filename: info for info in listing}
            files = hf.select_files(infos, kind, variant, repo_id=repo_id)
            needed = sum(infos[f].file_size or 0 for f in files if infos[f].will_download)
            if needed:
                self._reserve(key, repo_id, needed)
            log.info("hf_download_started", repo=repo_id, variant=variant, files=len(files), bytes=needed)
            folder = snapshot_download(repo_id, cache_dir=cache, allow_patterns=files, etag_timeout=self.http_timeout_s)
            if needed:
                self.metrics.downloaded("hf", needed)
        except StippleError:
            raise
        except Exception as exc:
            raise _hf_error(repo_id, exc) from exc
        return Path(folder), files

    def _record_hf(
        self, key: str, repo_id: str, kind: str, variant: str | None, path: Path, files: list[str] | None, pin: bool
    ) -> Path:
        """Add or refresh the repo's entry (its size is what its cache folder holds now)."""
        repo_folder = hf.repo_folder(self.root / "hf", repo_id)
        entry = self._entries.get(key) or Entry(
            key=key,
            ref=repo_id,
            source="hf",
            kind=kind,
            path=self._relative(path),
            evict_path=self._relative(repo_folder),
            size_bytes=0,
            last_used=0.0,
        )
        entry.path = self._relative(path)
        entry.size_bytes = hf.folder_bytes(repo_folder)
        if files is not None:
            entry.files[variant or ""] = files
        self._entries[key] = entry
        return self._touch(entry, pin)

    # -- budget ----------------------------------------------------------------------

    def _reserve(self, key: str, ref: str, size: int) -> None:
        """Make room for `size` more bytes for `key` (evicting LRU entries) and hold it."""
        with self._lock:
            if self.budget_bytes is not None:
                self._make_room(key, ref, size)
            self._reserved[key] = size

    def _hold(self, key: str, ref: str, size: int) -> None:
        """Count `size` bytes of a download of unknown size against the budget, evicting
        nothing; DiskBudgetExceeded once they could not fit even after evicting all it may."""
        with self._lock:
            if self.budget_bytes is not None:
                used = sum(e.size_bytes for e in self._entries.values())
                used += sum(held for k, held in self._reserved.items() if k != key)
                freeable = sum(e.size_bytes for e in self._entries.values() if self._evictable(e, key))
                if used - freeable + size > self.budget_bytes:
                    raise DiskBudgetExceeded(ref, needed=size, budget=self.budget_bytes, unevictable=used - freeable)
            self._reserved[key] = size

    def _make_room(self, key: str, ref: str, needed: int) -> None:
        """Evict least recently used entries until `needed` fits; evict nothing if it cannot."""
        assert self.budget_bytes is not None
        budget = self.budget_bytes
        used = sum(e.size_bytes for e in self._entries.values())
        used += sum(size for k, size in self._reserved.items() if k != key)
        if used + needed <= budget:
            return
        candidates = sorted((e for e in self._entries.values() if self._evictable(e, key)), key=lambda e: e.last_used)
        freeable = sum(e.size_bytes for e in candidates)
        if used - freeable + needed > budget:
            raise DiskBudgetExceeded(ref, needed=needed, budget=budget, unevictable=used - freeable)
        for entry in candidates:
            if used + needed <= budget:
                break
            log.info("store_evicting", ref=entry.ref, size_bytes=entry.size_bytes, for_ref=ref)
            self._remove(entry)
            self.metrics.evictions.inc()
            used -= entry.size_bytes

    def _evictable(self, entry: Entry, for_key: str) -> bool:
        """Not pinned, not being downloaded, not the entry we make room for, and fetchable
        again (a repo cannot be fetched again while the hub is off)."""
        if entry.key == for_key or self._pins[entry.key] or entry.key in self._reserved:
            return False
        return not (entry.source == "hf" and self._hub_offline())

    def _remove(self, entry: Entry) -> None:
        """Forget `entry` and delete its files."""
        self._entries.pop(entry.key, None)
        self._save()
        target = self.root / entry.evict_path
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    # -- helpers ---------------------------------------------------------------------

    def _touch(self, entry: Entry, pin: bool) -> Path:
        """Mark `entry` used now (strictly after every earlier use), save, pin if asked."""
        now = max(time.time(), self._last_touch + 1e-6)
        self._last_touch = now
        entry.last_used = now
        self._save()
        if pin:
            self._pins[entry.key] += 1
        return self.root / entry.path

    def _entry_for(self, path: Path) -> Entry | None:
        path = Path(path).absolute()
        for entry in self._entries.values():
            held = self.root / entry.path
            if path == held or held in path.parents:
                return entry
        return None

    def _ref_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._ref_locks.setdefault(key, threading.Lock())

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = make_client(self.http_timeout_s, sources=self.sources, resolver=self._resolver)
            return self._client

    def _relative(self, path: Path) -> str:
        return os.path.relpath(Path(path).absolute(), self.root)

    def _save(self) -> None:
        save_index(self.root, self._entries)


def _hf_error(repo_id: str, exc: Exception) -> StippleError:
    """A StoreError for what huggingface_hub raised while online."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError)):
        return ModelNotAvailable(repo_id, f"the hub refuses it ({type(exc).__name__}: {_first_line(exc)})")
    status: Any = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and isinstance(status, int) and 400 <= status < 500 and status != 429:
        return DownloadFailed(f"hf://{repo_id}", f"HTTP {status}: {_first_line(exc)}", retryable=False, status=status)
    if isinstance(exc, LocalEntryNotFoundError):
        return DownloadFailed(f"hf://{repo_id}", f"the hub cannot be reached: {_first_line(exc)}")
    return DownloadFailed(f"hf://{repo_id}", f"{type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
