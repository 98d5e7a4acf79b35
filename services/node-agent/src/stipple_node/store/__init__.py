"""The node's model store: model references to local paths, downloads, disk budget.

See `store.ModelStore` for the whole story; `classify` tells what a reference names.
"""

from __future__ import annotations

from .download import ProgressEvent
from .errors import (
    ChecksumMismatch,
    DiskBudgetExceeded,
    DownloadCancelled,
    DownloadFailed,
    DownloadTooLarge,
    DownloadTooSlow,
    ModelNotAvailable,
    SourceRefused,
    StoreError,
    StoreLocked,
)
from .refs import RefKind, classify, public_url
from .store import ModelStore, StoredModel

__all__ = [
    "ChecksumMismatch",
    "DiskBudgetExceeded",
    "DownloadCancelled",
    "DownloadFailed",
    "DownloadTooLarge",
    "DownloadTooSlow",
    "ModelNotAvailable",
    "ModelStore",
    "ProgressEvent",
    "RefKind",
    "SourceRefused",
    "StoreError",
    "StoreLocked",
    "StoredModel",
    "classify",
    "public_url",
]
