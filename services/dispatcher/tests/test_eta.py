"""Honest ETAs (issue 16): each node's speed learned from what the dispatcher saw (speed.py),
not from what the node says, and the queue's ETAs built on it (queue.py `status`). Without
NATS, on the queue's own clock (`apply(..., at=...)`), except the one test of `stored_at`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from nats.aio.msg import Msg

from stipple_common import __version__
from stipple_common.messages import TaskCommitted, TaskStarted, TaskSubmitted, TaskSucceeded
from stipple_common.settings import InvalidSettings, load_settings
from stipple_common.taskspec import parse_task
from stipple_dispatcher.queue import Assign, TaskQueue
from stipple_dispatcher.selection import NodeIndex
from stipple_dispatcher.service import stored_at
from stipple_dispatcher.settings import DispatcherSettings
from stipple_dispatcher.speed import Fit, SpeedModel, work_of
from stipple_testkit.nodes import joined

NOW = 1000.0
PRIOR = 0.05  # STIPPLE_SECONDS_PER_STEP: 20 steps at 512x512 is 1 s


def spec_of(steps: int = 20, side: int = 512, images: int = 1) -> Any:
    config = {"steps": steps, "seed": 1, "image_width": side, "image_height": side, "num_images": images}
    return parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": config})


def submitted(task_id: str, steps: int = 20, side: int = 512) -> TaskSubmitted:
    return TaskSubmitted(task_id=task_id, spec=spec_of(steps, side), submitted_at=NOW, fee=0)


def queue_of(*names: str, **settings: Any) -> TaskQueue[str]:
    """One copy per task (no sampling), one slot per node, every node live."""
    index = NodeIndex()
    for name in names:
        index.join(joined(name, models=("tiny-sd",)), NOW, __version__)
    settings = {"node_ttl_s": 1e6, "validation_rate": 0.0, "seconds_per_step": PRIOR, **settings}
    return TaskQueue(index, DispatcherSettings(**settings), np.random.default_rng(0))


def run(
    queue: TaskQueue[str], task_id: str, at: float, seconds: float, *, steps: int = 20, elapsed_s: float = 0.0
) -> str:
    """Submit a task, assign it at `at`, its node starts a second later and commits `seconds`
    after the assignment (claiming `elapsed_s`), and it succeeds; returns the node."""
    queue.submit(submitted(task_id, steps), f"msg-{task_id}", {}, at)
    (decision,) = [d for d in queue.pump(at) if isinstance(d, Assign)]
    (node,) = decision.assigned.nodes
    queue.apply(TaskStarted(task_id=task_id, node_id=node), at=at + 1.0)
    committed = TaskCommitted(task_id=task_id, node_id=node, commitment="0x", signature="0x", elapsed_s=elapsed_s)
    queue.apply(committed, at=at + seconds)
    queue.apply(TaskSucceeded(task_id=task_id, reason="unanimous", images=[], verdicts={}), at=at + seconds)
    return node


# ---------------------------------------------------------------------- the speed model


def test_a_node_never_timed_takes_the_prior():
    speed = SpeedModel(PRIOR)
    assert speed.predict("new", spec_of(20)) == pytest.approx(1.0)
    assert speed.predict("new", spec_of(40, 1024)) == pytest.approx(0.05 * 40 * 4)
    assert work_of(spec_of(20, 1000, 2)) == pytest.approx(20 * 2 * 1.0)


def test_the_speed_model_learns_each_nodes_time_from_what_the_dispatcher_saw():
    queue = queue_of("a")
    for i in range(12):
        node = run(queue, f"t{i}", NOW + 10 * i, 4.0)  # four times the prior
    assert queue.speed.predict(node, spec_of(20)) == pytest.approx(4.0)
    assert queue.speed.predict(node, spec_of(40)) == pytest.approx(8.0)  # the prior's shape, scaled
    assert queue.speed.factor[node] == pytest.approx(4.0)


def test_a_line_is_fitted_once_a_node_ran_sizes_far_apart():
    speed = SpeedModel(PRIOR)
    for steps in [10, 40, 20, 80, 10, 40]:
        assert speed.observe("a", spec_of(steps), 2.0 + 0.1 * steps)  # 2 s overhead, 0.1 s per step
    overhead, per_work = speed.line("a", "tiny-sd")
    assert overhead == pytest.approx(2.0)
    assert speed.predict("a", spec_of(30)) == pytest.approx(5.0)
    assert per_work * work_of(spec_of(1)) == pytest.approx(0.1)


def test_newer_runs_weigh_more_a_node_that_slowed_down_is_followed():
    speed = SpeedModel(PRIOR, alpha=0.3)
    for _ in range(10):
        speed.observe("a", spec_of(20), 1.0)
    for _ in range(10):
        speed.observe("a", spec_of(20), 3.0)
    assert speed.predict("a", spec_of(20)) == pytest.approx(3.0, rel=0.05)


def test_a_node_that_lies_in_elapsed_s_does_not_move_its_speed():
    honest, liar = queue_of("a"), queue_of("a")
    for i in range(5):
        run(honest, f"t{i}", NOW + 10 * i, 6.0, elapsed_s=6.0)
        run(liar, f"t{i}", NOW + 10 * i, 6.0, elapsed_s=0.01)  # claims to be 600 times faster
    assert liar.speed.predict("a", spec_of(20)) == honest.speed.predict("a", spec_of(20)) == pytest.approx(6.0)


def test_a_late_started_does_not_make_a_node_look_faster():
    queue = queue_of("a")
    queue.submit(submitted("t"), "msg", {}, NOW)
    list(queue.pump(NOW))
    queue.apply(TaskStarted(task_id="t", node_id="a"), at=NOW + 5.9)  # "started" just before it commits
    queue.apply(TaskCommitted(task_id="t", node_id="a", commitment="0x", signature="0x"), at=NOW + 6.0)
    assert queue.speed.predict("a", spec_of(20)) == pytest.approx(6.0)  # timed from its assignment


@pytest.mark.parametrize("seconds", [0.0, -3.0, math.nan, math.inf, 121.0])
def test_a_run_that_cannot_be_real_is_ignored(seconds):
    queue = queue_of("a", task_timeout_s=120)
    run(queue, "t", NOW, seconds)
    assert queue.speed.fits == {}
    assert queue.speed.predict("a", spec_of(20)) == pytest.approx(1.0)  # still the prior
    assert not SpeedModel(PRIOR, max_s=120).observe("a", spec_of(20), seconds)


def test_nothing_is_learned_without_the_time_of_the_event_or_from_a_node_not_assigned_here():
    queue = queue_of("a", "b")
    queue.submit(submitted("t"), "msg", {}, NOW)
    (decision,) = queue.pump(NOW)
    (node,) = decision.assigned.nodes
    other = ({"a", "b"} - {node}).pop()
    queue.apply(TaskCommitted(task_id="t", node_id=other, commitment="0x", signature="0x"), at=NOW + 3)
    queue.apply(TaskCommitted(task_id="t", node_id=node, commitment="0x", signature="0x"))  # no `at`
    queue.apply(TaskCommitted(task_id="unknown", node_id=node, commitment="0x", signature="0x"), at=NOW + 3)
    assert queue.speed.fits == {}


def test_the_validators_time_after_the_last_commitment_is_learned():
    queue = queue_of("a")
    queue.submit(submitted("t"), "msg", {}, NOW)
    list(queue.pump(NOW))
    queue.apply(TaskCommitted(task_id="t", node_id="a", commitment="0x", signature="0x"), at=NOW + 1)
    queue.apply(TaskSucceeded(task_id="t", reason="unanimous", images=[], verdicts={}), at=NOW + 1.5)
    assert queue.speed.finish_s == pytest.approx(0.5)


def test_fit_falls_back_to_the_scaled_prior_shape_when_a_line_would_be_absurd():
    fit = Fit()
    for x, y in [(1.0, 5.0), (2.0, 4.0), (4.0, 3.0)]:  # slower on smaller tasks: no line
        fit.add(x, y, 0.2)
    overhead, per_work = fit.line()
    assert overhead == 0.0
    assert per_work > 0


def test_eta_alpha_out_of_range_is_refused_naming_it():
    with pytest.raises(InvalidSettings, match="STIPPLE_ETA_ALPHA='0'"):
        load_settings(DispatcherSettings, {"STIPPLE_ETA_ALPHA": "0"})
    with pytest.raises(InvalidSettings, match="STIPPLE_ETA_ALPHA='1.5'"):
        load_settings(DispatcherSettings, {"STIPPLE_ETA_ALPHA": "1.5"})
    assert load_settings(DispatcherSettings, {"STIPPLE_ETA_ALPHA": "0.5"}).eta_alpha == 0.5


# ---------------------------------------------------------------------- ETAs


def test_a_queued_task_behind_running_ones_gets_a_longer_eta():
    idle, busy = queue_of("a", "b"), queue_of("a", "b")
    for queue in (idle, busy):
        queue.submit(submitted("waiting"), "msg", {}, NOW)
    assert idle.status("waiting", NOW).eta_s == pytest.approx(1.0)  # a free node: its own run
    busy.queued.clear()
    for task_id in ("r1", "r2"):  # both nodes take a 100-step task (5 s at the prior)
        busy.submit(submitted(task_id, steps=100), f"msg-{task_id}", {}, NOW)
    assert len(list(busy.pump(NOW))) == 2
    busy.submit(submitted("waiting"), "msg", {}, NOW + 2)
    status = busy.status("waiting", NOW + 2)
    assert status.queued
    assert status.eta_s == pytest.approx(3.0 + 1.0)  # 3 s left of a running task, then its own second
    assert busy.status("waiting", NOW + 4).eta_s == pytest.approx(1.0 + 1.0)  # the running ones went on


def test_the_eta_of_a_queued_task_follows_the_nodes_measured_speed():
    queue = queue_of("a")
    for i in range(6):
        run(queue, f"t{i}", NOW + 10 * i, 3.0)  # a node three times slower than the prior
    queue.submit(submitted("r"), "msg-r", {}, NOW + 100)
    list(queue.pump(NOW + 100))  # runs on the only node
    queue.submit(submitted("next"), "msg-next", {}, NOW + 100)
    queue.submit(submitted("after", steps=40), "msg-after", {}, NOW + 100)
    assert queue.status("next", NOW + 101).eta_s == pytest.approx(2.0 + 3.0)
    assert queue.status("after", NOW + 101).eta_s == pytest.approx(2.0 + 3.0 + 6.0)


def test_a_running_task_has_its_predicted_run_less_what_it_ran():
    queue = queue_of("a")
    queue.submit(submitted("t", steps=100), "msg", {}, NOW)
    list(queue.pump(NOW))
    queue.apply(TaskStarted(task_id="t", node_id="a"), at=NOW + 1)
    status = queue.status("t", NOW + 2)
    assert (status.queued, status.eta_s) == (False, pytest.approx(5.0 - 2.0))
    assert queue.status("t", NOW + 20).eta_s == pytest.approx(0.5)  # overdue: a tenth more
    assert queue.status("unknown", NOW).eta_s == 0.0


def test_tasks_ahead_spread_over_the_free_nodes_by_their_speed():
    queue = queue_of("fast", "slow", seconds_per_step=0.05)
    for _ in range(6):
        queue.speed.observe("fast", spec_of(20), 1.0)
        queue.speed.observe("slow", spec_of(20), 4.0)
    for task_id in ("q1", "q2", "q3"):
        queue.submit(submitted(task_id), f"msg-{task_id}", {}, NOW)
    queue.index.assigned(["fast", "slow"])  # both busy with tasks this queue did not assign
    # half a run left on each (0.5 s, 2 s): q1 takes fast when it frees (ends 1.5), q2 fast again
    # (2.5), q3 slow, free at 2 (ends 6): the queue hands a task to the first node free, as `pump` does
    etas = [queue.status(task_id, NOW).eta_s for task_id in ("q1", "q2", "q3")]
    assert etas == pytest.approx([1.5, 2.5, 6.0])


def test_stored_at_is_the_streams_time_never_later_than_now():
    stored = 1_700_000_000.25
    reply = f"$JS.ACK.TASKS.dispatcher.1.7.7.{int(stored * 1e9)}.0"
    msg = Msg(_client=None, subject="tasks.t.committed", reply=reply, data=b"")
    assert stored_at(msg) == pytest.approx(stored, abs=1e-3)
    future = Msg(_client=None, subject="s", reply=f"$JS.ACK.TASKS.d.1.7.7.{int(4e18)}.0", data=b"")
    assert stored_at(future) < 4e9
    assert stored_at(Msg(_client=None, subject="s", reply="", data=b"")) > stored


def test_an_expensive_forecast_is_reused_for_a_second_and_a_task_queued_since_goes_behind():
    queue = queue_of("a")
    queue.ETA_CHEAP_S = -1.0  # every pass counts as expensive (thousands of nodes)
    queue.submit(submitted("r", steps=100), "msg-r", {}, NOW)
    list(queue.pump(NOW))  # 5 s on the only node
    queue.submit(submitted("q1"), "msg-q1", {}, NOW)
    assert queue.status("q1", NOW).eta_s == pytest.approx(5.0 + 1.0)
    queue.submit(submitted("q2", steps=40), "msg-q2", {}, NOW + 0.5)
    assert queue.status("q1", NOW + 0.5).eta_s == pytest.approx(5.5)  # the same end, half a second nearer
    assert queue.status("q2", NOW + 0.5).eta_s == pytest.approx(5.5 + 2.0)  # behind q1, at the mean speed
    queue.ETA_CHEAP_S = 1.0  # cheap again: anything changed is a fresh pass
    queue.submit(submitted("q3"), "msg-q3", {}, NOW + 0.6)
    assert queue.status("q3", NOW + 0.6).eta_s == pytest.approx(4.4 + 1.0 + 2.0 + 1.0)
