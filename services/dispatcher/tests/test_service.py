"""The dispatcher service itself, on its own nats-server: assignment, idempotent
redelivery, the queue (free nodes, fee order, position and ETA, cancellation), and
giving up (never hanging) when no node can take a task; and, with the in-process network
(stipple_testkit.network), a node lost mid-task replaced and the task still succeeding."""

import asyncio
import dataclasses
import time
import uuid

import pytest
from nats.js.api import KeyValueConfig
from prometheus_client import CollectorRegistry

from stipple_common import bus, subjects
from stipple_common.identity import dev_node_id
from stipple_common.messages import (
    CancelWork,
    IndexedStake,
    NodeBanned,
    NodeHeartbeat,
    PrefetchRequest,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskReassigned,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
    assignment_decoder,
    control_decoder,
    encode,
    queue_status_decoder,
    task_event_decoder,
)
from stipple_common.service import open_service
from stipple_common.taskspec import parse_task
from stipple_dispatcher.metrics import DispatcherMetrics
from stipple_dispatcher.queue import Assign, TaskQueue
from stipple_dispatcher.selection import NodeIndex
from stipple_dispatcher.service import BeatGate, Dispatcher, DispatcherSettings, follow_heartbeats, serve
from stipple_testkit.nodes import joined

pytestmark = pytest.mark.integration


async def stake(js, name, owner="", amount=1000, *, leaving=False):
    """What the chain-indexer writes when node `name` stakes: its stake under its node id in
    the `stakes` bucket; `owner`: the operator who staked for it ("" : the node itself)."""
    kv = await js.create_key_value(KeyValueConfig(bucket=subjects.STAKES_BUCKET, history=1))
    owner_id = dev_node_id(owner) if owner else ""
    await kv.put(dev_node_id(name), encode(IndexedStake(stake=amount, leaving=leaving, owner=owner_id)))


async def announce(js, name, operator="", models=("tiny-sd",), on_disk=(), *, address=None):
    """Node `name` (its id `dev_node_id(name)`) is staked by `operator` on chain, joins and
    beats once; `address`: what its announcement claims (its own id unless given)."""
    node_id = dev_node_id(name)
    await stake(js, name, operator)
    announcement = joined(node_id, models=models, models_on_disk=on_disk, address=address)
    await bus.publish(js, subjects.node_subject(node_id, "joined"), announcement, msg_id=f"{node_id}:j")
    beat = NodeHeartbeat(node_id=node_id, at=time.time())
    await bus.publish(js, subjects.node_subject(node_id, "heartbeat"), beat, msg_id=f"{node_id}:hb")


def ids(*names):
    return {dev_node_id(name) for name in names}


async def events_of(js, task_id):
    return await bus.read_subject(js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder)


async def wait_for_event(js, task_id, kind, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in await events_of(js, task_id) if isinstance(e, kind)]
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind.__name__} for {task_id}: {await events_of(js, task_id)}")


async def work_counts(js):
    """Messages waiting per work subject (the WORK stream is a work queue: it can't be browsed)."""
    info = await js.stream_info(subjects.WORK_STREAM, subjects_filter="work.>")
    return dict(info.state.subjects or {})


@pytest.fixture
async def dispatcher(fresh_nats_url):
    settings = DispatcherSettings(
        nats_url=fresh_nats_url, validation_rate=1.0, dispatch_timeout_s=1.0, task_timeout_s=60
    )
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        for i in range(4):
            await announce(ctx.js, f"n{i}", f"op{i % 3}")  # n0 and n3 share an operator (their stakes' owner)
        runner = asyncio.create_task(serve(ctx, settings))
        yield ctx.js
        stop.set()
        await asyncio.wait_for(runner, 10)


def submitted(model="tiny-sd", fee=0):
    spec = parse_task({"base_model": model, "prompt": "p", "task_config": {"seed": 1}})
    return TaskSubmitted(task_id=uuid.uuid4().hex, spec=spec, submitted_at=time.time(), fee=fee)


async def submit(js, event):
    await bus.publish(js, subjects.task_subject(event.task_id, "submitted"), event, msg_id=event.task_id)


