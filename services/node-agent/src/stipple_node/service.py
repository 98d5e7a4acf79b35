"""Node-agent wiring: announce, heartbeat, pull assignments from ``work.<node_id>.task``
and control messages (reveal, cancel, pre-fetch, probe) from ``work.<node_id>.control``.

A node is its Ethereum key: its id is its address (stipple_common.identity), it joins
NATS by signing the server's nonce (the gatekeeper admits it as a node only while the
chain says it holds the minimum stake), and it stores its images through the
gatekeeper's blob intake (it holds no blob-store credentials).

One task at a time (a GPU runs one diffusion at a time); the diffusion runs in a worker
thread so heartbeats, progress, control messages and `in_progress()` keep flowing. A
finished task is uploaded and *committed* (a signed hash of the result and a secret
nonce); the node reveals the result only when the validator asks, after every node has
committed, so no node can copy another's. A task that cannot run (bad input that
slipped past the gateway, a missing model, out of memory) ends with a typed ``errored``
event; the node stays up and takes the next task. A cancelled task stops at the next
step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import os
import platform
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import nats.errors
import structlog
from eth_account.signers.local import LocalAccount
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from stipple_common import __version__, bus, commitment, subjects, tracing
from stipple_common.blobstore.intake import IntakeClient, UploadRefused
from stipple_common.errors import StippleError, Transient, shorten
from stipple_common.identity import node_id_of
from stipple_common.logs import setup_logging
from stipple_common.messages import (
    MAX_ERROR_CODE,
    Assignment,
    CancelWork,
    DownloadProgress,
    ImageResult,
    JoinStatus,
    NodeErrored,
    NodeHeartbeat,
    NodeJoined,
    NodeProbed,
    NodeQuit,
    PrefetchRequest,
    ProbeRequest,
    Progress,
    ResultRevealed,
    RevealRequest,
    TaskCommitted,
    TaskEvent,
    TaskStarted,
    assignment_decoder,
    control_decoder,
    encode,
    error_message,
    join_status_decoder,
)
from stipple_common.metrics import Metrics
from stipple_common.service import ServiceContext, freeze_startup_heap, install_stop_signals, open_service
from stipple_common.settings import CommonSettings, InvalidSettings
from stipple_common.sources import ENV_NAME as SOURCES_ENV
from stipple_common.sources import load_policy
from stipple_common.taskspec import canonical

from .annotators import parse_weights
from .inputs import resolve_inputs
from .metrics import NodeMetrics, RunnerMetrics, StoreMetrics
from .pipeline import GeneratedImage, PipelineRunner, configure_determinism, platform_class
from .staking import ensure_stake
from .store import DownloadCancelled, ModelStore, ProgressEvent
from .tinymodel import TINY_MODEL_NAME, make_tiny_model
from .unrevealed import Unrevealed, UnrevealedStore

log = structlog.get_logger("stipple.node")

MAX_UNREVEALED = 1_000  # committed results kept for a reveal; the oldest go first
UPLOAD_RETRY_MAX_S = 5.0  # the longest pause between two uploads of a result while the store is away


class NodeSettings(CommonSettings, frozen=True, kw_only=True):
    node_id: str = ""  # optional: the node's address (its id); a check that the key file is the expected one
    models: str = f"{TINY_MODEL_NAME}=builtin"  # name=folder[,name=folder...]; "builtin" builds the tiny model
    model_cache: str = ""  # the model store (downloads, builtin models); empty: ~/.cache/stipple/models
    disk_budget_gb: float = 0.0  # how much the store may download; 0: no limit
    model_sources: str = ""  # JSON source policy: what apps may name as models (docs/security.md, "Model sources")
    download_timeout_s: float = 3600.0  # one model download in all (redirects, retries, body): slower ones are cut
    download_max_gb: float = 0.0  # the largest file one download may be; 0: only the disk budget limits it
    hf_offline: bool = False  # never contact the Hugging Face hub (HF_HUB_OFFLINE=1 does the same)
    safety_checker: str = ""  # folder of a StableDiffusionSafetyChecker + CLIPImageProcessor
    pipeline_cache: int = 2  # loaded pipelines kept in memory
    annotator_weights: str = (
        ""  # name=ref[,...]: where an annotator's weights come from (default lllyasviel/Annotators)
    )
    key_file: str = ""  # the node's Ethereum key (hex); empty: <model_cache>/node.key, created at first start
    stake: int = 0  # what to stake with `chain` on (smallest token unit; 0: the network's minimum)
    chain: bool = False  # stake on chain at start with the node's key, through the chain-indexer's relay
    chain_wait_s: float = 60.0  # how long to wait for the chain-indexer at start
    device: str = "cpu"
    torch_threads: int = 1  # fixed, so that the same task gives the same bits on the same machine
    heartbeat_s: float = 2.0
    in_progress_s: float = 5.0  # how often a running task tells JetStream it is still alive
    # step progress is published at the first step, the last, and at most once per this between
    # (a GPU makes 20 to 50 steps a second: each report is a message to every watching gateway)
    progress_interval_s: float = 0.2
    declare_streams: bool = False  # a node has no right to (the control plane declares them)


def parse_models(spec: str, cache: Path) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise InvalidSettings(f"STIPPLE_MODELS={spec!r}: expected name=folder[,name=folder...], got {item!r}")
        if folder == "builtin":
            if name != TINY_MODEL_NAME:
                raise InvalidSettings(f"STIPPLE_MODELS: only {TINY_MODEL_NAME!r} is built in, got {name!r}")
            models[name] = make_tiny_model(cache / "builtin" / name)
        else:
            path = Path(folder).expanduser()
            if not (path / "model_index.json").exists():
                raise InvalidSettings(f"STIPPLE_MODELS: model {name!r} folder {path} has no model_index.json")
            models[name] = path
    if not models:
        raise InvalidSettings("STIPPLE_MODELS is empty: a node must serve at least one model")
    return models


def load_or_create_key(path: Path) -> str:
    """The node's private key from `path`, created (mode 0600) if it does not exist."""
    if path.exists():
        key = path.read_text().strip()
        try:
            commitment.account_from_key(key)
        except Exception as exc:
            raise InvalidSettings(f"STIPPLE_KEY_FILE={str(path)!r}: not a hex private key ({exc})") from None
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "0x" + secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return key


