"""The store's index: what it holds, how big, when last used. One JSON file, written atomically.

The index is what the LRU eviction and the node's inventory read. It is rewritten whole
(to a temporary file, fsynced, then renamed) after every change, so a crash leaves either
the old or the new index, never a torn one. A corrupt index is set aside, not fatal: the
store starts empty and downloads again what it needs.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Literal

import msgspec
import structlog

log = structlog.get_logger("stipple.node.store")

INDEX_NAME = "index.json"
INDEX_VERSION = 1


class Entry(msgspec.Struct, kw_only=True):
    """One thing the store downloaded and may evict."""

    key: str
    """"hf:<repo id>" or the URL's folder key."""
    ref: str
    """What to announce: the repo id, or the URL without credentials."""
    source: Literal["hf", "url"]
    kind: str
    path: str
    """Relative to the store root: the snapshot folder or the downloaded file."""
    evict_path: str
    """Relative to the store root: what eviction deletes (the HF repo folder, the URL's folder)."""
    size_bytes: int
    last_used: float
    sha256: str | None = None
    files: dict[str, list[str]] = msgspec.field(default_factory=dict)
    """HF only: variant ("" for none) -> the repo files fetched for it."""


class IndexFile(msgspec.Struct, kw_only=True):
    version: int = INDEX_VERSION
    entries: list[Entry] = msgspec.field(default_factory=list)


def load_index(root: Path) -> dict[str, Entry]:
    """The entries of `root`'s index whose files still exist; {} if there is none yet."""
    path = root / INDEX_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        index = msgspec.json.decode(data, type=IndexFile)
    except msgspec.DecodeError as exc:
        aside = path.with_name(f"{INDEX_NAME}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        log.warning("store_index_corrupt", path=str(path), moved_to=str(aside), error=str(exc))
        return {}
    entries = {}
    for entry in index.entries:
        if (root / entry.path).exists():
            entries[entry.key] = entry
        else:
            log.warning("store_entry_missing", ref=entry.ref, path=entry.path)
    return entries


def save_index(root: Path, entries: dict[str, Entry]) -> None:
    """Write the index atomically (temporary file, fsync, rename)."""
    path = root / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.tmp")
    data = msgspec.json.format(msgspec.json.encode(IndexFile(entries=list(entries.values()))), indent=1)
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
