"""The gateway's HTTP layer: the Starlette app and its routes.

Handlers parse the request (body, headers, Idempotency-Key, the caller's API key), call
the task service (tasks.py, which does the work and knows nothing of HTTP), and turn its
results and refusals into responses. `create_app(tasks)` builds the app; each route is
wrapped with authentication and rate limits, the request metrics and the request's span.

Errors: native routes answer ``{"error": {"code", "message", "field"?, "value"?}}``,
SDCN routes answer ``{"msg": "..."}``; bad input is 4xx and names the field and value.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, cast

import msgspec
import nats.errors
import structlog
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from stipple_common import tracing
from stipple_common.errors import InvalidInput, StippleError
from stipple_common.messages import Validation
from stipple_common.taskspec import TaskSpec, parse_task

from . import a1111, horde, network, openai_images, openapi
from .auth import ApiKey, client_ip
from .errors import ApiError
from .events import TaskEventStream
from .sdcn import parse_sdcn_img2img, parse_sdcn_txt2img
from .settings import GatewaySettings
from .tasks import TaskService
from .views import SdcnResult, TaskAccepted, TaskLinks
from .webhooks import check_webhook_url

__all__ = ["ApiError", "Gateway", "GatewaySettings", "Routes", "TaskService", "create_app"]

Gateway = TaskService
"""The task service's former name (it was the handlers too), kept for code that imports it."""

log = structlog.get_logger("stipple.gateway")

INTERRUPT_TRIES, INTERRUPT_PAUSE_S = 40, 0.05  # an interrupt waits up to 2 s for the task it names to be stored
IMAGE_MAX_AGE_S = 31_536_000  # Cache-Control max-age of an image that is kept for good


def json_response(body: msgspec.Struct, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status_code=status_code, headers=headers, media_type="application/json")


ErrorShape = Literal["native", "sdcn", "openai", "a1111", "horde"]


def error_response(error: ApiError, *, shape: ErrorShape = "native") -> JSONResponse:
    """`error` in the shape of the API the request used, with its status and headers."""
    if shape == "sdcn":
        body = error.sdcn_body()
    elif shape == "openai":
        body = openai_images.error_body(error)
    elif shape == "a1111":
        body = a1111.error_body(error)
    elif shape == "horde":
        body = horde.error_body(error)
    else:
        body = error.native_body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


