"""Large inputs: how a node reads an input image the gateway put in the blob store.

An app may send input images of up to `taskspec.MAX_IMAGE_BYTES` each, but a NATS message
holds at most the server's ``max_payload`` (1 MiB by default), and the whole task travels
in one (`tasks.<id>.submitted`, then each node's `Assignment`). When the task would not
fit, the gateway stores each input image under ``inputs/<sha256>`` (content-addressed) and
the task carries ``blob:sha256:<hex>`` in the image's field instead (`taskspec.blob_ref`).

Nodes cannot read the blob store (docs/security.md, "no peeking"), so they ask for an
input over NATS: a request on ``rpc.blobs.<node_id>.inputs`` (inside the ``rpc.blobs.<id>.>``
a node may already publish on; the gatekeeper's intake listens only on ``rpc.blobs.<id>``
and ``rpc.blobs.<id>.<12 hex digits>``) with the task id and the reference in its headers.
A gateway answers only a node assigned to that task, and only for a reference the task
holds. The answer comes in parts on the request's reply subject (an inbox of the node's),
each at most a message: `PART`, `PARTS` and `SIZE` headers, or one message with `ERROR`
and `MESSAGE`. The node checks the SHA-256 of what it got against the reference, so
nothing in between can change an input unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from stipple_common.errors import StippleError, Transient

__all__ = [
    "ERROR",
    "INPUT_QUEUE",
    "MESSAGE",
    "PART",
    "PARTS",
    "REF",
    "SIZE",
    "TASK",
    "InputUnavailable",
    "fetch_input",
    "input_rpc_subject",
    "part_bytes",
]

TASK = "Stipple-Task"
REF = "Stipple-Input"
PART = "Stipple-Part"
PARTS = "Stipple-Parts"
SIZE = "Stipple-Size"
ERROR = "Stipple-Error"
MESSAGE = "Stipple-Message"
INPUT_QUEUE = "inputs"  # the queue group of the gateways that answer
HEADROOM_BYTES = 64 * 1024  # below max_payload: headers and the protocol's own bytes

# ERROR codes a gateway answers; "unavailable" may pass (the node's work is redelivered)
NOT_FOUND = "not_found"
REFUSED = "refused"
UNAVAILABLE = "unavailable"


class InputUnavailable(StippleError):
    """An input image the node cannot use: not stored (expired, never written:
    `input_missing`), refused (`input_refused`), or not the bytes the task names
    (`input_mismatch`). Names the task's field; not retryable."""

    def __init__(self, field: str, message: str, *, code: str) -> None:
        super().__init__(f"{field}: {message}", code=code)
        self.field = field


def input_rpc_subject(node_id: str) -> str:
    """Where a node asks for an input image of a task it is assigned to."""
    return f"rpc.blobs.{node_id}.inputs"


def part_bytes(max_payload: int) -> int:
    """The largest part of an answer on a server with this ``max_payload``."""
    return max(64 * 1024, max_payload - HEADROOM_BYTES)


async def fetch_input(nc: NATS, node_id: str, task_id: str, field: str, ref: str, *, timeout_s: float = 30.0) -> bytes:
    """The bytes of input `ref` (``blob:sha256:<hex>``) of task `task_id`, as a gateway
    holds them (the caller checks them against the digest). `InputUnavailable` when the
    gateway says it is not stored or refuses; `Transient` when no gateway answers in time or
    a part is lost (trying again may work)."""
    inbox = nc.new_inbox()
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        queue.put_nowait(msg)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(input_rpc_subject(node_id), b"", reply=inbox, headers={TASK: task_id, REF: ref})
        parts: dict[int, bytes] = {}
        expected: int | None = None
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while expected is None or len(parts) < expected:
            try:
                msg = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                got = f"{len(parts)} of {expected} parts" if expected is not None else "no answer"
                raise Transient(
                    f"{field}: input {ref} of task {task_id} not received within {timeout_s:g} s ({got})"
                ) from None
            headers = msg.headers or {}
            if headers.get("Status") == "503":  # the server's "no responders": no gateway listens
                raise Transient(f"{field}: no gateway answers for input {ref} of task {task_id}")
            if ERROR in headers:
                code, message = headers[ERROR], headers.get(MESSAGE, "")
                if code == UNAVAILABLE:
                    raise Transient(f"{field}: input {ref} cannot be read now: {message}")
                kind = "input_missing" if code == NOT_FOUND else "input_refused"
                raise InputUnavailable(field, f"input {ref}: {message}", code=kind)
            try:
                index, expected, size = int(headers[PART]), int(headers[PARTS]), int(headers[SIZE])
            except (KeyError, ValueError):
                index, expected = -1, 0
            if not 0 <= index < expected:
                raise InputUnavailable(field, f"input {ref}: malformed answer part", code="input_refused")
            parts[index] = msg.data
        data = b"".join(parts[i] for i in range(expected))
        if len(data) != size:
            raise Transient(f"{field}: input {ref}: got {len(data)} bytes of {size}")
        return data
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
