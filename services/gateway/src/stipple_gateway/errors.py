"""The gateway's error answer: an HTTP status, a stable code, a message naming the field
and value, in the native shape ``{"error": {...}}`` or the SDCN shape ``{"msg": ...}``.

The task service raises it (it owns which status and code each refusal is); the HTTP
layer (app.py) turns it into a response. No web framework here."""

from __future__ import annotations

from typing import Any

from stipple_common.errors import NO_VALUE, InvalidInput


class ApiError(Exception):
    """An answer other than success, with its HTTP status.

    `headers` go on the response (``Retry-After``, ``WWW-Authenticate``); `extra` adds
    fields to the native error object (``limit`` for 429)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        value: Any = NO_VALUE,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.value = status, code, message, field, value
        self.headers = headers or {}
        self.extra = extra or {}

    @classmethod
    def invalid(cls, exc: InvalidInput) -> ApiError:
        return cls(422, exc.code, exc.message, field=exc.field, value=exc.value)

    def native_body(self) -> dict[str, Any]:
        """The native body, ``{"error": {"code", "message", "field"?, "value"?, ...extra}}``."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.value is not NO_VALUE:
            plain = isinstance(self.value, (int, float, str, bool, type(None)))
            body["value"] = self.value if plain else repr(self.value)
        body.update(self.extra)
        return {"error": body}

    def sdcn_body(self) -> dict[str, Any]:
        """The SDCN body, ``{"msg": "..."}``."""
        return {"msg": self.message}
