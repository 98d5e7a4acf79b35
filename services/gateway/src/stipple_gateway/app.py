"""HTTP routes. Handlers validate, publish events and read the task's fold; they hold no
state of their own, so any number of gateways can serve the same network.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stipple_common import bus, subjects
from stipple_common.aggregate import Task, replay
from stipple_common.blobstore import BlobNotFound, BlobStore
from stipple_common.errors import NO_VALUE, InvalidInput, StippleError
from stipple_common.messages import OUTCOME_EVENTS, TaskSubmitted, task_event_decoder
from stipple_common.metrics import Metrics
from stipple_common.nodes import NodeDirectory
from stipple_common.settings import CommonSettings
from stipple_common.taskspec import SEED_MAX, TaskSpec, parse_task, resolve_seed

from .sdcn import parse_sdcn_img2img, parse_sdcn_txt2img

log = structlog.get_logger("stipple.gateway")

TASK_ID = re.compile(r"^[0-9a-f]{32}$")


class GatewaySettings(CommonSettings, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 2_000_000
    sync_timeout_s: float = 120.0  # how long the synchronous SDCN endpoints wait for an outcome
    replication: int = 3  # must match the dispatcher's
    node_ttl_s: float = 10.0
    default_model: str = "tiny-sd"  # for SDCN requests that name no model


class ApiError(Exception):
    """An answer other than success, with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None, value: Any = NO_VALUE):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.value = status, code, message, field, value

    @classmethod
    def invalid(cls, exc: InvalidInput) -> ApiError:
        return cls(422, exc.code, exc.message, field=exc.field, value=exc.value)

    def native(self) -> JSONResponse:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.value is not NO_VALUE:
            plain = isinstance(self.value, (int, float, str, bool, type(None)))
            body["value"] = self.value if plain else repr(self.value)
        return JSONResponse({"error": body}, status_code=self.status)

    def sdcn(self) -> JSONResponse:
        return JSONResponse({"msg": self.message}, status_code=self.status)