async def commit_all(js, assigned):
    """The assigned nodes finish computing: their slots free up."""
    for node in assigned.nodes:
        event = TaskCommitted(task_id=assigned.task_id, node_id=node, commitment="0x", signature="0x")
        await bus.publish(
            js, subjects.task_subject(assigned.task_id, "committed", node), event, msg_id=f"{assigned.task_id}:{node}:c"
        )


async def queue_status(js, task_id):
    nc = js._nc
    reply = await nc.request(subjects.QUEUE_STATUS, task_id.encode(), timeout=2)
    return queue_status_decoder.decode(reply.data)


@pytest.fixture
async def three_nodes(fresh_nats_url):
    """Exactly three nodes (one task at a time), a 3 s queue timeout."""
    settings = DispatcherSettings(
        nats_url=fresh_nats_url, validation_rate=1.0, dispatch_timeout_s=3.0, task_timeout_s=60
    )
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        for i in range(3):
            await announce(ctx.js, f"n{i}", f"op{i}")
        runner = asyncio.create_task(serve(ctx, settings))
        yield ctx.js
        stop.set()
        await asyncio.wait_for(runner, 10)


async def test_assigns_three_nodes_of_distinct_operators_and_sends_their_work(dispatcher):
    js = dispatcher
    event = submitted()
    await bus.publish(js, subjects.task_subject(event.task_id, "submitted"), event, msg_id="a")
    (assigned,) = await wait_for_event(js, event.task_id, TaskAssigned)
    assert len(set(assigned.nodes)) == 3
    assert not ids("n0", "n3") <= set(assigned.nodes)
    assert assigned.deadline > time.time() + 50
    assert await work_counts(js) == {subjects.work_subject(n): 1 for n in assigned.nodes}
    for node_id in assigned.nodes:
        raw = await js.get_last_msg(subjects.WORK_STREAM, subjects.work_subject(node_id))
        work = assignment_decoder.decode(raw.data)
        assert work.task_id == event.task_id
        assert work.spec == event.spec
        assert work.deadline == assigned.deadline

    # A redelivered submission (say the dispatcher died before its ack) re-sends the same work, once.
    await bus.publish(js, subjects.task_subject(event.task_id, "submitted"), event, msg_id="b")
    await asyncio.sleep(0.5)
    assert len([e for e in await events_of(js, event.task_id) if isinstance(e, TaskAssigned)]) == 1
    assert await work_counts(js) == {subjects.work_subject(n): 1 for n in assigned.nodes}


async def test_a_task_no_registered_node_serves_is_refused_at_once(dispatcher):
    js = dispatcher
    event = submitted(model="sdxl")
    started = time.monotonic()
    await bus.publish(js, subjects.task_subject(event.task_id, "submitted"), event, msg_id="c")
    (aborted,) = await wait_for_event(js, event.task_id, TaskAborted)
    assert time.monotonic() - started < 0.9  # not after the 1 s dispatch timeout
    assert aborted.reason == "unservable"
    assert "no registered node serves 'sdxl'" in aborted.detail


async def test_a_task_whose_nodes_are_gone_waits_then_is_aborted(fresh_nats_url):
    settings = DispatcherSettings(nats_url=fresh_nats_url, validation_rate=1.0, dispatch_timeout_s=1.0, node_ttl_s=0.5)
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        for i in range(3):
            await announce(ctx.js, f"n{i}", f"op{i}")
        runner = asyncio.create_task(serve(ctx, settings))
        await asyncio.sleep(0.6)  # the heartbeats go stale: registered, not live
        event = submitted()
        await submit(ctx.js, event)
        (aborted,) = await wait_for_event(ctx.js, event.task_id, TaskAborted)
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert aborted.reason == "no_nodes"
    assert "0 eligible nodes" in aborted.detail
    assert time.time() - event.submitted_at >= 1.0


