"""NATS accounts and permissions: who may publish and subscribe to what.

The server runs three accounts (docs/security.md):

- ``APP``: the network. The control-plane services log in with their own user and
  password (static users, each with every right: they are trusted); nodes are admitted
  here by the gatekeeper's auth callout, each with a user JWT whose permissions are
  `node_permissions` (a staked node) or `applicant_permissions` (a key without the
  minimum stake, a slashed or leaving one: it may only ask the chain relay about itself).
- ``AUTH``: where the auth callout service (the gatekeeper) connects with its nkey to
  answer ``$SYS.REQ.USER.AUTH``.
- ``SYS``: the system account; the gatekeeper's user there closes a banned node's
  connections (``$SYS.REQ.SERVER.<id>.KICK``).

Nobody else can connect: there are no anonymous users, and every connection that is
not a static user goes through the callout, which admits only a proven Ethereum key.

A node (an untrusted stranger) may only
- publish its own task events, ``tasks.*.{started,committed,revealed,errored}.<id>``;
  what it says of itself, ``nodes.<id>.{joined,heartbeat,quit,probed}``; its progress,
  ``progress.*.<id>``; ``downloads.<id>``; requests to the chain relay on
  ``rpc.chain.<id>``, to the blob intake on ``rpc.blobs.<id>[.>]`` and to the gatekeeper
  on ``rpc.join.<id>``;
- fetch from and ack its two work consumers (``node-<id>``, ``node-<id>-control`` on WORK),
  which the gatekeeper creates: a node can neither create a consumer (a filter of its own
  choosing, or a push consumer delivering into the control plane's subjects) nor change one;
- receive replies on its own inbox prefix ``_INBOX_<id>.>``.
It can read no stream, no KV bucket and no object store, so it never sees another
node's work, events or images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import subjects

APP_ACCOUNT = "APP"
AUTH_ACCOUNT = "AUTH"
SYS_ACCOUNT = "SYS"
SERVICES = ("gateway", "dispatcher", "validator", "chain-indexer", "gatekeeper")


def node_inbox_prefix(node_id: str) -> str:
    return f"_INBOX_{node_id}"


def node_permissions(node_id: str) -> dict[str, Any]:
    stream = subjects.WORK_STREAM
    consumers = []
    for durable in (subjects.node_durable(node_id), subjects.node_control_durable(node_id)):
        consumers += [
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
        ]
    return {
        "pub": {
            "allow": [
                *(subjects.task_subject("*", event, node_id) for event in subjects.NODE_TASK_EVENTS),
                *(subjects.node_subject(node_id, event) for event in subjects.NODE_SELF_EVENTS),
                subjects.progress_subject("*", node_id),
                subjects.download_subject(node_id),
                subjects.chain_rpc_subject(node_id),
                subjects.join_rpc_subject(node_id),
                subjects.blob_rpc_subject(node_id),
                subjects.blob_rpc_subject(node_id) + ".>",
                *consumers,
            ]
        },
        "sub": {"allow": [f"{node_inbox_prefix(node_id)}.>"]},
    }


def applicant_permissions(node_id: str) -> dict[str, Any]:
    """A proven key that may not take part (below the minimum stake, slashed, leaving,
    banned): it may ask the gatekeeper why, ask the chain relay about its own address and
    hand in transactions it signed itself (to stake), and nothing else."""
    return {
        "pub": {"allow": [subjects.chain_rpc_subject(node_id), subjects.join_rpc_subject(node_id)]},
        "sub": {"allow": [f"{node_inbox_prefix(node_id)}.>"]},
    }


SERVICE_PERMISSIONS: dict[str, Any] = {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}


@dataclass(frozen=True)
class User:
    """A static user of the server configuration (a control-plane service, or a test's)."""

    name: str
    password: str
    permissions: dict[str, Any]


def service_user(name: str, password: str) -> User:
    return User(name, password, SERVICE_PERMISSIONS)


@dataclass(frozen=True)
class CalloutKeys:
    """The public halves of the gatekeeper's keys, for the server configuration."""

    issuer: str  # the account nkey (A...) that signs the callout's answers and the users' JWTs
    callout_user: str  # the user nkey (U...) the gatekeeper connects with in AUTH


def render_accounts(
    services: list[User],
    callout: CalloutKeys,
    *,
    system_password: str,
    raw_passwords: bool = False,
) -> str:
    """The ``accounts``, ``system_account`` and ``authorization { auth_callout }`` blocks of
    a nats-server configuration. With `raw_passwords`, a password of the form ``$VAR`` is
    written unquoted, so that nats-server reads it from its environment (deploy/k8s)."""

    def value(password: str) -> str:
        if raw_passwords and password.startswith("$"):
            return password
        return json.dumps(password)

    def user(u: User) -> str:
        permissions = json.dumps(u.permissions)
        return f'{{"user": {json.dumps(u.name)}, "password": {value(u.password)}, "permissions": {permissions}}}'

    app_users = ",\n      ".join(user(u) for u in services)
    auth_users = ", ".join(value(name) for name in [callout.callout_user, *(u.name for u in services), "sys"])
    return f"""accounts {{
  {AUTH_ACCOUNT} {{
    users: [ {{ nkey: {callout.callout_user} }} ]
  }}
  {APP_ACCOUNT} {{
    jetstream: enabled
    users: [
      {app_users}
    ]
  }}
  {SYS_ACCOUNT} {{
    users: [ {{ user: "sys", password: {value(system_password)} }} ]
  }}
}}
system_account: {SYS_ACCOUNT}
authorization {{
  auth_callout {{
    issuer: {callout.issuer}
    account: {AUTH_ACCOUNT}
    auth_users: [{auth_users}]
  }}
}}
"""
