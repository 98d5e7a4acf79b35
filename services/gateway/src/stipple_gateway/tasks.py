"""The task service: what the gateway does with tasks, behind its HTTP layer (app.py).

It knows NATS, JetStream and the blob store, and the task aggregate: it submits tasks
(capacity check, fee reservation, publish), folds a task from its stored events, builds
its views, serves checked image bytes, asks the dispatcher for a pending task's place in
the queue, waits for outcomes, cancels, lists nodes, and runs the gateway's background
work (step progress, end-to-end latency, webhook delivery). It knows no web framework:
refusals are `ApiError` (a status and a stable code), which the HTTP layer renders.

A task whose id derives from an Idempotency-Key is looked up before it is published: a
retry gets the stored task however long after (JetStream's duplicate window is two
minutes), and a retry with another body is 409 (`request_digest`, kept in a header of the
stored `submitted`). Rate limits are shared by every gateway through NATS KV (limits.py).

What it keeps in memory (step progress, the tasks it is timing, rate-limit leases) is a
cache of this gateway's own, so any number of gateways can serve the same network.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from stipple_common import bus, subjects, tracing
from stipple_common.aggregate import Task, replay
from stipple_common.blobstore import BlobNotFound, BlobStore
from stipple_common.errors import InvalidInput, Rejected
from stipple_common.messages import (
    OUTCOME_EVENTS,
    ImageResult,
    QueueStatus,
    TaskCancelled,
    TaskSubmitted,
    Validation,
    decode_task_event,
    event_name,
    queue_status_decoder,
)
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_common.sources import check_task_sources
from stipple_common.taskspec import SEED_MAX, TaskSpec, resolve_seed

from .auth import ClientLimits, KeyRing, parse_api_keys, parse_trusted_proxies
from .errors import ApiError
from .events import (
    OUTCOME_CONFIRM_PAUSE_S,
    OUTCOME_CONFIRM_TRIES,
    StoredEvent,
    StreamSlots,
    TaskEventStream,
    read_task_events,
)
from .inputs import InputStore
from .limits import LimitMetrics, SharedLimits
from .metrics import GatewayMetrics
from .network import NetworkFold
from .payment import CustodialWallet
from .progress import ProgressBoard
from .settings import GatewaySettings
from .taskids import network_secret, new_task_id, parse_secret
from .views import Health, NodeInfo, NodesView, TaskView, task_view
from .webhooks import Webhooks

__all__ = ["MAX_TIMED_TASKS", "TASK_ID", "Finished", "Loaded", "StoredImage", "TaskService"]

log = structlog.get_logger("stipple.gateway")

TASK_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_TIMED_TASKS = 100_000  # accepted tasks whose outcome the gateway waits for, to time them (oldest dropped)
DIGEST_HEADER = "Stipple-Request-Digest"  # on a `submitted` whose id derives from an Idempotency-Key
_canonical = msgspec.json.Encoder(order="deterministic")


def request_digest(spec: TaskSpec, source: str, owner: str, webhook_url: str, fee: int, validation: Validation) -> str:
    """SHA-256 of the request as the gateway understood it (the parsed spec, seed -1 not yet
    drawn, and what else the task carries), in a canonical encoding: the same request
    however its JSON was spelled (key order, spacing, 7 or 7.0), and a different one for
    any other body or route."""
    return hashlib.sha256(_canonical.encode((source, owner, webhook_url, fee, validation, spec))).hexdigest()


@dataclass
class Loaded:
    """A task as folded from the stream, with when its outcome was stored."""

    task: Task
    finished_at: float | None


@dataclass
class StoredImage:
    """An accepted image's checked PNG, and how long it is kept still (None: for good)."""

    png: bytes
    seconds_left: float | None


@dataclass
class Finished:
    """A task that succeeded, with its images' checked PNGs in order."""

    task: Task
    pngs: list[bytes]


@dataclass
class Submission:
    """A submitted task, and whether an earlier request (same Idempotency-Key) stored it."""

    event: TaskSubmitted
    existing: bool