async def test_tasks_queue_for_busy_nodes_in_fee_order_with_position_and_eta(three_nodes):
    js = three_nodes
    first = submitted()
    await submit(js, first)
    (running,) = await wait_for_event(js, first.task_id, TaskAssigned)
    cheap, dear = submitted(fee=1), submitted(fee=50)
    await submit(js, cheap)
    await submit(js, dear)
    await asyncio.sleep(0.3)
    assert not [e for e in await events_of(js, cheap.task_id) if isinstance(e, TaskAssigned)]
    dear_status, cheap_status = await queue_status(js, dear.task_id), await queue_status(js, cheap.task_id)
    assert (dear_status.queued, dear_status.position, dear_status.queue_length) == (True, 0, 2)
    assert cheap_status.position == 1
    assert cheap_status.eta_s > dear_status.eta_s > 0
    assert not (await queue_status(js, first.task_id)).queued  # assigned, not waiting

    await commit_all(js, running)  # the nodes are free again: the higher fee goes first
    (second,) = await wait_for_event(js, dear.task_id, TaskAssigned)
    await asyncio.sleep(0.3)
    assert not [e for e in await events_of(js, cheap.task_id) if isinstance(e, TaskAssigned)]
    await commit_all(js, second)
    await wait_for_event(js, cheap.task_id, TaskAssigned)


async def test_cancelling_drops_a_queued_task_and_stops_an_assigned_ones_nodes(three_nodes):
    js = three_nodes
    running, queued = submitted(), submitted()
    await submit(js, running)
    (assigned,) = await wait_for_event(js, running.task_id, TaskAssigned)
    await submit(js, queued)
    await asyncio.sleep(0.2)
    for event in (queued, running):
        cancel = TaskCancelled(task_id=event.task_id)
        await bus.publish(js, subjects.task_subject(event.task_id, "cancelled"), cancel, msg_id=f"{event.task_id}:x")
    await asyncio.sleep(0.5)
    for node in assigned.nodes:
        raw = await js.get_last_msg(subjects.WORK_STREAM, subjects.control_subject(node))
        assert control_decoder.decode(raw.data) == CancelWork(task_id=running.task_id)
    assert not (await queue_status(js, queued.task_id)).queued
    await asyncio.sleep(0.5)  # the cancelled task freed the nodes, and the queued one never runs
    assert not [e for e in await events_of(js, queued.task_id) if isinstance(e, TaskAssigned)]
    after = submitted()
    await submit(js, after)
    await wait_for_event(js, after.task_id, TaskAssigned)


async def test_a_node_that_does_not_accept_in_time_is_replaced_by_another_operators_node(fresh_nats_url):
    settings = DispatcherSettings(
        nats_url=fresh_nats_url, validation_rate=1.0, accept_timeout_s=0.5, max_reassignments=1
    )
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        js = ctx.js
        for i in range(3):
            await announce(js, f"n{i}", f"op{i}")
        await announce(js, "same-op", "op0")  # may never replace n1 or n2 next to n0 (op0 staked for both)
        runner = asyncio.create_task(serve(ctx, settings))
        event = submitted()
        await submit(js, event)
        (assigned,) = await wait_for_event(js, event.task_id, TaskAssigned)
        silent = assigned.nodes[2]
        for node in assigned.nodes[:2]:
            started = TaskStarted(task_id=event.task_id, node_id=node)
            await bus.publish(js, subjects.task_subject(event.task_id, "started", node), started, msg_id=f"{node}:s")
        await announce(js, "spare", "op-spare")  # a free node of a fourth operator
        (reassigned,) = await wait_for_event(js, event.task_id, TaskReassigned)
        assert reassigned.replaced == silent
        assert reassigned.by == dev_node_id("spare")  # never a node of an operator the task has or had
        raw = await js.get_last_msg(subjects.WORK_STREAM, subjects.work_subject(reassigned.by))
        assert assignment_decoder.decode(raw.data).task_id == event.task_id
        raw = await js.get_last_msg(subjects.WORK_STREAM, subjects.control_subject(silent))
        assert control_decoder.decode(raw.data) == CancelWork(task_id=event.task_id)
        await asyncio.sleep(1.5)  # the replacement is silent too, but the limit is one per task
        assert len([e for e in await events_of(js, event.task_id) if isinstance(e, TaskReassigned)]) == 1
        stop.set()
        await asyncio.wait_for(runner, 10)


