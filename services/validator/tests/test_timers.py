"""The validator's own state, without a server. Its deadlines (`Validator.timers`): one
timer per task, held on the message that set it; a later deadline acks the earlier
message, a redelivery of the same message replaces the delivery held without acking it;
giving timers back naks each with its time left (partitioned: within the sweep window).
And a partition given away takes its folds with it."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry

from stipple_common import bus, subjects
from stipple_validator.metrics import ValidatorMetrics
from stipple_validator.service import GIVEN_BACK_PER_S, Validator, ValidatorSettings, _Folded


class FakeMsg:
    """What HeldMessages does to a message, recorded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, float | None]] = []

    async def ack(self) -> None:
        self.calls.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.calls.append(("nak", delay))

    async def in_progress(self) -> None:
        self.calls.append(("in_progress", None))


def make_validator(partitions: int = 1) -> Validator:
    return Validator(
        js=None,
        directory=None,
        windows=None,
        prober=None,
        settings=ValidatorSettings(partitions=partitions),
        metrics=ValidatorMetrics(CollectorRegistry()),
        blobs=None,
    )


async def test_a_later_deadline_acks_the_earlier_message_and_a_redelivery_does_not() -> None:
    v = make_validator()
    assigned, reveal, again = FakeMsg("assigned"), FakeMsg("reveal"), FakeMsg("reveal, redelivered")
    assert isinstance(await v._arm("t", "assigned", assigned, 2, bus.Redeliver(delay=60)), bus.Hold)
    assert isinstance(await v._arm("t", "reveal", reveal, 5, bus.Redeliver(delay=30)), bus.Hold)
    assert assigned.calls == [("ack", None)]  # judged at its deadline it would have been acked
    assert isinstance(await v._arm("t", "reveal", again, 5, bus.Redeliver(delay=30)), bus.Hold)
    assert reveal.calls == []  # the same stream message: acking its old delivery would ack the new one
    assert v.timers["t"].msg is again
    assert v.held.holds(again)
    assert not v.held.holds(reveal)
    assert await v._arm("u", "assigned", FakeMsg("nothing to wait for"), 9, None) is None
    assert set(v.timers) == {"t"}
    await v._disarm("t")  # the task ended
    assert again.calls == [("ack", None)]
    assert v.timers == {}
    assert len(v.held) == 0


async def test_a_timer_fires_at_its_deadline() -> None:
    v = make_validator()
    fired: list[str] = []

    async def fire(task_id: str) -> None:
        fired.append(task_id)

    v.fire = fire  # type: ignore[method-assign]
    await v._arm("t", "assigned", FakeMsg("assigned"), 2, bus.Redeliver(delay=0.05))
    await v._arm("u", "assigned", FakeMsg("assigned"), 3, bus.Redeliver(delay=60))
    await asyncio.sleep(0.3)
    assert fired == ["t"]


async def test_timers_given_back_by_a_single_validator_are_naked_with_their_time_left() -> None:
    v = make_validator()
    msgs = {task_id: FakeMsg(task_id) for task_id in ("t", "u")}
    await v._arm("t", "assigned", msgs["t"], 1, bus.Redeliver(delay=100.0))
    await v._arm("u", "reveal", msgs["u"], 2, bus.Redeliver(delay=5.0))
    started = time.time()
    assert await v.give_back_timers() == 2
    ((call, delay),) = msgs["t"].calls
    assert call == "nak"
    assert 99.0 < delay <= 100.0 + (time.time() - started)
    ((call, delay),) = msgs["u"].calls
    assert 4.0 < delay <= 5.0
    assert v.timers == {}


async def test_a_partition_given_away_naks_its_timers_spread_within_the_sweep_window_or_sooner_if_due() -> None:
    """So the next holder folds each of its open tasks within `sweep_quiet_s` and sweeps
    them, whatever the server's copy loses; the other partitions' timers stay."""
    v = make_validator(partitions=4)
    ids = [f"task-{i}" for i in range(40)]
    msgs = {task_id: FakeMsg(task_id) for task_id in ids}
    mine = [t for t in ids if subjects.partition_for(t, 4) == 1]
    assert len(mine) >= 4
    soon = mine[-1]  # due in 1 s: comes back then, not later
    for seq, task_id in enumerate(ids):
        await v._arm(task_id, "assigned", msgs[task_id], seq, bus.Redeliver(delay=1.0 if task_id == soon else 120.0))
    assert await v.give_back_timers(1) == len(mine)
    delays = []
    for task_id in ids:
        if task_id in mine:
            ((call, delay),) = msgs[task_id].calls
            assert call == "nak"
            delays.append(delay)
            assert task_id not in v.timers
        else:
            assert msgs[task_id].calls == []
            assert task_id in v.timers
    window = v.settings.sweep_quiet_s
    assert delays[0] == 0.0
    assert all(0.0 <= d < window for d in delays)
    assert delays[:-1] == sorted(delays[:-1])  # spread evenly, not all at once
    assert delays[-1] <= 1.0  # the one due sooner
    assert await v.give_back_timers() == len(ids) - len(mine)
    assert v.timers == {}


async def test_many_timers_given_back_come_back_no_faster_than_the_next_holder_can_rebuild_them() -> None:
    v = make_validator(partitions=4)
    msgs = [FakeMsg(str(i)) for i in range(6_000)]
    for i, msg in enumerate(msgs):
        await v._arm(f"task-{i}", "assigned", msg, i, bus.Redeliver(delay=600.0))
    assert await v.give_back_timers() == 6_000
    delays = [msg.calls[0][1] for msg in msgs]
    assert max(delays) == pytest.approx(6_000 / GIVEN_BACK_PER_S, abs=0.01)  # 30 s, past the 20 s window
    assert sum(1 for d in delays if d < 1.0) == GIVEN_BACK_PER_S  # 200 in the first second


def test_a_partition_given_away_takes_its_folds_and_reveal_requests_with_it():
    """`forget_partition(k)` drops exactly the folds (and sent-reveal marks) of the tasks
    whose id the server maps to partition k, the ones the next holder goes on with; the
    other partitions' folds stay, and the ended tasks are still known as ended."""
    validator = make_validator(partitions=4)
    ids = [uuid.uuid4().hex for _ in range(64)]
    by_partition = {k: [t for t in ids if subjects.partition_for(t, 4) == k] for k in range(4)}
    assert all(by_partition.values())  # 64 ids reach every partition
    for seq, task_id in enumerate(ids):
        validator.tasks[task_id] = _Folded(task=None, seq=seq)
    validator.requested = set(ids[::2])
    validator.ended = {"done": 7}
    assert validator.forget_partition(2) == len(by_partition[2])
    assert set(validator.tasks) == set(ids) - set(by_partition[2])
    assert validator.requested == set(ids[::2]) - set(by_partition[2])
    assert validator.forget_partition(2) == 0  # nothing of it is left
    assert validator.ended == {"done": 7}
