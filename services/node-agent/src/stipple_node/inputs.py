"""A task's input images that the gateway put in the blob store, read before it runs.

A task too big for a NATS message carries ``blob:sha256:<hex>`` in an input image's field
(docs/protocol.md, "Large inputs"). The node asks a gateway for the bytes
(`stipple_common.blobstore.inputs.fetch_input`: the node cannot read the blob store),
checks that they hash to the reference's digest and that they are an image within the
limits (`taskspec.check_image_bytes`: the header only, as for a data URL), and runs the
task with them as data URLs, so the pipeline reads every input one way.

Every failure names the field: `input_missing` (not stored: expired or never written),
`input_refused`, `input_mismatch` (other bytes than the task names) and `invalid_input`
(a malformed reference, or bytes that are no image within the limits); none is retried.
A gateway that does not answer in time is `Transient`: the assignment is redelivered.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

from nats.aio.client import Client as NATS

from stipple_common.blobstore.inputs import InputUnavailable, fetch_input
from stipple_common.taskspec import (
    TaskSpec,
    check_image_bytes,
    image_media_type,
    input_images,
    is_blob_ref,
    parse_blob_ref,
    with_input_images,
)

__all__ = ["resolve_inputs"]


async def resolve_inputs(nc: NATS, node_id: str, task_id: str, spec: TaskSpec, *, timeout_s: float = 30.0) -> TaskSpec:
    """`spec` with each input image it references read, checked and written as a data URL."""
    resolved: dict[str, str] = {}
    for field, value in input_images(spec).items():
        if not is_blob_ref(value):
            continue
        digest = parse_blob_ref(field, value)  # InvalidInput for anything but the exact form
        data = await fetch_input(nc, node_id, task_id, field, value, timeout_s=timeout_s)
        got = (await asyncio.to_thread(hashlib.sha256, data)).hexdigest()
        if got != digest:
            raise InputUnavailable(
                field, f"the {len(data)} bytes read for {value} have SHA-256 {got}", code="input_mismatch"
            )
        check_image_bytes(field, data)
        encoded = await asyncio.to_thread(base64.b64encode, data)
        resolved[field] = f"data:{image_media_type(data)};base64,{encoded.decode()}"
    return with_input_images(spec, resolved) if resolved else spec