@dataclass
class Gateway:
    """The gateway's dependencies and its handlers."""

    nc: NATS
    js: JetStreamContext
    blobs: BlobStore
    directory: NodeDirectory
    settings: GatewaySettings
    metrics: Metrics

    def __post_init__(self) -> None:
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
        operators = {n.operator for n in live}
        need = self.settings.replication
        if len(operators) < need:
            raise ApiError(
                503,
                "no_nodes",
                f"not enough live nodes for {spec.model_name!r}: {len(live)} live nodes of {len(operators)} "
                f"operators, a task needs {need} of distinct operators; try again later",
            )

    async def submit(self, spec: TaskSpec, source: str, task_id: str) -> TaskSubmitted:
        self.check_capacity(spec)
        event = TaskSubmitted(
            task_id=task_id,
            spec=resolve_seed(spec, secrets.randbelow(SEED_MAX + 1)),
            submitted_at=time.time(),
            source=source,
        )
        await bus.publish(self.js, subjects.task_subject(task_id, "submitted"), event, msg_id=f"{task_id}:submitted")
        self.submitted.labels(source).inc()
        log.info("task_submitted", task_id=task_id, source=source, model=spec.model_name)
        return event

    async def load_task(self, task_id: str) -> Task:
        if not TASK_ID.match(task_id):
            raise ApiError(404, "not_found", f"no task with id {task_id!r} (ids are 32 hex digits)")
        events = await bus.read_subject(
            self.js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder
        )
        task, _rejected = replay(events)
        if task is None:
            raise ApiError(404, "not_found", f"no task with id {task_id!r}")
        return task

    async def wait_for_outcome(self, task_id: str, submit: Callable[[], Awaitable[object]]) -> Task:
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
        task = await self.load_task(task_id)  # the stream is the truth, the core message only a wake-up
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
        try:
            spec = parse_task(await self.read_json(request))
        except InvalidInput as exc:
            raise ApiError.invalid(exc) from None
        event = await self.submit(spec, "native", new_task_id(request.headers.get("idempotency-key")))
        return JSONResponse(
            {
                "task_id": event.task_id,
                "status": "pending",
                "seed": event.spec.task_config.seed,
                "links": {"self": f"/v1/tasks/{event.task_id}"},
            },
            status_code=202,
        )

    async def get_task(self, request: Request) -> Response:
        task = await self.load_task(request.path_params["task_id"])
        return JSONResponse(task_view(task))

    async def get_image(self, request: Request) -> Response:
        task = await self.load_task(request.path_params["task_id"])
        index = request.path_params["index"]
        if task.status != "succeeded":
            raise ApiError(409, "not_ready", f"task {task.task_id} is {task.status}; images exist once it succeeded")
        if not 0 <= index < len(task.images):
            raise ApiError(404, "not_found", f"image index {index} out of range; the task has {len(task.images)}")
        try:
            png = await self.blobs.get(task.images[index].key)
        except BlobNotFound:
            raise ApiError(410, "expired", f"image {index} of task {task.task_id} is no longer stored") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=31536000, immutable"})

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
        task_id = new_task_id(request.headers.get("idempotency-key"))
        task = await self.wait_for_outcome(task_id, lambda: self.submit(spec, "sdcn", task_id))
        if task.status != "succeeded":
            detail = f"task {task_id} was aborted: {task.reason} {task.detail}".strip()
            raise ApiError(502, task.reason or "aborted", detail)
        pngs = [await self.blobs.get(image.key) for image in task.images]
        return JSONResponse(
            {
                "images": [base64.b64encode(png).decode() for png in pngs],
                "task_id": task_id,
                "seeds": [image.seed for image in task.images],
            }
        )

    async def list_nodes(self, request: Request) -> Response:
        now = time.time()
        live = {n.node_id for n in self.directory.live(now)}
        nodes = [
            {
                "node_id": e.joined.node_id,
                "operator": e.joined.operator,
                "device": e.joined.device,
                "models": e.joined.models,
                "live": e.joined.node_id in live,
                "last_seen_s_ago": round(now - e.last_seen, 3),
            }
            for e in self.directory.entries.values()
        ]
        return JSONResponse({"nodes": nodes, "live": len(live)})

    async def healthz(self, request: Request) -> Response:
        connected = self.nc.is_connected
        live = len(self.directory.live())
        body = {"status": "ok" if connected else "unavailable", "nats": connected, "live_nodes": live}
        return JSONResponse(body, status_code=200 if connected else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def new_task_id(idempotency_key: str | None) -> str:
    """A fresh task id, or one derived from the app's Idempotency-Key so that a retried
    request is the same task (the publish is deduplicated by its message id)."""
    if idempotency_key:
        return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return uuid.uuid4().hex


def spec_view(spec: TaskSpec) -> dict[str, Any]:
    """The task as stored, with input images summarized: they can be megabytes each."""
    view = msgspec.to_builtins(spec)

    def summary(data_url: str) -> str:
        return f"<image, {len(data_url)} characters>" if data_url else ""

    for field in ("init_image", "mask_image"):
        view[field] = summary(view.get(field, ""))
    if view.get("controlnet"):
        view["controlnet"]["image_dataurl"] = summary(view["controlnet"]["image_dataurl"])
    return view


def task_view(task: Task) -> dict[str, Any]:
    """The app's view of a task."""
    view: dict[str, Any] = {
        "task_id": task.task_id,
        "status": task.status,
        "source": task.source,
        "submitted_at": task.submitted_at,
        "seed": task.spec.task_config.seed,
        "task": spec_view(task.spec),
        "nodes": [
            {
                "node_id": run.node_id,
                "status": run.status,
                "images": [{"index": i.index, "phash": i.phash, "seed": i.seed} for i in run.images],
                **({"error": {"code": run.error_code, "message": run.error_message}} if run.error_code else {}),
            }
            for run in task.nodes.values()
        ],
    }
    if task.finished:
        view["outcome"] = {
            "status": task.status,
            "reason": task.reason,
            "detail": task.detail,
            "verdicts": task.verdicts,
        }
    if task.status == "succeeded":
        view["images"] = [
            {
                "index": i.index,
                "url": f"/v1/tasks/{task.task_id}/images/{i.index}",
                "seed": i.seed,
                "phash": i.phash,
                "width": i.width,
                "height": i.height,
            }
            for i in task.images
        ]
    return view


def create_app(gw: Gateway) -> Starlette:
    def route(path: str, endpoint: Any, methods: list[str], sdcn: bool = False) -> Route:
        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            try:
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

        return Route(path, wrapped, methods=methods)

    return Starlette(
        routes=[
            route("/v1/tasks", gw.post_task, ["POST"]),
            route("/v1/tasks/{task_id}", gw.get_task, ["GET"]),
            route("/v1/tasks/{task_id}/images/{index:int}", gw.get_image, ["GET"]),
            route("/v1/nodes", gw.list_nodes, ["GET"]),
            route("/txt2img", gw.sdcn_txt2img, ["POST"], sdcn=True),
            route("/img2img", gw.sdcn_img2img, ["POST"], sdcn=True),
            route("/healthz", gw.healthz, ["GET"]),
            route("/metrics", gw.metrics_endpoint, ["GET"]),
        ]
    )