class TaskCancelledError(StippleError):
    code = "cancelled"


class NotAdmitted(InvalidSettings):
    """The network admits this key only as an applicant (no or too little stake, leaving,
    banned): the node does not start, and says why."""


class Uploads(Protocol):
    """Where a node's images go: the gatekeeper's blob intake (IntakeClient), or in tests
    of the node alone a BlobStore."""

    async def put(self, key: str, data: bytes, *, content_type: str = ...) -> object: ...


@dataclass
class _Committed:
    """A result committed but not yet revealed. Kept from before the commitment is
    published, so a redelivered assignment publishes the same commitment again (its
    message id deduplicates it) and uploads the same images, instead of a new result
    whose nonce the stored commitment would not match."""

    images: list[ImageResult]
    pngs: list[bytes]
    nonce: str
    elapsed_s: float
    event: TaskCommitted
    determinism: str = ""  # the runner's determinism class, revealed with the images
    uploaded: asyncio.Event = field(default_factory=asyncio.Event)  # the reveal waits for it


def device_description(device: str) -> tuple[str, int]:
    """A human name of the compute device and its memory in bytes."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        return props.name, int(props.total_memory)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"cpu: {platform.processor() or platform.machine()}", int(memory)


class NodeAgent:
    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        runner: PipelineRunner,
        settings: NodeSettings,
        metrics: NodeMetrics,
        store: ModelStore | None = None,
        key: str | None = None,
        uploads: Uploads | None = None,
        unrevealed: UnrevealedStore | None = None,
    ) -> None:
        self.account = commitment.account_from_key(key) if key else commitment.new_account()
        node_id = node_id_of(self.account.address)
        self.committed: OrderedDict[str, _Committed] = OrderedDict()  # task id -> result awaiting its reveal
        self.unrevealed = unrevealed  # the same on disk, across restarts (unrevealed.py)
        for kept in unrevealed.load() if unrevealed else []:
            restored = _Committed(
                images=kept.images,
                pngs=[],
                nonce=kept.nonce,
                elapsed_s=kept.elapsed_s,
                event=kept.event,
                determinism=kept.determinism,
            )
            restored.uploaded.set()  # kept only once stored
            self.committed[kept.task_id] = restored
        self.cancelled: OrderedDict[str, None] = OrderedDict()  # recent cancellations (bounded)
        self.delivered: OrderedDict[str, None] = OrderedDict()  # tasks this process committed to (bounded)
        self.prefetching: dict[str, asyncio.Task[None]] = {}
        self.probing: dict[str, asyncio.Task[None]] = {}
        self.started_at = time.time()  # a new one only on a restart (the dispatcher lifts a pause then)
        self.node_id = node_id
        self.store = store
        self.nc = nc
        self.js = js
        self.blobs: Uploads = uploads if uploads is not None else IntakeClient(nc, node_id)
        self.runner = runner
        self.settings = settings
        self.busy = False
        self.metrics = metrics
        metrics.busy.set_function(lambda: 1.0 if self.busy else 0.0)  # the agent built last: the one running
        metrics.info.labels(node_id, __version__, settings.device).set(1)

    def rebind(self, nc: NATS, js: JetStreamContext) -> None:
        """Go on on a new connection (the node joined again): what it committed is kept."""
        self.nc, self.js = nc, js
        if isinstance(self.blobs, IntakeClient):
            self.blobs = IntakeClient(nc, self.node_id)

    def announcement(self) -> NodeJoined:
        device, memory = device_description(self.settings.device)
        stored = sorted(self.store.inventory(), key=lambda m: m.last_used, reverse=True) if self.store else []
        return NodeJoined(
            node_id=self.node_id,
            device=device,
            memory_bytes=memory,
            models=self.runner.model_names[:256],
            version=__version__,
            started_at=self.started_at,
            # within what the network reads (messages.ModelsOnDisk, ModelNames): the most recently used
            models_on_disk=[m.ref for m in stored[:2048]],
            models_loaded=self.runner.loaded()[:256],
            loras_on_disk=[m.ref for m in stored if m.kind == "lora"][:256],
            address=self.account.address,
            determinism=platform_class(self.settings.device),
        )

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Heartbeat until stopped; a failed beat is logged and the next one tried."""
        while not stop.is_set():
            beat = NodeHeartbeat(
                node_id=self.node_id, at=time.time(), busy=self.busy, models_loaded=self.runner.loaded()[:256]
            )
            try:
                await bus.publish_event(self.js, beat)
            except Exception as exc:
                log.warning("heartbeat_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.heartbeat_s)

    async def _publish_event(self, event: TaskEvent) -> None:
        """One of this node's task events, on its own subject (`bus.publish_event`)."""
        await bus.publish_event(self.js, event)

    def _progress_callback(self, loop: asyncio.AbstractEventLoop, task_id: str) -> Callable[[int, int], None]:
        subject = subjects.progress_subject(task_id, self.node_id)

        interval = self.settings.progress_interval_s
        last_sent = -math.inf

        def report(step: int, total: int) -> None:  # called from the diffusion thread
            nonlocal last_sent
            if task_id in self.cancelled:  # checked at every step, reported or not
                raise TaskCancelledError(f"task {task_id} was cancelled")
            now = time.monotonic()
            if step < total and now - last_sent < interval:
                return  # the first step, the last, and one per interval between
            last_sent = now
            data = encode(Progress(task_id=task_id, node_id=self.node_id, step=step, total=total))
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.nc.publish(subject, data)))

        return report

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.settings.in_progress_s)
            await msg.in_progress()

    async def handle(self, msg: Msg) -> bus.Redeliver | None:
        work = assignment_decoder.decode(msg.data)
        tracing.bind_task(work.task_id, self.node_id)
        if work.task_id in self.cancelled:
            log.info("task_skipped_cancelled")
            return None
        pending = self.committed.get(work.task_id)
        if pending is None and work.task_id in self.delivered:
            # redelivered after this process committed and revealed (a stall past the ack wait,
            # a SIGSTOP): nothing to do; an `errored` now would be judged against its result
            log.info("task_redelivered_after_reveal")
            return None
        if pending is None and time.time() > work.deadline:
            # (a redelivery of a task this process committed to goes on below: an `errored`
            # after a commitment is `withheld`, which is slashed)
            await self._fail(work, "deadline_passed", "the assignment arrived after its deadline")
            return None
        if pending is None:  # (else a redelivery after this process committed: finish that)
            pending = await self._run(work, msg)
            if pending is None:
                return None
        try:
            if msg.metadata.num_delivered > 1 and not pending.uploaded.is_set():
                why = await self._upload_in_time(work, pending, msg)
                if why is not None:
                    return None
            await self._deliver(work.task_id, pending)
        except UploadRefused as exc:  # for good, and before the commitment: an honest error, said
            # (given up in silence, the node would hold its slot and the task its nodes until the deadline)
            self.committed.pop(work.task_id, None)
            await self._fail(work, exc.code, exc.message)
            return None
        self.delivered[work.task_id] = None
        while len(self.delivered) > 10_000:
            self.delivered.popitem(last=False)
        self.metrics.tasks.labels("committed").inc()
        self.metrics.task_seconds.observe(pending.elapsed_s)
        log.info("task_committed", images=len(pending.images), elapsed_s=round(pending.elapsed_s, 3))
        return None

    async def _run(self, work: Assignment, msg: Msg) -> _Committed | None:
        """Run the task; its prepared commitment, or None when it ended otherwise (an
        `errored` event, a cancellation). `started` goes out while the diffusion starts."""
        started_event = TaskStarted(task_id=work.task_id, node_id=self.node_id)
        announce = asyncio.create_task(self._publish_event(started_event))
        started = time.perf_counter()
        self.busy = True
        keep_alive = asyncio.create_task(self._keep_alive(msg))
        failure: tuple[str, str] | None = None
        try:
            with tracing.task_span("node.generate", task_id=work.task_id, node_id=self.node_id):
                images = await self._generate(work)
        except (TaskCancelledError, DownloadCancelled):
            self.metrics.tasks.labels("cancelled").inc()
            log.info("task_cancelled")
            return None
        except StippleError as exc:
            if exc.retryable:
                raise
            failure = (exc.code, exc.message)
        except Exception as exc:  # the node must survive anything one task does (e.g. CUDA OOM)
            code = "out_of_memory" if "out of memory" in str(exc).lower() else "internal"
            log.exception("task_crashed", code=code)
            failure = (code, f"{type(exc).__name__}: {exc}")
        finally:
            keep_alive.cancel()
            self.busy = False
            await announce  # `started` is stored before anything after it (or this raises)
        if failure is not None:
            await self._fail(work, *failure)
            return None
        return self.prepare(work.task_id, images, time.perf_counter() - started)

    def prepare(self, task_id: str, images: list[GeneratedImage], elapsed: float) -> _Committed:
        """The signed commitment to `images` (stored under keys nobody can guess before the
        reveal names them), kept for the reveal."""
        secret = secrets.token_hex(8)
        results = [
            ImageResult(
                index=index,
                key=f"tasks/{task_id}/{self.node_id}/{secret}/{index}.png",
                phash=image.phash,
                seed=image.seed,
                width=image.width,
                height=image.height,
                sha256=hashlib.sha256(image.png).hexdigest(),
                checkpoints=image.checkpoints,
                summaries=image.summaries,
            )
            for index, image in enumerate(images)
        ]
        determinism = images[0].determinism if images else ""
        nonce = commitment.new_nonce()
        value = commitment.make_commitment(task_id, self.node_id, results, nonce, determinism)
        event = TaskCommitted(
            task_id=task_id,
            node_id=self.node_id,
            commitment=value,
            signature=commitment.sign(self.account, value),
            elapsed_s=elapsed,
        )
        pending = _Committed(
            images=results,
            pngs=[image.png for image in images],
            nonce=nonce,
            elapsed_s=elapsed,
            event=event,
            determinism=determinism,
        )
        self.committed[task_id] = pending
        while len(self.committed) > MAX_UNREVEALED:  # tasks decided without this node's reveal
            forgotten, _ = self.committed.popitem(last=False)
            if self.unrevealed:
                self.unrevealed.drop(forgotten)
        return pending

    async def _deliver(self, task_id: str, pending: _Committed) -> None:
        """Upload the images, then publish the commitment. Not both at once: once committed, a
        node must reveal (the validator judges a committed node that does not, or that reports
        an error instead, `withheld`, which is slashed), so an upload that fails must fail
        before the commitment, where it is an honest error. The order costs one publish."""
        if not pending.uploaded.is_set():  # (stored already on a redelivery: _upload_in_time)
            await self._upload(pending)
        if self.unrevealed:  # a restart from here on can still reveal
            kept = Unrevealed(
                task_id=task_id,
                images=pending.images,
                nonce=pending.nonce,
                elapsed_s=pending.elapsed_s,
                determinism=pending.determinism,
                event=pending.event,
            )
            await asyncio.to_thread(self.unrevealed.save, kept)
        await self._commit(task_id, pending)

    async def _upload_in_time(self, work: Assignment, pending: _Committed, msg: Msg) -> str | None:
        """Upload on a redelivered assignment, waiting out a blob store (or intake) that is
        away: tried again in place with back-off while the deadline allows, the message kept
        alive, instead of spending the consumer's last deliveries (`max_deliver` 3) within
        seconds and then falling silent (`timeout`, which counts towards a pause). A first
        failure was handed back to the consumer as any transient one. None once stored;
        else why not, after an `errored` (store_unavailable: an honest error, before any
        commitment) or a cancellation."""
        why = ""
        keep_alive = asyncio.create_task(self._keep_alive(msg))
        try:
            for attempt in itertools.count(1):
                try:
                    await self._upload(pending)
                    return None
                except Transient as exc:
                    why = exc.message
                delay = bus.backoff(attempt, base=0.5, cap=UPLOAD_RETRY_MAX_S)
                if work.task_id in self.cancelled:
                    return "cancelled"
                if time.time() + delay >= work.deadline:
                    break
                log.warning("upload_retry", attempt=attempt, retry_in_s=delay, error=why)
                await asyncio.sleep(delay)
        finally:
            keep_alive.cancel()
        self.committed.pop(work.task_id, None)
        await self._fail(work, "store_unavailable", f"the images could not be stored before the deadline: {why}")
        return why

    async def _commit(self, task_id: str, pending: _Committed) -> None:
        with tracing.task_span("node.commit", task_id=task_id, node_id=self.node_id):
            await self._publish_event(pending.event)

    async def _upload(self, pending: _Committed) -> None:
        if pending.uploaded.is_set():
            return
        with (
            tracing.task_span(
                "node.upload", task_id=pending.event.task_id, node_id=self.node_id, images=len(pending.pngs)
            ),
            self.metrics.upload_seconds.time(),
        ):
            for result, png in zip(pending.images, pending.pngs, strict=True):
                await self.blobs.put(result.key, png, content_type="image/png")
        pending.pngs.clear()  # stored: the reveal needs only the keys
        pending.uploaded.set()

    async def prefetch(self, request: PrefetchRequest) -> None:
        """Download a model the network wants into the store, then announce it."""
        try:
            if self.store is None:
                log.warning("prefetch_without_store", ref=request.ref)
                return
            await asyncio.to_thread(self.store.resolve, request.ref, kind=request.kind)
            joined = self.announcement()
            await bus.publish_event(self.js, joined)  # new content, so a new message id
            log.info("prefetched", ref=request.ref, models_on_disk=len(joined.models_on_disk))
        except StippleError as exc:
            log.warning("prefetch_failed", ref=request.ref, code=exc.code, error=exc.message)
        except Exception:
            log.exception("prefetch_crashed", ref=request.ref)
        finally:
            self.prefetching.pop(request.ref, None)

    async def handle_control(self, msg: Msg) -> bus.Redeliver | None:
        """Reveal requests and cancellations; they arrive while a task may be running."""
        message = control_decoder.decode(msg.data)
        tracing.bind_task(message.task_id, self.node_id)
        if isinstance(message, PrefetchRequest):
            if message.ref not in self.prefetching:  # a download must not hold up reveals: run it aside
                self.prefetching[message.ref] = asyncio.create_task(self.prefetch(message))
            return None
        if isinstance(message, ProbeRequest):  # the check a paused node passes to work again
            if message.probe_id not in self.probing:
                self.probing[message.probe_id] = asyncio.create_task(self.probe(message))
            return None
        if isinstance(message, CancelWork):
            self.cancelled[message.task_id] = None
            while len(self.cancelled) > 10_000:
                self.cancelled.popitem(last=False)
            self.committed.pop(message.task_id, None)
            if self.unrevealed:
                self.unrevealed.drop(message.task_id)
            return None
        assert isinstance(message, RevealRequest)
        pending = self.committed.get(message.task_id)
        if pending is None:  # revealed already, or restarted without its unrevealed store
            log.warning("reveal_without_commitment")
            return None
        if not pending.uploaded.is_set():  # (uploads end before the commitment: a safeguard)
            try:
                await asyncio.wait_for(pending.uploaded.wait(), max(0.0, message.deadline - time.time()))
            except TimeoutError:
                log.warning("reveal_upload_unfinished")  # the validator judges this node withheld
                return None
        revealed = ResultRevealed(
            task_id=message.task_id,
            node_id=self.node_id,
            images=pending.images,
            elapsed_s=pending.elapsed_s,
            nonce=pending.nonce,
            determinism=pending.determinism,
        )
        with tracing.task_span("node.reveal", task_id=message.task_id, node_id=self.node_id):
            await self._publish_event(revealed)
        # forgotten only once stored: a publish that failed (the bus away past the handler's
        # patience) leaves the request to be redelivered, and the commitment to answer it
        self.committed.pop(message.task_id, None)
        if self.unrevealed:
            self.unrevealed.drop(message.task_id)
        self.metrics.tasks.labels("revealed").inc()
        return None

    async def probe(self, request: ProbeRequest) -> None:
        """Run the probe's tiny task (after any task in progress) and answer it."""
        started = time.perf_counter()
        phash, error = "", ""
        try:
            images = await asyncio.to_thread(self.runner.run, canonical(request.spec))
            phash = images[0].phash
        except StippleError as exc:
            error = exc.code
        except Exception as exc:  # the answer says the pipeline is broken; the node stays up
            log.exception("probe_crashed")
            error = "out_of_memory" if "out of memory" in str(exc).lower() else "internal"
        answer = NodeProbed(
            node_id=self.node_id,
            probe_id=request.probe_id,
            elapsed_s=time.perf_counter() - started,
            phash=phash,
            error=error,
        )
        try:
            await bus.publish_event(self.js, answer)
            log.info("probe_answered", probe_id=request.probe_id, error=error, elapsed_s=round(answer.elapsed_s, 3))
        except (nats.errors.Error, TimeoutError) as exc:  # unanswered: the validator sends another probe
            log.warning("probe_not_answered", probe_id=request.probe_id, error=str(exc))
        finally:
            self.probing.pop(request.probe_id, None)

    async def _generate(self, work: Assignment) -> list[GeneratedImage]:
        """Run the task in a worker thread (the runner validates it again: a node trusts nobody),
        after reading the input images the gateway stored apart (inputs.py: typed errors)."""
        spec = await resolve_inputs(self.nc, self.node_id, work.task_id, canonical(work.spec))
        report = self._progress_callback(asyncio.get_running_loop(), work.task_id)
        cancelled = lambda: work.task_id in self.cancelled  # noqa: E731 (polled by a download's watchdog)
        return await asyncio.to_thread(self.runner.run, spec, report, cancelled)

    async def _fail(self, work: Assignment, code: str, message: str) -> None:
        # (the network refuses a longer message as undecodable, a strike against this node)
        code, message = shorten(code, MAX_ERROR_CODE), error_message(message)
        event = NodeErrored(task_id=work.task_id, node_id=self.node_id, code=code, message=message)
        await self._publish_event(event)
        self.metrics.tasks.labels(code).inc()
        log.warning("task_failed", code=code, error=message)


