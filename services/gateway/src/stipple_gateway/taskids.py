"""Task ids: random, or derived from the app's ``Idempotency-Key`` under a secret only the
gateways hold.

A retried request must be the same task, so an id derived from the key is deterministic
(its publish is deduplicated by its message id). It must not be predictable by the app:
the task id decides the validator partition that judges the task (the server's
``partition()`` over the id, docs/architecture.md "Partitioned validator"), and an app
that could compute ids could choose keys whose tasks all land on one partition, loading
one validator replica with its whole rate limit. So the id is an HMAC-SHA256 of the API
key id and the Idempotency-Key under the network's task-id secret.

Every gateway replica must derive the same id (a retry may reach another replica), so
the secret is the network's, not the process's: ``STIPPLE_TASK_ID_SECRET`` when the
operator sets one (64 hex digits), else one made by the first gateway and kept in the KV
bucket `subjects.GATEWAY_BUCKET` (created once with ``create``: replicas that start
together agree on the first writer's). Nodes cannot read that bucket (their permissions
name none of it); apps never reach NATS.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig

from stipple_common import bus, subjects
from stipple_common.settings import InvalidSettings

SECRET_KEY = "task-id-secret"  # the key in subjects.GATEWAY_BUCKET
SECRET_BYTES = 32


def parse_secret(value: str) -> bytes | None:
    """``STIPPLE_TASK_ID_SECRET``: 64 hex digits, or empty (the network's, from KV). A bad
    one is refused saying what is wrong with it, never its characters (it is a secret)."""
    if not value:
        return None
    try:
        secret = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise InvalidSettings("STIPPLE_TASK_ID_SECRET: not hex; expected 64 hex digits") from None
    if len(secret) != SECRET_BYTES:
        raise InvalidSettings(f"STIPPLE_TASK_ID_SECRET: {len(secret)} bytes; expected {SECRET_BYTES} (64 hex digits)")
    return secret


async def network_secret(js: JetStreamContext, replicas: int) -> bytes:
    """The secret every gateway of this network shares: the first one to ask makes it."""
    config = KeyValueConfig(
        bucket=subjects.GATEWAY_BUCKET,
        description="the gateways' shared secrets (stipple_gateway.taskids)",
        history=1,
        replicas=replicas,
    )
    kv = await bus.key_value(js, config)
    try:
        await kv.create(SECRET_KEY, secrets.token_bytes(SECRET_BYTES))
    except nats.js.errors.KeyWrongLastSequenceError:
        pass  # another gateway made it first: take that one
    entry = await kv.get(SECRET_KEY)
    if entry.value is None or len(entry.value) != SECRET_BYTES:
        raise InvalidSettings(
            f"the task-id secret in KV {subjects.GATEWAY_BUCKET}/{SECRET_KEY} is not {SECRET_BYTES} bytes"
        )
    return entry.value


def new_task_id(idempotency_key: str | None, owner: str, secret: bytes) -> str:
    """A fresh task id, or one derived from the app's Idempotency-Key and its API key id
    (two apps' keys never meet) under `secret`, so that a retried request is the same task."""
    if idempotency_key:
        scoped = f"{owner}\n{idempotency_key}".encode()
        return hmac.new(secret, scoped, hashlib.sha256).hexdigest()[:32]
    return uuid.uuid4().hex
