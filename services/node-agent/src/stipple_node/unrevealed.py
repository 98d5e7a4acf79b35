"""Committed results not yet revealed, kept on disk: a node that restarts between its
commitment and its reveal can still reveal.

Once a node has committed it must reveal when asked: the validator judges a committed node
that does not `withheld`, and slashes it (a node that learned from the wait that its task
was sampled must not be able to trade a committed cheat for a timeout). The nonce that
opens the commitment lives only in the node, so without this a crash, an upgrade or an
out-of-memory kill in that window would cost an honest node its stake.

One JSON file per task (`<task_id>.json`, msgspec), written atomically (a temporary file,
then a rename) after the images are stored and before the commitment is published, and
removed once the node has revealed, the task was cancelled, or the record is older than
`max_age_s`. The folder holds at most `keep` records, the oldest removed first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import structlog

from stipple_common.messages import ImageResult, TaskCommitted

log = structlog.get_logger("stipple.node")

TASK_ID_CHARS = frozenset("0123456789abcdefABCDEF-_")


class Unrevealed(msgspec.Struct, frozen=True, kw_only=True):
    """What a reveal needs: the committed images (stored already), the nonce, the class."""

    task_id: str
    images: list[ImageResult]
    nonce: str
    elapsed_s: float
    determinism: str
    event: TaskCommitted  # the commitment as published (a redelivered assignment publishes it again)


_decoder = msgspec.json.Decoder(Unrevealed)


class UnrevealedStore:
    def __init__(self, folder: Path, *, keep: int = 1_000, max_age_s: float = 86_400.0) -> None:
        self.folder = folder
        self.keep = keep
        self.max_age_s = max_age_s
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, task_id: str) -> Path | None:
        """The record's file; None for a task id that is not a plain file name (ids are hex)."""
        if not task_id or len(task_id) > 128 or not set(task_id) <= TASK_ID_CHARS:
            return None
        return self.folder / f"{task_id}.json"

    def save(self, record: Unrevealed) -> None:
        path = self._path(record.task_id)
        if path is None:
            log.warning("unrevealed_not_kept", task_id=record.task_id[:100], why="not a task id")
            return
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(msgspec.json.encode(record))
        os.replace(temporary, path)
        self._prune()

    def drop(self, task_id: str) -> None:
        path = self._path(task_id)
        if path is not None:
            path.unlink(missing_ok=True)

    def load(self) -> list[Unrevealed]:
        """The records kept, oldest first; unreadable and expired ones are removed."""
        self._prune()
        out = []
        for path in self._files():
            try:
                out.append(_decoder.decode(path.read_bytes()))
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("unrevealed_unreadable", path=str(path), error=str(exc))
                path.unlink(missing_ok=True)
        return out

    def _files(self) -> list[Path]:
        files = []
        for path in self.folder.glob("*.json"):
            try:
                files.append((path.stat().st_mtime, path))
            except OSError:
                continue
        return [path for _, path in sorted(files)]

    def _prune(self) -> None:
        files = self._files()
        now = time.time()
        for index, path in enumerate(files):
            try:
                old = now - path.stat().st_mtime > self.max_age_s
            except OSError:
                continue
            if old or index < len(files) - self.keep:
                path.unlink(missing_ok=True)
