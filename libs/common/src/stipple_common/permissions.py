"""NATS permissions: what each kind of client may publish and subscribe to.

A node agent is untrusted. It may only
- publish its own events: ``tasks.*.{started,committed,revealed,errored}.<id>`` (and
  readers check that the event's node id is the subject's: `messages.decode_task_event`),
  ``nodes.<id>.>``, ``progress.*``, ``downloads.<id>``;
- consume its own two work consumers (``node-<id>`` and ``node-<id>-control`` on WORK);
- receive replies on its own inbox prefix ``_INBOX_<id>.>`` (a shared ``_INBOX.>`` would
  let it read every other client's replies, the validator's stream reads included).
It cannot subscribe to ``tasks.>`` or read the TASKS stream, so it never sees another
node's reveal before the outcome, nor another node's work. Images: with the S3 backend
a node's credentials write objects only (MinIO policy in deploy/); the JetStream object
store, the embedded default, does not isolate nodes from each other's images.

The control-plane services (gateway, dispatcher, validator, chain-indexer) are trusted
and get everything. `render_authorization` writes the ``authorization`` block of a
nats-server configuration (deploy/nats/ is rendered from it; the tests start a real
nats-server with it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import subjects


def node_inbox_prefix(node_id: str) -> str:
    return f"_INBOX_{node_id}"


def node_permissions(node_id: str) -> dict[str, Any]:
    work, control = subjects.node_durable(node_id), subjects.node_control_durable(node_id)
    stream = subjects.WORK_STREAM
    consumers = []
    for durable in (work, control):
        consumers += [
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
        ]
    return {
        "publish": {
            "allow": [
                *(f"tasks.*.{event}.{node_id}" for event in subjects.NODE_EVENTS),
                f"nodes.{node_id}.>",
                "progress.*",
                subjects.download_subject(node_id),
                subjects.chain_rpc_subject(node_id),
                "$JS.API.INFO",
                *consumers,
            ]
        },
        "subscribe": {"allow": [f"{node_inbox_prefix(node_id)}.>"]},
    }


SERVICE_PERMISSIONS: dict[str, Any] = {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}


@dataclass(frozen=True)
class User:
    name: str
    password: str
    permissions: dict[str, Any]


def node_user(node_id: str, password: str) -> User:
    return User(node_id, password, node_permissions(node_id))


def service_user(name: str, password: str) -> User:
    return User(name, password, SERVICE_PERMISSIONS)


def render_authorization(users: list[User]) -> str:
    """The ``authorization { users = [...] }`` block (nats-server reads JSON values)."""
    entries = [{"user": u.name, "password": u.password, "permissions": u.permissions} for u in users]
    return "authorization {\n  users = " + json.dumps(entries, indent=2).replace("\n", "\n  ") + "\n}\n"
