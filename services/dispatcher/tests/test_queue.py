"""The dispatcher's decisions (queue.py), without NATS: the queue's order, blocked models,
giving up, replacing silent nodes and nodes lost mid-task, cancelling, pre-fetching, and a
task's place in line.
A held message is a string here (the service holds nats messages)."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from stipple_common import __version__
from stipple_common.messages import (
    Assignment,
    CancelWork,
    NodeErrored,
    PrefetchRequest,
    TaskAborted,
    TaskCancelled,
    TaskCommitted,
    TaskEscalated,
    TaskReassigned,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
)
from stipple_common.taskspec import parse_task
from stipple_common.vrf import VrfKey
from stipple_dispatcher.queue import (
    Abort,
    Assign,
    Cancel,
    Extend,
    NoReplacement,
    Prefetch,
    Replace,
    TaskQueue,
    Wait,
    estimate_seconds,
)
from stipple_dispatcher.selection import NodeIndex
from stipple_dispatcher.settings import DispatcherSettings
from stipple_testkit.nodes import joined

NOW = 1000.0
LORA = "https://models.example/lora/fox.safetensors"


def index_of(*names: str, model: str = "tiny-sd", on_disk: tuple[str, ...] = ()) -> NodeIndex:
    """Nodes that each staked for themselves (one operator each), live at NOW."""
    index = NodeIndex()
    add(index, *names, model=model, on_disk=on_disk)
    return index


def add(index: NodeIndex, *names: str, model: str = "tiny-sd", on_disk: tuple[str, ...] = ()) -> None:
    for name in names:
        index.join(joined(name, models=(model,), models_on_disk=on_disk), NOW, __version__)


def queue_of(index: NodeIndex, **settings: Any) -> TaskQueue[str]:
    """A queue over `index`; its nodes stay live (no heartbeats here) unless `node_ttl_s` says."""
    settings.setdefault("node_ttl_s", 1e6)
    settings.setdefault("validation_rate", 1.0)  # every task compared: three nodes (sampling has its own tests)
    return TaskQueue(index, DispatcherSettings(**settings), np.random.default_rng(0))


def submitted(
    task_id: str, *, fee: int = 0, at: float = NOW, model: str = "tiny-sd", steps: int = 20, lora: str = ""
) -> TaskSubmitted:
    body: dict[str, Any] = {"base_model": model, "prompt": "p", "task_config": {"steps": steps, "seed": 1}}
    if lora:
        body["loras"] = [{"model": lora, "weight": 0.5}]
    return TaskSubmitted(task_id=task_id, spec=parse_task(body), submitted_at=at, fee=fee)


def submit(queue: TaskQueue[str], *events: TaskSubmitted, now: float = NOW) -> list[Any]:
    decisions: list[Any] = []
    for event in events:
        decisions += queue.submit(event, f"msg-{event.task_id}", {"traceparent": event.task_id}, now)
    return decisions


def assigned(decisions: list[Any]) -> list[str]:
    return [d.assigned.task_id for d in decisions if isinstance(d, Assign)]


def commit(queue: TaskQueue[str], decision: Assign[str]) -> None:
    for node in decision.assigned.nodes:
        signed = TaskCommitted(task_id=decision.assigned.task_id, node_id=node, commitment="0x", signature="0x")
        assert queue.apply(signed) == []


# ---------------------------------------------------------------------- assigning


def test_a_task_gets_nodes_of_distinct_operators_its_work_and_its_message_settled():
    index = index_of("a", "b", "c", "d")
    index.set_stake("d", 0, "a")  # a's operator staked for d: never both
    queue = queue_of(index, task_timeout_s=60)
    assert submit(queue, submitted("t")) == []  # queued, nothing to publish yet
    (decision,) = queue.pump(NOW + 2)
    assert isinstance(decision, Assign)
    nodes = decision.assigned.nodes
    assert len(set(nodes)) == 3
    assert not {"a", "d"} <= set(nodes)
    assert decision.assigned.deadline == NOW + 2 + 60
    assert decision.work == Assignment(task_id="t", spec=submitted("t").spec, deadline=NOW + 62)
    assert (decision.held, decision.trace, decision.waited_s) == ("msg-t", {"traceparent": "t"}, 2)
    assert decision.decision_s >= 0
    assert "t" in queue.running
    assert not queue.queued
    assert all(index.inflight[index.row[n]] == 1 for n in nodes)


def test_the_queue_goes_by_fee_per_gpu_second_then_by_age():
    queue = queue_of(index_of("a", "b", "c"))
    submit(
        queue,
        submitted("old-cheap", fee=1, at=NOW - 10),
        submitted("young-cheap", fee=1, at=NOW - 5),
        submitted("long-dear", fee=10, steps=100),  # 0.1 per step
        submitted("short-dear", fee=10, steps=20),  # 0.5 per step: best
    )
    order = []
    for _ in range(4):  # one task at a time: three nodes, one slot each
        decisions = list(queue.pump(NOW))
        (task_id,) = assigned(decisions)
        order.append(task_id)
        commit(queue, next(d for d in decisions if isinstance(d, Assign)))
    assert order == ["short-dear", "long-dear", "old-cheap", "young-cheap"]


def test_estimates_scale_with_steps_images_and_pixels():
    small = parse_task({"base_model": "m", "prompt": "p", "task_config": {"steps": 10}})
    large = parse_task(
        {"base_model": "m", "prompt": "p", "task_config": {"steps": 20, "num_images": 2, "image_width": 1024}}
    )
    assert estimate_seconds(small, 0.05) == pytest.approx(0.5)
    assert estimate_seconds(large, 0.05) == pytest.approx(0.05 * 20 * 2 * 2)


def test_a_model_without_free_nodes_is_blocked_for_the_rest_of_the_pass():
    index = index_of("a", "b", "c")
    add(index, "x", "y", "z", model="sdxl")
    queue = queue_of(index, dispatch_timeout_s=30)
    submit(queue, submitted("first", fee=3), submitted("second", fee=2), submitted("xl", fee=1, model="sdxl"))
    decisions = list(queue.pump(NOW))
    # `second` found no free nodes (`first` took them), and `xl`'s nodes were still free
    assert assigned(decisions) == ["first", "xl"]
    assert [d.task_id for d in decisions if isinstance(d, Wait)] == ["second"]
    submit(queue, submitted("third", fee=1))
    decisions = list(queue.pump(NOW + 1))
    assert [d.task_id for d in decisions if isinstance(d, Wait)] == ["second"]  # `third` was not even tried
    assert set(queue.queued) == {"second", "third"}


def test_a_task_that_waits_past_the_dispatch_timeout_is_aborted_with_its_message():
    index = index_of("a", "b", "c")
    queue = queue_of(index, dispatch_timeout_s=30)
    submit(queue, submitted("running", fee=9), submitted("late", fee=1), submitted("early", at=NOW - 31))
    decisions = list(queue.pump(NOW))
    assert assigned(decisions) == ["running"]
    assert [d.task_id for d in decisions if isinstance(d, Wait)] == ["late"]
    (abort,) = [d for d in decisions if isinstance(d, Abort)]
    # a timed-out task is tried (and given up) even behind a blocked one of its model
    assert abort.aborted.task_id == "early"
    assert abort.aborted.reason == "no_nodes"
    assert "0 eligible nodes" in abort.aborted.detail
    assert (abort.held, abort.trace) == ("msg-early", {"traceparent": "early"})
    assert abort.decision_s is not None
    assert set(queue.queued) == {"late"}


def test_a_task_no_registered_node_serves_is_refused_at_once():
    queue = queue_of(index_of("a", "b", "c"))
    (abort,) = submit(queue, submitted("t", model="sdxl"))
    assert isinstance(abort, Abort)
    assert abort.aborted == TaskAborted(task_id="t", reason="unservable", detail="no registered node serves 'sdxl'")
    assert (abort.held, abort.trace, abort.decision_s) == (None, None, None)  # the handler acks it
    assert not queue.queued


def test_with_no_node_registered_yet_a_task_waits():
    queue = queue_of(NodeIndex(), dispatch_timeout_s=30)
    assert submit(queue, submitted("t")) == []
    assert [type(d) for d in queue.pump(NOW)] == [Wait]
    add(queue.index, "a", "b", "c")
    assert assigned(list(queue.pump(NOW + 1))) == ["t"]


def test_slots_free_up_as_nodes_commit_or_err():
    index = index_of("a", "b", "c")
    queue = queue_of(index)
    submit(queue, submitted("one", fee=2), submitted("two", fee=1))
    (first, _) = queue.pump(NOW)
    assert isinstance(first, Assign)
    a, b, c = first.assigned.nodes
    queue.apply(TaskCommitted(task_id="one", node_id=a, commitment="0x", signature="0x"))
    queue.apply(NodeErrored(task_id="one", node_id=b, code="oom", message="out of memory"))
    assert assigned(list(queue.pump(NOW))) == []  # c still computes
    queue.apply(TaskCommitted(task_id="one", node_id=c, commitment="0x", signature="0x"))
    assert assigned(list(queue.pump(NOW))) == ["two"]
    assert "one" in queue.running  # until its outcome
    queue.apply(TaskSucceeded(task_id="one", reason="unanimous", images=[], verdicts={}, qos={}))
    assert set(queue.running) == {"two"}


def test_slots_freed_counts_only_the_events_that_give_a_slot_back():
    """The dispatcher pumps its queue only after an event that freed a slot (`slots_freed`
    moved): `started`, a second word from a node, or an outcome after every commitment free none."""
    index = index_of("a", "b", "c")
    queue = queue_of(index)
    submit(queue, submitted("one"))
    (first,) = queue.pump(NOW)
    assert isinstance(first, Assign)
    a, b, _ = first.assigned.nodes
    queue.apply(TaskStarted(task_id="one", node_id=a))
    assert queue.slots_freed == 0
    queue.apply(TaskCommitted(task_id="one", node_id=a, commitment="0x", signature="0x"))
    assert queue.slots_freed == 1
    queue.apply(TaskCommitted(task_id="one", node_id=a, commitment="0x", signature="0x"))  # said twice
    queue.apply(NodeErrored(task_id="one", node_id=b, code="oom", message="out of memory"))
    assert queue.slots_freed == 2
    queue.apply(TaskSucceeded(task_id="one", reason="unanimous", images=[], verdicts={}, qos={}))
    assert queue.slots_freed == 3  # c never answered: the outcome gives its slot back
    queue.apply(TaskSucceeded(task_id="one", reason="unanimous", images=[], verdicts={}, qos={}))
    assert queue.slots_freed == 3
    assert index.inflight[: index.size].sum() == 0


def test_an_outcome_frees_the_slots_still_held_and_forgets_the_task():
    index = index_of("a", "b", "c")
    queue = queue_of(index)
    submit(queue, submitted("t"))
    list(queue.pump(NOW))
    assert queue.apply(TaskAborted(task_id="t", reason="no_agreement")) == []
    assert not queue.running
    assert index.inflight[: index.size].sum() == 0


def test_decisions_are_made_one_at_a_time_and_undone_when_not_carried_out():
    index = index_of("a", "b", "c", "d", "e", "f")
    queue = queue_of(index)
    submit(queue, submitted("one", fee=2), submitted("two", fee=1))
    decisions = queue.pump(NOW)
    first = next(decisions)
    assert isinstance(first, Assign)
    assert set(queue.queued) == {"two"}  # applied when yielded; `two` not decided yet
    queue.undo(first)  # publishing `assigned` failed: the caller stops there
    assert set(queue.queued) == {"one", "two"}
    assert queue.queued["one"].held == "msg-one"
    assert not queue.running
    assert index.inflight[: index.size].sum() == 0
    assert assigned(list(queue.pump(NOW))) == ["one", "two"]  # the next pump tries again


# ---------------------------------------------------------------------- silent nodes


def started(queue: TaskQueue[str], task_id: str, *nodes: str) -> None:
    for node in nodes:
        assert queue.apply(TaskStarted(task_id=task_id, node_id=node)) == []


def test_a_node_that_does_not_start_in_time_is_replaced_by_another_operators_node():
    index = index_of("a", "b", "c")
    queue = queue_of(index, accept_timeout_s=10, max_reassignments=2, task_timeout_s=60)
    submit(queue, submitted("t"))
    (decision,) = queue.pump(NOW)
    assert isinstance(decision, Assign)
    first, second, silent = decision.assigned.nodes
    started(queue, "t", first, second)
    assert list(queue.replace_overdue(NOW + 10)) == []  # not overdue yet
    add(index, "same-op")
    index.set_stake("same-op", 0, first)  # the operator of a node the task has: never
    add(index, "spare")
    (replace,) = queue.replace_overdue(NOW + 11)
    assert replace == Replace(
        reassigned=TaskReassigned(task_id="t", replaced=silent, by="spare", deadline=NOW + 71),
        work=Assignment(task_id="t", spec=submitted("t").spec, deadline=NOW + 71),
        cancel=CancelWork(task_id="t"),
        trace={"traceparent": "t"},
    )
    assert queue.running["t"].members == [first, second, silent, "spare"]
    assert index.inflight[index.row[silent]] == 0
    assert index.inflight[index.row["spare"]] == 1
    assert list(queue.replace_overdue(NOW + 12)) == []  # the spare's own timer runs from its assignment


def test_replacements_stop_at_the_limit_and_never_reuse_an_operator():
    index = index_of("a", "b", "c", "d", "e")
    queue = queue_of(index, accept_timeout_s=10, max_reassignments=1)
    submit(queue, submitted("t"))
    (decision,) = queue.pump(NOW)
    assert isinstance(decision, Assign)
    silent = decision.assigned.nodes[0]
    started(queue, "t", *decision.assigned.nodes[1:])
    (replace,) = queue.replace_overdue(NOW + 11)
    assert isinstance(replace, Replace)
    assert replace.reassigned.by not in decision.assigned.nodes
    # the replacement is silent too: the limit is one per task (the validator's deadline takes over)
    assert list(queue.replace_overdue(NOW + 30)) == []
    assert silent not in queue.running["t"].holding


def test_a_silent_node_without_a_spare_is_left_to_the_validator():
    index = index_of("a", "b", "c")
    queue = queue_of(index, accept_timeout_s=10)
    submit(queue, submitted("t"))
    (decision,) = queue.pump(NOW)
    assert isinstance(decision, Assign)
    silent = decision.assigned.nodes[2]
    started(queue, "t", *decision.assigned.nodes[:2])
    (none,) = queue.replace_overdue(NOW + 11)
    assert isinstance(none, NoReplacement)
    assert (none.task_id, none.node_id, none.trace) == ("t", silent, {"traceparent": "t"})
    assert "eligible nodes" in none.detail
    assert list(queue.replace_overdue(NOW + 20)) == []  # its timer is gone
    assert index.inflight[index.row[silent]] == 1  # it keeps its slot


def test_an_undone_replacement_gives_the_slot_back():
    index = index_of("a", "b", "c", "d")
    queue = queue_of(index, accept_timeout_s=10)
    submit(queue, submitted("t"))
    (decision,) = queue.pump(NOW)
    assert isinstance(decision, Assign)
    silent = decision.assigned.nodes[0]
    started(queue, "t", *decision.assigned.nodes[1:])
    (replace,) = queue.replace_overdue(NOW + 11)
    assert isinstance(replace, Replace)
    queue.undo(replace)
    task = queue.running["t"]
    assert task.members == decision.assigned.nodes
    assert silent in task.holding
    assert index.inflight[index.row[silent]] == 1
    assert index.inflight[index.row["d"]] == 0


# ---------------------------------------------------------------------- nodes lost mid-task


def beat(index: NodeIndex, at: float, *nodes: str) -> None:
    for node in nodes:
        index.heartbeat(node, at)


def started_everywhere(queue: TaskQueue[str], task_id: str = "t") -> list[str]:
    """Assign `task_id` at NOW; every node it got starts. Its nodes, in assignment order."""
    submit(queue, submitted(task_id))
    (decision,) = queue.pump(NOW)
    assert isinstance(decision, Assign)
    started(queue, task_id, *decision.assigned.nodes)
    return decision.assigned.nodes


def test_a_started_node_that_goes_silent_is_replaced_once_its_ttl_runs_out():
    index = index_of("a", "b", "c", "d")
    queue = queue_of(index, node_ttl_s=10, accept_timeout_s=30, task_timeout_s=60)
    nodes = started_everywhere(queue)
    lost, *alive = nodes
    (spare,) = set(index.ids) - set(nodes)
    beat(index, NOW + 8, *alive, spare)  # `lost` beats no more
    assert list(queue.replace_overdue(NOW + 10)) == []  # its last beat is still within the TTL
    (replace,) = queue.replace_overdue(NOW + 11)
    assert replace == Replace(
        reassigned=TaskReassigned(task_id="t", replaced=lost, by=spare, deadline=NOW + 71, reason="node_lost"),
        work=Assignment(task_id="t", spec=submitted("t").spec, deadline=NOW + 71),
        cancel=CancelWork(task_id="t"),
        trace={"traceparent": "t"},
    )
    task = queue.running["t"]
    assert task.members == [*nodes, spare]
    assert task.holding == {*alive, spare}
    assert index.inflight[index.row[lost]] == 0
    assert index.inflight[index.row[spare]] == 1
    assert list(queue.replace_overdue(NOW + 12)) == []  # once; the spare's accept timer runs from now
    started(queue, "t", lost)  # a late word from the replaced node changes nothing
    assert lost not in task.working
    assert list(queue.replace_overdue(NOW + 13)) == []


@pytest.mark.parametrize("how", ["quit", "banned"])
def test_a_started_node_that_quits_or_is_banned_is_replaced_at_once(how):
    index = index_of("a", "b", "c", "d")
    queue = queue_of(index, node_ttl_s=10, accept_timeout_s=30)
    lost, *_ = started_everywhere(queue)
    if how == "quit":
        index.leave(lost)
    else:
        index.ban(lost, NOW + 3600)
    (replace,) = queue.replace_overdue(NOW + 1)
    assert isinstance(replace, Replace)
    assert (replace.reassigned.replaced, replace.reassigned.reason) == (lost, "node_lost")


@pytest.mark.parametrize("outcome", ["committed", "errored"])
def test_a_node_that_committed_or_erred_is_never_replaced_when_it_goes_silent(outcome):
    index = index_of("a", "b", "c", "d")
    queue = queue_of(index, node_ttl_s=10, accept_timeout_s=30)
    nodes = started_everywhere(queue)
    done, *alive = nodes
    (spare,) = set(index.ids) - set(nodes)
    if outcome == "committed":
        event: TaskCommitted | NodeErrored = TaskCommitted(task_id="t", node_id=done, commitment="0x", signature="0x")
    else:
        event = NodeErrored(task_id="t", node_id=done, code="oom", message="out of memory")
    assert queue.apply(event) == []
    beat(index, NOW + 8, *alive, spare)
    index.leave(done)  # silent, and gone for good
    assert list(queue.replace_overdue(NOW + 11)) == []
    assert queue.running["t"].members == nodes
    started(queue, "t", done)  # a redelivered `started` does not watch it again
    assert list(queue.replace_overdue(NOW + 12)) == []


def test_lost_nodes_are_replaced_up_to_the_limit_and_each_once():
    index = index_of("a", "b", "c", "d", "e", "f")
    queue = queue_of(index, node_ttl_s=10, accept_timeout_s=30, max_reassignments=1)
    lost, *_ = started_everywhere(queue)
    index.leave(lost)
    (replace,) = queue.replace_overdue(NOW + 1)
    assert isinstance(replace, Replace)
    by = replace.reassigned.by
    started(queue, "t", by)
    index.leave(by)  # the replacement is lost too: the limit is one per task
    assert list(queue.replace_overdue(NOW + 2)) == []
    task = queue.running["t"]
    assert by in task.holding  # it keeps its slot: the validator's commit deadline decides
    assert by not in task.working  # and it is not tried again
    assert list(queue.replace_overdue(NOW + 3)) == []


def test_not_started_and_lost_nodes_share_the_limit():
    index = index_of("a", "b", "c", "d", "e", "f")
    queue = queue_of(index, node_ttl_s=100, accept_timeout_s=10, max_reassignments=1)
    submit(queue, submitted("t"))
    (decision,) = queue.pump(NOW)
    assert isinstance(decision, Assign)
    silent, lost, other = decision.assigned.nodes
    started(queue, "t", lost, other)
    index.leave(lost)
    (replace,) = queue.replace_overdue(NOW + 11)  # both are due; the silent one is due the longest
    assert isinstance(replace, Replace)
    assert (replace.reassigned.replaced, replace.reassigned.reason) == (silent, "not_accepted")
    assert queue.running["t"].members == [silent, lost, other, replace.reassigned.by]
    assert lost in queue.running["t"].holding


def test_a_lost_node_is_replaced_by_a_node_of_an_operator_the_task_never_had():
    index = index_of("a", "b", "c")
    queue = queue_of(index, node_ttl_s=10, accept_timeout_s=30)
    lost, first, _ = started_everywhere(queue)
    add(index, "twin", "same-op", "spare")
    index.set_stake("twin", 0, lost)  # the lost node's own operator: never
    index.set_stake("same-op", 0, first)  # the operator of a node the task has: never
    index.leave(lost)
    (replace,) = queue.replace_overdue(NOW + 1)
    assert isinstance(replace, Replace)
    assert (replace.reassigned.replaced, replace.reassigned.by) == (lost, "spare")


def test_a_lost_node_without_a_spare_is_left_to_the_validator():
    index = index_of("a", "b", "c")
    queue = queue_of(index, node_ttl_s=10, accept_timeout_s=30)
    lost, *_ = started_everywhere(queue)
    add(index, "twin")
    index.set_stake("twin", 0, lost)
    index.leave(lost)
    (none,) = queue.replace_overdue(NOW + 1)
    assert isinstance(none, NoReplacement)
    assert (none.task_id, none.node_id, none.trace, none.reason) == ("t", lost, {"traceparent": "t"}, "node_lost")
    assert "eligible nodes" in none.detail
    assert index.inflight[index.row[lost]] == 1  # it keeps its slot
    assert list(queue.replace_overdue(NOW + 2)) == []  # one try: the validator's commit deadline takes over


# ---------------------------------------------------------------------- cancelling


def test_cancelling_a_queued_task_drops_it_and_settles_its_message():
    queue = queue_of(index_of("a", "b", "c"))
    submit(queue, submitted("running", fee=1), submitted("queued"))
    list(queue.pump(NOW))
    (cancel,) = queue.apply(TaskCancelled(task_id="queued"))
    assert cancel == Cancel(cancel=CancelWork(task_id="queued"), nodes=[], held="msg-queued", was_queued=True)
    assert not queue.queued


def test_cancelling_an_assigned_task_cancels_every_node_it_had_and_frees_them():
    index = index_of("a", "b", "c", "d")
    queue = queue_of(index, accept_timeout_s=10)
    submit(queue, submitted("t"))
    (decision,) = queue.pump(NOW)
    assert isinstance(decision, Assign)
    started(queue, "t", *decision.assigned.nodes[1:])
    (replace,) = queue.replace_overdue(NOW + 11)
    assert isinstance(replace, Replace)
    (cancel,) = queue.apply(TaskCancelled(task_id="t"))
    assert isinstance(cancel, Cancel)
    assert cancel.nodes == [*decision.assigned.nodes, replace.reassigned.by]  # the replaced one too
    assert (cancel.held, cancel.was_queued) == (None, False)
    assert not queue.running
    assert index.inflight[: index.size].sum() == 0


def test_cancelling_a_task_held_elsewhere_leaves_its_nodes_to_the_stream():
    queue = queue_of(index_of("a", "b", "c"))
    (cancel,) = queue.apply(TaskCancelled(task_id="unknown"))
    assert cancel == Cancel(cancel=CancelWork(task_id="unknown"), nodes=None, held=None, was_queued=False)


def test_a_redelivered_submission_keeps_the_newest_message():
    queue = queue_of(index_of("a", "b", "c"))
    submit(queue, submitted("t"))
    assert queue.resubmitted("t", "msg-again") == "msg-t"
    (assign,) = queue.pump(NOW)
    assert isinstance(assign, Assign)
    assert assign.held == "msg-again"


# ---------------------------------------------------------------------- pre-fetching


def test_a_wanted_model_too_few_nodes_hold_is_prefetched_by_others_once_per_round():
    index = index_of("has-it", on_disk=(LORA,))
    add(index, "n1", "n2", "n3")
    queue = queue_of(index, prefetch_demand=2, prefetch_window_s=600, prefetch_cooldown_s=300)
    assert submit(queue, submitted("t1", lora=LORA)) == []  # asked once: not wanted yet
    (prefetch,) = submit(queue, submitted("t2", lora=LORA), now=NOW + 1)
    assert isinstance(prefetch, Prefetch)
    assert prefetch.request == PrefetchRequest(ref=LORA, kind="lora")
    assert len(prefetch.nodes) == 2  # one holds it: two more make three
    assert set(prefetch.nodes) < {"n1", "n2", "n3"}
    assert (prefetch.holders, prefetch.round_id) == (1, int((NOW + 1) // 300))
    assert submit(queue, submitted("t3", lora=LORA), now=NOW + 2) == []  # cooling down
    (again,) = submit(queue, submitted("t4", lora=LORA), submitted("t5", lora=LORA), now=NOW + 302)
    assert again.round_id == int((NOW + 302) // 300)


def test_demand_is_counted_within_the_window_and_only_for_downloadable_models():
    index = index_of("n1", "n2", "n3")
    queue = queue_of(index, prefetch_demand=2, prefetch_window_s=60)
    assert submit(queue, submitted("t1", lora=LORA)) == []
    assert submit(queue, submitted("t2", lora=LORA), now=NOW + 61) == []  # the first one is too old
    assert submit(queue, submitted("t3", lora="fox"), submitted("t4", lora="fox")) == []  # a bare name
    assert len(submit(queue, submitted("t5", lora=LORA), now=NOW + 62)) == 1


def test_a_model_enough_live_nodes_hold_is_not_prefetched():
    index = index_of("a", "b", "c", on_disk=(LORA,))
    add(index, "d")
    queue = queue_of(index, prefetch_demand=1)
    assert submit(queue, submitted("t", lora=LORA)) == []


# ---------------------------------------------------------------------- where a task stands


def test_status_gives_the_position_among_the_same_models_tasks_and_an_eta():
    index = index_of(*[f"n{i}" for i in range(6)])  # two lanes of three
    add(index, "x", "y", "z", model="sdxl")
    queue = queue_of(index, seconds_per_step=0.1, node_ttl_s=10)
    for node in index.ids:
        index.assigned([node])  # every node busy: everything waits
    submit(
        queue,
        submitted("dear", fee=50, steps=10),
        submitted("cheap", fee=1, steps=30),
        submitted("xl", model="sdxl"),
    )
    dear, cheap, xl = (queue.status(t, NOW) for t in ("dear", "cheap", "xl"))
    assert (dear.queued, dear.position, dear.queue_length) == (True, 0, 3)
    # every node busy with a task this queue did not assign: half a run (of the first task) left, then its own
    assert dear.eta_s == pytest.approx(0.5 * 1.0 + 1.0)
    assert (cheap.position, cheap.eta_s) == (1, pytest.approx(0.5 * 1.0 + 3.0))  # the one ahead takes another node
    assert xl.position == 0  # other nodes: its own line
    assert not queue.status("unknown", NOW).queued
    index.last_seen[:] = NOW - 100  # no live node: one lane
    assert queue.status("cheap", NOW).eta_s == 1.0 + 3.0


# ---------------------------------------------------------------------- sampling


def sampled_queue(rate: float, *names: str, key: VrfKey | None = None) -> TaskQueue[str]:
    return TaskQueue(
        index_of(*(names or tuple("abcdefgh"))),
        DispatcherSettings(node_ttl_s=1e6, validation_rate=rate, node_slots=1000),
        np.random.default_rng(0),
        key=key,
    )


def test_a_task_the_sample_does_not_draw_runs_on_one_node_with_its_proof():
    key = VrfKey.generate()
    queue = sampled_queue(0.0, key=key)
    submit(queue, submitted("alone"))
    (decision,) = queue.pump(NOW)
    assert isinstance(decision, Assign)
    assert len(decision.assigned.nodes) == 1
    proof = decision.assigned.sampling
    assert proof is not None
    assert not proof.selected
    assert proof.rate == 0.0
    assert proof.check("alone", key.public)
    assert not proof.check("another-task", key.public)  # a proof is for one task id


def test_a_drawn_task_and_a_full_one_run_on_three_nodes_given_the_same_work():
    queue = sampled_queue(1.0)
    submit(queue, submitted("drawn"))
    (drawn,) = queue.pump(NOW)
    assert len(drawn.assigned.nodes) == 3
    assert drawn.assigned.sampling.selected
    never = sampled_queue(0.0)
    full = msgspec.structs.replace(submitted("full"), validation="full")
    submit(never, full)
    (decision,) = never.pump(NOW)
    assert len(decision.assigned.nodes) == 3
    assert not decision.assigned.sampling.selected  # the app asked: not the sample
    # one Assignment for every copy: nothing in what a node receives says how many run it
    assert decision.work == Assignment(task_id="full", spec=full.spec, deadline=decision.assigned.deadline)


def test_the_sample_draws_about_the_rate_the_same_way_every_time_and_cannot_be_steered():
    key = VrfKey.generate()
    queue = sampled_queue(0.25, key=key)
    ids = [f"task-{i}" for i in range(400)]
    submit(queue, *(submitted(task_id) for task_id in ids))
    decisions = [d for d in queue.pump(NOW) if isinstance(d, Assign)]
    assert len(decisions) == len(ids)
    drawn = [d for d in decisions if d.assigned.sampling.selected]
    assert 0.17 * len(ids) < len(drawn) < 0.33 * len(ids)  # binomial(400, 0.25): 4+ sigma either side
    for d in decisions:
        proof = d.assigned.sampling
        assert proof.check(d.assigned.task_id, key.public)
        assert len(d.assigned.nodes) == (3 if proof.selected else 1)
    again = sampled_queue(0.25, key=key)  # another dispatcher with the same key draws the same
    assert [again.draw(submitted(i))[0] for i in ids[:20]] == [d.assigned.sampling for d in decisions[:20]]
    other = sampled_queue(0.25)  # another key draws otherwise: the proofs are the key's
    assert [other.draw(submitted(i))[0].selected for i in ids] != [d.assigned.sampling.selected for d in decisions]


def test_a_lone_node_that_does_not_start_is_replaced_within_the_reassignment_budget():
    queue = sampled_queue(0.0, "a", "b", "c", "d")
    queue.settings = msgspec.structs.replace(queue.settings, accept_timeout_s=5, max_reassignments=2)
    submit(queue, submitted("t"))
    (decision,) = queue.pump(NOW)
    first = decision.assigned.nodes[0]
    (replace,) = queue.replace_overdue(NOW + 6)
    assert isinstance(replace, Replace)
    assert replace.reassigned.replaced == first
    (again,) = queue.replace_overdue(NOW + 12)
    assert isinstance(again, Replace)
    assert again.reassigned.replaced == replace.reassigned.by
    assert list(queue.replace_overdue(NOW + 18)) == []  # two reassignments: the budget is spent


def test_the_queue_eta_counts_the_expected_copies_not_three_per_task():
    queue = sampled_queue(0.0, "a", "b", "c")
    queue.index.assigned(["a", "b", "c"], 1000)  # every slot taken: tasks wait
    submit(queue, submitted("first"), submitted("second"))
    status = queue.status("second", NOW)
    # three busy nodes, one copy per task at rate 0: the one ahead takes one node, this one the
    # next (half a run left on its unknown task, then its own); with three copies it would wait
    # for the first task's end
    assert queue.expected_copies == 1.0
    assert status.position == 1
    assert status.eta_s == pytest.approx(estimate_seconds(submitted("second").spec, 0.05) * 1.5, abs=1e-3)


# ---------------------------------------------------------------------- escalation


def escalated(task_id: str, exclude: list[str], round_: int = 1, more: int = 2) -> TaskEscalated:
    return TaskEscalated(task_id=task_id, round=round_, more=more, exclude=exclude, deadline=NOW + 10)


def test_an_escalated_task_gets_more_nodes_of_operators_it_never_had():
    index = index_of("a", "b", "c", "d", "e", "f")
    index.set_stake("e", 100, "a")  # a's operator staked for e too: e may not judge a
    queue = queue_of(index, task_timeout_s=60)
    submit(queue, submitted("t"))
    (decision,) = queue.pump(NOW)
    first = decision.assigned.nodes
    commit(queue, decision)
    extend = queue.extend(escalated("t", first), submitted("t").spec, NOW + 5, give_up=False)
    assert isinstance(extend, Extend)
    drawn = extend.extended.nodes
    assert len(drawn) == 2
    assert not set(drawn) & set(first)
    if "a" in first:
        assert "e" not in drawn
    assert extend.extended.round == 1
    assert extend.extended.deadline == NOW + 65
    assert extend.work == Assignment(task_id="t", spec=submitted("t").spec, deadline=NOW + 65)
    assert queue.running["t"].members == [*first, *drawn]
    assert all(index.inflight[index.row[n]] == 1 for n in drawn)
    assert set(queue.running["t"].accepting) == set(drawn)  # watched like any: replaced if they do not start
    assert queue.running["t"].extended == 2  # and not counted against the reassignment budget


def test_an_escalation_waits_for_free_nodes_then_gives_up_with_none():
    queue = queue_of(index_of("a", "b", "c", "d"), task_timeout_s=60)
    submit(queue, submitted("t"))
    (decision,) = queue.pump(NOW)
    event = escalated("t", decision.assigned.nodes)
    assert queue.extend(event, submitted("t").spec, NOW + 1, give_up=False) is None  # one free node, two wanted
    extend = queue.extend(event, submitted("t").spec, NOW + 9, give_up=True)
    assert extend.extended.nodes == []
    assert extend.extended.detail  # why: what the node index said


def test_an_extension_that_could_not_be_published_is_undone():
    queue = queue_of(index_of("a", "b", "c", "d", "e"), task_timeout_s=60)
    submit(queue, submitted("t"))
    list(queue.pump(NOW))
    before = list(queue.running["t"].members)
    extend = queue.extend(escalated("t", before), submitted("t").spec, NOW + 1, give_up=False)
    queue.undo(extend)
    assert queue.running["t"].members == before
    assert queue.running["t"].extended == 0
    assert all(queue.index.inflight[queue.index.row[n]] == 0 for n in extend.extended.nodes)


def test_an_escalation_for_a_task_this_dispatcher_does_not_hold_still_excludes_its_nodes():
    queue = queue_of(index_of("a", "b", "c", "d", "e"))
    extend = queue.extend(escalated("gone", ["a", "b", "c"]), submitted("gone").spec, NOW, give_up=False)
    assert sorted(extend.extended.nodes) == ["d", "e"]


def test_a_drawn_task_keeps_its_place_in_the_queue_and_a_full_one_is_ranked_per_node_run():
    """The queue goes by the fee per node-run the app pays for: the draw must not push a
    sampled task back (which would also show it was drawn)."""
    drawn, alone = sampled_queue(1.0), sampled_queue(0.0)
    for queue in (drawn, alone):
        submit(queue, submitted("t", fee=30))
    assert drawn.queued["t"].copies == 3
    assert drawn.queued["t"].rank == alone.queued["t"].rank
    full = sampled_queue(0.0)
    submit(full, msgspec.structs.replace(submitted("f", fee=90), validation="full"), submitted("s", fee=30))
    assert full.queued["f"].rank[0] == full.queued["s"].rank[0]  # 90 for three runs = 30 for one