class TaskService:
    """The gateway's dependencies and what it does with tasks.

    `owner` arguments are the API key id a request came with ("" with keys off): with
    keys on, a task is visible to the key that submitted it only. `clock` is the wall
    clock of result expiry (tests move it). `gateway_metrics` is the gateway's collectors
    (built from `metrics.registry` when not given). Call `start` before serving and `stop`
    at the end; `fatal` is set when a background worker gave up, and the process should
    then stop (its supervisor starts it afresh)."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        blobs: BlobStore,
        directory: NodeDirectory,
        settings: GatewaySettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        *,
        gateway_metrics: GatewayMetrics | None = None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.blobs = blobs
        self.directory = directory
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.keys = KeyRing(parse_api_keys(settings.api_keys))  # InvalidSettings at start when malformed
        self.progress = ProgressBoard(settings.progress_max_tasks)
        self.network = NetworkFold()  # recent tasks, QoS points, earnings and slashes for the web pages
        self.wallet = CustodialWallet(nc, js)
        self.inputs = InputStore(nc, js, blobs)  # input images too big for a NATS message
        self.closing = asyncio.Event()  # set when the gateway stops: ends the events streams
        self.fatal = asyncio.Event()  # set when a background worker gave up: the service stops
        self._subs: list[Subscription] = []
        self._workers: list[asyncio.Task[None]] = []
        if gateway_metrics is None:
            gateway_metrics = GatewayMetrics(metrics.registry, webhooks=bool(settings.webhook_secret))
        self.gateway_metrics = gateway_metrics
        # open events streams, per gateway and per caller; callers without a key, per client IP (auth.py)
        self.sse_slots = StreamSlots(settings.max_sse_streams, settings.max_sse_per_client, gateway_metrics)
        self.limits: SharedLimits | None = None  # API keys' and client IPs' buckets, shared by every gateway
        if settings.shared_limits:
            self.limits = SharedLimits(
                nc,
                bucket=settings.limits_bucket,
                replicas=settings.stream_replicas,
                metrics=LimitMetrics(gateway_metrics.registry),
            )
        self.keys.shared = self.limits
        self.anon = ClientLimits(
            settings.anon_rate_per_minute, settings.anon_burst, gateway_metrics=gateway_metrics, shared=self.limits
        )
        self.trusted_proxies = parse_trusted_proxies(settings.trusted_proxies)  # InvalidSettings at start
        # the secret Idempotency-Keys become task ids under (taskids.py): the operator's, or
        # the network's from KV at `start`
        self._task_id_secret = parse_secret(settings.task_id_secret)
        self.webhooks: Webhooks | None = None
        if settings.webhook_secret:
            self.webhooks = Webhooks(
                js,
                self._webhook_view,
                secret=settings.webhook_secret,
                timeout_s=settings.webhook_timeout_s,
                max_attempts=settings.webhook_max_attempts,
                backoff_s=settings.webhook_backoff_s,
                backoff_max_s=settings.webhook_backoff_max_s,
                gateway_metrics=gateway_metrics,
                previous_secret=settings.webhook_secret_previous,
                allow_private=settings.webhook_allow_private,
            )
        self._accepted: OrderedDict[str, float] = OrderedDict()  # task -> submitted_at, until its outcome

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Take the network's task-id secret, follow step progress, and deliver webhooks
        when a secret is set."""
        if self._task_id_secret is None:
            self._task_id_secret = await network_secret(self.js, self.settings.stream_replicas)
        if self.limits is not None:
            await self.limits.open()  # when it cannot, logged: each gateway's own buckets decide meanwhile
        self._subs = await self.progress.follow(self.nc)
        self._subs += await self.network.follow(self.nc, self.js)
        self._subs += await self.inputs.serve()  # nodes read the large inputs this gateway stored
        for outcome in OUTCOME_EVENTS:  # end-to-end latency (core NATS: a lost one is one lost sample)
            self._subs.append(await self.nc.subscribe(subjects.all_tasks(outcome), cb=self._on_outcome))
        if self.webhooks is not None:
            run = self.webhooks.run(self.closing, concurrency=self.settings.webhook_concurrency, metrics=self.metrics)
            worker = asyncio.create_task(run, name="webhooks")
            worker.add_done_callback(self._worker_ended)
            self._workers.append(worker)

    def new_task_id(self, idempotency_key: str | None, owner: str = "") -> str:
        """The id of a task submitted now: random, or derived from the Idempotency-Key (and
        the API key id) under the network's secret, the same at every gateway (taskids.py)."""
        if self._task_id_secret is None:
            raise RuntimeError("TaskService.start() takes the task-id secret first")
        return new_task_id(idempotency_key, owner, self._task_id_secret)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """A background consumer that gave up (bus.supervise) ends the gateway, as any
        other service's would: its supervisor starts it afresh."""
        if not task.cancelled() and task.exception() is not None and not self.closing.is_set():
            log.error("gateway_worker_gave_up", worker=task.get_name(), error=repr(task.exception()))
            self.fatal.set()

    async def stop(self) -> None:
        self.closing.set()
        if self._workers:
            _done, pending = await asyncio.wait(self._workers, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribe_failed", error=str(exc))
        self._subs = []
        await self.inputs.stop()

    @property
    def webhooks_enabled(self) -> bool:
        return self.webhooks is not None

    # ------------------------------------------------------------------ submitting

    def model_names(self) -> set[str]:
        """Every model a registered node serves or holds on disk (its LoRAs are not models)."""
        names: set[str] = set()
        for entry in self.directory.entries.values():
            loras = set(entry.joined.loras_on_disk)
            names.update(m for m in (*entry.joined.models, *entry.joined.models_on_disk) if m not in loras)
        return names

    def check_capacity(self, spec: TaskSpec, model_field: str = "base_model") -> None:
        """Refuse at once what the network cannot run now (never queue it forever); an
        unknown model is named as the app's API names it (`model_field`)."""
        known = self.model_names()
        if spec.model_name not in known:
            available = ", ".join(sorted(known)) or "none (no node has registered)"
            raise ApiError(
                422 if known else 503,
                "unknown_model" if known else "no_nodes",
                f"{model_field}: no node serves {spec.model_name!r}; available models: {available}",
                field=model_field,
                value=spec.model_name,
            )
        live = [n for n in self.directory.live() if n.serves(spec.model_name)]
        operators = {self.directory.operator(n.node_id) for n in live}
        need = self.settings.replication
        if len(operators) < need:
            raise ApiError(
                503,
                "no_nodes",
                f"not enough live nodes for {spec.model_name!r}: {len(live)} live nodes of {len(operators)} "
                f"operators, a task needs {need} of distinct operators; try again later",
            )

    async def submit(
        self,
        spec: TaskSpec,
        source: str,
        task_id: str,
        *,
        owner: str = "",
        webhook_url: str = "",
        fee: int = 0,
        validation: Validation = "sampled",
        model_field: str = "base_model",
        idempotent: bool = False,
    ) -> TaskSubmitted:
        """Accept a task: capacity, then the fee reserved (402 when the deposit cannot pay),
        then ``tasks.<id>.submitted`` published (deduplicated by the task id). A `full`
        validation runs on `replication` nodes always, and pays `fee` for each.

        `idempotent`: `task_id` derives from the request's Idempotency-Key; a task stored
        under it already is returned as it is (nothing checked, charged or published), or
        refused with 409 when it was submitted with another request."""
        submission = await self._submit(
            spec,
            source,
            task_id,
            owner=owner,
            webhook_url=webhook_url,
            fee=fee,
            validation=validation,
            model_field=model_field,
            idempotent=idempotent,
        )
        return submission.event

    async def _submit(
        self,
        spec: TaskSpec,
        source: str,
        task_id: str,
        *,
        owner: str = "",
        webhook_url: str = "",
        fee: int = 0,
        validation: Validation = "sampled",
        model_field: str = "base_model",
        idempotent: bool = False,
    ) -> Submission:
        tracing.bind_task(task_id)  # the request's span and log lines are about this task
        digest = ""
        if idempotent:
            digest = request_digest(spec, source, owner, webhook_url, fee, validation)
            stored = await self.stored_submission(task_id, digest)
            if stored is not None:
                return Submission(stored, existing=True)
        try:  # the operator's model-source policy (STIPPLE_MODEL_SOURCES), which nodes apply again
            check_task_sources(spec)
        except InvalidInput as exc:
            raise ApiError.invalid(exc) from None
        self.check_capacity(spec, model_field)
        if validation == "full":
            fee *= self.settings.replication
        spec = await self.inputs.fit(spec)  # large input images into the blob store (413 when still too big)
        await self.wallet.charge(task_id, fee)  # 402 when the deposit cannot pay
        event = TaskSubmitted(
            task_id=task_id,
            spec=resolve_seed(spec, secrets.randbelow(SEED_MAX + 1)),
            submitted_at=time.time(),
            source=source,
            owner=owner,
            webhook_url=webhook_url,
            fee=fee,
            validation=validation,
        )
        await bus.publish_event(self.js, event, headers={DIGEST_HEADER: digest} if digest else None)
        self.gateway_metrics.submitted.labels(source).inc()
        self._accepted[task_id] = event.submitted_at
        while len(self._accepted) > MAX_TIMED_TASKS:
            self._accepted.popitem(last=False)
        log.info("task_submitted", task_id=task_id, source=source, model=spec.model_name, owner=owner)
        return Submission(event, existing=False)

    async def stored_submission(self, task_id: str, digest: str) -> TaskSubmitted | None:
        """The task's stored `submitted` (by Direct Get of its subject), None when there is
        none; 409 `idempotency_conflict` when it was submitted with a request whose digest is
        not `digest` (one stored before digests were kept is taken as the same request)."""
        stored = await bus.read_stored(self.js, subjects.TASKS_STREAM, subjects.task_subject(task_id, "submitted"))
        for message in stored:  # the first one is the task (the fold ignores any later one)
            try:
                event = decode_task_event(message.subject, message.data)
            except Rejected as exc:
                log.warning("task_event_rejected", reason=exc.reason, sender=exc.sender, error=exc.message)
                continue
            if not isinstance(event, TaskSubmitted):
                continue
            if message.headers.get(DIGEST_HEADER, digest) != digest:
                raise ApiError(
                    409,
                    "idempotency_conflict",
                    f"Idempotency-Key: this key was used for task {task_id} with a different request (the body "
                    "differs, or it went to another route); retry with the same body to get that task, or use a "
                    "new Idempotency-Key for a new task",
                    field="Idempotency-Key",
                    extra={"task_id": task_id},
                )
            log.info("task_resubmitted", task_id=task_id, source=event.source, owner=event.owner)
            return event
        return None

    async def _on_outcome(self, msg: Msg) -> None:
        """Observe the end-to-end latency of a task this gateway accepted."""
        task_id, outcome = subjects.subject_token(msg.subject, 1), subjects.subject_token(msg.subject, 2)
        submitted_at = self._accepted.pop(task_id, None)
        if submitted_at is not None:
            self.gateway_metrics.task_seconds.labels(outcome).observe(max(0.0, time.time() - submitted_at))

    async def wait_for_outcome(self, task_id: str, owner: str, submit: Callable[[], Awaitable[object]]) -> Task:
        """Submit while subscribed to the task's outcome subjects, so it cannot be missed."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def on_outcome(msg: Msg) -> None:
            if not done.done():
                done.set_result(msg.subject)

        subs = [await self.nc.subscribe(subjects.task_subject(task_id, e), cb=on_outcome) for e in OUTCOME_EVENTS]
        try:
            submitted = await submit()
            existing = isinstance(submitted, Submission) and submitted.existing
            # an earlier request's task (Idempotency-Key): its outcome may be long stored
            if existing and not done.done() and (await self.load_task(task_id, owner)).task.finished:
                done.set_result("stored")
            try:
                # shielded: a timeout must leave `done` pending (not cancelled, which is "done": woken)
                await asyncio.wait_for(asyncio.shield(done), self.settings.sync_timeout_s)
            except TimeoutError:
                pass
        finally:
            for sub in subs:
                await sub.unsubscribe()
        task = (await self.load_task(task_id, owner)).task  # the stream is the truth, the core message a wake-up
        for _ in range(OUTCOME_CONFIRM_TRIES):  # woken by an outcome the stream may not hold yet
            if task.finished or not done.done():
                break
            await asyncio.sleep(OUTCOME_CONFIRM_PAUSE_S)
            task = (await self.load_task(task_id, owner)).task
        if not task.finished:
            raise ApiError(
                504,
                "timeout",
                f"task {task_id} did not finish within {self.settings.sync_timeout_s:g} s (state {task.status}); "
                f"it goes on: poll GET /v1/tasks/{task_id}",
            )
        return task

    async def submit_and_wait(
        self,
        spec: TaskSpec,
        source: str,
        task_id: str,
        *,
        owner: str = "",
        model_field: str = "base_model",
        idempotent: bool = False,
    ) -> Finished:
        """Submit, wait for the outcome (504 after `sync_timeout_s`), and read the images;
        a task that did not succeed is 502 with its reason as the code. `idempotent`: as
        `submit` (a retry of a finished task answers at once)."""
        task = await self.wait_for_outcome(
            task_id,
            owner,
            lambda: self._submit(spec, source, task_id, owner=owner, model_field=model_field, idempotent=idempotent),
        )
        if task.status != "succeeded":
            detail = f"task {task_id} was {task.status}: {task.reason} {task.detail}".strip()
            raise ApiError(502, task.reason or task.status, detail)
        pngs = await asyncio.gather(*(self.image_bytes(task, image) for image in task.images))
        return Finished(task, list(pngs))

    # ------------------------------------------------------------------ reading

    def check_task_id(self, task_id: str) -> None:
        if not TASK_ID.match(task_id):
            raise ApiError(404, "not_found", f"no task with id {task_id!r} (ids are 32 hex digits)")

    def fold(self, task_id: str, stored: list[StoredEvent], owner: str) -> Loaded:
        """The task from its stored events; 404 when there is none, or (with API keys on)
        when another key submitted it: the answer does not tell the two apart."""
        task, _rejected = replay(s.event for s in stored)
        if task is None or (self.keys.enabled and task.owner != owner):
            raise ApiError(404, "not_found", f"no task with id {task_id!r}")
        outcomes = [s.stored_at for s in stored if event_name(s.event) in OUTCOME_EVENTS]
        return Loaded(task, outcomes[0] if task.finished and outcomes else None)

    async def load_task(self, task_id: str, owner: str = "") -> Loaded:
        self.check_task_id(task_id)
        return self.fold(task_id, await read_task_events(self.js, task_id), owner)

    def view(self, loaded: Loaded, queue: QueueStatus | None = None) -> TaskView:
        return task_view(
            loaded.task,
            progress=self.progress.of(loaded.task.task_id, loaded.task.nodes),
            etas=self.progress.etas(loaded.task.task_id, loaded.task.nodes),
            finished_at=loaded.finished_at,
            result_ttl_s=self.settings.result_ttl_s,
            queue=queue,
        )

    async def get_task_view(self, task_id: str, owner: str = "") -> TaskView:
        """The task as an app sees it, with its place in the queue while pending."""
        loaded = await self.load_task(task_id, owner)
        return self.view(loaded, await self.queue_status(loaded.task))

    async def queue_status(self, task: Task) -> QueueStatus | None:
        """A pending task's place in the dispatcher's queue (None when nobody answers fast)."""
        if task.status != "pending":
            return None
        try:
            reply = await self.nc.request(subjects.QUEUE_STATUS, task.task_id.encode(), timeout=0.25)
            status = queue_status_decoder.decode(reply.data)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            log.info("queue_status_unavailable", task_id=task.task_id, error=type(exc).__name__)
            return None
        return status if status.queued else None

    async def open_events(
        self, task_id: str, owner: str = "", client: str = ""
    ) -> tuple[TaskEventStream, list[StoredEvent]]:
        """A live stream of the task's events, subscribed before its stored events were
        read (returned with it); 404 as `load_task`, 429 past the caps on open streams
        (`client`: the caller they count, its API key or IP). The caller closes the stream."""
        self.check_task_id(task_id)
        stream = TaskEventStream(
            self.nc,
            self.js,
            task_id,
            keepalive_s=self.settings.sse_keepalive_s,
            closing=self.closing,
            max_s=self.settings.sse_max_s,
            slots=self.sse_slots,
            client=client or (f"key {owner}" if owner else "anonymous"),
        )
        stored = await stream.open()
        try:
            self.fold(task_id, stored, owner)
        except BaseException:
            await stream.close()
            raise
        return stream, stored

    async def image(self, task_id: str, index: int, owner: str = "") -> StoredImage:
        """Image `index` of a succeeded task: 409 before it succeeded, 404 out of range,
        410 once expired (`result_ttl_s` after the outcome) or gone from the store."""
        loaded = await self.load_task(task_id, owner)
        task = loaded.task
        if task.status != "succeeded":
            raise ApiError(409, "not_ready", f"task {task.task_id} is {task.status}; images exist once it succeeded")
        if not 0 <= index < len(task.images):
            raise ApiError(404, "not_found", f"image index {index} out of range; the task has {len(task.images)}")
        ttl = self.settings.result_ttl_s
        left: float | None = None
        if ttl > 0 and loaded.finished_at is not None:
            expires_at = loaded.finished_at + ttl
            left = expires_at - self.clock()
            if left <= 0:
                when = datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds")
                raise ApiError(
                    410,
                    "expired",
                    f"image {index} of task {task.task_id} expired at {when} (results are kept {ttl:g} s)",
                )
        return StoredImage(await self.image_bytes(task, task.images[index]), left)

    async def image_bytes(self, task: Task, image: ImageResult) -> bytes:
        """An accepted image's PNG, only if it is the one the validator checked: the bytes
        read from the blob store must hash to the outcome's SHA-256 (when it has one; older
        outcomes do not). Otherwise 502 `image_integrity`, logged, and nothing served."""
        try:
            png = await self.blobs.get(image.key)
        except BlobNotFound:
            raise ApiError(410, "expired", f"image {image.index} of task {task.task_id} is no longer stored") from None
        if image.sha256:
            digest = (await asyncio.to_thread(hashlib.sha256, png)).hexdigest()
            if digest != image.sha256:
                self.gateway_metrics.integrity_failures.inc()
                log.error(
                    "image_integrity_failed",
                    task_id=task.task_id,
                    index=image.index,
                    key=image.key,
                    expected=image.sha256,
                    got=digest,
                    size=len(png),
                )
                raise ApiError(
                    502,
                    "image_integrity",
                    f"image {image.index} of task {task.task_id}: the stored bytes are not the validated image "
                    "(SHA-256 mismatch); it is not served",
                )
        return png

    async def _webhook_view(self, task_id: str) -> TaskView | None:
        stored = await read_task_events(self.js, task_id)
        task, _rejected = replay(s.event for s in stored)
        if task is None:
            return None
        return self.view(self.fold(task_id, stored, task.owner))

    # ------------------------------------------------------------------ cancelling

    def _finished_error(self, task: Task) -> ApiError:
        outcome = f"{task.reason}: {task.detail}" if task.detail else task.reason
        return ApiError(
            409,
            "already_finished",
            f"task {task.task_id} already finished: status {task.status}, outcome {outcome}; "
            "it can no longer be cancelled",
            extra={"status": task.status, "reason": task.reason},
        )

    async def cancel(self, task_id: str, owner: str = "") -> TaskView:
        """Cancel a task not finished yet; 409 when it finished first (also when its
        outcome was stored between our read and our publish: the first outcome wins)."""
        loaded = await self.load_task(task_id, owner)
        if loaded.task.finished:
            raise self._finished_error(loaded.task)
        detail = f"cancelled by the app (API key {owner})" if owner else "cancelled by the app"
        event = TaskCancelled(task_id=task_id, detail=detail)
        await bus.publish_event(self.js, event)
        loaded = await self.load_task(task_id, owner)  # the first outcome stored wins: was it ours?
        for _ in range(OUTCOME_CONFIRM_TRIES):  # a stream replica a moment behind may answer the read
            if loaded.task.finished:
                break
            await asyncio.sleep(OUTCOME_CONFIRM_PAUSE_S)
            loaded = await self.load_task(task_id, owner)
        if loaded.task.status != "cancelled":
            raise self._finished_error(loaded.task)
        self.gateway_metrics.cancelled.inc()
        log.info("task_cancelled", task_id=task_id, owner=owner)
        return self.view(loaded)

    # ------------------------------------------------------------------ the network

    def nodes(self) -> NodesView:
        """The nodes this gateway's directory knows, live or not."""
        now = time.time()
        live = {n.node_id for n in self.directory.live(now)}
        nodes = [
            NodeInfo(
                node_id=e.joined.node_id,
                operator=self.directory.operator(e.joined.node_id),
                device=e.joined.device,
                models=e.joined.models,
                live=e.joined.node_id in live,
                last_seen_s_ago=round(now - e.last_seen, 3),
                address=e.joined.address,
                stake=self.directory.stake(e.joined.node_id),
            )
            for e in self.directory.entries.values()
        ]
        return NodesView(nodes=nodes, live=len(live))

    def health(self) -> Health:
        """``ok`` while connected to NATS (`nats` says which)."""
        connected = self.nc.is_connected
        return Health(
            status="ok" if connected else "unavailable", nats=connected, live_nodes=len(self.directory.live())
        )
