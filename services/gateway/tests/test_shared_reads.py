"""An outcome reaches all of a task's watchers at once, and each confirms it from the
stream: the confirmation is one read for all of them (events.read_task_events_shared)."""

from __future__ import annotations

import asyncio

import pytest

from stipple_gateway import events


async def test_concurrent_confirmations_of_one_task_share_one_read(monkeypatch):
    reads: list[str] = []
    release = asyncio.Event()

    async def read(js, task_id):
        reads.append(task_id)
        await release.wait()
        return [f"stored {task_id}"]

    monkeypatch.setattr(events, "read_task_events", read)
    js = object()
    waiting = [asyncio.create_task(events.read_task_events_shared(js, "t1")) for _ in range(72)]
    other = asyncio.create_task(events.read_task_events_shared(js, "t2"))
    await asyncio.sleep(0.01)
    waiting[0].cancel()  # a watcher that hangs up does not cancel the read the others wait for
    release.set()
    results = await asyncio.gather(*waiting[1:], other)
    assert reads == ["t1", "t2"]
    assert results == [["stored t1"]] * 71 + [["stored t2"]]
    # a later confirmation reads afresh (nothing is cached past the read)
    assert await events.read_task_events_shared(js, "t1") == ["stored t1"]
    assert reads == ["t1", "t2", "t1"]
    assert not events._reading


async def test_a_failed_shared_read_fails_every_caller_and_the_next_one_reads_again(monkeypatch):
    calls = 0

    async def read(js, task_id):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise TimeoutError("the bus is away")
        return ["ok"]

    monkeypatch.setattr(events, "read_task_events", read)
    js = object()
    outcomes = await asyncio.gather(
        *(events.read_task_events_shared(js, "t") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, TimeoutError) for o in outcomes)
    assert await events.read_task_events_shared(js, "t") == ["ok"]
    assert calls == 2


@pytest.fixture(autouse=True)
def _no_reads_left():
    yield
    events._reading.clear()