async def test_a_wanted_model_that_too_few_nodes_hold_is_prefetched_by_others(fresh_nats_url):
    lora = "https://models.example/lora/fox.safetensors"
    settings = DispatcherSettings(nats_url=fresh_nats_url, validation_rate=1.0, prefetch_demand=2)
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        js = ctx.js
        await announce(js, "has-it", "op0", on_disk=(lora,))
        for i in range(1, 4):
            await announce(js, f"n{i}", f"op{i}")
        runner = asyncio.create_task(serve(ctx, settings))
        spec = parse_task({"base_model": "tiny-sd", "prompt": "p", "loras": [{"model": lora, "weight": 0.7}]})
        for _ in range(2):  # the second task makes it wanted
            event = TaskSubmitted(task_id=uuid.uuid4().hex, spec=spec, submitted_at=time.time())
            await submit(js, event)
        await asyncio.sleep(1.0)
        asked = []
        for node in ("has-it", "n1", "n2", "n3"):
            subject = subjects.control_subject(dev_node_id(node))
            info = await js.stream_info(subjects.WORK_STREAM, subjects_filter=subject)
            if info.state.subjects:
                request = control_decoder.decode((await js.get_last_msg(subjects.WORK_STREAM, subject)).data)
                if isinstance(request, PrefetchRequest):
                    assert request == PrefetchRequest(ref=lora, kind="lora")
                    asked.append(node)
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert len(asked) == 2  # one node holds it: two more make three
    assert "has-it" not in asked


async def test_two_nodes_whose_stakes_one_owner_holds_never_share_a_task(fresh_nats_url):
    settings = DispatcherSettings(nats_url=fresh_nats_url, validation_rate=1.0, task_timeout_s=60)
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        js = ctx.js
        for name in ("a1", "a2", "b", "c"):
            await announce(js, name)  # each staked for itself: four operators
        runner = asyncio.create_task(serve(ctx, settings))
        await stake(js, "a2", owner="a1")  # now the chain says a1 holds a2's stake: one operator
        await asyncio.sleep(0.3)
        for _ in range(8):
            event = submitted()
            await submit(js, event)
            (assigned,) = await wait_for_event(js, event.task_id, TaskAssigned)
            assert ids("b", "c") <= set(assigned.nodes)
            assert len(ids("a1", "a2") & set(assigned.nodes)) == 1
            await commit_all(js, assigned)
        stop.set()
        await asyncio.wait_for(runner, 10)


async def test_banned_unstaked_and_lying_nodes_are_never_picked(fresh_nats_url):
    settings = DispatcherSettings(nats_url=fresh_nats_url, validation_rate=1.0, task_timeout_s=60, min_stake=100)
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        js = ctx.js
        for name in ("n0", "n1", "n2", "banned", "poor", "leaving", "liar"):
            address = dev_node_id("n0") if name == "liar" else None  # claims another node's address
            await announce(js, name, address=address)
        await stake(js, "poor", amount=99)
        await stake(js, "leaving", leaving=True)
        ban = NodeBanned(
            node_id=dev_node_id("banned"), reason="not_assigned", detail="", until=time.time() + 600, at=time.time()
        )
        await bus.publish(js, subjects.node_subject(ban.node_id, "banned"), ban, msg_id="ban")
        runner = asyncio.create_task(serve(ctx, settings))
        for _ in range(4):
            event = submitted()
            await submit(js, event)
            (assigned,) = await wait_for_event(js, event.task_id, TaskAssigned)
            assert set(assigned.nodes) == ids("n0", "n1", "n2")
            await commit_all(js, assigned)
        stop.set()
        await asyncio.wait_for(runner, 10)


# ------------------------------------------------------------------ traces


async def trace_of(js, stream, subject):
    from stipple_common import tracing

    raw = await js.get_last_msg(stream, subject)
    return tracing.trace_id_of(raw.headers)