async def run(settings: NodeSettings) -> None:
    setup_logging("node-agent", level=settings.log_level, fmt=settings.log_format)
    configure_determinism(settings.torch_threads)
    cache = Path(settings.model_cache).expanduser() if settings.model_cache else Path.home() / ".cache/stipple/models"
    models = parse_models(settings.models, cache)
    key = load_or_create_key(Path(settings.key_file).expanduser() if settings.key_file else cache / "node.key")
    account = commitment.account_from_key(key)
    node_id = check_node_id(settings, account.address)
    downloads = DownloadReporter()
    budget = int(settings.disk_budget_gb * 1024**3) or None
    sources = load_policy({SOURCES_ENV: settings.model_sources})
    with ModelStore(
        cache / "store",
        budget_bytes=budget,
        hf_offline=settings.hf_offline,
        progress=downloads,
        sources=sources,
        download_timeout_s=settings.download_timeout_s,
        max_download_bytes=int(settings.download_max_gb * 1024**3) or None,
    ) as store:
        runner = PipelineRunner(
            models,
            store=store,
            device=settings.device,
            cache_size=settings.pipeline_cache,
            safety_checker=Path(settings.safety_checker) if settings.safety_checker else None,
            annotator_weights=parse_weights(settings.annotator_weights),
        )
        for name in runner.model_names:
            runner.load(name)  # load before announcing: a live node is a ready node
        log.info("node_identity", node_id=node_id)
        stop = asyncio.Event()
        install_stop_signals(stop)
        freeze_startup_heap()

        agent: NodeAgent | None = None  # one across connections: its committed results wait for their reveals
        unrevealed = UnrevealedStore(cache / "unrevealed" / node_id)  # and across restarts

        async def work(ctx: ServiceContext) -> None:
            nonlocal agent
            downloads.attach(ctx, asyncio.get_running_loop(), node_id)
            agent = agent or make_agent(ctx, settings, runner, store, key, unrevealed=unrevealed)
            await serve(ctx, settings, runner, store, key, agent=agent)

        await keep_joined(settings, account, work, stop=stop)


