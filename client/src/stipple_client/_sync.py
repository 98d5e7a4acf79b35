"""`Client`: the operations of _core.py performed with `httpx.Client` (blocking)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ._core import ClientBase, Close, Effect, Op, Read, Sleep
from .models import Event, Generation, Node, Submitted, Task

T = TypeVar("T")


class Client(ClientBase[httpx.Client, httpx.BaseTransport]):
    """A blocking client of a Stipple gateway's native API:
    ``Client("http://127.0.0.1:8080", api_key=None, *, timeout=30.0, retries=3, model=None)``
    (the settings are described on `ClientBase`). POSTs carry an Idempotency-Key, so a
    retried submit is the same task. Close it, or use it as a context manager."""

    def open_http(self, transport: httpx.BaseTransport | None, **options: Any) -> httpx.Client:
        return httpx.Client(transport=transport, **options)

    # ------------------------------------------------------------------ the API

    def generate(
        self,
        prompt: str | None = None,
        *,
        task: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Generation:
        """Submit a task, follow it to its outcome and download its images (TaskFailed if it
        did not succeed). Parameters as `submit`."""
        return self._drive(self.core.generate(self.core.body(prompt, task, params), idempotency_key))

    def submit(
        self,
        prompt: str | None = None,
        *,
        task: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Submitted:
        """Submit a task: `prompt` and parameters (`model`, `negative_prompt`, `steps`, `seed`,
        `width`, `height`, `num_images`, `cfg`, and any other task field as it is named), or a
        whole task as `task=` (the parameters override its fields)."""
        return self._drive(self.core.submit(self.core.body(prompt, task, params), idempotency_key))

    def wait(self, task_id: str) -> Generation:
        """Follow a submitted task to its outcome and download its images (TaskFailed if it did not succeed)."""
        return self._drive(self.core.wait(task_id))

    def get(self, task_id: str) -> Task:
        return self._drive(self.core.get(task_id))

    def cancel(self, task_id: str) -> Task:
        return self._drive(self.core.cancel(task_id))

    def events(self, task_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The task's events as they happen (first those already stored, after `last_event_id`
        if given), until its outcome; a dropped connection is resumed where it broke."""
        yield from self._steps(self.core.events(task_id, last_event_id))

    def image(self, task_id: str, index: int) -> bytes:
        """The PNG of image `index` of a succeeded task."""
        return self._drive(self.core.image(task_id, index))

    def nodes(self) -> list[Node]:
        return self._drive(self.core.nodes())

    # ------------------------------------------------------------------ performing effects

    def _drive(self, op: Op[T]) -> T:
        steps = self._steps(op)
        while True:
            try:
                next(steps)  # an operation other than `events` yields no events; none is lost
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    def _steps(self, op: Op[T]) -> Iterator[Event]:
        """Run `op`: perform each effect it yields, send it the result (or throw in the
        transport's exception), pass its events on; return what it returns."""
        readers: dict[int, Iterator[str]] = {}
        opened: list[httpx.Response] = []
        reply: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    effect = op.throw(error) if error is not None else op.send(reply)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                reply, error = None, None
                if isinstance(effect, Event):
                    yield effect
                    continue
                try:
                    reply = self._perform(effect, readers, opened)
                except httpx.TransportError as exc:
                    error = exc
        finally:
            op.close()
            for response in opened:  # also when the app stopped reading events early
                response.close()

    def _perform(self, effect: Effect, readers: dict[int, Iterator[str]], opened: list[httpx.Response]) -> Any:
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        if isinstance(effect, Read):
            return next(readers[id(effect.response)], None)
        if isinstance(effect, Close):
            effect.response.close()
            return None
        request = self.http.build_request(effect.method, effect.path, json=effect.json, headers=effect.headers)
        response = self.http.send(request, stream=effect.stream)
        if effect.stream:
            opened.append(response)
            if response.is_error:
                response.read()
            else:
                readers[id(response)] = response.iter_text()
        return response

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