async def test_assignments_made_later_continue_the_tasks_own_trace(three_nodes):
    """A queued task is assigned while the dispatcher handles another task's events (or on
    its clock): the assignment and the work still belong to the queued task's trace."""
    from opentelemetry import trace

    from stipple_common import tracing

    js = three_nodes
    tracer = trace.get_tracer("test")
    first, second = submitted(), submitted()
    with tracer.start_as_current_span("first"):
        first_trace = tracing.current_trace_id()
        await submit(js, first)
    (running,) = await wait_for_event(js, first.task_id, TaskAssigned)
    with tracer.start_as_current_span("second"):
        second_trace = tracing.current_trace_id()
        await submit(js, second)
    await asyncio.sleep(0.3)  # queued: every node is busy with the first task
    with tracer.start_as_current_span("nodes done"):  # a third trace: the first task's nodes
        other_trace = tracing.current_trace_id()
        await commit_all(js, running)
    (assigned,) = await wait_for_event(js, second.task_id, TaskAssigned)
    assert len({first_trace, second_trace, other_trace}) == 3
    assert await trace_of(js, subjects.TASKS_STREAM, subjects.task_subject(first.task_id, "assigned")) == first_trace
    assert await trace_of(js, subjects.TASKS_STREAM, subjects.task_subject(second.task_id, "assigned")) == second_trace
    for node in assigned.nodes:
        assert await trace_of(js, subjects.WORK_STREAM, subjects.work_subject(node)) == second_trace


async def test_a_replacement_on_the_clock_continues_the_tasks_trace(fresh_nats_url):
    from opentelemetry import trace

    from stipple_common import tracing

    settings = DispatcherSettings(nats_url=fresh_nats_url, validation_rate=1.0, accept_timeout_s=0.3, task_timeout_s=60)
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        for i in range(4):
            await announce(ctx.js, f"n{i}", f"op{i}")
        runner = asyncio.create_task(serve(ctx, settings))
        event = submitted()
        with trace.get_tracer("test").start_as_current_span("submit"):
            task_trace = tracing.current_trace_id()
            await submit(ctx.js, event)
        (assigned,) = await wait_for_event(ctx.js, event.task_id, TaskAssigned)
        for node in assigned.nodes[1:]:  # these start; the first stays silent
            started = TaskStarted(task_id=event.task_id, node_id=node)
            await bus.publish(ctx.js, subjects.task_subject(event.task_id, "started", node), started, msg_id=node)
        (reassigned,) = await wait_for_event(ctx.js, event.task_id, TaskReassigned)
        subject = subjects.task_subject(event.task_id, "reassigned")
        assert await trace_of(ctx.js, subjects.TASKS_STREAM, subject) == task_trace
        assert await trace_of(ctx.js, subjects.WORK_STREAM, subjects.work_subject(reassigned.by)) == task_trace
        stop.set()
        await asyncio.wait_for(runner, 10)


# ------------------------------------------------------------------ a node lost mid-task


