"""A node's way to store its images: it hands them to the gatekeeper's blob intake.

Nodes hold no blob-store credentials at all (docs/security.md, "no peeking"): they can
neither read nor list anything, on either backend. A node sends each image over NATS to
``rpc.blobs.<node_id>`` (core request-reply, in parts of at most `PART_BYTES`); the
intake (services/gatekeeper, intake.py) writes it under the key the node chose, after
checking that the key lies under ``tasks/<task_id>/<node_id>/``, that the node is
assigned to that task, that the size is within the limit and that nothing is stored
there yet (write once: what the validator checked cannot be swapped afterwards).

Protocol: every part carries the headers below and its bytes as the payload. The first
part goes to the intake's queue group; when more follow, the answer's `continue_on`
names the subject of the intake instance that holds the upload, and the other parts
go there. Each part is answered (`UploadReply`), which also paces the sender.
"""

from __future__ import annotations

import secrets

import nats.errors
from nats.aio.client import Client as NATS

from stipple_common import subjects
from stipple_common.errors import StippleError, Transient
from stipple_common.messages import upload_reply_decoder

PART_BYTES = 256 * 1024
MAX_BLOB_BYTES = 32 * 1024 * 1024  # a 2048x2048 PNG of noise is about 12.6 MB

KEY = "Stipple-Key"
UPLOAD = "Stipple-Upload"
PART = "Stipple-Part"
LAST = "Stipple-Last"
CONTENT_TYPE = "Content-Type"


class UploadRefused(StippleError):
    """The intake refused the upload (a key outside the node's prefix, a task not its
    own, too large, already stored): retrying cannot help."""

    code = "upload_refused"


def blob_prefix(task_id: str, node_id: str) -> str:
    """Where a node's images of a task live; the only place it may write."""
    return f"tasks/{task_id}/{node_id}/"


class IntakeClient:
    """`put` for a node: the BlobStore method a node needs, over the intake."""

    def __init__(self, nc: NATS, node_id: str, *, part_bytes: int = PART_BYTES, timeout_s: float = 10.0) -> None:
        self.nc = nc
        self.node_id = node_id
        self.part_bytes = part_bytes
        self.timeout_s = timeout_s

    async def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> str:
        """Store `data` under `key`; returns its SHA-256 as the intake computed it."""
        upload = secrets.token_hex(8)
        subject = subjects.blob_rpc_subject(self.node_id)
        parts = [data[i : i + self.part_bytes] for i in range(0, len(data), self.part_bytes)] or [b""]
        for index, part in enumerate(parts):
            headers = {KEY: key, UPLOAD: upload, PART: str(index), CONTENT_TYPE: content_type}
            if index == len(parts) - 1:
                headers[LAST] = "1"
            try:
                msg = await self.nc.request(subject, part, timeout=self.timeout_s, headers=headers)
            except (TimeoutError, nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                raise Transient(f"blob intake did not answer for {key!r} part {index}: {type(exc).__name__}") from None
            reply = upload_reply_decoder.decode(msg.data)
            if not reply.ok:
                if reply.error == "store_unavailable":
                    raise Transient(f"blob intake: {reply.message}")
                raise UploadRefused(f"blob intake refused {key!r}: {reply.error}: {reply.message}")
            if reply.continue_on:
                subject = reply.continue_on
            if index == len(parts) - 1:
                return reply.sha256
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Nothing to release: the NATS connection belongs to the caller."""
