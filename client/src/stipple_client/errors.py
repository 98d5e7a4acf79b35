"""The errors the client raises: one base, `StippleError`, carrying the gateway's error object
(``{"error": {"code", "message", "field"?, "value"?}}``) and the HTTP status, and a subclass
per thing an app handles differently (fix the input, retry later, log in, give up on the task).

`error_from` maps a gateway answer to its class; it is used by both clients (_core.py).
"""

from __future__ import annotations

import email.utils
import time
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .models import Task


class StippleError(Exception):
    """Anything the gateway refused or could not do. `status` is the HTTP status (None when no
    answer came); `code` the gateway's stable code (``invalid_input``, ``not_found``, ...);
    `field` and `value` name the input at fault, when there is one; `body` is the error object."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        field: str | None = None,
        value: Any = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.field = field
        self.value = value
        self.body = body or {}

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status is not None else ""
        return f"{self.message} ({where}{self.code})"


class InvalidInput(StippleError):
    """The request is wrong (400, 413, 422, or another 4xx naming a field): `field` and `value`
    say what to fix. Never retried."""


class Unauthorized(StippleError):
    """401/403: the API key is missing, unknown or not allowed."""


class NotFound(StippleError):
    """404: no such task (or another API key's), or image index out of range; 410: expired."""


class Conflict(StippleError):
    """409: the task is not in a state that allows this (``not_ready``, ``already_finished``)."""


class RateLimited(StippleError):
    """429: the API key is over its rate limit, still after the client's retries; `retry_after`
    is the wait the gateway asked for (seconds), when it said."""

    retry_after: float | None = None


class Unavailable(StippleError):
    """503 (no live nodes for the model, the message bus is down), 502/504, or no answer at all
    (`status` None, code ``connection_failed``), still after the client's retries."""


class TaskFailed(StippleError):
    """The task ended without images: aborted by the network (`reason` says why, e.g.
    ``no_agreement``, ``too_few_results``) or cancelled. `task` is its final view."""

    def __init__(self, task: Task) -> None:
        outcome = task.outcome
        reason = outcome.reason if outcome and outcome.reason else task.status
        detail = outcome.detail if outcome else ""
        text = f"task {task.task_id} was {task.status}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(text, code=reason)
        self.task = task
        self.task_id = task.task_id
        self.task_status = task.status
        self.reason = reason
        self.detail = detail


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date (RFC 9110); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_from(response: httpx.Response) -> StippleError:
    """The typed error of a gateway answer with a 4xx/5xx status (its body read)."""
    status = response.status_code
    try:
        payload = response.json()
    except ValueError:
        payload = None
    detail: dict[str, Any] = {}
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        detail = payload["error"]
    code = str(detail.get("code") or f"http_{status}")
    message = str(detail.get("message") or response.text[:500] or response.reason_phrase)
    field = detail.get("field")
    kind: type[StippleError] = StippleError
    if status in (401, 403):
        kind = Unauthorized
    elif status in (404, 410):
        kind = NotFound
    elif status == 409:
        kind = Conflict
    elif status == 429:
        kind = RateLimited
    elif status in (502, 503, 504):
        kind = Unavailable
    elif status in (400, 413, 422) or (400 <= status < 500 and field is not None):
        kind = InvalidInput
    error = kind(message, status=status, code=code, field=field, value=detail.get("value"), body=detail)
    if isinstance(error, RateLimited):
        error.retry_after = parse_retry_after(response.headers.get("retry-after"))
    return error
