"""A Stipple network inside the test process, made of the real services.

Each service runs its real `serve` as an asyncio task on its own NATS connection (its own
user on a secured server); nodes join through the real join protocol (`keep_joined`,
as the node agent runs: the server's nonce signed with the node's key, the gatekeeper's
callout, staking through the chain relay when the chain runs, joining again when the
network closes the connection). A test picks the parts it needs:

    async with Network.secured(tmp_path) as net:          # authentication on, like production
        await net.gatekeeper(min_stake=MIN_STAKE)
        await net.chain_indexer(min_stake=MIN_STAKE)
        await net.dispatcher(); await net.validator()
        honest = await net.node(runner, "honest-1")       # its node id: dev_node_id("honest-1")

`Network.plain(url)` is the same on a server without authentication (the gatekeeper then
only takes uploads). `control_plane_and_nodes` starts the usual set (gatekeeper, dispatcher,
validator, and a node per name). Everything stops when the block ends.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from eth_account import Account
from nats.js import JetStreamContext

from stipple_common import bus, subjects
from stipple_common.identity import key_for, node_id_of
from stipple_common.messages import TaskAborted, TaskSubmitted, TaskSucceeded, decode_task_event
from stipple_common.natsserver import NatsServer, NetworkCredentials, start_secured
from stipple_common.process import free_port
from stipple_common.service import ServiceContext, open_service
from stipple_common.taskspec import parse_task
from stipple_dispatcher.service import DispatcherSettings
from stipple_dispatcher.service import serve as serve_dispatcher
from stipple_gatekeeper.service import GatekeeperSettings
from stipple_gatekeeper.service import serve as serve_gatekeeper
from stipple_node.pipeline import PipelineRunner
from stipple_node.service import NodeAgent, NodeSettings, keep_joined, make_agent
from stipple_node.service import serve as serve_node
from stipple_validator.service import ValidatorSettings
from stipple_validator.service import serve as serve_validator


@dataclass
class NodeHandle:
    name: str
    node_id: str
    key: str
    stopping: asyncio.Event  # the node's own: stopping one node stops only it
    agent: asyncio.Task[None] | None = None
    ctx: ServiceContext | None = None  # its current connection (a new one after it joined again)
    joins: int = 0

    async def stop(self) -> None:
        """Stop this node as SIGTERM would (it says goodbye), and wait for it."""
        self.stopping.set()
        if self.agent is not None:
            await asyncio.wait_for(asyncio.gather(self.agent, return_exceptions=True), 30)


@dataclass
class Network:
    url: str  # the server's URL without credentials (what nodes dial)
    credentials: NetworkCredentials | None = None
    server: NatsServer | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    services: list[asyncio.Task[None]] = field(default_factory=list)  # the control plane's, of `tasks`
    nodes: dict[str, NodeHandle] = field(default_factory=dict)
    contexts: dict[str, ServiceContext] = field(default_factory=dict)  # service name -> its context (metrics)
    gateway_url: str = ""  # once `gateway()` ran
    _app: ServiceContext | None = None  # run_task's connection (the gateway's user)

    @classmethod
    def plain(cls, url: str) -> Network:
        return cls(url=url)

    @classmethod
    def secured(cls, store_dir: Path) -> Network:
        server, credentials = start_secured(store_dir)
        return cls(url=server.url, credentials=credentials, server=server)

    def service_url(self, service: str) -> str:
        return self.credentials.service_url(self.url, service) if self.credentials else self.url

    async def __aenter__(self) -> Network:
        await self.stack.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        for handle in self.nodes.values():
            handle.stopping.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 30)
        finally:
            await self.stack.__aexit__(None, None, None)
            if self.server is not None:
                self.server.stop()

    async def _run(self, name: str, settings: Any, serve: Any, *, blobs: bool = False) -> ServiceContext:
        ctx = await self.stack.enter_async_context(open_service(name, settings, blobs=blobs, stop=self.stop))
        served = asyncio.create_task(serve(ctx, settings), name=name)
        self.tasks.append(served)
        self.services.append(served)
        self.contexts[name] = ctx
        return ctx

    def check_services(self) -> None:
        """Raise what ended a control-plane service, if one failed: a failed service sets
        the stop this network's services share, so a test waiting on a task would
        otherwise see only that it never ended."""
        for served in self.services:
            if served.done() and not served.cancelled() and (exc := served.exception()) is not None:
                raise AssertionError(f"the {served.get_name()} service failed: {exc!r}") from exc

    def metric(self, service: str, name: str, **labels: str) -> float:
        """A metric's current value in a service of this network (0 when not there yet)."""
        value = self.contexts[service].metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0

    async def gatekeeper(self, **overrides: Any) -> GatekeeperSettings:
        options: dict[str, Any] = {"nats_url": self.service_url("gatekeeper"), "reconcile_s": 2.0}
        if self.credentials is not None:
            options.update(
                issuer_seed=self.credentials.issuer_seed,
                callout_seed=self.credentials.callout_seed,
                system_url=self.credentials.system_url(self.url),
            )
        else:
            options["callout"] = False
        settings = GatekeeperSettings(**{**options, **overrides})
        await self._run("gatekeeper", settings, serve_gatekeeper, blobs=settings.intake)
        return settings

    async def dispatcher(self, **overrides: Any) -> DispatcherSettings:
        """The dispatcher. Unless a test sets `validation_rate`, every task is compared
        (rate 1: three nodes), as the tests of comparison, slashing and replacement need;
        the tests of sampling set their own rate."""
        defaults = {"nats_url": self.service_url("dispatcher"), "validation_rate": 1.0}
        settings = DispatcherSettings(**{**defaults, **overrides})
        await self._run("dispatcher", settings, serve_dispatcher)
        return settings

    async def validator(self, **overrides: Any) -> ValidatorSettings:
        settings = ValidatorSettings(**{"nats_url": self.service_url("validator"), **overrides})
        await self._run("validator", settings, serve_validator, blobs=True)
        return settings

    async def chain_indexer(self, **overrides: Any) -> Any:
        from stipple_chain_indexer.service import IndexerSettings
        from stipple_chain_indexer.service import serve as serve_indexer

        defaults = {"nats_url": self.service_url("chain-indexer"), "validation_rate": 1.0}  # as the dispatcher's
        settings = IndexerSettings(**{**defaults, **overrides})
        await self._run("chain-indexer", settings, serve_indexer)
        return settings

    async def gateway(self, **overrides: Any) -> Any:
        from stipple_gateway.service import GatewaySettings
        from stipple_gateway.service import serve as serve_gateway

        settings = GatewaySettings(**{"nats_url": self.service_url("gateway"), "port": free_port(), **overrides})
        await self._run("gateway", settings, serve_gateway, blobs=True)
        self.gateway_url = f"http://{settings.host}:{settings.port}"
        for _ in range(100):  # until uvicorn listens
            try:
                _, writer = await asyncio.open_connection(settings.host, settings.port)
            except OSError:
                await asyncio.sleep(0.05)
            else:
                writer.close()
                break
        return settings

    async def control_plane_and_nodes(
        self,
        runner: PipelineRunner,
        agents: list[tuple[str, type[NodeAgent]]],
        *,
        dispatcher: dict[str, Any] | None = None,
        validator: dict[str, Any] | None = None,
    ) -> None:
        """The real gatekeeper, dispatcher and validator (with these settings), and one node
        agent per (name, NodeAgent type), as tasks of this process, each on its own connection."""
        await self.gatekeeper()
        await self.dispatcher(**(dispatcher or {}))
        await self.validator(**(validator or {}))
        for name, agent_type in agents:
            await self.node(runner, name, agent_type)

    async def replicated(self, runner: PipelineRunner, *, partitions: int = 1, **validator: Any) -> JetStreamContext:
        """The network as production runs it on a cluster: every stream at R3, the
        gatekeeper, the dispatcher, the validator (one, or with `partitions` > 1 two
        partitioned replicas, each on half of the task events, with 2 s leases) and three
        node agents; the test's JetStream context."""
        js = (await self.client()).js
        await bus.ensure_streams(js, subjects.stream_configs(replicas=3))
        await self.gatekeeper(stream_replicas=3)
        await self.dispatcher(stream_replicas=3)
        if partitions == 1:
            await self.validator(stream_replicas=3, phash_threshold=2, **validator)
        else:  # both active (VALIDATION, R3 as well)
            partitioned = {"partitions": partitions, "lease_s": 2.0, **validator}
            for instance in ("v0", "v1"):
                await self.validator(stream_replicas=3, phash_threshold=2, instance=instance, **partitioned)
        for name in ("node-1", "node-2", "node-3"):
            await self.node(runner, name, NodeAgent)
        await asyncio.sleep(1.0)  # nodes announce themselves
        return js

    async def run_task(
        self,
        *,
        seed: int = 5,
        steps: int = 4,
        size: int = 64,
        prompt: str = "a red fox in the snow",
        timeout: float = 60,
    ) -> TaskSucceeded | TaskAborted:
        """Submit a tiny-sd task as the gateway would (`submitted` on its subject) and
        return its outcome, checking that it has exactly one."""
        task_id = await self.submit_task(seed=seed, steps=steps, size=size, prompt=prompt)
        return await self.outcome(task_id, timeout)

    async def submit_task(
        self, *, seed: int = 5, steps: int = 4, size: int = 64, prompt: str = "a red fox in the snow"
    ) -> str:
        """Publish a tiny-sd task's `submitted` as the gateway would; its task id."""
        if self._app is None:
            self._app = await self.client("gateway")
        task_id = uuid.uuid4().hex
        config = {"image_width": size, "image_height": size, "steps": steps, "seed": seed}
        spec = parse_task({"base_model": "tiny-sd", "prompt": prompt, "task_config": config})
        submitted = TaskSubmitted(task_id=task_id, spec=spec, submitted_at=time.time())
        await bus.publish(self._app.js, subjects.task_subject(task_id, "submitted"), submitted, msg_id=task_id)
        return task_id

    async def outcome(self, task_id: str, timeout: float = 60) -> TaskSucceeded | TaskAborted:
        """The task's outcome once there is one (and then that there is only one)."""
        if self._app is None:
            self._app = await self.client("gateway")
        js = self._app.js

        deadline = time.monotonic() + timeout

        async def outcomes() -> list[TaskSucceeded | TaskAborted]:
            while True:
                try:
                    msgs = await bus.read_messages(js, subjects.TASKS_STREAM, subjects.task_events(task_id))
                    break
                except (nats.errors.Error, TimeoutError):  # a cluster electing a stream leader: ask again
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            events = [decode_task_event(m.subject, m.data) for m in msgs]
            return [e for e in events if isinstance(e, TaskSucceeded | TaskAborted)]

        while time.monotonic() < deadline:
            self.check_services()
            found = await outcomes()
            if found:
                await asyncio.sleep(0.3)  # a second outcome, if any, would show now
                assert len(await outcomes()) == 1, f"task {task_id} ended twice"
                return found[0]
            await asyncio.sleep(0.1)
        raise AssertionError(f"task {task_id} never ended: {await self.where_stuck(task_id)}")

    async def where_stuck(self, task_id: str) -> str:
        """What the streams hold of a task that did not end: its events in TASKS (and in
        VALIDATION, and that partition's consumer, when the validator is partitioned), for
        the failure message of a test that waited for it."""
        if self._app is None:
            self._app = await self.client("gateway")
        js = self._app.js
        found: list[str] = []
        try:
            msgs = await bus.read_messages(js, subjects.TASKS_STREAM, subjects.task_events(task_id))
            start = msgs[0].metadata.timestamp if msgs else None
            events = (  # sequence:event(.node)@seconds after the first event
                f"{m.metadata.sequence.stream}:{'.'.join(m.subject.split('.')[2:])[:16]}"
                f"@{(m.metadata.timestamp - start).total_seconds():.1f}"
                for m in msgs
                if start is not None
            )
            found.append("TASKS " + ", ".join(events))
            try:
                info = await js.stream_info(subjects.VALIDATION_STREAM)
            except nats.js.errors.NotFoundError:  # an unpartitioned validator: TASKS says it all
                info = None
            if info is not None:
                k = subjects.partition_for(task_id, subjects.partitions_of(info.config))
                subject = f"{subjects.PARTITION_PREFIX}.{k}.{task_id}.>"
                held = (await js.stream_info(subjects.VALIDATION_STREAM, subjects_filter=subject)).state.subjects
                copies = (f"{s.rsplit('.', 1)[-1]} x{n}" for s, n in sorted((held or {}).items()))
                # (a work queue: what it holds is what the partition's reader has not acked)
                found.append(f"VALIDATION p{k} (not acked) " + (", ".join(copies) or "none"))
                durable = subjects.validator_partition_consumer(k).durable_name
                c = await js.consumer_info(subjects.VALIDATION_STREAM, durable)
                found.append(
                    f"consumer p{k}: delivered {c.delivered.stream_seq}, ack floor {c.ack_floor.stream_seq}, "
                    f"pending {c.num_pending}, unacked {c.num_ack_pending}, redelivered {c.num_redelivered}"
                )
        except Exception as exc:  # (a cluster still electing: say what was read)
            found.append(repr(exc))
        return "; ".join(found)

    async def client(self, service: str = "validator") -> ServiceContext:
        """A control-plane connection (a service's user) for the test itself."""
        settings = DispatcherSettings(nats_url=self.service_url(service), declare_streams=False)
        return await self.stack.enter_async_context(open_service(f"test-{service}", settings, stop=self.stop))

    async def node(
        self,
        runner: PipelineRunner,
        name: str,
        agent_type: type[NodeAgent] = NodeAgent,
        *,
        key: str | None = None,
        **overrides: Any,
    ) -> NodeHandle:
        """A node agent (of `agent_type`) with the key `key_for(name)` unless given; it joins
        through the gatekeeper and, with `chain=True`, stakes through the relay first."""
        key = key or key_for(name)
        account = Account.from_key(key)
        settings = NodeSettings(**{"nats_url": self.url, "heartbeat_s": 0.5, **overrides})
        handle = NodeHandle(name, node_id_of(account.address), key, asyncio.Event())
        joined = asyncio.Event()
        agent: NodeAgent | None = None  # one across connections, as the node agent's `run` keeps it

        async def work(ctx: ServiceContext) -> None:
            nonlocal agent
            handle.ctx = ctx
            handle.joins += 1
            joined.set()
            agent = agent or make_agent(ctx, settings, runner, key=key, agent_type=agent_type)
            await serve_node(ctx, settings, runner, key=key, agent=agent)

        # as the node agent's `run` does: join, serve, and join again if the network closes the connection
        handle.agent = asyncio.create_task(keep_joined(settings, account, work, stop=handle.stopping))
        self.tasks.append(handle.agent)
        waiting = asyncio.create_task(joined.wait())
        await asyncio.wait({waiting, handle.agent}, return_when=asyncio.FIRST_COMPLETED)
        if not joined.is_set():
            waiting.cancel()
            await handle.agent  # raises why it could not join (NotAdmitted, ...)
            raise RuntimeError(f"node {name} stopped before it joined")
        self.nodes[name] = handle
        return handle


def tiny_runner(folder: Path) -> PipelineRunner:
    """The built-in tiny model, loaded once (bit-exact at one torch thread)."""
    from stipple_node.pipeline import configure_determinism
    from stipple_node.tinymodel import make_tiny_model

    configure_determinism(1)
    runner = PipelineRunner({"tiny-sd": make_tiny_model(folder)})
    runner.load("tiny-sd")
    return runner
