"""`AsyncClient`: the operations of _core.py performed with `httpx.AsyncClient` (asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx

from ._core import ClientBase, Close, Effect, Op, Read, Sleep
from .models import Event, Generation, Node, Submitted, Task

T = TypeVar("T")


@dataclass(frozen=True)
class Done(Generic[T]):
    """An operation's result, as the last item of `AsyncClient._steps` (an async generator
    cannot return a value)."""

    value: T


class AsyncClient(ClientBase[httpx.AsyncClient, httpx.AsyncBaseTransport]):
    """The asyncio client: `Client`'s settings and methods, each a coroutine (and `events` an
    async iterator). Close it (``await client.aclose()``) or use ``async with``."""

    def open_http(self, transport: httpx.AsyncBaseTransport | None, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=transport, **options)

    # ------------------------------------------------------------------ the API (documented on Client)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        task: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Generation:
        return await self._drive(self.core.generate(self.core.body(prompt, task, params), idempotency_key))

    async def submit(
        self,
        prompt: str | None = None,
        *,
        task: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Submitted:
        return await self._drive(self.core.submit(self.core.body(prompt, task, params), idempotency_key))

    async def wait(self, task_id: str) -> Generation:
        return await self._drive(self.core.wait(task_id))

    async def get(self, task_id: str) -> Task:
        return await self._drive(self.core.get(task_id))

    async def cancel(self, task_id: str) -> Task:
        return await self._drive(self.core.cancel(task_id))

    async def events(self, task_id: str, last_event_id: str | None = None) -> AsyncIterator[Event]:
        steps = self._steps(self.core.events(task_id, last_event_id))
        try:
            async for item in steps:
                if isinstance(item, Event):
                    yield item
        finally:
            await steps.aclose()

    async def image(self, task_id: str, index: int) -> bytes:
        return await self._drive(self.core.image(task_id, index))

    async def nodes(self) -> list[Node]:
        return await self._drive(self.core.nodes())

    # ------------------------------------------------------------------ performing effects

    async def _drive(self, op: Op[T]) -> T:
        steps = self._steps(op)
        try:
            async for item in steps:
                if isinstance(item, Done):
                    return item.value
        finally:
            await steps.aclose()
        raise AssertionError("an operation ended without its result")  # _steps always ends with Done

    async def _steps(self, op: Op[T]) -> AsyncGenerator[Event | Done[T], None]:
        """As `Client._steps`, with the result as a last `Done` item."""
        readers: dict[int, AsyncIterator[str]] = {}
        opened: list[httpx.Response] = []
        reply: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    effect = op.throw(error) if error is not None else op.send(reply)
                except StopIteration as stop:
                    yield Done(stop.value)
                    return
                reply, error = None, None
                if isinstance(effect, Event):
                    yield effect
                    continue
                try:
                    reply = await self._perform(effect, readers, opened)
                except httpx.TransportError as exc:
                    error = exc
        finally:
            op.close()
            for response in opened:
                await response.aclose()

    async def _perform(
        self, effect: Effect, readers: dict[int, AsyncIterator[str]], opened: list[httpx.Response]
    ) -> Any:
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        if isinstance(effect, Read):
            return await anext(readers[id(effect.response)], None)
        if isinstance(effect, Close):
            await effect.response.aclose()
            return None
        request = self.http.build_request(effect.method, effect.path, json=effect.json, headers=effect.headers)
        response = await self.http.send(request, stream=effect.stream)
        if effect.stream:
            opened.append(response)
            if response.is_error:
                await response.aread()
            else:
                readers[id(response)] = response.aiter_text()
        return response

    # ------------------------------------------------------------------ lifetime

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()
