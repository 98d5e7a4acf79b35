"""The blob intake: nodes' images into the blob store, for nodes that hold no credentials.

A node sends each image on ``rpc.blobs.<node_id>`` in parts (the protocol is in
stipple_common.blobstore.intake). Before anything is kept in memory, the first part is
checked:

- the key lies under ``tasks/<task_id>/<node_id>/`` with the node id of the subject (the
  server's word, not the node's), and has no ``..`` or empty segment;
- the node is assigned to that task (the task's ``assigned``, ``reassigned`` and ``extended`` events);
- nothing is stored under the key yet: a blob is written once, so what the validator
  checked cannot be swapped afterwards;
- the node has stored fewer than `MAX_BLOBS_PER_TASK` blobs in the task through this
  intake (an honest node stores one per image, at most `MAX_IMAGES`, and again after a
  restart): each blob costs a decode here, so the count bounds what a node can make the
  intake decode and store for one task (counted when an upload begins, so uploads begun
  together may pass it by the `max_uploads_per_node` a node may have open).

With each blob it stores the blob's facts (stipple_common.pngfacts: SHA-256, PNG size,
pHash, or why it is no PNG), computed from the bytes it writes, so that the validator
judges a reveal without reading the image back. The stored content type comes from the
facts too (image/png, or application/octet-stream), never from the node.

The size is checked as parts arrive (`max_blob_bytes`); an upload left unfinished is
dropped after `upload_timeout_s`; each node may have `max_uploads_per_node` uploads open
and all of them together at most `max_buffered_bytes` in memory. Parts after the first go
to this instance's own subject (``rpc.blobs.<node_id>.<instance>``), so several intakes
can share the queue group.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from stipple_common import subjects
from stipple_common.blobstore import BlobExists, BlobStore
from stipple_common.blobstore.intake import KEY, LAST, PART, UPLOAD, blob_prefix
from stipple_common.errors import StippleError
from stipple_common.messages import (
    TaskAssigned,
    TaskExtended,
    TaskReassigned,
    UploadReply,
    encode,
    task_event_decoder,
)
from stipple_common.pngfacts import METADATA_KEY, PngFacts, png_facts
from stipple_common.taskspec import MAX_IMAGES, MAX_SIDE

from .metrics import IntakeMetrics

log = structlog.get_logger("stipple.gatekeeper.intake")

MAX_BLOBS_PER_TASK = 2 * MAX_IMAGES  # per node and task, per intake instance


@dataclass
class _Upload:
    key: str
    task_id: str
    started: float
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    next_part: int = 1


class Refused(StippleError):
    """An upload the intake will not take; `code` is the UploadReply error."""


class Intake:
    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        blobs: BlobStore,
        metrics: IntakeMetrics,
        max_blob_bytes: int,
        upload_timeout_s: float = 60.0,
        max_uploads_per_node: int = 8,
        max_buffered_bytes: int = 512 * 1024 * 1024,
        check_assignment: bool = True,
    ) -> None:
        self.nc = nc
        self.js = js
        self.blobs = blobs
        self.max_blob_bytes = max_blob_bytes
        self.upload_timeout_s = upload_timeout_s
        self.max_uploads_per_node = max_uploads_per_node
        self.max_buffered_bytes = max_buffered_bytes
        self.check_assignment = check_assignment
        self.instance = secrets.token_hex(6)
        self.uploads: dict[tuple[str, str], _Upload] = {}
        self.buffered = 0
        self._assigned: OrderedDict[tuple[str, str], None] = OrderedDict()  # (task, node) known assigned
        self._stored: OrderedDict[tuple[str, str], int] = OrderedDict()  # (task, node) -> blobs decoded here
        self.metrics = metrics

    async def serve(self) -> list[object]:
        return [
            await self.nc.subscribe(subjects.blob_rpc_subject("*"), queue=subjects.GATEKEEPER_QUEUE, cb=self.on_part),
            await self.nc.subscribe(subjects.blob_rpc_subject("*") + f".{self.instance}", cb=self.on_part),
        ]

    async def on_part(self, msg: Msg) -> None:
        node_id = subjects.subject_token(msg.subject, 2)
        try:
            reply = await self.take(node_id, msg.headers or {}, msg.data)
        except Refused as exc:
            self.metrics.results.labels(exc.code).inc()
            log.warning("upload_refused", node_id=node_id, reason=exc.code, error=exc.message)
            reply = UploadReply(ok=False, error=exc.code, message=exc.message)
        except StippleError as exc:  # the store is down: the node retries later
            self.metrics.results.labels("store_unavailable").inc()
            log.warning("upload_not_stored", node_id=node_id, error=exc.message)
            reply = UploadReply(ok=False, error="store_unavailable", message=exc.message)
        if msg.reply:
            await msg.respond(encode(reply))

    async def take(self, node_id: str, headers: dict[str, str], data: bytes) -> UploadReply:
        self._expire()
        upload_id = headers.get(UPLOAD, "")
        try:
            part = int(headers.get(PART, ""))
        except ValueError:
            raise Refused(f"{PART}: not a number (got {headers.get(PART)!r})", code="bad_part") from None
        last = headers.get(LAST) == "1"
        if not upload_id or len(upload_id) > 64:
            raise Refused(f"{UPLOAD}: missing or too long", code="bad_part")
        slot = (node_id, upload_id)
        if part == 0:
            if slot in self.uploads:
                raise Refused(f"upload {upload_id!r} was started already", code="bad_part")
            key = headers.get(KEY, "")
            task_id = await self._check_key(node_id, key)
            upload = _Upload(key=key, task_id=task_id, started=time.monotonic())
        else:
            upload = self.uploads.get(slot)  # type: ignore[assignment]
            if upload is None or part != upload.next_part:
                raise Refused(f"part {part} of an unknown, finished or out-of-order upload", code="bad_part")
            upload.next_part += 1
        if upload.size + len(data) > self.max_blob_bytes:
            self._drop(slot)
            raise Refused(f"{upload.key!r} is larger than {self.max_blob_bytes} bytes", code="too_large")
        if last:
            self._drop(slot)
            blob = b"".join([*upload.parts, data])
            return await self._store(node_id, upload, blob)
        if part == 0:
            open_uploads = sum(1 for node, _ in self.uploads if node == node_id)
            if open_uploads >= self.max_uploads_per_node or self.buffered + len(data) > self.max_buffered_bytes:
                raise Refused("too many uploads in progress; try again", code="busy")
            self.uploads[slot] = upload
        upload.parts.append(data)
        upload.size += len(data)
        self.buffered += len(data)
        continue_on = subjects.blob_rpc_subject(node_id) + f".{self.instance}"
        return UploadReply(ok=True, key=upload.key, size=upload.size, continue_on=continue_on)

    async def _store(self, node_id: str, upload: _Upload, blob: bytes) -> UploadReply:
        # what the validator judges, from the bytes written here
        facts = await asyncio.to_thread(png_facts, blob, max_pixels=MAX_SIDE * MAX_SIDE)
        metadata = {METADATA_KEY: facts.encode()}
        content_type = "application/octet-stream" if facts.error else "image/png"
        counted = (upload.task_id, node_id)
        try:  # write once, atomically on JetStream (no read first)
            await self.blobs.put_new(upload.key, blob, content_type=content_type, metadata=metadata)
        except BlobExists:
            self._count(counted)  # the decode was done: it counts against the node's blobs for the task
            stored = await self.blobs.stat(upload.key)
            known = PngFacts.decode(stored.metadata.get(METADATA_KEY)) if stored is not None else None
            if known is None or known.sha256 != facts.sha256:  # (the facts this intake stored with it)
                raise Refused(f"{upload.key!r} is stored already; a blob is written once", code="exists") from None
            # the same bytes again: a retry whose first answer was lost (the store was slow or away)
            self.metrics.results.labels("repeated").inc()
            log.info("upload_repeated", node_id=node_id, key=upload.key, size=len(blob))
            return UploadReply(ok=True, key=upload.key, size=len(blob), sha256=facts.sha256)
        self._count(counted)
        self.metrics.results.labels("stored").inc()
        self.metrics.stored_bytes.inc(len(blob))
        log.info("upload_stored", node_id=node_id, key=upload.key, size=len(blob))
        return UploadReply(ok=True, key=upload.key, size=len(blob), sha256=facts.sha256)

    def _count(self, counted: tuple[str, str]) -> None:
        """One more blob decoded for this node and task (`MAX_BLOBS_PER_TASK`)."""
        self._stored[counted] = self._stored.get(counted, 0) + 1
        self._stored.move_to_end(counted)
        while len(self._stored) > 100_000:
            self._stored.popitem(last=False)

    async def _check_key(self, node_id: str, key: str) -> str:
        """The key's task, once the key and the node's right to write it are checked."""
        segments = key.split("/")
        if len(segments) < 4 or segments[0] != "tasks" or any(s in ("", ".", "..") for s in segments):
            raise Refused(f"key {key[:200]!r}: expected tasks/<task_id>/<node_id>/...", code="bad_key")
        task_id = segments[1]
        if not key.startswith(blob_prefix(task_id, node_id)) or len(key) > 512:
            raise Refused(f"key {key[:200]!r}: a node writes only under tasks/<task_id>/{node_id}/", code="bad_key")
        if self.check_assignment and not await self._assigned_to(task_id, node_id):
            raise Refused(f"node {node_id} is not assigned to task {task_id!r}", code="not_assigned")
        if self._stored.get((task_id, node_id), 0) >= MAX_BLOBS_PER_TASK:  # before any part is buffered
            raise Refused(
                f"node {node_id} stored {MAX_BLOBS_PER_TASK} blobs in task {task_id!r} already", code="too_many"
            )
        return task_id

    async def _assigned_to(self, task_id: str, node_id: str) -> bool:
        if (task_id, node_id) in self._assigned:
            return True
        nodes: set[str] = set()
        try:
            raw = await self.js.get_last_msg(subjects.TASKS_STREAM, subjects.task_subject(task_id, "assigned"))
            event = task_event_decoder.decode(raw.data)
            if isinstance(event, TaskAssigned):
                nodes.update(event.nodes)
        except NotFoundError:
            pass
        if node_id in nodes:  # the common case: one read, and the task's other nodes known too
            self._remember_assigned(task_id, nodes)
            return True
        for name in ("reassigned", "extended"):  # the nodes that joined the task later
            seq, subject = 0, subjects.task_subject(task_id, name)
            for _ in range(subjects.MAX_MSGS_PER_TASK_SUBJECT):
                try:
                    raw = await self.js.get_msg(subjects.TASKS_STREAM, seq=seq + 1, subject=subject, next=True)
                except NotFoundError:
                    break
                seq = raw.seq or seq + 1
                event = task_event_decoder.decode(raw.data)
                if isinstance(event, TaskReassigned):
                    nodes.add(event.by)
                elif isinstance(event, TaskExtended):
                    nodes.update(event.nodes)
        if node_id not in nodes:
            return False
        self._remember_assigned(task_id, nodes)
        return True

    def _remember_assigned(self, task_id: str, nodes: set[str]) -> None:
        for node in nodes:
            self._assigned[(task_id, node)] = None
        while len(self._assigned) > 100_000:
            self._assigned.popitem(last=False)

    def _drop(self, slot: tuple[str, str]) -> None:
        upload = self.uploads.pop(slot, None)
        if upload is not None:
            self.buffered -= upload.size

    def _expire(self) -> None:
        now = time.monotonic()
        for slot, upload in list(self.uploads.items()):
            if now - upload.started > self.upload_timeout_s:
                self._drop(slot)
                log.warning("upload_abandoned", node_id=slot[0], key=upload.key, size=upload.size)


async def expire_loop(intake: Intake, stop: asyncio.Event, every_s: float = 10.0) -> None:
    """Drop abandoned uploads even when no new part arrives."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            intake._expire()
