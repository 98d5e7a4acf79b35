"""What the client does, written once for both clients, without I/O ("sans-I/O").

Each operation (submit, get, events, wait, ...) is a generator that *yields effects* — send
this request (`Send`), read the next chunk of that stream (`Read`), close it (`Close`), sleep
(`Sleep`) — and is sent back their results (or has the transport's exception thrown in). It
may also yield `Event`s, which `events()` hands to the app. `Client` (_sync.py) performs the
effects with `httpx.Client`, `AsyncClient` (_async.py) with `httpx.AsyncClient`: each is a
short loop, so retries, Idempotency-Keys, error mapping, the SSE parser and the resuming of a
dropped events stream exist once (and `ClientBase` holds the settings both share); they are
tested without a network in client/tests/test_retries.py.
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from .errors import RateLimited, StippleError, TaskFailed, Unavailable, error_from, parse_retry_after
from .models import Event, Generation, Node, Submitted, Task

__version__ = "0.1.0"

RETRY_STATUSES = frozenset({429, 503})  # and no answer at all; never another 4xx
TASK_CONFIG_FIELDS = frozenset(
    {"image_width", "image_height", "steps", "cfg", "seed", "num_images", "safety_checker"}
)  # TaskSpec.task_config's fields: the rest of a task's fields are top-level
ALIASES = {"model": "base_model", "width": "image_width", "height": "image_height"}


# --------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class Send:
    """Send a request (`path` relative to the base URL); answered with the `httpx.Response`,
    its body read unless `stream` (a streamed error answer is read all the same)."""

    method: str
    path: str
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False


@dataclass(frozen=True)
class Read:
    """The next text chunk of a streamed response; None at its end."""

    response: httpx.Response


@dataclass(frozen=True)
class Close:
    response: httpx.Response


@dataclass(frozen=True)
class Sleep:
    seconds: float


Effect = Send | Read | Close | Sleep
T = TypeVar("T")
HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)
TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)
Op = Generator[Effect | Event, Any, T]
"""An operation: yields effects (and, for `events`, events), returns its result."""


# --------------------------------------------------------------------------- task bodies


def task_body(
    prompt: str | None,
    params: dict[str, Any],
    *,
    task: dict[str, Any] | None = None,
    default_model: str | None = None,
) -> dict[str, Any]:
    """The JSON of ``POST /v1/tasks`` from a `task` dict (optional), the prompt and keyword
    parameters: `model` is `base_model`, `width`/`height` are `task_config.image_width`/
    `image_height`, and `steps`, `seed`, `cfg`, `num_images`, `safety_checker` go into
    `task_config`; any other name is a top-level field as given (the gateway refuses, naming
    it, one it does not know). None leaves a parameter out."""
    body = copy.deepcopy(task) if task else {}
    config = dict(body.get("task_config") or {})
    if prompt is not None:
        body["prompt"] = prompt
    for name, value in params.items():
        if value is None:
            continue
        key = ALIASES.get(name, name)
        if key in TASK_CONFIG_FIELDS:
            config[key] = value
        else:
            body[key] = value
    if config:
        body["task_config"] = config
    if default_model and "base_model" not in body:
        body["base_model"] = default_model
    return body


# --------------------------------------------------------------------------- Server-Sent Events


MAX_EVENT_CHARS = 4 * 1024 * 1024  # one event (a task view is a few KB): a gateway's stream must not grow us
MAX_EVENT_NESTING = 2048  # brackets in one event's data: json.loads recurses, and C's stack is not Python's limit


class EventParser:
    """The text/event-stream format (the WHATWG HTML standard's parser, § 9.2.6), fed in
    chunks. Bounded: an event (its lines so far) over MAX_EVENT_CHARS is a StippleError
    (``bad_stream``), and a chunk without a line end is only appended, not split again."""

    def __init__(self) -> None:
        self.buffer = ""
        self.data: list[str] = []
        self.type = ""
        self.id: str | None = None
        self.size = 0  # characters of the event being read

    def feed(self, chunk: str) -> list[Event]:
        self.size += len(chunk)
        if self.size > MAX_EVENT_CHARS:
            raise StippleError(f"an event of the stream is over {MAX_EVENT_CHARS} characters", code="bad_stream")
        self.buffer += chunk
        if "\n" not in chunk and "\r" not in chunk:
            return []  # no line ended: nothing to split (splitting the whole buffer each time is quadratic)
        *lines, self.buffer = self.buffer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        events = []
        for line in lines:
            if not line:
                if self.data:
                    events.append(
                        Event(id=self.id, type=self.type or "message", data=decode_data("\n".join(self.data)))
                    )
                self.data, self.type, self.id = [], "", None
                self.size = len(self.buffer)
                continue
            if line.startswith(":"):  # a comment: the gateway's keep-alive
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self.data.append(value)
            elif name == "event":
                self.type = value
            elif name == "id" and "\0" not in value:
                self.id = value
        return events


def decode_data(text: str) -> Any:
    if text.count("[") + text.count("{") > MAX_EVENT_NESTING:  # at most that deep, without parsing it
        raise StippleError(f"an event's data holds over {MAX_EVENT_NESTING} brackets", code="bad_stream")
    try:
        return json.loads(text)
    except ValueError:
        return text


# --------------------------------------------------------------------------- the operations


def task_path(task_id: str, *rest: str) -> str:
    return "/".join(("/v1/tasks", quote(task_id, safe=""), *rest))


class Core:
    """The operations, over effects. `retries` is how many times a request is tried again
    (after no answer, 429 or 503), and a dropped events stream reopened, waiting `backoff`
    seconds doubled each time (with jitter), or what ``Retry-After`` says, at most `max_wait`."""

    def __init__(self, *, retries: int = 3, backoff: float = 0.5, max_wait: float = 30.0, model: str | None = None):
        if retries < 0:
            raise ValueError(f"retries must be 0 or more (got {retries!r})")
        self.retries, self.backoff, self.max_wait, self.model = retries, backoff, max_wait, model

    def body(self, prompt: str | None, task: dict[str, Any] | None, params: dict[str, Any]) -> dict[str, Any]:
        return task_body(prompt, params, task=task, default_model=self.model)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before try `attempt` + 2: the server's ``Retry-After`` if it gave one, else
        exponential backoff with full jitter on its upper half; never above `max_wait`."""
        if retry_after is not None:
            return min(self.max_wait, retry_after)
        ceiling = min(self.max_wait, self.backoff * 2.0**attempt)
        return ceiling * (0.5 + random.random() / 2)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> Op[httpx.Response]:
        """A request, tried again after no answer, 429 or 503; a 4xx/5xx answer raises its typed error."""
        attempt = 0
        while True:
            try:
                response: httpx.Response = yield Send(method, path, json, dict(headers or {}), stream)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    message = f"{method} {path}: no answer after {attempt + 1} tries ({type(exc).__name__}: {exc})"
                    raise Unavailable(message, code="connection_failed") from exc
                wait = self.delay(attempt)
            else:
                if not response.is_error:
                    return response
                error = error_from(response)
                if attempt >= self.retries or response.status_code not in RETRY_STATUSES:
                    raise error
                after = error.retry_after if isinstance(error, RateLimited) else None
                wait = self.delay(attempt, after or parse_retry_after(response.headers.get("retry-after")))
            attempt += 1
            yield Sleep(wait)

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> Op[Submitted]:
        """``POST /v1/tasks`` with an Idempotency-Key (a fresh one unless given): every retry
        of it is the same task."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = yield from self.request("POST", "/v1/tasks", json=body, headers=headers)
        return Submitted.from_json(response.json())

    def get(self, task_id: str) -> Op[Task]:
        response = yield from self.request("GET", task_path(task_id))
        return Task.from_json(response.json())

    def cancel(self, task_id: str) -> Op[Task]:
        """``DELETE /v1/tasks/{id}``: the task's view, cancelled. Cancelling a cancelled task
        (a retry whose first try got through) answers its view too; one that ended otherwise
        raises Conflict."""
        try:
            response = yield from self.request("DELETE", task_path(task_id))
        except StippleError as error:
            if error.status == 409 and error.body.get("status") == "cancelled":
                return (yield from self.get(task_id))
            raise
        return Task.from_json(response.json())

    def image(self, task_id: str, index: int) -> Op[bytes]:
        response = yield from self.request("GET", task_path(task_id, "images", str(int(index))))
        return response.content

    def nodes(self) -> Op[list[Node]]:
        response = yield from self.request("GET", "/v1/nodes")
        return [Node.from_json(node) for node in response.json().get("nodes", [])]

    def events(self, task_id: str, last_event_id: str | None = None) -> Op[Event]:
        """The task's events until its outcome (returned). A stream that drops or ends before
        the outcome is reopened with ``Last-Event-ID`` (the gateway sends what came after it),
        `retries` times in a row at most."""
        drops = 0
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            response = yield from self.request("GET", task_path(task_id, "events"), headers=headers, stream=True)
            parser = EventParser()
            why = "the stream ended before the outcome"
            try:
                while (chunk := (yield Read(response))) is not None:
                    for event in parser.feed(chunk):
                        drops = 0
                        if event.id:
                            last_event_id = event.id
                        yield event
                        if event.is_outcome:
                            yield Close(response)
                            return event
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
            yield Close(response)
            if drops >= self.retries:
                raise Unavailable(f"events of task {task_id}: {why}, {drops + 1} times", code="connection_failed")
            yield Sleep(self.delay(drops))
            drops += 1

    def wait(self, task_id: str) -> Op[Generation]:
        """Follow the task's events to its outcome, then read its view and its images; raise
        TaskFailed when it did not succeed."""
        yield from self.events(task_id)
        task = yield from self.get(task_id)
        if task.status != "succeeded":
            raise TaskFailed(task)
        images = []
        for image in task.images:
            images.append((yield from self.image(task_id, image.index)))
        return Generation(task_id=task_id, task=task, images=images, seeds=[image.seed for image in task.images])

    def generate(self, body: dict[str, Any], idempotency_key: str | None = None) -> Op[Generation]:
        submitted = yield from self.submit(body, idempotency_key)
        return (yield from self.wait(submitted.task_id))


class ClientBase(Generic[HttpT, TransportT]):
    """What `Client` and `AsyncClient` are made of: the operations (`core`) and the httpx
    client that performs them (`http`).

    `base_url` is the gateway's (``http://127.0.0.1:8080``); `api_key` its bearer secret, if
    it has keys on; `timeout` is per request, in seconds; `retries` how many times a request
    is tried again after no answer, 429 or 503, waiting `backoff` seconds doubled each time
    (or the ``Retry-After``), at most `max_wait`; `model` is the `base_model` of tasks that do
    not name one; `transport` replaces httpx's (tests, proxies)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_wait: float = 30.0,
        model: str | None = None,
        transport: TransportT | None = None,
    ) -> None:
        self.core = Core(retries=retries, backoff=backoff, max_wait=max_wait, model=model)
        headers = {"User-Agent": f"stipple-client/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http: HttpT = self.open_http(transport, base_url=base_url, headers=headers, timeout=timeout)

    def open_http(self, transport: TransportT | None, **options: Any) -> HttpT:
        raise NotImplementedError