async def keep_joined(
    settings: NodeSettings,
    account: LocalAccount,
    work: Callable[[ServiceContext], Awaitable[None]],
    *,
    stop: asyncio.Event,
    rejoin_pause_s: float = 1.0,
    metrics: Metrics | None = None,
) -> None:
    """Join the network and run `work` until `stop` is set. When the network closes the
    connection for good, join again (the client reconnects by itself after a disconnect,
    but not after the server closed it for an expired identity: see the gatekeeper's
    STIPPLE_NODE_IDENTITY_TTL_S). `work` gets each new connection; the metrics (one
    registry for every connection) and whatever `work` keeps outlive it."""
    metrics = metrics or Metrics("node-agent")
    while not stop.is_set():
        session = asyncio.Event()  # this connection's: set by `stop`, or when the connection is gone
        watchers: list[asyncio.Task[None]] = [asyncio.create_task(_set_when_set(stop, session))]
        try:
            async with join_network(settings, account, stop=session, metrics=metrics) as ctx:
                watchers.append(asyncio.create_task(_set_when_closed(ctx.nc, session)))
                await work(ctx)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
            log.warning("node_connection_lost", error=repr(exc))
        finally:
            for watcher in watchers:
                watcher.cancel()
        if not stop.is_set():
            log.warning("node_rejoining", node_id=node_id_of(account.address), reason="the connection was closed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rejoin_pause_s)


async def _set_when_set(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _set_when_closed(nc: NATS, target: asyncio.Event, every_s: float = 1.0) -> None:
    while not nc.is_closed:  # nats-py has no event for it outside its own callbacks
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(target.wait(), every_s)
        if target.is_set():
            return
    target.set()


@contextlib.asynccontextmanager
async def join_network(
    settings: NodeSettings,
    account: LocalAccount,
    *,
    stop: asyncio.Event | None = None,
    name: str = "node-agent",
    metrics: Metrics | None = None,
) -> AsyncIterator[ServiceContext]:
    """Connect as the node of `account` and make sure the network admits it as a node:
    asks the gatekeeper (``rpc.join.<id>``) how it was admitted; an applicant without
    (enough) stake stakes through the chain relay when STIPPLE_CHAIN is on, waits until
    the gatekeeper sees the stake, and connects again. Raises NotAdmitted, saying why,
    when it cannot become a node. On a NATS without authentication (no gatekeeper
    answers) it goes on as it is."""
    node_id = node_id_of(account.address)
    staked = False
    while True:  # at most twice: as an applicant that stakes, then as a node
        async with open_service(name, settings, identity=account, stop=stop, metrics=metrics) as ctx:
            status = await join_status(ctx.nc, node_id)
            if status is None or status.level == "node":
                if settings.chain and not staked:  # tops the stake up to STIPPLE_STAKE if asked
                    await ensure_stake(ctx.nc, node_id, account, settings.stake, wait_s=settings.chain_wait_s)
                yield ctx
                return
            if not settings.chain or staked or status.reason not in ("no_stake", "below_minimum"):
                raise NotAdmitted(
                    f"the network admits {node_id} only as an applicant: {status.reason}: {status.detail}"
                )
            log.info("staking_to_join", node_id=node_id, reason=status.reason, detail=status.detail)
            await ensure_stake(ctx.nc, node_id, account, settings.stake, wait_s=settings.chain_wait_s)
            staked = True
            await wait_admitted(ctx.nc, node_id, settings.chain_wait_s)
        # connect again: the gatekeeper admits the key as a node now


def check_node_id(settings: NodeSettings, address: str) -> str:
    """The node's id is its key's address; STIPPLE_NODE_ID, if set, must be that address."""
    node_id = node_id_of(address)
    if settings.node_id and settings.node_id.lower() != node_id:
        raise InvalidSettings(
            f"STIPPLE_NODE_ID={settings.node_id!r}: a node's id is its key's address, {node_id} "
            f"(the key in STIPPLE_KEY_FILE); leave STIPPLE_NODE_ID empty or set it to that"
        )
    return node_id


async def join_status(nc: NATS, node_id: str, timeout: float = 5.0) -> JoinStatus | None:
    """How the gatekeeper admitted this key (None: no gatekeeper answers, a network whose
    NATS has no authentication)."""
    try:
        msg = await nc.request(subjects.join_rpc_subject(node_id), b"", timeout=timeout)
    except nats.errors.NoRespondersError:
        return None
    except nats.errors.TimeoutError:
        log.warning("join_status_unanswered", node_id=node_id)
        return None
    return join_status_decoder.decode(msg.data)


async def wait_admitted(nc: NATS, node_id: str, wait_s: float) -> None:
    """Wait until the gatekeeper would admit this key as a node (its stake indexed)."""
    deadline = time.monotonic() + wait_s
    status = None
    while time.monotonic() < deadline:
        status = await join_status(nc, node_id)
        if status is None or status.level == "node":
            return
        await asyncio.sleep(0.5)
    detail = f"{status.reason}: {status.detail}" if status else "no answer"
    raise NotAdmitted(f"staked, yet not admitted as a node within {wait_s:g} s ({detail})")


class DownloadReporter:
    """Model-download progress from the store's thread to NATS (core, lossy by design)."""

    def __init__(self) -> None:
        self._target: tuple[ServiceContext, asyncio.AbstractEventLoop, str] | None = None

    def attach(self, ctx: ServiceContext, loop: asyncio.AbstractEventLoop, node_id: str) -> None:
        self._target = (ctx, loop, node_id)

    def __call__(self, event: ProgressEvent) -> None:
        if self._target is None:
            return
        ctx, loop, node_id = self._target
        message = DownloadProgress(
            node_id=node_id,
            ref=event.ref,
            downloaded_bytes=event.downloaded_bytes,
            total_bytes=event.total_bytes,
            done=event.done,
        )
        subject = subjects.download_subject(node_id)
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(ctx.nc.publish(subject, encode(message))))


def make_agent(
    ctx: ServiceContext,
    settings: NodeSettings,
    runner: PipelineRunner,
    store: ModelStore | None = None,
    key: str | None = None,
    agent_type: type[NodeAgent] | None = None,
    uploads: Uploads | None = None,
    unrevealed: UnrevealedStore | None = None,
) -> NodeAgent:
    """The node (of `agent_type`, a NodeAgent subclass in tests) on `ctx`'s connection. Its
    metrics are those of `ctx.metrics`' registry: the same collectors for every agent built
    on it (`NodeMetrics.of`)."""
    owned = (getattr(part, "metrics", None) for part in (runner, store))  # made before the registry (metrics.py)
    parts = [m for m in owned if isinstance(m, RunnerMetrics | StoreMetrics)]
    return (agent_type or NodeAgent)(
        nc=ctx.nc,
        js=ctx.js,
        runner=runner,
        settings=settings,
        metrics=NodeMetrics.of(ctx.metrics, settings.device, parts=parts),
        store=store,
        key=key,
        uploads=uploads,
        unrevealed=unrevealed,
    )


async def serve(
    ctx: ServiceContext,
    settings: NodeSettings,
    runner: PipelineRunner,
    store: ModelStore | None = None,
    key: str | None = None,
    agent_type: type[NodeAgent] | None = None,
    uploads: Uploads | None = None,
    agent: NodeAgent | None = None,
) -> NodeAgent:
    """Run a node until `ctx.stop`; `key` is its Ethereum private key (None: a new one),
    and its address is the node's id. `agent_type` lets tests run a NodeAgent subclass
    with one behaviour changed; `uploads` replaces the blob intake (tests of a node alone).
    `agent`: the node of an earlier connection, whose commitments still wait for their
    reveals, on this connection now. Returns the agent."""
    if agent is None:
        agent = make_agent(ctx, settings, runner, store, key, agent_type, uploads)
    elif agent.nc is not ctx.nc:
        agent.rebind(ctx.nc, ctx.js)
    node_id = agent.node_id
    check_node_id(settings, agent.account.address)
    joined = agent.announcement()
    await bus.publish_event(ctx.js, joined)
    log.info("node_joined", node_id=node_id, models=joined.models, device=joined.device)
    beats = asyncio.create_task(agent.heartbeat(ctx.stop))
    # neither idle heartbeats nor lag polls on a node's two consumers: thousands of nodes
    # would each cost the bus a message a second and a consumer-info request every few
    # seconds; a lost pull request is noticed by its silence, the lag read off deliveries
    control = asyncio.create_task(
        ctx.consume(
            subjects.WORK_STREAM,
            subjects.node_control_consumer(node_id),
            agent.handle_control,
            create=False,
            heartbeat_s=None,
            poll_lag=False,
        )
    )
    try:
        await ctx.consume(
            subjects.WORK_STREAM,
            subjects.node_work_consumer(node_id),
            agent.handle,
            batch=1,
            create=False,
            heartbeat_s=None,
            poll_lag=False,
        )
    finally:
        ctx.stop.set()
        await beats
        await control
        quit_event = NodeQuit(node_id=node_id, at=time.time())
        try:
            await bus.publish_event(ctx.js, quit_event)
            log.info("node_quit", node_id=node_id)
        except Exception as exc:  # the TTL retires the node anyway
            log.warning("node_quit_not_announced", node_id=node_id, error=str(exc))
    return agent
