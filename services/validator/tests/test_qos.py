"""The QoS window: the mean of scored tasks, and the timeouts that pause a node counted
only since its last passed check."""

import uuid

import pytest
from nats.js.api import KeyValueConfig

from stipple_validator.qos import CLEARED, QOS_WINDOW, QosWindows, Sample, recent_timeouts, summary, unchanged


def window(*verdicts: str) -> list[Sample]:
    return [Sample(task_id=f"t{i}", score=10 if v == "agree" else 0, verdict=v) for i, v in enumerate(verdicts)]


@pytest.mark.parametrize(
    ("verdicts", "timeouts"),
    [
        ((), 0),
        (("timeout", "timeout"), 2),
        (("timeout", "agree", "timeout"), 2),
        (("timeout", "timeout", "agree", "agree"), 1),  # the last 3 only
        (("timeout", "timeout", CLEARED), 0),
        (("timeout", "timeout", CLEARED, "timeout"), 1),
        (("timeout", CLEARED, "timeout", "timeout"), 2),
    ],
)
def test_recent_timeouts_count_the_last_three_since_the_check(verdicts, timeouts):
    assert recent_timeouts(window(*verdicts)) == timeouts


def test_the_check_marker_is_no_sample():
    qos = summary("n", window("agree", "timeout", CLEARED), "probe:1")
    assert (qos.qos, qos.samples, qos.recent_timeouts, qos.task_id) == (5.0, 2, 0, "probe:1")
    assert summary("n", window(CLEARED), "probe:2").qos == 0.0


def same(before, after):
    """What the validator asks: is the summary after the sample the one before it?"""
    return unchanged(before, summary("n", after, "t"))


def test_a_summary_is_unchanged_only_when_mean_count_and_timeouts_all_are():
    full = [Sample(task_id=f"t{i}", score=10, verdict="agree") for i in range(QOS_WINDOW)]
    steady = [*full[1:], Sample(task_id="new", score=10, verdict="agree")]
    assert same(full, steady)  # a full window of equal scores: one in, one out
    assert not same(full[:-1], full)  # the count grows
    assert not same(full, [*full[1:], Sample(task_id="new", score=5, verdict="agree")])  # the mean moves
    timeout = [Sample(task_id=t, score=0, verdict="timeout") for t in ("a", "b")]
    slow = [*full[:-2], *timeout]
    assert not same(slow, [*slow[1:], Sample(task_id="probe:1", score=0, verdict=CLEARED)])  # cleared
    # the mean and the count stay while the recent timeouts move: a timeout leaves the front, one comes in
    timed = [Sample(task_id="x", score=0, verdict="timeout"), *full[1:]]
    later = [*timed[1:], Sample(task_id="y", score=0, verdict="timeout")]
    assert summary("n", timed, "").qos == summary("n", later, "").qos
    assert not same(timed, later)


@pytest.mark.integration
async def test_windows_add_once_keep_fifty_and_list_the_paused(fresh_nats_url):
    import nats

    nc = await nats.connect(fresh_nats_url)
    try:
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"qos{uuid.uuid4().hex[:8]}"))
        windows = QosWindows(kv)
        assert await windows.paused() == []
        for i in range(QOS_WINDOW + 5):
            assert await windows.add("ok", Sample(task_id=f"t{i}", score=10, verdict="agree")) is not None
        assert await windows.add("ok", Sample(task_id="t54", score=10, verdict="agree")) is None  # counted once
        added = await windows.add("ok", Sample(task_id="x", score=5, verdict="agree"))
        assert added is not None
        assert len(added.window) == QOS_WINDOW
        assert added.before[-1].task_id == f"t{QOS_WINDOW + 4}"
        assert added.window[-1].task_id == "x"
        for i in range(2):
            await windows.add("slow", Sample(task_id=f"t{i}", score=0, verdict="timeout"))
        await windows.add("back", Sample(task_id="t0", score=0, verdict="timeout"))
        await windows.add("back", Sample(task_id="t1", score=0, verdict="timeout"))
        await windows.add("back", Sample(task_id="probe:1", score=0, verdict=CLEARED))
        assert await windows.paused() == ["slow"]  # what a restarted validator probes
    finally:
        await nc.close()


@pytest.mark.integration
async def test_a_window_this_process_wrote_is_one_write_and_another_writer_is_never_lost(fresh_nats_url):
    """After its first write, a node's next sample is one compare-and-set (no read): and
    when another validator (one that held the lease before) wrote in between, the stale
    write is refused, the window read again, and both writers' samples kept."""
    import nats

    nc = await nats.connect(fresh_nats_url)
    try:
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"qos{uuid.uuid4().hex[:8]}"))
        reads: list[str] = []

        async def on_read(msg) -> None:
            reads.append(msg.subject)

        stream = f"KV_{kv._name}"  # a get is a Direct Get, or a STREAM.MSG.GET without allow_direct
        taps = [
            await nc.subscribe(f"$JS.API.DIRECT.GET.{stream}.>", cb=on_read),
            await nc.subscribe(f"$JS.API.DIRECT.GET.{stream}", cb=on_read),
            await nc.subscribe(f"$JS.API.STREAM.MSG.GET.{stream}", cb=on_read),
        ]
        conflicts: list[str] = []  # (what the service counts in stipple_validator_qos_conflicts_total)
        ours, theirs = QosWindows(kv, on_conflict=lambda: conflicts.append("n")), QosWindows(kv)
        await ours.add("n", Sample(task_id="t1", score=10, verdict="agree"))
        await nc.flush()
        first = len(reads)
        assert first >= 1  # the tap sees reads: the first add read the (missing) window
        for i in range(2, 6):
            await ours.add("n", Sample(task_id=f"t{i}", score=10, verdict="agree"))
        await nc.flush()
        assert len(reads) == first, "a window this process wrote was read again"
        await theirs.add("n", Sample(task_id="other", score=0, verdict="timeout"))
        assert len(conflicts) == 0
        assert await ours.add("n", Sample(task_id="t3", score=10, verdict="agree")) is None  # counted once
        added = await ours.add("n", Sample(task_id="t6", score=10, verdict="agree"))
        assert len(conflicts) == 1  # its remembered revision was stale: refused, read again
        assert added is not None
        assert [s.task_id for s in added.before] == ["t1", "t2", "t3", "t4", "t5", "other"]  # as read again
        assert [s.task_id for s in added.window] == ["t1", "t2", "t3", "t4", "t5", "other", "t6"]
        stored, _ = await QosWindows(kv)._read("n")
        assert stored == added.window
        for tap in taps:
            await tap.unsubscribe()
    finally:
        await nc.close()
