"""NATS permissions keep a node on its own subjects (commit-reveal depends on it).

A real nats-server with the authorization block from `stipple_common.permissions`: the
dispatcher and validator log in as trusted services, three real node agents as node
users (their own inbox prefix, no stream declarations, images to S3 on moto). A task
runs end to end under those permissions. Then a node user tries what a cheater would:
read the task events, read another node's work, speak for another node. Each is refused
by the server.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from stipple_common import bus, subjects
from stipple_common.messages import NodeErrored, NodeQuit, TaskSubmitted, TaskSucceeded, task_event_decoder
from stipple_common.natsserver import NatsServer
from stipple_common.permissions import node_inbox_prefix, node_user, render_authorization, service_user
from stipple_common.service import open_service
from stipple_common.taskspec import parse_task
from stipple_dispatcher.service import DispatcherSettings
from stipple_dispatcher.service import serve as serve_dispatcher
from stipple_node.pipeline import PipelineRunner
from stipple_node.service import NodeSettings
from stipple_node.service import serve as serve_node
from stipple_validator.service import ValidatorSettings
from stipple_validator.service import serve as serve_validator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = ("node-1", "node-2", "node-3")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    users = [service_user(name, f"{name}-pw") for name in ("dispatcher", "validator", "app")]
    users += [node_user(node, f"{node}-pw") for node in NODES]
    with NatsServer.start(tmp_path_factory.mktemp("nats"), config=render_authorization(users)) as nats_server:
        yield nats_server


def url(server: NatsServer, user: str) -> str:
    return f"nats://{user}:{user}-pw@{server.host}:{server.port}"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    yield f"127.0.0.1:{port}"
    moto.stop()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> PipelineRunner:
    from stipple_node.pipeline import configure_determinism
    from stipple_node.tinymodel import make_tiny_model

    configure_determinism(1)
    runner = PipelineRunner({"tiny-sd": make_tiny_model(Path(tmp_path_factory.mktemp("tiny")))})
    runner.load("tiny-sd")
    return runner


async def test_a_task_runs_end_to_end_with_nodes_on_their_own_subjects(server, s3_endpoint, runner):
    stop = asyncio.Event()
    s3 = {
        "blob_backend": "s3",
        "s3_endpoint": s3_endpoint,
        "s3_access_key": "test",
        "s3_secret_key": "test",
        "blob_bucket": "permissions-test",
    }
    async with AsyncExitStack() as stack:
        services = []
        dispatcher = DispatcherSettings(nats_url=url(server, "dispatcher"))
        ctx = await stack.enter_async_context(open_service("dispatcher", dispatcher, stop=stop))
        services.append(asyncio.create_task(serve_dispatcher(ctx, dispatcher)))
        validator = ValidatorSettings(nats_url=url(server, "validator"))
        ctx = await stack.enter_async_context(open_service("validator", validator, stop=stop))
        services.append(asyncio.create_task(serve_validator(ctx, validator)))
        for node in NODES:
            settings = NodeSettings(
                nats_url=url(server, node),
                node_id=node,
                operator=node,
                declare_streams=False,
                nats_inbox_prefix=node_inbox_prefix(node),
                heartbeat_s=0.5,
                **s3,
            )
            ctx = await stack.enter_async_context(open_service("node-agent", settings, blobs=True, stop=stop))
            services.append(asyncio.create_task(serve_node(ctx, settings, runner)))
        app = await stack.enter_async_context(open_service("app", DispatcherSettings(nats_url=url(server, "app"))))
        await asyncio.sleep(1.0)
        task_id = uuid.uuid4().hex
        spec = parse_task(
            {
                "base_model": "tiny-sd",
                "prompt": "a fox",
                "task_config": {"image_width": 64, "image_height": 64, "steps": 4, "seed": 7},
            }
        )
        event = TaskSubmitted(task_id=task_id, spec=spec, submitted_at=time.time())
        await bus.publish(app.js, subjects.task_subject(task_id, "submitted"), event, msg_id=task_id)
        outcome = None
        for _ in range(600):
            events = await bus.read_subject(
                app.js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder
            )
            outcome = next((e for e in events if isinstance(e, TaskSucceeded)), None)
            if outcome:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*services), 30)
    assert outcome is not None, "the task did not succeed under the node permissions"
    assert set(outcome.verdicts.values()) == {"agree"}


class Violations:
    def __init__(self) -> None:
        self.errors: list[str] = []

    async def record(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def wait_for(self, words: str, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(words.lower() in e.lower() for e in self.errors):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no server error containing {words!r}: {self.errors}")


async def as_node(server: NatsServer, node: str) -> tuple[nats.NATS, Violations]:
    violations = Violations()
    nc = await nats.connect(
        url(server, node), inbox_prefix=node_inbox_prefix(node), error_cb=violations.record, max_reconnect_attempts=0
    )
    return nc, violations


async def test_a_node_cannot_read_task_events(server):
    nc, violations = await as_node(server, "node-1")
    app = await nats.connect(url(server, "app"))
    try:
        seen = []

        async def on_msg(msg):
            seen.append(msg.subject)

        await nc.subscribe("tasks.>", cb=on_msg)
        await violations.wait_for('Permissions Violation for Subscription to "tasks.>"')
        await app.publish("tasks.t1.revealed", b"{}")
        await asyncio.sleep(0.3)
        assert seen == []
        js = nc.jetstream(timeout=1.0)
        with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
            await js.add_consumer(
                subjects.TASKS_STREAM, ConsumerConfig(durable_name="peek", ack_policy=AckPolicy.EXPLICIT)
            )
        await violations.wait_for('Permissions Violation for Publish to "$JS.API.CONSUMER.DURABLE.CREATE.TASKS.peek"')
    finally:
        await nc.close()
        await app.close()


async def test_a_node_cannot_take_another_nodes_work_or_speak_for_it(server):
    nc, violations = await as_node(server, "node-1")
    try:
        js = nc.jetstream(timeout=1.0)
        with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
            await js.add_consumer(
                subjects.WORK_STREAM,
                ConsumerConfig(durable_name=subjects.node_durable("node-2"), filter_subject="work.node-2.task"),
            )
        await violations.wait_for("CONSUMER.DURABLE.CREATE.WORK.node-node-2")
        with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
            await nc.request(f"$JS.API.CONSUMER.MSG.NEXT.WORK.{subjects.node_durable('node-2')}", b"1", timeout=1.0)
        await violations.wait_for("CONSUMER.MSG.NEXT.WORK.node-node-2")
        quit_event = NodeQuit(node_id="node-2", at=time.time())
        with pytest.raises((nats.errors.TimeoutError, TimeoutError, nats.errors.NoRespondersError)):
            await bus.publish(js, subjects.node_subject("node-2", "quit"), quit_event, msg_id="forged", timeout=1.0)
        await violations.wait_for('Permissions Violation for Publish to "nodes.node-2.quit"')
        forged = NodeErrored(task_id="t1", node_id="node-2", code="x", message="forged")
        with pytest.raises((nats.errors.TimeoutError, TimeoutError, nats.errors.NoRespondersError)):
            await bus.publish(js, subjects.task_subject("t1", "errored", "node-2"), forged, msg_id="f2", timeout=1.0)
        await violations.wait_for('Permissions Violation for Publish to "tasks.t1.errored.node-2"')
        await nc.subscribe("_INBOX.>")  # everybody's replies
        await violations.wait_for('Permissions Violation for Subscription to "_INBOX.>"')
    finally:
        await nc.close()