class EventStreamResponse(StreamingResponse):
    """A text/event-stream answer that releases the stream's subscriptions however it ends
    (also when the client is gone before the first byte)."""

    def __init__(self, stream: TaskEventStream, content: AsyncIterator[bytes]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.close()


MAX_JSON_DEPTH = 32  # the deepest body of any API here nests 4 levels; deeper is refused before it is read
DEPTH_IN_THREAD_BYTES = 256 * 1024  # a body larger than this is measured in a worker thread


def json_depth(value: Any, limit: int) -> int:
    """How deeply `value`'s lists and dicts nest (1 for a flat one), counted without
    recursion (a hostile body must not reach Python's recursion limit anywhere: in a
    parser, a repr() for an error message, a log line); stops past `limit`."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)', re.DOTALL)  # a string (or its unclosed rest)
_JSON_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_JSON_NOT_BRACKETS = bytes(b for b in range(256) if b not in _JSON_STEP)


def json_text_depth(body: bytes) -> int:
    """How deeply the JSON text `body` nests, from its brackets outside strings, before any
    parser sees it (linear, in C loops). Needed because the services import eth_account,
    whose py_ecc raises Python's recursion limit to 100,000: msgspec then recurses past the C
    stack on a body nested ~50,000 deep (100 KB) and the process dies (SIGSEGV) instead of
    raising RecursionError."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _JSON_NOT_BRACKETS)
    return max(itertools.accumulate(map(_JSON_STEP.__getitem__, brackets)), default=0)


def owner_of(request: Request) -> str:
    """The API key id the request came with ("" when keys are off)."""
    return getattr(request.state, "key_id", "")


def client_of(request: Request, tasks: TaskService) -> str:
    """The caller's IP: the socket peer, or what a trusted proxy says (auth.client_ip)."""
    peer = request.client.host if request.client else None
    return client_ip(peer, request.headers.get("x-forwarded-for"), tasks.trusted_proxies)


MAX_FEE = 10**30  # far above any real price; keeps the number a JSON integer every client reads


def check_fee(value: Any, max_fee: int = MAX_FEE) -> int:
    """`fee`: what the app offers for the task (smallest token unit); orders the queue. The
    network's `max_fee` bounds it (a larger fee would make cheating pay: economics.py)."""
    limit = min(max_fee, MAX_FEE)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise InvalidInput("fee", value, f"must be an integer from 0 to {limit} (STIPPLE_MAX_FEE)")
    return value


def check_validation(value: Any) -> Validation:
    """`validation`: "sampled" (the default: one node, and three when the network's secret
    sample draws the task) or "full" (three nodes always; the fee is charged three times)."""
    if value not in ("sampled", "full"):
        raise InvalidInput("validation", value, 'must be "sampled" (the default) or "full" (three nodes, three fees)')
    return cast(Validation, value)


def idempotent(request: Request) -> bool:
    """Whether the request's task id derives from its Idempotency-Key (`TaskService.new_task_id`): the
    task service then returns a task stored under it instead of running it again."""
    return bool(request.headers.get("idempotency-key"))


class Routes:
    """The handlers: one per route, each a thin translation to and from the task service."""

    def __init__(self, tasks: TaskService) -> None:
        self.tasks = tasks
        self.settings = tasks.settings
        self.a1111_models: dict[str, str] = {}  # API key id -> the model POST /sdapi/v1/options chose
        # API key id -> its running A1111 txt2img / img2img (task id, started): A1111 runs one
        # job at a time, and its progress and interrupt endpoints name none
        self.a1111_running: dict[str, tuple[str, float]] = {}
        self.a1111_interrupted: set[str] = set()  # task ids POST /sdapi/v1/interrupt cancelled

    async def read_json(self, request: Request) -> Any:
        body = await self.read_body(request)
        if not body:
            raise ApiError(422, "invalid_input", "request body is empty; expected a JSON object", field="$")
        # before msgspec (see json_text_depth); a large body is measured off the event loop
        # (12 MB of brackets and short strings take about 0.7 s on these cores)
        measure = asyncio.to_thread(json_text_depth, body) if len(body) > DEPTH_IN_THREAD_BYTES else None
        text_depth = await measure if measure is not None else json_text_depth(body)
        if text_depth > MAX_JSON_DEPTH:
            raise ApiError(
                400,
                "invalid_json",
                f"request body nests deeper than {MAX_JSON_DEPTH} levels",
                field="$",
                value=text_depth,
            )
        try:
            value = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}", field="$") from None
        except RecursionError:  # msgspec's own limit (about 1,000 levels)
            value = None
            depth = MAX_JSON_DEPTH + 1
        else:
            depth = json_depth(value, MAX_JSON_DEPTH)
        if depth > MAX_JSON_DEPTH:
            raise ApiError(
                400, "invalid_json", f"request body nests deeper than {MAX_JSON_DEPTH} levels", field="$", value=depth
            )
        return value

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 past `max_body_bytes` (before it is all read)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        return bytes(body)

    async def post_task(self, request: Request) -> Response:
        raw = await self.read_json(request)
        webhook_url = ""
        fee = 0
        validation: Validation = "sampled"
        try:
            if isinstance(raw, dict) and "webhook_url" in raw:
                raw = dict(raw)
                webhook_url = check_webhook_url(
                    raw.pop("webhook_url"),
                    allow_private=self.settings.webhook_allow_private,
                    enabled=self.tasks.webhooks_enabled,
                )
            if isinstance(raw, dict) and "fee" in raw:
                raw = dict(raw)
                fee = check_fee(raw.pop("fee"), self.settings.max_fee)
            if isinstance(raw, dict) and "validation" in raw:
                raw = dict(raw)
                validation = check_validation(raw.pop("validation"))
            spec = parse_task(raw)
        except InvalidInput as exc:
            raise ApiError.invalid(exc) from None
        owner = owner_of(request)
        task_id = self.tasks.new_task_id(request.headers.get("idempotency-key"), owner)
        event = await self.tasks.submit(
            spec,
            "native",
            task_id,
            owner=owner,
            webhook_url=webhook_url,
            fee=fee,
            validation=validation,
            idempotent=idempotent(request),
        )
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
        return json_response(await self.tasks.get_task_view(request.path_params["task_id"], owner_of(request)))

    async def cancel_task(self, request: Request) -> Response:
        view = await self.tasks.cancel(request.path_params["task_id"], owner_of(request))
        return json_response(view, status_code=202)

    async def task_events(self, request: Request) -> Response:
        owner = owner_of(request)
        client = f"API key {owner!r}" if owner else f"client {client_of(request, self.tasks)}"
        stream, stored = await self.tasks.open_events(request.path_params["task_id"], owner, client)
        if request.method == "HEAD":  # the headers only: a stream would last until the task ends
            await stream.close()
            return Response(media_type="text/event-stream", headers={"Cache-Control": "no-store"})
        return EventStreamResponse(stream, stream.frames(stored, request.headers.get("last-event-id")))

    async def get_image(self, request: Request) -> Response:
        image = await self.tasks.image(request.path_params["task_id"], request.path_params["index"], owner_of(request))
        max_age = IMAGE_MAX_AGE_S if image.seconds_left is None else min(IMAGE_MAX_AGE_S, int(image.seconds_left))
        scope = "private" if self.tasks.keys.enabled else "public"
        return Response(image.png, media_type="image/png", headers={"Cache-Control": f"{scope}, max-age={max_age}"})

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
        task_id = self.tasks.new_task_id(request.headers.get("idempotency-key"), owner)
        finished = await self.tasks.submit_and_wait(spec, "sdcn", task_id, owner=owner, idempotent=idempotent(request))
        images = [base64.b64encode(png).decode() for png in finished.pngs]
        seeds = [image.seed for image in finished.task.images]
        return json_response(SdcnResult(images=images, task_id=task_id, seeds=seeds))

    async def openai_generate(self, request: Request) -> Response:
        """OpenAI's ``POST /v1/images/generations``: submit, wait, return the images
        (openai_images.py)."""
        try:
            spec, asked = openai_images.parse_generation(await self.read_json(request), self.settings.default_model)
        except InvalidInput as exc:
            raise ApiError(400, exc.code, exc.message, field=exc.field, value=exc.value) from None
        return await self.openai_answer(request, spec, asked)

    async def openai_answer(
        self, request: Request, spec: TaskSpec, asked: openai_images.ImageGenerationRequest
    ) -> Response:
        """Run an OpenAI generation or edit and answer as OpenAI does."""
        owner = owner_of(request)
        task_id = self.tasks.new_task_id(request.headers.get("idempotency-key"), owner)
        if asked.user:
            log.info("openai_user", task_id=task_id, user=asked.user[:256])
        finished = await self.tasks.submit_and_wait(
            spec, "openai", task_id, owner=owner, model_field="model", idempotent=idempotent(request)
        )
        if asked.response_format == "url":
            base = str(request.base_url).rstrip("/")
            data = [
                openai_images.ImageData(url=f"{base}/v1/tasks/{task_id}/images/{image.index}")
                for image in finished.task.images
            ]
        else:
            data = [openai_images.ImageData(b64_json=base64.b64encode(png).decode()) for png in finished.pngs]
        return json_response(openai_images.ImagesResponse(created=int(time.time()), data=data))

    async def openai_edit(self, request: Request) -> Response:
        """OpenAI's ``POST /v1/images/edits`` (multipart): inpaint, wait, return the images."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                400,
                "invalid_input",
                "expected a multipart/form-data body (image, mask, prompt, ...)",
                field="content-type",
                value=request.headers.get("content-type", "")[:100],
            )
        body = await self.read_body(request)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
        except (HTTPException, ValueError) as exc:
            detail = getattr(exc, "detail", str(exc))
            raise ApiError(400, "invalid_input", f"not a readable multipart body: {detail}", field="$") from None
        fields: dict[str, str] = {}
        files: dict[str, list[bytes]] = {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            else:
                files.setdefault(name, []).append(await value.read())
        await form.close()
        try:
            spec, asked = openai_images.parse_edit(fields, files, self.settings.default_model)
        except InvalidInput as exc:
            raise ApiError(400, exc.code, exc.message, field=exc.field, value=exc.value) from None
        return await self.openai_answer(request, spec, asked)

    async def a1111_txt2img(self, request: Request) -> Response:
        return await self.a1111(request, img2img=False)

    async def a1111_img2img(self, request: Request) -> Response:
        return await self.a1111(request, img2img=True)

    async def a1111(self, request: Request, *, img2img: bool) -> Response:
        """AUTOMATIC1111's txt2img / img2img: submit, wait, answer as A1111 does (a1111.py)."""
        raw = await self.read_json(request)
        owner = owner_of(request)
        model = self.a1111_models.get(owner, self.settings.default_model)
        try:
            spec = a1111.parse_request(raw, img2img=img2img, model=model)
        except InvalidInput as exc:
            raise ApiError(
                400 if exc.field != "$" else 422, exc.code, exc.message, field=exc.field, value=exc.value
            ) from None
        task_id = self.tasks.new_task_id(request.headers.get("idempotency-key"), owner)
        self.a1111_running[owner] = (task_id, time.time())
        try:
            finished = await self.tasks.submit_and_wait(
                spec,
                "a1111",
                task_id,
                owner=owner,
                model_field="override_settings.sd_model_checkpoint",
                idempotent=idempotent(request),
            )
        except ApiError:
            if task_id not in self.a1111_interrupted:
                raise
            # interrupted: A1111 answers with what it has; a Stipple node returns no partial images
            return JSONResponse(a1111.result([], raw, spec, task_id, [], interrupted=True))
        finally:
            self.a1111_interrupted.discard(task_id)
            if self.a1111_running.get(owner, ("",))[0] == task_id:
                del self.a1111_running[owner]
        images = [base64.b64encode(png).decode() for png in finished.pngs] if raw.get("send_images", True) else []
        seeds = [image.seed for image in finished.task.images]
        return JSONResponse(a1111.result(images, raw, spec, task_id, seeds))

    async def a1111_progress(self, request: Request) -> Response:
        """The caller's running txt2img / img2img: the step of its node furthest along."""
        running = self.a1111_running.get(owner_of(request))
        if running is None:
            return JSONResponse(a1111.progress(None, 0.0))
        task_id, started = running
        step = self.tasks.progress.furthest(task_id)
        eta_s = None
        if step is None:  # not started: queued, or loading the model
            try:
                loaded = await self.tasks.load_task(task_id, owner_of(request))
            except ApiError as exc:
                if exc.status != 404:
                    raise
                loaded = None  # its submission is not stored yet: queued, with no estimate
            queued = await self.tasks.queue_status(loaded.task) if loaded is not None else None
            eta_s = queued.eta_s if queued is not None else None
        return JSONResponse(
            a1111.progress(task_id, started, step.step if step else 0, step.total if step else 0, eta_s)
        )

    async def a1111_interrupt(self, request: Request) -> Response:
        """Cancel the caller's running txt2img / img2img (nothing to do when none runs); the
        request that started it answers 200 with no images."""
        running = self.a1111_running.get(owner_of(request))
        if running is not None:
            self.a1111_interrupted.add(running[0])
            for _ in range(INTERRUPT_TRIES):
                try:
                    await self.tasks.cancel(running[0], owner_of(request))
                except ApiError as exc:
                    if exc.status == 404:  # its submission is not stored yet
                        await asyncio.sleep(INTERRUPT_PAUSE_S)
                        continue
                    if exc.status != 409:  # 409: it finished first, and its request answers with the images
                        raise
                break
        return JSONResponse(None)

    async def a1111_sd_models(self, request: Request) -> Response:
        return JSONResponse(a1111.sd_models(sorted(self.tasks.model_names())))

    async def a1111_loras(self, request: Request) -> Response:
        """The LoRAs live nodes hold on disk (their announcements' `loras_on_disk`)."""
        refs = sorted({ref for node in self.tasks.directory.live() for ref in node.loras_on_disk})
        return JSONResponse(a1111.loras(refs))

    async def a1111_samplers(self, request: Request) -> Response:
        return JSONResponse(a1111.samplers())

    async def a1111_schedulers(self, request: Request) -> Response:
        return JSONResponse(a1111.schedulers())

    async def a1111_options(self, request: Request) -> Response:
        """GET: the model in force for this API key; POST: set it (`sd_model_checkpoint`, a
        model some registered node serves). A1111's other options are refused, naming them."""
        owner = owner_of(request)
        if request.method == "POST":
            raw = await self.read_json(request)
            if not isinstance(raw, dict):
                raise ApiError(422, "invalid_input", "expected a JSON object", field="$")
            for key, value in raw.items():
                if key != "sd_model_checkpoint":
                    raise ApiError(
                        400, "invalid_input", f"{key}: not an option Stipple supports", field=key, value=value
                    )
                known = sorted(self.tasks.model_names())
                if value not in known:
                    raise ApiError(
                        422,
                        "unknown_model",
                        f"sd_model_checkpoint: no node serves {value!r}; available: {', '.join(known) or 'none'}",
                        field=key,
                        value=value,
                    )
                self.a1111_models[owner] = value
                while len(self.a1111_models) > 10_000:
                    self.a1111_models.pop(next(iter(self.a1111_models)))
            return JSONResponse(None)
        return JSONResponse({"sd_model_checkpoint": self.a1111_models.get(owner, self.settings.default_model)})

    async def openai_models(self, request: Request) -> Response:
        """OpenAI's ``GET /v1/models``: the models live nodes serve."""
        names = sorted({model for node in self.tasks.directory.live() for model in node.models})
        return json_response(openai_images.ModelList(data=[openai_images.Model(id=name) for name in names]))

    async def webhook_secret(self, request: Request) -> Response:
        """The calling app's webhook signing secret (webhooks.py: derived per API key)."""
        if self.tasks.webhooks is None:
            raise ApiError(404, "webhooks_off", "webhooks are off on this gateway (it has no STIPPLE_WEBHOOK_SECRET)")
        secret = self.tasks.webhooks.secret_for(owner_of(request))
        return json_response(secret, headers={"Cache-Control": "no-store"})

    async def list_nodes(self, request: Request) -> Response:
        return json_response(self.tasks.nodes())

    async def healthz(self, request: Request) -> Response:
        body = self.tasks.health()
        return json_response(body, status_code=200 if body.nats else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.tasks.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(self, request: Request) -> Response:
        return Response(openapi.document_bytes(), media_type="application/json")

    async def docs_page(self, request: Request) -> Response:
        return HTMLResponse(openapi.DOCS_HTML)

    async def docs_asset(self, request: Request) -> Response:
        """Swagger UI's script or stylesheet, from the vendored copy (no CDN)."""
        name = request.path_params["name"]
        media_type = openapi.SWAGGER_UI_ASSETS.get(name)
        if media_type is None:
            raise ApiError(404, "not_found", f"no docs asset {name[:100]!r}", field="name", value=name[:100])
        return FileResponse(
            openapi.SWAGGER_UI_DIR / name, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
        )


def create_app(tasks: TaskService) -> Starlette:
    """The gateway's Starlette app over `tasks` (started and stopped by its owner)."""
    tracer = trace.get_tracer("stipple.gateway")
    routes = Routes(tasks)
    web = network.NetworkRoutes(tasks)  # GET /v1/network, /v1/nodes/{node_id} and the web pages
    hordes = horde.HordeRoutes(tasks, routes.read_json)  # the AI Horde API under /api/v2
    apikey = hordes.authenticate  # the Horde's `apikey` header instead of Authorization (submitting only)

    def route(
        path: str,
        endpoint: Callable[[Request], Awaitable[Response]],
        methods: list[str],
        *,
        shape: ErrorShape = "native",
        public: bool = False,
        authenticate: Callable[[Request], ApiKey] | None = None,  # default: Authorization: Bearer
    ) -> Route:
        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if not public and tasks.keys.enabled:
                    if authenticate is not None:
                        key = authenticate(request)
                    else:
                        key = tasks.keys.authenticate(request.headers.get("authorization"))
                    await tasks.keys.acquire(key, time.monotonic())  # shared by every gateway (limits.py)
                    request.state.key_id = key.key_id
                else:  # no key: limited per client IP (auth.ClientLimits)
                    await tasks.anon.acquire(client_of(request, tasks), time.monotonic())
                response = await endpoint(request)
            except ApiError as exc:
                response = error_response(exc, shape=shape)
            except StippleError as exc:
                log.warning("request_failed", path=path, code=exc.code, error=exc.message)
                retry = {"Retry-After": "1"} if exc.retryable else None
                error = ApiError(503 if exc.retryable else 500, exc.code, exc.message, headers=retry)
                response = error_response(error, shape=shape)
            except (nats.errors.Error, TimeoutError) as exc:
                # a NATS server lost, a leader being elected (seconds): the app retries, with
                # its Idempotency-Key, and gets the same task (docs/reliability.md)
                log.warning("request_failed_nats", path=path, error=repr(exc))
                error = ApiError(
                    503,
                    "unavailable",
                    f"the message bus is unavailable ({type(exc).__name__}); retry",
                    headers={"Retry-After": "1"},
                )
                response = error_response(error, shape=shape)
            tasks.gateway_metrics.requests.labels(path, str(response.status_code)).inc()
            tasks.gateway_metrics.request_seconds.labels(path).observe(time.perf_counter() - started)
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
        return error_response(ApiError(exc.status_code, code, message, headers=dict(exc.headers or {})))

    app = Starlette(
        exception_handlers={HTTPException: no_route},
        routes=[
            route("/v1/tasks", routes.post_task, ["POST"]),
            route("/v1/tasks/{task_id}", routes.task_resource, ["GET", "DELETE"]),
            route("/v1/tasks/{task_id}/events", routes.task_events, ["GET"]),
            route("/v1/tasks/{task_id}/images/{index:int}", routes.get_image, ["GET"]),
            route("/v1/nodes", routes.list_nodes, ["GET"]),
            route("/v1/webhook-secret", routes.webhook_secret, ["GET"]),
            route("/txt2img", routes.sdcn_txt2img, ["POST"], shape="sdcn"),
            route("/img2img", routes.sdcn_img2img, ["POST"], shape="sdcn"),
            route("/v1/images/generations", routes.openai_generate, ["POST"], shape="openai"),
            route("/v1/images/edits", routes.openai_edit, ["POST"], shape="openai"),
            route("/v1/models", routes.openai_models, ["GET"], shape="openai"),
            route("/sdapi/v1/txt2img", routes.a1111_txt2img, ["POST"], shape="a1111"),
            route("/sdapi/v1/img2img", routes.a1111_img2img, ["POST"], shape="a1111"),
            route("/sdapi/v1/sd-models", routes.a1111_sd_models, ["GET"], shape="a1111"),
            route("/sdapi/v1/loras", routes.a1111_loras, ["GET"], shape="a1111"),
            route("/sdapi/v1/samplers", routes.a1111_samplers, ["GET"], shape="a1111"),
            route("/sdapi/v1/schedulers", routes.a1111_schedulers, ["GET"], shape="a1111"),
            route("/sdapi/v1/options", routes.a1111_options, ["GET", "POST"], shape="a1111"),
            route("/sdapi/v1/progress", routes.a1111_progress, ["GET"], shape="a1111"),
            route("/sdapi/v1/interrupt", routes.a1111_interrupt, ["POST"], shape="a1111"),
            route("/api/v2/generate/async", hordes.generate_async, ["POST"], shape="horde", authenticate=apikey),
            # as on the Horde: a request's random id is its key, and the status routes are open
            route("/api/v2/generate/check/{id}", hordes.check, ["GET"], shape="horde", public=True),
            route("/api/v2/generate/status/{id}", hordes.status, ["GET", "DELETE"], shape="horde", public=True),
            route("/api/v2/status/models", hordes.models, ["GET"], shape="horde", public=True),
            route("/api/v2/status/heartbeat", hordes.heartbeat, ["GET"], shape="horde", public=True),
            route("/healthz", routes.healthz, ["GET"], public=True),
            route("/metrics", routes.metrics_endpoint, ["GET"], public=True),
            route("/openapi.json", routes.openapi_json, ["GET"], public=True),
            route("/docs", routes.docs_page, ["GET"], public=True),
            route("/docs/assets/{name}", routes.docs_asset, ["GET"], public=True),
            route("/v1/network", web.network, ["GET"]),
            route("/v1/nodes/{node_id}", web.node, ["GET"]),
            route("/", web.generator_page, ["GET"], public=True),
            route("/network", web.network_page, ["GET"], public=True),
            route("/nodes/{node_id}", web.node_page, ["GET"], public=True),
            route("/web/{path:path}", web.asset, ["GET"], public=True),
        ],
    )
    app.state.routes = routes  # the handlers' state (A1111's running jobs), for whoever holds the app
    return app