async def test_a_lost_node_is_replaced_unless_the_stream_holds_its_answer_already(fresh_nats_url):
    """A node that committed and quit at once: its `committed` may reach the dispatcher's
    consumer after its `quit` reached the node index. The stream is asked before replacing
    it (the task would refuse the replacement); a lost node with no answer is replaced."""
    settings = DispatcherSettings(nats_url=fresh_nats_url, validation_rate=1.0, task_timeout_s=60)
    async with open_service("dispatcher", settings, stop=asyncio.Event()) as ctx:
        index, now = NodeIndex(), time.time()
        for name in ("n0", "n1", "n2"):
            index.join(joined(dev_node_id(name)), now)
        tasks = TaskQueue(index, settings)
        registry = CollectorRegistry()
        dispatcher = Dispatcher(ctx.js, tasks, DispatcherMetrics(registry, tasks))
        event = submitted()
        tasks.submit(event, None, {}, now)
        (assign,) = tasks.pump(now)
        assert isinstance(assign, Assign)
        index.join(joined(dev_node_id("spare")), now)
        answered, lost, _ = nodes = assign.assigned.nodes
        for node in nodes:
            tasks.apply(TaskStarted(task_id=event.task_id, node_id=node))
        committed = TaskCommitted(task_id=event.task_id, node_id=answered, commitment="0x", signature="0x")
        await bus.publish(ctx.js, subjects.task_subject(event.task_id, "committed", answered), committed, msg_id="c")
        index.leave(answered)  # its `quit` is folded; its `committed` is still on its way

        for decision in tasks.replace_overdue(time.time()):
            await dispatcher.carry_out_one(decision)
        assert not [e for e in await events_of(ctx.js, event.task_id) if isinstance(e, TaskReassigned)]
        assert tasks.running[event.task_id].members == nodes
        assert index.inflight[index.row[dev_node_id("spare")]] == 0
        tasks.apply(committed)  # it arrives: the slot is freed
        assert index.inflight[index.row[answered]] == 0

        index.leave(lost)  # lost before it answered: replaced
        for decision in tasks.replace_overdue(time.time()):
            await dispatcher.carry_out_one(decision)
        (reassigned,) = await wait_for_event(ctx.js, event.task_id, TaskReassigned)
        assert (reassigned.replaced, reassigned.by, reassigned.reason) == (lost, dev_node_id("spare"), "node_lost")
        assert registry.get_sample_value("stipple_dispatcher_tasks_total", {"result": "node_lost"}) == 1
        assert registry.get_sample_value("stipple_dispatcher_tasks_total", {"result": "reassigned"}) is None


# ------------------------------------------------------------------ a node lost mid-task, end to end


@pytest.mark.slow
async def test_a_node_killed_after_it_started_is_replaced_and_the_task_succeeds(fresh_nats_url, tmp_path):
    """The real gatekeeper, dispatcher, validator and four real node agents (in this
    process, the tiny model): `doomed` starts its part of the task and dies while computing
    (its heartbeats stop, it never commits), after `spare` joined. Once `doomed` is no longer
    live the dispatcher replaces it with `spare`, whose result the validator counts: the
    task succeeds well before its commit deadline, all three results agreeing."""
    from stipple_node.service import NodeAgent, TaskCancelledError
    from stipple_testkit.network import Network, tiny_runner

    killed = asyncio.Event()

    async def set_when_set(source: asyncio.Event, target: asyncio.Event) -> None:
        await source.wait()
        target.set()

    class Doomed(NodeAgent):
        """Computes until `killed`, then is a dead process: no heartbeat, no result (it
        only takes the dispatcher's cancellation, so that the test ends cleanly)."""

        async def heartbeat(self, stop):
            silenced = asyncio.Event()
            relays = [asyncio.create_task(set_when_set(event, silenced)) for event in (stop, killed)]
            try:
                await super().heartbeat(silenced)
            finally:
                for relay in relays:
                    relay.cancel()

        async def _generate(self, work):
            await killed.wait()
            for _ in range(600):
                if work.task_id in self.cancelled:
                    break
                await asyncio.sleep(0.1)
            raise TaskCancelledError(f"task {work.task_id} was cancelled")

    runner = tiny_runner(tmp_path / "tiny")
    commit_timeout_s = 30.0
    async with Network.plain(fresh_nats_url) as net:
        await net.gatekeeper()
        # 0.5 s heartbeats (the kit's): a node is lost 3 s after its last one
        await net.dispatcher(node_ttl_s=3.0, task_timeout_s=commit_timeout_s)
        await net.validator(deadline_grace_s=0.1)
        honest = [await net.node(runner, name) for name in ("honest-1", "honest-2")]
        doomed = await net.node(runner, "doomed", Doomed)
        app = await net.client("gateway")
        await asyncio.sleep(0.5)  # the nodes' announcements reach the dispatcher

        task_id = uuid.uuid4().hex
        config = {"image_width": 64, "image_height": 64, "steps": 4, "seed": 7}
        spec = parse_task({"base_model": "tiny-sd", "prompt": "a red fox in the snow", "task_config": config})
        submitted_at = time.time()
        await submit(app.js, TaskSubmitted(task_id=task_id, spec=spec, submitted_at=submitted_at))
        (assigned,) = await wait_for_event(app.js, task_id, TaskAssigned)
        assert set(assigned.nodes) == {doomed.node_id, *(node.node_id for node in honest)}
        deadline = time.monotonic() + 20
        while not any(
            isinstance(e, TaskStarted) and e.node_id == doomed.node_id for e in await events_of(app.js, task_id)
        ):
            assert time.monotonic() < deadline, "doomed never started"
            await asyncio.sleep(0.05)

        spare = await net.node(runner, "spare")  # a fourth operator, free
        await asyncio.sleep(0.5)
        killed.set()  # doomed dies mid-task
        (reassigned,) = await wait_for_event(app.js, task_id, TaskReassigned, timeout=15)
        outcome = await net.outcome(task_id, timeout=30)
        decided_in = time.time() - submitted_at
        node_lost = net.metric("dispatcher", "stipple_dispatcher_tasks_total", result="node_lost")

    assert (reassigned.replaced, reassigned.by, reassigned.reason) == (doomed.node_id, spare.node_id, "node_lost")
    assert isinstance(outcome, TaskSucceeded), outcome
    assert outcome.reason == "unanimous"  # the replaced node is judged, not counted
    assert outcome.verdicts == {
        honest[0].node_id: "agree",
        honest[1].node_id: "agree",
        doomed.node_id: "timeout",
        spare.node_id: "agree",
    }
    assert outcome.qos[doomed.node_id] == 0
    assert outcome.qos[spare.node_id] > 0
    assert node_lost == 1
    assert decided_in < commit_timeout_s  # not at the commit deadline: the replacement's commitment completed it


