"""How a `stipple` command that reads the network connects to NATS: the one place for the
TLS context, two quick tries, and a single line on stderr (its password redacted) when the
server does not answer, instead of nats-py's traceback per try."""

from __future__ import annotations

import sys

import nats
from nats.aio.client import Client as NATS

from stipple_common import bus
from stipple_common.logs import redact
from stipple_common.settings import InvalidSettings


async def connect(command: str, nats_url: str, ca_file: str) -> NATS | None:
    """A connection for `command` (its name starts each error line), or None after saying
    why on stderr: a bad CA file, or a server that does not answer."""
    errors: list[Exception] = []

    async def keep_error(exc: Exception) -> None:  # nats-py would print each try's traceback
        errors.append(exc)

    try:
        tls = bus.tls_context(nats_url, ca_file)
    except InvalidSettings as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return None
    try:
        return await nats.connect(
            nats_url,
            tls=tls,
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # two tries, then NoServersError (0 would mean: forever)
            reconnect_time_wait=0.2,
            error_cb=keep_error,
        )
    except (OSError, nats.errors.Error) as exc:
        cause = errors[-1] if errors else exc
        print(f"{command}: NATS at {redact(nats_url)!r} does not answer: {redact(str(cause))}", file=sys.stderr)
        return None
