"""A standing pull on one durable JetStream consumer: credit kept outstanding, topped up.

nats-py's `fetch` asks anew for every batch. Each ask is a pull request that the server
answers with the messages there are and then a status ("no messages", "request timeout"),
and an empty consumer is asked twice (a no-wait probe, then a waiting request). At the
control plane's pace most batches are one message, so each delivery cost two to four more
core messages, and an idle consumer asked once a second: a request and its timeout, two
messages a second per consumer, four per node (two consumers each).

`PullFeed` keeps credit outstanding instead, as the Go and Java clients' `consume` do: it
asks for `batch` messages with an expiry of `PULL_EXPIRES_S`, and asks again for the
difference when half of it has been handled, or when a request ends (expired, or cut by
the server) with messages still owed. Requests the server lost are asked again: at once
after a reconnection, and otherwise after a silence longer than the server may keep (its
expiry's status, or two idle heartbeats where asked for, plus `STALL_MARGIN_S`): a
consumer's leader lost with its server.

What the caller sees: messages, one at a time, and `ConsumerGone` (the consumer was
deleted), `LeaderAway` (no server answers for it: an election) or `PullRefused` (the
server refuses the request itself: a limit of the consumer's). Heartbeats and request ends
are handled here.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

PULL_EXPIRES_S = 5.0
"""How long one pull request waits on the server. An idle consumer costs one request and
its timeout status per this many seconds."""
STALL_MARGIN_S = 2.0
"""Silence, past the longest the server may be silent (the expiry; with heartbeats, two of
them), after which an outstanding request is taken as lost."""
SERVICE_HEARTBEAT_S = 1.0
"""The control plane's consumers ask for an idle heartbeat this often (a status message a
second each, a dozen consumers in all), so that a request lost with a consumer's leader is
noticed within about 4 s. Nodes ask for none: there are thousands, and they wait out an
expiry's silence instead (7 s)."""

_STATUS = "Status"
_DESCRIPTION = "Description"
_PENDING = "Nats-Pending-Messages"


class ConsumerGone(Exception):
    """The server says the consumer was deleted."""


class LeaderAway(Exception):
    """No server answers pull requests for the consumer (503: its leader is being elected)."""


class PullRefused(Exception):
    """The server refused the pull request itself (a `409` such as "Exceeded
    MaxRequestBatch", or another status this feed does not know): asking the same again
    would be refused again, so the caller must not simply loop."""


_ENDS = ("leadership change", "server shutdown", "batch completed")
"""`409` descriptions that end a request the server had taken (its credit is over, with
what it still owed), as opposed to refusing one."""


class PullFeed:
    """Messages of one durable pull consumer, through a subscription of its own inbox."""

    def __init__(
        self,
        nc: NATS,
        *,
        api_prefix: str,
        stream: str,
        durable: str,
        batch: int,
        expires_s: float = PULL_EXPIRES_S,
        heartbeat_s: float | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        if heartbeat_s is not None and not 0 < heartbeat_s <= expires_s / 2:
            raise ValueError(f"heartbeat_s must be within (0, expires_s / 2], not {heartbeat_s}")
        self._nc = nc
        self._subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._batch = batch
        self._low = batch // 2  # ask again when the credit left falls to this
        self._request = {"expires": int(expires_s * 1e9)}
        if heartbeat_s is not None:
            self._request["idle_heartbeat"] = int(heartbeat_s * 1e9)
        self._stall_s = (2 * heartbeat_s if heartbeat_s is not None else expires_s) + STALL_MARGIN_S
        self._inbox = nc.new_inbox()
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Subscription | None = None
        self.credit = 0
        """Messages asked for and not yet taken by `next` (in flight, or buffered here)."""
        self._heard = time.monotonic()  # the last message or status from the server
        self._reconnects = nc.stats["reconnects"]
        self.requests = 0  # pull requests sent (for tests and benches)
        self.heartbeats = 0  # idle heartbeats received

    async def start(self) -> None:
        async def on_msg(msg: Msg) -> None:
            self._queue.put_nowait(msg)

        self._sub = await self._nc.subscribe(self._inbox, cb=on_msg)
        await self.top_up()

    async def top_up(self) -> None:
        """Ask for the difference to `batch` when the credit left is at most half of it."""
        if self.credit > self._low:
            return
        want = self._batch - self.credit
        request = {"batch": want, **self._request}
        await self._nc.publish(self._subject, msgspec.json.encode(request), reply=self._inbox)
        if self.credit == 0:
            self._heard = time.monotonic()  # the silence counts from the first request owed
        self.credit += want
        self.requests += 1

    async def next(self, timeout: float) -> Msg | None:
        """The next message, or None when none came within `timeout` (asking again first
        when a request ended, or went silent long enough to be lost)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    msg = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    await self._ask_again_if_lost()
                    return None
            else:
                msg = self._queue.get_nowait()
            self._heard = time.monotonic()
            status = _status(msg)
            if not status:
                self.credit = max(0, self.credit - 1)
                return msg
            await self._on_status(status, msg)

    async def _ask_again_if_lost(self) -> None:
        """Ask anew when what is owed was lost: the connection came back (a server that
        restarted, or another one, holds none of this client's requests), or a request
        went silent for too long (its consumer's leader was lost with its server)."""
        reconnects = self._nc.stats["reconnects"]
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            self.credit = 0
        elif self.credit > 0 and time.monotonic() - self._heard > self._stall_s:
            self.credit = 0
        await self.top_up()

    async def _on_status(self, status: str, msg: Msg) -> None:
        headers = msg.headers or {}
        if status == "100":  # an idle heartbeat
            self.heartbeats += 1
            return
        if status == "503":  # no responders: nobody holds the consumer now
            self.credit = 0
            raise LeaderAway(headers.get(_DESCRIPTION, "no responders"))
        description = headers.get(_DESCRIPTION, "")
        if status == "409" and "consumer deleted" in description.lower():
            self.credit = 0
            raise ConsumerGone(description)
        if not (status == "408" or (status == "409" and description.lower().startswith(_ENDS))):
            self.credit = 0
            raise PullRefused(f"{status} {description}".strip())
        # the request expired (408) or the server cut it (a leader change, a shutdown):
        # it is over, with what it still owed
        pending = headers.get(_PENDING)
        if pending is not None and pending.isdigit():
            self.credit = max(0, self.credit - int(pending))
        else:
            self.credit = 0  # unknown: ask anew (at worst more than batch is owed for a while)
        await self.top_up()

    async def close(self) -> list[Msg]:
        """Stop listening; the messages received and not yet taken, for the caller to give back."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # a closed connection: nothing to undo
                pass
        left: list[Msg] = []
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            if not _status(msg):
                left.append(msg)
        return left


def _status(msg: Msg) -> str:
    """The status of a message the server sent about the request ("100", "408", ...), or
    "" for a delivery."""
    return msg.headers.get(_STATUS, "") if msg.headers else ""
