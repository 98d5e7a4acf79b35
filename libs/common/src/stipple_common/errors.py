"""One base exception for Stipple, with structured fields.

`code` is a stable, machine-readable reason (it travels in events and HTTP bodies);
`retryable` tells the consumer loop whether to redeliver the message (nak) or give up
on it (term).
"""

from __future__ import annotations

from typing import Any


class StippleError(Exception):
    """Base of every error Stipple raises on purpose."""

    code: str = "internal"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


# JetStream API error codes (nats-server's errors.json) the code branches on; nats-py raises
# them as a generic APIError (BadRequestError) with `err_code` set.
JS_STREAM_CONFIG_MISMATCH = 10058  # stream name already in use with a different configuration
JS_WRONG_LAST_SEQUENCE = 10071  # the subject's last sequence is not the one the publish expected


NO_VALUE: Any = type("NoValue", (), {"__repr__": lambda self: "<no value>"})()
"""Stands for "the app sent nothing here" (a missing field), unlike an explicit null."""


def shorten(text: str, limit: int) -> str:
    """`text` in at most `limit` characters: cut, ending in "...", when longer."""
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


class InvalidInput(StippleError):
    """A task field is wrong. Names the field, the value and what is allowed."""

    code = "invalid_input"

    def __init__(self, field: str, value: Any, reason: str) -> None:
        if value is NO_VALUE:
            text = f"{field}: {reason}"
        else:
            shown = shorten(repr(value), 120)
            text = f"{field}: {reason} (got {shown})"
        super().__init__(text)
        self.field = field
        self.value = value
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "field": self.field, "reason": self.reason}
        if self.value is not NO_VALUE:
            plain = isinstance(self.value, (int, float, str, bool, type(None)))
            out["value"] = self.value if plain else repr(self.value)
        return out


class Transient(StippleError):
    """Something that may work if tried again later (a store is down, a timeout)."""

    code = "transient"
    retryable = True


class Rejected(StippleError):
    """A message the network does not believe: its payload disagrees with the subject the
    server delivered it on, it is malformed, or its sender had no right to say it. Never
    retried (the consumer terminates it), counted by `reason` and logged with `sender`
    (the node id from the subject, or "" for the control plane)."""

    code = "rejected"

    def __init__(self, message: str, *, reason: str, sender: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.sender = sender
