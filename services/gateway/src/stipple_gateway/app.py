"""HTTP routes. Handlers validate, publish events and read the task's fold; what they keep
in memory (step progress, rate-limit buckets) is a cache of this gateway's own, so any
number of gateways can serve the same network.

Errors: native routes answer ``{"error": {"code", "message", "field"?, "value"?}}``,
SDCN routes answer ``{"msg": "..."}``; bad input is 4xx and names the field and value.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from stipple_common import bus, subjects, tracing
from stipple_common.aggregate import Task, replay
from stipple_common.blobstore import BlobNotFound, BlobStore
from stipple_common.errors import InvalidInput, StippleError
from stipple_common.messages import (
    OUTCOME_EVENTS,
    ImageResult,
    QueueStatus,
    TaskCancelled,
    TaskSubmitted,
    event_name,
    queue_status_decoder,
)
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_common.settings import CommonSettings
from stipple_common.taskspec import SEED_MAX, TaskSpec, parse_task, resolve_seed

from . import openapi
from .auth import KeyRing, parse_api_keys
from .errors import ApiError
from .events import (
    OUTCOME_CONFIRM_PAUSE_S,
    OUTCOME_CONFIRM_TRIES,
    EventStreamResponse,
    StoredEvent,
    TaskEventStream,
    read_task_events,
)
from .payment import CustodialWallet
from .progress import ProgressBoard
from .sdcn import parse_sdcn_img2img, parse_sdcn_txt2img
from .views import (
    Health,
    NodeInfo,
    NodesView,
    SdcnResult,
    TaskAccepted,
    TaskLinks,
    TaskView,
    json_response,
    task_view,
)
from .webhooks import Webhooks, check_webhook_url

__all__ = ["ApiError", "Gateway", "GatewaySettings", "create_app", "new_task_id"]

log = structlog.get_logger("stipple.gateway")

TASK_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_TIMED_TASKS = 100_000  # accepted tasks whose outcome the gateway waits for, to time them (oldest dropped)


class GatewaySettings(CommonSettings, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 2_000_000
    sync_timeout_s: float = 120.0  # how long the synchronous SDCN endpoints wait for an outcome
    default_model: str = "tiny-sd"  # for SDCN requests that name no model
    # "" = keys off (anyone may call); "id:secret:rate_per_minute[:burst],..." or "@/path/to/file"
    api_keys: str = ""
    webhook_secret: str = ""  # HMAC-SHA256 key of X-Stipple-Signature; "" = webhooks off
    webhook_timeout_s: float = 10.0  # one POST
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 1.0  # the first retry's delay; it doubles up to webhook_backoff_max_s
    webhook_backoff_max_s: float = 300.0
    webhook_concurrency: int = 4  # POSTs in flight per gateway
    webhook_allow_private: bool = False  # accept webhook URLs on loopback / private addresses
    result_ttl_s: float = 7 * 24 * 3600.0  # images expire this long after the outcome; 0 = never
    sse_keepalive_s: float = 15.0  # comment line on an idle events stream
    progress_max_tasks: int = 10_000  # tasks whose step progress is kept in memory


@dataclass
class Loaded:
    """A task as folded from the stream, with when its outcome was stored."""

    task: Task
    finished_at: float | None


@dataclass
class Gateway:
    """The gateway's dependencies and its handlers."""

    nc: NATS
    js: JetStreamContext
    blobs: BlobStore
    directory: NodeDirectory
    settings: GatewaySettings
    metrics: Metrics
    clock: Callable[[], float] = field(default=time.time)  # wall clock, for result expiry

    def __post_init__(self) -> None:
        self.keys = KeyRing(parse_api_keys(self.settings.api_keys))  # InvalidSettings at start when malformed
        self.progress = ProgressBoard(self.settings.progress_max_tasks)
        self.wallet = CustodialWallet(self.nc, self.js)
        self.closing = asyncio.Event()  # set when the gateway stops: ends the events streams
        self.fatal = asyncio.Event()  # set when a background worker gave up: the service stops
        self._subs: list[Any] = []
        self._workers: list[asyncio.Task[None]] = []
        self.webhooks: Webhooks | None = None
        if self.settings.webhook_secret:
            self.webhooks = Webhooks(
                self.js,
                self._webhook_view,
                secret=self.settings.webhook_secret,
                timeout_s=self.settings.webhook_timeout_s,
                max_attempts=self.settings.webhook_max_attempts,
                backoff_s=self.settings.webhook_backoff_s,
                backoff_max_s=self.settings.webhook_backoff_max_s,
                registry=self.metrics.registry,
            )
        self.requests = Counter(
            "stipple_gateway_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.metrics.registry,
        )
        self.request_seconds = Histogram(
            "stipple_gateway_request_seconds",
            "HTTP request time by route",
            ["route"],
            registry=self.metrics.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.submitted = Counter(
            "stipple_gateway_tasks_submitted_total", "Tasks accepted", ["source"], registry=self.metrics.registry
        )
        self.cancelled = Counter(
            "stipple_gateway_tasks_cancelled_total", "Tasks cancelled by apps", registry=self.metrics.registry
        )
        self.task_seconds = Histogram(
            "stipple_gateway_task_seconds",
            "End to end: submission to outcome of the tasks this gateway accepted, by outcome",
            ["outcome"],
            registry=self.metrics.registry,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
        )
        self.integrity_failures = Counter(
            "stipple_gateway_image_integrity_failures_total",
            "Accepted images not served: the stored bytes' SHA-256 is not the validated one",
            registry=self.metrics.registry,
        )
        self._accepted: OrderedDict[str, float] = OrderedDict()  # task -> submitted_at, until its outcome

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Follow step progress, and deliver webhooks when a secret is set."""
        self._subs = await self.progress.follow(self.nc)
        for outcome in OUTCOME_EVENTS:  # end-to-end latency (core NATS: a lost one is one lost sample)
            self._subs.append(await self.nc.subscribe(subjects.all_tasks(outcome), cb=self._on_outcome))
        if self.webhooks is not None:
            run = self.webhooks.run(self.closing, concurrency=self.settings.webhook_concurrency, metrics=self.metrics)
            worker = asyncio.create_task(run, name="webhooks")
            worker.add_done_callback(self._worker_ended)
            self._workers.append(worker)

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

    # ------------------------------------------------------------------ helpers

    async def read_json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        if not body:
            raise ApiError(422, "invalid_input", "request body is empty; expected a JSON object", field="$")
        try:
            return msgspec.json.decode(bytes(body))
        except msgspec.DecodeError as exc:
            raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}", field="$") from None

    def check_capacity(self, spec: TaskSpec) -> None:
        """Refuse at once what the network cannot run now (never queue it forever)."""
        known = {
            m for entry in self.directory.entries.values() for m in (*entry.joined.models, *entry.joined.models_on_disk)
        }
        if spec.model_name not in known:
            available = ", ".join(sorted(known)) or "none (no node has registered)"
            raise ApiError(
                422 if known else 503,
                "unknown_model" if known else "no_nodes",
                f"base_model: no node serves {spec.model_name!r}; available models: {available}",
                field="base_model",
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
        self, spec: TaskSpec, source: str, task_id: str, *, owner: str = "", webhook_url: str = "", fee: int = 0
    ) -> TaskSubmitted:
        tracing.bind_task(task_id)  # the request's span and log lines are about this task
        self.check_capacity(spec)
        await self.wallet.charge(task_id, fee)  # 402 when the deposit cannot pay
        event = TaskSubmitted(
            task_id=task_id,
            spec=resolve_seed(spec, secrets.randbelow(SEED_MAX + 1)),
            submitted_at=time.time(),
            source=source,
            owner=owner,
            webhook_url=webhook_url,
            fee=fee,
        )
        await bus.publish_event(self.js, event)
        self.submitted.labels(source).inc()
        self._accepted[task_id] = event.submitted_at
        while len(self._accepted) > MAX_TIMED_TASKS:
            self._accepted.popitem(last=False)
        log.info("task_submitted", task_id=task_id, source=source, model=spec.model_name, owner=owner)
        return event

    async def _on_outcome(self, msg: Any) -> None:
        """Observe the end-to-end latency of a task this gateway accepted."""
        task_id, outcome = subjects.subject_token(msg.subject, 1), subjects.subject_token(msg.subject, 2)
        submitted_at = self._accepted.pop(task_id, None)
        if submitted_at is not None:
            self.task_seconds.labels(outcome).observe(max(0.0, time.time() - submitted_at))

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
            finished_at=loaded.finished_at,
            result_ttl_s=self.settings.result_ttl_s,
            queue=queue,
        )

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
                self.integrity_failures.inc()
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

    async def _webhook_view(self, task_id: str) -> TaskView | None:
        stored = await read_task_events(self.js, task_id)
        task, _rejected = replay(s.event for s in stored)
        if task is None:
            return None
        return self.view(self.fold(task_id, stored, task.owner))

    async def wait_for_outcome(self, task_id: str, owner: str, submit: Callable[[], Awaitable[object]]) -> Task:
        """Submit while subscribed to the task's outcome subjects, so it cannot be missed."""
        done = asyncio.get_running_loop().create_future()

        async def on_outcome(msg: Any) -> None:
            if not done.done():
                done.set_result(msg.subject)

        subs = [await self.nc.subscribe(subjects.task_subject(task_id, e), cb=on_outcome) for e in OUTCOME_EVENTS]
        try:
            await submit()
            try:
                await asyncio.wait_for(done, self.settings.sync_timeout_s)
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

    # ------------------------------------------------------------------ routes

    async def post_task(self, request: Request) -> Response:
        raw = await self.read_json(request)
        webhook_url = ""
        fee = 0
        try:
            if isinstance(raw, dict) and "webhook_url" in raw:
                raw = dict(raw)
                webhook_url = check_webhook_url(
                    raw.pop("webhook_url"),
                    allow_private=self.settings.webhook_allow_private,
                    enabled=self.webhooks is not None,
                )
            if isinstance(raw, dict) and "fee" in raw:
                raw = dict(raw)
                fee = check_fee(raw.pop("fee"), self.settings.max_fee)
            spec = parse_task(raw)
        except InvalidInput as exc:
            raise ApiError.invalid(exc) from None
        owner = owner_of(request)
        task_id = new_task_id(request.headers.get("idempotency-key"), owner)
        event = await self.submit(spec, "native", task_id, owner=owner, webhook_url=webhook_url, fee=fee)
        accepted = TaskAccepted(
            task_id=event.task_id,
            status="pending",
            seed=event.spec.task_config.seed,
            links=TaskLinks(self=f"/v1/tasks/{event.task_id}", events=f"/v1/tasks/{event.task_id}/events"),
        )
        return json_response(accepted, status_code=202)

    async def task_resource(self, request: Request) -> Response:
        return await (self.cancel_task if request.method == "DELETE" else self.get_task)(request)

    async def get_task(self, request: Request) -> Response:
        loaded = await self.load_task(request.path_params["task_id"], owner_of(request))
        return json_response(self.view(loaded, await self.queue_status(loaded.task)))

    def _finished_error(self, task: Task) -> ApiError:
        outcome = f"{task.reason}: {task.detail}" if task.detail else task.reason
        return ApiError(
            409,
            "already_finished",
            f"task {task.task_id} already finished: status {task.status}, outcome {outcome}; "
            "it can no longer be cancelled",
            extra={"status": task.status, "reason": task.reason},
        )

    async def cancel_task(self, request: Request) -> Response:
        task_id, owner = request.path_params["task_id"], owner_of(request)
        loaded = await self.load_task(task_id, owner)
        if loaded.task.finished:
            raise self._finished_error(loaded.task)
        detail = f"cancelled by the app (API key {owner})" if owner else "cancelled by the app"
        event = TaskCancelled(task_id=task_id, detail=detail)
        await bus.publish_event(self.js, event)
        loaded = await self.load_task(task_id, owner)  # the first outcome stored wins: was it ours?
        if loaded.task.status != "cancelled":
            raise self._finished_error(loaded.task)
        self.cancelled.inc()
        log.info("task_cancelled", task_id=task_id, owner=owner)
        return json_response(self.view(loaded), status_code=202)

    async def task_events(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        self.check_task_id(task_id)
        stream = TaskEventStream(
            self.nc, self.js, task_id, keepalive_s=self.settings.sse_keepalive_s, closing=self.closing
        )
        stored = await stream.open()
        try:
            self.fold(task_id, stored, owner_of(request))
        except BaseException:
            await stream.close()
            raise
        if request.method == "HEAD":  # the headers only: a stream would last until the task ends
            await stream.close()
            return Response(media_type="text/event-stream", headers={"Cache-Control": "no-store"})
        return EventStreamResponse(stream, stream.frames(stored, request.headers.get("last-event-id")))

    async def get_image(self, request: Request) -> Response:
        loaded = await self.load_task(request.path_params["task_id"], owner_of(request))
        task, index = loaded.task, request.path_params["index"]
        if task.status != "succeeded":
            raise ApiError(409, "not_ready", f"task {task.task_id} is {task.status}; images exist once it succeeded")
        if not 0 <= index < len(task.images):
            raise ApiError(404, "not_found", f"image index {index} out of range; the task has {len(task.images)}")
        ttl = self.settings.result_ttl_s
        max_age = 31_536_000
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
            max_age = min(max_age, int(left))
        png = await self.image_bytes(task, task.images[index])
        scope = "private" if self.keys.enabled else "public"
        return Response(png, media_type="image/png", headers={"Cache-Control": f"{scope}, max-age={max_age}"})

    async def sdcn_txt2img(self, request: Request) -> Response:
        return await self.sdcn(request, parse_sdcn_txt2img)

    async def sdcn_img2img(self, request: Request) -> Response:
        return await self.sdcn(request, parse_sdcn_img2img)

    async def sdcn(self, request: Request, parse: Callable[[Any, str], TaskSpec]) -> Response:
        """The synchronous SDCN endpoints: submit, wait for the outcome, return base64 PNGs."""
        try:
            spec = parse(await self.read_json(request), self.settings.default_model)
        except InvalidInput as exc:
            raise ApiError.invalid(exc) from None
        owner = owner_of(request)
        task_id = new_task_id(request.headers.get("idempotency-key"), owner)
        task = await self.wait_for_outcome(task_id, owner, lambda: self.submit(spec, "sdcn", task_id, owner=owner))
        if task.status != "succeeded":
            detail = f"task {task_id} was {task.status}: {task.reason} {task.detail}".strip()
            raise ApiError(502, task.reason or task.status, detail)
        pngs = await asyncio.gather(*(self.image_bytes(task, image) for image in task.images))
        images = [base64.b64encode(png).decode() for png in pngs]
        return json_response(SdcnResult(images=images, task_id=task_id, seeds=[image.seed for image in task.images]))

    async def list_nodes(self, request: Request) -> Response:
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
        return json_response(NodesView(nodes=nodes, live=len(live)))

    async def healthz(self, request: Request) -> Response:
        connected = self.nc.is_connected
        body = Health(
            status="ok" if connected else "unavailable", nats=connected, live_nodes=len(self.directory.live())
        )
        return json_response(body, status_code=200 if connected else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(self, request: Request) -> Response:
        return Response(openapi.document_bytes(), media_type="application/json")

    async def docs_page(self, request: Request) -> Response:
        return HTMLResponse(openapi.DOCS_HTML)


def owner_of(request: Request) -> str:
    """The API key id the request came with ("" when keys are off)."""
    return getattr(request.state, "key_id", "")


MAX_FEE = 10**30  # far above any real price; keeps the number a JSON integer every client reads


def check_fee(value: Any, max_fee: int = MAX_FEE) -> int:
    """`fee`: what the app offers for the task (smallest token unit); orders the queue. The
    network's `max_fee` bounds it (a larger fee would make cheating pay: economics.py)."""
    limit = min(max_fee, MAX_FEE)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise InvalidInput("fee", value, f"must be an integer from 0 to {limit} (STIPPLE_MAX_FEE)")
    return value


def new_task_id(idempotency_key: str | None, owner: str = "") -> str:
    """A fresh task id, or one derived from the app's Idempotency-Key (and its API key, so
    two apps' keys never meet) so that a retried request is the same task (the publish is
    deduplicated by its message id)."""
    if idempotency_key:
        scoped = f"{owner}\n{idempotency_key}" if owner else idempotency_key
        return hashlib.sha256(scoped.encode()).hexdigest()[:32]
    return uuid.uuid4().hex


def create_app(gw: Gateway) -> Starlette:
    tracer = trace.get_tracer("stipple.gateway")

    def route(path: str, endpoint: Any, methods: list[str], *, sdcn: bool = False, public: bool = False) -> Route:
        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if not public and gw.keys.enabled:
                    key = gw.keys.authenticate(request.headers.get("authorization"))
                    gw.keys.admit(key, time.monotonic())
                    request.state.key_id = key.key_id
                response = await endpoint(request)
            except ApiError as exc:
                response = exc.sdcn() if sdcn else exc.native()
            except StippleError as exc:
                log.warning("request_failed", path=path, code=exc.code, error=exc.message)
                error = ApiError(503 if exc.retryable else 500, exc.code, exc.message)
                response = error.sdcn() if sdcn else error.native()
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("request_failed_nats", path=path, error=repr(exc))
                error = ApiError(503, "unavailable", f"the message bus is unavailable ({type(exc).__name__}); retry")
                response = error.sdcn() if sdcn else error.native()
            gw.requests.labels(path, str(response.status_code)).inc()
            gw.request_seconds.labels(path).observe(time.perf_counter() - started)
            return response

        async def traced(request: Request) -> Response:
            """The request's span: the root of a submitted task's trace (it continues the
            caller's W3C traceparent when the request carries one)."""
            with tracer.start_as_current_span(
                f"{request.method} {path}",
                context=tracing.extract(request.headers),
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": request.method, "http.route": path, "url.path": request.url.path},
            ) as span:
                with structlog.contextvars.bound_contextvars(trace_id=tracing.current_trace_id()):
                    response = await wrapped(request)
                span.set_attribute("http.response.status_code", response.status_code)
                if response.status_code >= 500:
                    span.set_status(trace.StatusCode.ERROR)
            return response

        return Route(path, traced, methods=methods)

    async def no_route(request: Request, exc: Exception) -> Response:
        """Starlette's own 404 (no such path) and 405 (wrong method), in the native error shape."""
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return ApiError(exc.status_code, code, message, headers=dict(exc.headers or {})).native()

    return Starlette(
        exception_handlers={HTTPException: no_route},
        routes=[
            route("/v1/tasks", gw.post_task, ["POST"]),
            route("/v1/tasks/{task_id}", gw.task_resource, ["GET", "DELETE"]),
            route("/v1/tasks/{task_id}/events", gw.task_events, ["GET"]),
            route("/v1/tasks/{task_id}/images/{index:int}", gw.get_image, ["GET"]),
            route("/v1/nodes", gw.list_nodes, ["GET"]),
            route("/txt2img", gw.sdcn_txt2img, ["POST"], sdcn=True),
            route("/img2img", gw.sdcn_img2img, ["POST"], sdcn=True),
            route("/healthz", gw.healthz, ["GET"], public=True),
            route("/metrics", gw.metrics_endpoint, ["GET"], public=True),
            route("/openapi.json", gw.openapi_json, ["GET"], public=True),
            route("/docs", gw.docs_page, ["GET"], public=True),
        ],
    )
