"""Input images too big for a NATS message: stored by the gateway, read by the nodes.

A task travels whole in one NATS message (`tasks.<id>.submitted`, then each node's
`Assignment`), and a message holds at most the server's ``max_payload`` (1 MiB by
default; the TASKS stream takes at most 1 MiB whatever the server's), while an app may
send input images of up to `taskspec.MAX_IMAGE_BYTES` each.
`InputStore.fit` leaves a task that fits as it is; otherwise it puts each input image in
the blob store under ``inputs/<sha256>`` and writes ``blob:sha256:<hex>`` in its field
(`taskspec.blob_ref`); a task that is still too big is refused (413 `task_too_large`).

`InputStore.serve` answers the nodes, which cannot read the blob store, on
``rpc.blobs.<node>.inputs`` (`stipple_common.blobstore.inputs` has the protocol): only a
node assigned to the task, and only for a reference the task holds. Every gateway
answers (a queue group), from the stored task events, so no gateway needs to be the one
that stored the input.

A node is a stranger, so what it can make a gateway do is bounded per node: at most
`MAX_PENDING_PER_NODE` of its requests are checked or answered at once (one node's flood of
requests for tasks it is not in, each costing stream reads, cannot fill the gateway's queue
and starve the others), and each input is answered at most `MAX_ANSWERS_PER_INPUT` times
per node (a fetch that failed is asked again; one that asks forever only to make the
gateway send megabytes is refused).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

import stipple_common.blobstore.inputs as protocol
from stipple_common import subjects
from stipple_common.aggregate import replay
from stipple_common.blobstore import BlobNotFound, BlobStore
from stipple_common.errors import InvalidInput, StippleError
from stipple_common.taskspec import (
    TaskSpec,
    blob_key,
    blob_ref,
    decode_data_url,
    image_media_type,
    input_images,
    is_blob_ref,
    parse_blob_ref,
    with_input_images,
)

from .errors import ApiError
from .events import OUTCOME_CONFIRM_PAUSE_S, OUTCOME_CONFIRM_TRIES, read_task_events

__all__ = ["EVENT_OVERHEAD_BYTES", "InputStore"]

log = structlog.get_logger("stipple.gateway")

# what a `submitted` event adds to its spec (ids, owner, webhook URL, headers), with room to spare
EVENT_OVERHEAD_BYTES = 64 * 1024
MAX_CONCURRENT_ANSWERS = 8  # inputs read and sent at once by one gateway (each up to 8 MB in memory)
MAX_PENDING_ANSWERS = 256  # requests being checked or waiting for a slot; past it, "unavailable"
TASK_ID = re.compile(r"[0-9a-f]{32}")  # as the gateway's task ids (tasks.TASK_ID)
MAX_PENDING_PER_NODE = 4  # one node's requests being checked or answered at once
MAX_ANSWERS_PER_INPUT = 5  # answers of one input to one node (the first fetch and retries)
ANSWERED_KEPT = 100_000  # (node, task, reference) counts remembered, the oldest forgotten first


class InputStore:
    """Puts large inputs in the blob store (`fit`) and hands them to assigned nodes (`serve`)."""

    def __init__(self, nc: NATS, js: JetStreamContext, blobs: BlobStore) -> None:
        self.nc = nc
        self.js = js
        self.blobs = blobs
        self._answering = asyncio.Semaphore(MAX_CONCURRENT_ANSWERS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[str, int] = {}  # node -> its requests in hand
        self._answered: OrderedDict[tuple[str, str, str], int] = OrderedDict()

    def limit(self) -> int:
        """The most bytes a task's spec may take: a message on this server, and one in the
        TASKS stream (`subjects.MAX_TASK_MESSAGE_BYTES`), less the event's own fields."""
        return min(self.nc.max_payload, subjects.MAX_TASK_MESSAGE_BYTES) - EVENT_OVERHEAD_BYTES

    async def fit(self, spec: TaskSpec) -> TaskSpec:
        """`spec` if it fits a NATS message; else the same task with its input images
        stored and referenced; 413 `task_too_large` when even that does not fit."""
        if len(msgspec.json.encode(spec)) <= self.limit():
            return spec
        refs: dict[str, str] = {}
        for field, value in input_images(spec).items():
            if is_blob_ref(value):  # never from an app (parse_task refuses it): ours already
                continue
            data = await asyncio.to_thread(decode_data_url, field, value)  # checked by parse_task already
            digest = (await asyncio.to_thread(hashlib.sha256, data)).hexdigest()
            await self.blobs.put(blob_key(digest), data, content_type=image_media_type(data))
            refs[field] = blob_ref(digest)
            log.info("input_stored", field=field, size=len(data), sha256=digest)
        fitted = with_input_images(spec, refs)
        size = len(msgspec.json.encode(fitted))
        if size > self.limit():
            raise ApiError(
                413,
                "task_too_large",
                f"the task is {size} bytes without its input images; a task may take {self.limit()} "
                "(its input images are stored apart and do not count)",
            )
        return fitted

    # ------------------------------------------------------------------ answering nodes

    async def serve(self) -> list[Subscription]:
        sub = await self.nc.subscribe(protocol.input_rpc_subject("*"), queue=protocol.INPUT_QUEUE, cb=self._on_request)
        return [sub]

    async def _on_request(self, msg: Msg) -> None:
        """Answer in a task of its own: one slow read must not hold up the others."""
        node_id = subjects.subject_token(msg.subject, 2)
        mine = self._pending.get(node_id, 0)
        if len(self._tasks) >= MAX_PENDING_ANSWERS or mine >= MAX_PENDING_PER_NODE:
            # a flood: the node's fetch is transient, it asks again
            if msg.reply:
                busy = {protocol.ERROR: protocol.UNAVAILABLE, protocol.MESSAGE: "the gateway is busy"}
                await self._send(msg.reply, b"", busy)
            return
        self._pending[node_id] = mine + 1
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            left = self._pending.get(node_id, 1) - 1
            if left > 0:
                self._pending[node_id] = left
            else:
                self._pending.pop(node_id, None)

        task.add_done_callback(done)

    def _count_answer(self, node_id: str, task_id: str, ref: str) -> None:
        key = (node_id, task_id, ref)
        count = self._answered.pop(key, 0) + 1
        if count > MAX_ANSWERS_PER_INPUT:
            self._answered[key] = count - 1
            raise _Refusal(protocol.REFUSED, f"input {ref} of task {task_id} was sent {count - 1} times already")
        self._answered[key] = count
        while len(self._answered) > ANSWERED_KEPT:
            self._answered.popitem(last=False)

    async def _answer(self, msg: Msg) -> None:
        if not msg.reply:
            return
        node_id = subjects.subject_token(msg.subject, 2)
        headers = msg.headers or {}
        task_id, ref = headers.get(protocol.TASK, ""), headers.get(protocol.REF, "")
        try:
            digest = await self._check(node_id, task_id, ref)
            self._count_answer(node_id, task_id, ref)
            async with self._answering:  # at most so many inputs in memory at once
                data = await self._get(digest)
                size = protocol.part_bytes(self.nc.max_payload)
                parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
                for index, part in enumerate(parts):
                    header = {protocol.PART: str(index), protocol.PARTS: str(len(parts)), protocol.SIZE: str(len(data))}
                    if not await self._send(msg.reply, part, header):
                        return
        except _Refusal as exc:
            log.warning("input_refused", node_id=node_id, task_id=task_id, ref=ref, code=exc.code, error=str(exc))
            await self._send(msg.reply, b"", {protocol.ERROR: exc.code, protocol.MESSAGE: str(exc)})
            return
        log.info("input_served", node_id=node_id, task_id=task_id, ref=ref, size=len(data))

    async def _send(self, reply: str, data: bytes, headers: dict[str, str]) -> bool:
        try:
            await self.nc.publish(reply, data, headers=headers)
        except nats.errors.Error as exc:  # the node asks again (its fetch times out)
            log.warning("input_answer_failed", error=str(exc))
            return False
        return True

    async def _check(self, node_id: str, task_id: str, ref: str) -> str:
        """The reference's digest, if `node_id` is assigned to `task_id` and the task holds `ref`."""
        if not TASK_ID.fullmatch(task_id):  # never a wildcard or a dot in the subject read below
            raise _Refusal(protocol.REFUSED, f"not a task id: {task_id[:80]!r}")
        try:
            digest = parse_blob_ref(protocol.REF, ref)
        except InvalidInput as exc:
            raise _Refusal(protocol.REFUSED, exc.message) from None
        for attempt in range(OUTCOME_CONFIRM_TRIES):  # a stream replica a moment behind may answer
            try:
                task, _rejected = replay(s.event for s in await read_task_events(self.js, task_id))
            except (StippleError, nats.errors.Error, TimeoutError) as exc:
                raise _Refusal(protocol.UNAVAILABLE, f"cannot read task {task_id!r}: {exc}") from None
            if task is not None and node_id in task.nodes:
                break
            if attempt + 1 < OUTCOME_CONFIRM_TRIES:
                await asyncio.sleep(OUTCOME_CONFIRM_PAUSE_S)
        else:
            raise _Refusal(protocol.REFUSED, f"node {node_id} is not assigned to task {task_id!r}")
        if ref not in input_images(task.spec).values():
            raise _Refusal(protocol.REFUSED, f"task {task_id} has no input {ref}")
        return digest

    async def _get(self, digest: str) -> bytes:
        try:
            return await self.blobs.get(blob_key(digest))
        except BlobNotFound:
            raise _Refusal(protocol.NOT_FOUND, "not stored (expired or never written)") from None
        except StippleError as exc:
            raise _Refusal(protocol.UNAVAILABLE, f"the blob store: {exc.message}") from None

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