async def test_an_abort_that_could_not_be_published_is_decided_again_and_the_task_ends(fresh_nats_url):
    """While the stream cannot store `aborted` (as during a leader election), the abort
    fails; the task's `submitted` comes back and the abort is published once the stream
    takes it again. Before, the clock's task died with the failed publish, and the held
    message was kept alive forever: the task never ended."""
    settings = DispatcherSettings(nats_url=fresh_nats_url, validation_rate=1.0, dispatch_timeout_s=1.0, node_ttl_s=0.5)
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        for i in range(3):
            await announce(ctx.js, f"n{i}", f"op{i}")
        runner = asyncio.create_task(serve(ctx, settings))
        await asyncio.sleep(0.6)  # the heartbeats go stale: registered, not live
        event = submitted()
        attempts: list[bytes] = []
        aborted_subject = subjects.task_subject(event.task_id, "aborted")

        async def seen(msg):
            attempts.append(msg.data)

        sub = await ctx.nc.subscribe(aborted_subject, cb=seen)
        config = (await ctx.js.stream_info(subjects.TASKS_STREAM)).config
        await ctx.js.update_stream(dataclasses.replace(config, subjects=["tasks.*.submitted", "tasks.*.cancelled"]))
        await submit(ctx.js, event)
        for _ in range(200):  # until the dispatcher tried to publish the abort (it went out, unstored)
            if attempts:
                break
            await asyncio.sleep(0.05)
        assert attempts, "the dispatcher never tried to abort"
        assert not [e for e in await events_of(ctx.js, event.task_id) if isinstance(e, TaskAborted)]
        await ctx.js.update_stream(config)  # the stream takes every task subject again
        (aborted,) = await wait_for_event(ctx.js, event.task_id, TaskAborted, timeout=30)
        await sub.unsubscribe()
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert aborted.reason == "no_nodes"
    assert len(attempts) >= 2  # the failed attempt, then the stored one


