"""Errors of the model store.

Every error is a `StoreError` (a `StippleError`), so the node turns it into a typed
``errored`` event with a stable `code`; `retryable` tells the consumer loop whether trying
the task again later may help (a flaky network) or not (a 404, a wrong checksum).
"""

from __future__ import annotations

from stipple_common.errors import StippleError


def _size(n: int) -> str:
    """Bytes as a short human figure (for messages only; the exact number rides along)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit} ({n} B)"
        value /= 1024
    return f"{n} B"  # pragma: no cover


class StoreError(StippleError):
    """Base of every error the model store raises."""

    code = "store_error"


class ModelNotAvailable(StoreError):
    """The model is not on this disk and the store may not (or cannot) fetch it."""

    code = "model_not_available"

    def __init__(self, ref: str, reason: str) -> None:
        super().__init__(f"model {ref!r} is not available: {reason}")
        self.ref = ref
        self.reason = reason


class DownloadFailed(StoreError):
    """A download did not finish: network error, timeout, HTTP error status.

    Retryable for what may pass (connection errors, timeouts, 5xx, 408, 429), not for what
    will not (404, 403, other 4xx).
    """

    code = "download_failed"
    retryable = True

    def __init__(self, url: str, cause: str, *, retryable: bool = True, status: int | None = None) -> None:
        super().__init__(f"download of {url} failed: {cause}", retryable=retryable)
        self.url = url
        self.cause = cause
        self.status = status


class SourceRefused(DownloadFailed):
    """The operator's source policy (STIPPLE_MODEL_SOURCES) refuses the URL, a redirect of it,
    or an address its host resolves to (private, loopback, link-local, ...). Never retried."""

    code = "source_refused"

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(url, cause, retryable=False)


class DownloadTooLarge(DownloadFailed):
    """The file is larger than the node may download (its size limit or its disk budget
    while streaming). Never retried."""

    code = "download_too_large"

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(url, f"too large: {cause}", retryable=False)


class DownloadTooSlow(DownloadFailed):
    """The whole download did not finish within STIPPLE_DOWNLOAD_TIMEOUT_S (a slow or
    trickling server). Never retried: the next try would be as slow."""

    code = "download_too_slow"

    def __init__(self, url: str, limit_s: float) -> None:
        super().__init__(
            url, f"too slow: not finished within {limit_s:g} s (STIPPLE_DOWNLOAD_TIMEOUT_S)", retryable=False
        )
        self.limit_s = limit_s


class DownloadCancelled(DownloadFailed):
    """The task that needed the file was cancelled while it downloaded (the part file is
    kept: a later download resumes it)."""

    code = "download_cancelled"

    def __init__(self, url: str) -> None:
        super().__init__(url, "cancelled", retryable=False)


class ChecksumMismatch(StoreError):
    """The downloaded (or local) file does not have the sha256 the task asked for."""

    code = "checksum_mismatch"

    def __init__(self, ref: str, expected: str, actual: str) -> None:
        super().__init__(f"{ref}: sha256 mismatch: expected {expected}, got {actual}; the file was discarded")
        self.ref = ref
        self.expected = expected
        self.actual = actual


class DiskBudgetExceeded(StoreError):
    """A new file does not fit in the disk budget even after evicting what may be evicted."""

    code = "disk_budget_exceeded"

    def __init__(self, ref: str, *, needed: int, budget: int, unevictable: int) -> None:
        free = max(budget - unevictable, 0)
        super().__init__(
            f"{ref}: needs {_size(needed)} but the store budget is {_size(budget)}, of which {_size(unevictable)} "
            "cannot be freed (pinned by running tasks, being downloaded, or not downloadable again), "
            f"leaving {_size(free)}"
        )
        self.ref = ref
        self.needed = needed
        self.budget = budget
        self.unevictable = unevictable


class StoreLocked(StoreError):
    """Another ModelStore (in this or another process) already owns the store folder."""

    code = "store_locked"

    def __init__(self, root: str) -> None:
        super().__init__(
            f"model store {root} is already in use by another node process (or an unclosed ModelStore); "
            "give each node its own store folder"
        )
        self.root = root