async def test_heartbeats_the_nodes_stream_cannot_store_still_keep_nodes_live(fresh_nats_url):
    """While the NODES stream stores nothing (its leader being elected), the nodes' beats
    still reach the dispatcher on core NATS: a task is assigned to them, not aborted with
    `no_nodes` after the node TTL as before."""
    settings = DispatcherSettings(nats_url=fresh_nats_url, validation_rate=1.0, dispatch_timeout_s=2.0, node_ttl_s=0.5)
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        for i in range(3):
            await announce(ctx.js, f"n{i}", f"op{i}")
        config = (await ctx.js.stream_info(subjects.NODES_STREAM)).config
        await ctx.js.update_stream(dataclasses.replace(config, subjects=["nodes.*.joined", "nodes.*.quit"]))
        runner = asyncio.create_task(serve(ctx, settings))

        async def beat() -> None:  # published as a node does; the stream keeps none of them
            while not stop.is_set():
                for i in range(3):
                    node_id = dev_node_id(f"n{i}")
                    data = encode(NodeHeartbeat(node_id=node_id, at=time.time()))
                    await ctx.nc.publish(subjects.node_subject(node_id, "heartbeat"), data)
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(beat())
        await asyncio.sleep(1.0)  # twice the node TTL: only the core beats can keep them live
        event = submitted()
        await submit(ctx.js, event)
        (assigned,) = await wait_for_event(ctx.js, event.task_id, TaskAssigned)
        stop.set()
        await asyncio.gather(beating, asyncio.wait_for(runner, 10))
    assert set(assigned.nodes) == ids("n0", "n1", "n2")


async def test_a_node_flooding_its_heartbeat_subject_costs_one_decode_per_interval(nc):
    """A node may publish on its own heartbeat subject as often as it likes: the dispatcher
    decodes at most one beat per node per interval, and none of a node it does not hold or
    one over the size bound; the beats it lets through still keep the node live."""
    index = NodeIndex()
    node_id = dev_node_id("flooder")
    index.join(joined(node_id), seen_at=0.0)
    registry = CollectorRegistry()
    metrics = DispatcherMetrics(registry, TaskQueue(index, DispatcherSettings()))
    gate = BeatGate(index, interval_s=0.2, counted=metrics.heartbeats)
    sub = await follow_heartbeats(nc, gate)
    started = time.monotonic()
    stranger = dev_node_id("stranger")  # never joined
    flood = 3_000  # both nodes' floods stay under the subscription's pending limit: every beat reaches the gate
    for i in range(flood):
        await nc.publish(subjects.node_subject(node_id, "heartbeat"), encode(NodeHeartbeat(node_id=node_id, at=i)))
        await nc.publish(subjects.node_subject(stranger, "heartbeat"), encode(NodeHeartbeat(node_id=stranger, at=i)))
    huge = b'{"type":"heartbeat","node_id":"' + node_id.encode() + b'","at":1,"x":"' + b"a" * (300 * 1024) + b'"}'
    await nc.publish(subjects.node_subject(node_id, "heartbeat"), huge)
    await nc.flush()
    seen = 2 * flood + 1
    for _ in range(600):
        if gate.admitted + gate.dropped >= seen:
            break
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    await sub.unsubscribe()
    assert gate.admitted + gate.dropped == seen
    assert 1 <= gate.admitted <= 1 + elapsed / 0.2  # one per interval, however many were sent
    assert set(gate.last) == {node_id}  # the stranger never got a row in the table
    assert index.last_seen[index.row[node_id]] > 0  # the admitted beats kept the node live
    decoded = registry.get_sample_value("stipple_dispatcher_heartbeats_total", {"result": "decoded"})
    assert decoded == gate.admitted


def test_the_beat_gate_refuses_oversized_and_malformed_subjects():
    index = NodeIndex()
    node_id = dev_node_id("n0")
    index.join(joined(node_id), seen_at=0.0)
    gate = BeatGate(index, interval_s=1.0)
    assert not gate.admit(subjects.node_subject(node_id, "heartbeat"), 300 * 1024, now=10.0)
    assert not gate.admit("nodes.heartbeat", 10, now=10.0)
    assert gate.admit(subjects.node_subject(node_id, "heartbeat"), 100, now=10.0)
    assert not gate.admit(subjects.node_subject(node_id, "heartbeat"), 100, now=10.5)
    assert gate.admit(subjects.node_subject(node_id, "heartbeat"), 100, now=11.0)
