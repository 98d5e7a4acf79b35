"""The OpenAPI 3.1 document of the gateway, built from the same msgspec types the handlers
use (``msgspec.json.schema_components``), served at ``/openapi.json`` and written to
docs/openapi.json:

    python -m stipple_gateway.openapi docs/openapi.json      (what `just openapi` runs)

``/docs`` is a Swagger UI page whose script and stylesheet the gateway serves itself
(``/docs/assets/``: swagger-ui-dist 5.35.0 from npm, vendored in ``static/swagger-ui/`` with
its licence), so it works with no internet; the JSON document is the artifact, the page
only a viewer for it.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from stipple_common.messages import (
    NodeErrored,
    Progress,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskCommitted,
    TaskRevealOpened,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
)

from . import horde, network, openai_images
from .sdcn import SdcnImg2Img, SdcnTxt2Img
from .views import ErrorBody, Health, NodesView, SdcnError, SdcnResult, TaskAccepted, TaskRequest, TaskView
from .webhooks import WebhookSecret

REGENERATE = "just openapi   (or: python -m stipple_gateway.openapi docs/openapi.json)"
SWAGGER_UI = "/docs/assets"  # swagger-ui-dist 5.35.0 (npm pack), vendored: static/swagger-ui/
SWAGGER_UI_DIR = Path(__file__).parent / "static" / "swagger-ui"
SWAGGER_UI_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
DOCS_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Stipple gateway API</title>
<link rel="stylesheet" href="{SWAGGER_UI}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{SWAGGER_UI}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script>
<noscript>The API document is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body>
</html>
"""

EVENTS: dict[str, type[msgspec.Struct]] = {
    "submitted": TaskSubmitted,
    "assigned": TaskAssigned,
    "started": TaskStarted,
    "committed": TaskCommitted,
    "reveal": TaskRevealOpened,
    "revealed": ResultRevealed,
    "errored": NodeErrored,
    "succeeded": TaskSucceeded,
    "aborted": TaskAborted,
    "cancelled": TaskCancelled,
    "progress": Progress,
}

ERRORS = {
    400: "The body is not JSON (`invalid_json`).",
    401: "API keys are on and the `Authorization: Bearer <secret>` header is missing or wrong (`unauthorized`).",
    402: "The deposit that pays for tasks cannot pay the `fee` (`insufficient_deposit`, with `balance` and `price`).",
    404: "No such task, or another API key's task, or image index out of range (`not_found`).",
    409: "The task is not in a state that allows this (`not_ready`, `already_finished`), or the "
    "`Idempotency-Key` was used before with a different body (`idempotency_conflict`, `field`: Idempotency-Key).",
    410: "The result expired (`expired`).",
    413: "The body is larger than STIPPLE_MAX_BODY_BYTES (`body_too_large`), or the task without its input images "
    "does not fit a NATS message (`task_too_large`).",
    422: "A field is invalid, unknown or missing; `field` and `value` name it (`invalid_input`, `unknown_model`).",
    429: "The API key (without one: the client IP) is over its rate limit (`rate_limited`), or has too many open "
    "event streams (`too_many_streams`); `Retry-After` says when to try again.",
    502: "The network aborted or cancelled the task.",
    503: "Not enough live nodes for the model (`no_nodes`), the message bus is unavailable (`unavailable`: a "
    "NATS server lost, a leader being elected; retry after `Retry-After`, with the same `Idempotency-Key` it is the "
    "same task), or the chain-indexer did not answer for a paid task (`chain_unavailable`).",
    504: "The synchronous wait ran out; the task goes on (`timeout`).",
}

HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Bearer realm="stipple"'}},
    429: {"Retry-After": {"schema": {"type": "integer", "minimum": 1}, "description": "seconds"}},
    503: {"Retry-After": {"schema": {"type": "integer", "minimum": 1}, "description": "seconds (not on every 503)"}},
}

KEYED: list[dict[str, list[str]]] = [{"apiKey": []}, {}]  # a bearer key when STIPPLE_API_KEYS is set, nothing otherwise


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _responses(
    ok: dict[str, Any], errors: list[int], *, sdcn: bool = False, keyed: bool = True, schema: str = "ErrorBody"
) -> dict[str, Any]:
    codes = sorted({*errors, *((401, 429) if keyed else ())})
    out = dict(ok)
    for code in codes:
        out[str(code)] = {"description": ERRORS[code], "content": _json("SdcnError" if sdcn else schema)}
        if code in HEADERS:
            out[str(code)]["headers"] = HEADERS[code]
    return out


TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "A retried request with the same key (and the same API key) is the same task, however long "
    "after (while the task is stored): it is not run again. The same key with a different body is 409 "
    "`idempotency_conflict`.",
}


SSE_EVENT = {  # one event of the stream (the schema of a text/event-stream is an event's, as Open API 3.2 reads it)
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": list(EVENTS)},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "description": "A task event's message id (`Last-Event-ID`); progress has none."},
    },
}


def _events_description() -> str:
    names = ", ".join(f"`{name}`" for name in EVENTS)
    return (
        "Server-Sent Events: first every stored event of the task, then live ones, with no gap and no "
        "duplicate; each has `event:` set to its type and `data:` its JSON (the schema named in "
        "`x-stipple-events`; input images summarized); task events carry `id:` (their message id: send it "
        "back as `Last-Event-ID` to resume after it). Types: "
        f"{names}. `progress` events are per-step and lossy. The stream ends after `succeeded`, `aborted` or "
        "`cancelled`. A comment line (`: keep-alive`) comes every STIPPLE_SSE_KEEPALIVE_S (15 s) of silence."
    )


def _a1111_paths() -> dict[str, Any]:
    """The AUTOMATIC1111 routes (a1111.py): A1111's own shapes, described, not typed here."""
    anything = {"application/json": {"schema": {"type": "object"}}}
    listing = {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}
    a1111_error = {"application/json": {"schema": {"type": "object", "required": ["error", "detail"]}}}

    def answer(content: dict[str, Any], errors: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"200": {"description": "As AUTOMATIC1111 answers.", "content": content}}
        for code in sorted({*errors, 401, 429}):
            out[str(code)] = {"description": ERRORS[code], "content": a1111_error}
        return out

    def generate(summary: str, operation: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "operationId": operation,
                "security": KEYED,
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": anything},
                "responses": answer(anything, [400, 409, 413, 422, 502, 503, 504]),
            }
        }

    def listed(summary: str, operation: str) -> dict[str, Any]:
        return {
            "get": {"summary": summary, "operationId": operation, "security": KEYED, "responses": answer(listing, [])}
        }

    return {
        "/sdapi/v1/txt2img": generate("AUTOMATIC1111 txt2img; waits for the outcome (docs/api.md)", "a1111Txt2Img"),
        "/sdapi/v1/img2img": generate("AUTOMATIC1111 img2img and inpainting; waits for the outcome", "a1111Img2Img"),
        "/sdapi/v1/sd-models": listed("AUTOMATIC1111: the models registered nodes serve", "a1111SdModels"),
        "/sdapi/v1/loras": listed("AUTOMATIC1111: the LoRAs live nodes hold on disk", "a1111Loras"),
        "/sdapi/v1/samplers": listed("AUTOMATIC1111: the sampler names a task may use", "a1111Samplers"),
        "/sdapi/v1/schedulers": listed("AUTOMATIC1111: the schedulers (automatic, karras)", "a1111Schedulers"),
        "/sdapi/v1/options": {
            "get": {
                "summary": "AUTOMATIC1111: the model in force for this API key",
                "operationId": "a1111GetOptions",
                "security": KEYED,
                "responses": answer(anything, []),
            },
            "post": {
                "summary": "AUTOMATIC1111: choose the model (`sd_model_checkpoint`) for this API key",
                "operationId": "a1111SetOptions",
                "security": KEYED,
                "requestBody": {"required": True, "content": anything},
                "responses": answer({"application/json": {"schema": {"type": "null"}}}, [400, 422]),
            },
        },
        "/sdapi/v1/progress": {
            "get": {
                "summary": "AUTOMATIC1111: the step of this API key's running txt2img / img2img (idle: 0)",
                "operationId": "a1111Progress",
                "security": KEYED,
                "responses": answer(anything, []),
            }
        },
        "/sdapi/v1/interrupt": {
            "post": {
                "summary": "AUTOMATIC1111: cancel this API key's running txt2img / img2img (it answers with no images)",
                "operationId": "a1111Interrupt",
                "security": KEYED,
                "responses": answer({"application/json": {"schema": {"type": "null"}}}, []),
            }
        },
    }


def build() -> dict[str, Any]:
    """The whole document."""
    types: list[Any] = [
        TaskRequest,
        TaskAccepted,
        TaskView,
        ErrorBody,
        NodesView,
        Health,
        SdcnTxt2Img,
        SdcnImg2Img,
        SdcnResult,
        SdcnError,
        openai_images.ImageGenerationRequest,
        openai_images.ImagesResponse,
        openai_images.ModelList,
        openai_images.OpenAIError,
        WebhookSecret,
        *EVENTS.values(),
    ]
    _, schemas = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    for schema in schemas.values():  # msgspec releases differ in how they dedent docstrings
        if "description" in schema:
            schema["description"] = inspect.cleandoc(schema["description"])
    paths: dict[str, Any] = {
        "/v1/tasks": {
            "post": {
                "summary": "Submit a task",
                "operationId": "submitTask",
                "security": KEYED,
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _ref("TaskRequest"),
                            "examples": {
                                "txt2img": {
                                    "summary": "Two 512x512 images, 25 steps",
                                    "value": {
                                        "base_model": "tiny-sd",
                                        "prompt": "a red fox in the snow",
                                        "task_config": {"image_width": 512, "image_height": 512, "num_images": 2},
                                    },
                                }
                            },
                        }
                    },
                },
                "responses": _responses(
                    {"202": {"description": "Accepted: the task is pending.", "content": _json("TaskAccepted")}},
                    [400, 402, 409, 413, 422, 503],
                ),
            }
        },
        "/v1/tasks/{task_id}": {
            "parameters": [TASK_ID],
            "get": {
                "summary": "A task's state, nodes, per-node step progress, outcome and images",
                "operationId": "getTask",
                "security": KEYED,
                "responses": _responses(
                    {"200": {"description": "The task.", "content": _json("TaskView")}}, [404, 503]
                ),
            },
            "delete": {
                "summary": "Cancel a task",
                "description": "Publishes `cancelled` as the task's outcome; nodes stop, nobody is paid or slashed.",
                "operationId": "cancelTask",
                "security": KEYED,
                "responses": _responses(
                    {"202": {"description": "Cancelled: the task as it is now.", "content": _json("TaskView")}},
                    [404, 409, 503],
                ),
            },
        },
        "/v1/tasks/{task_id}/events": {
            "get": {
                "summary": "A task's events as Server-Sent Events",
                "operationId": "taskEvents",
                "security": KEYED,
                "parameters": [
                    TASK_ID,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Resume after this event id.",
                    },
                ],
                "responses": _responses(
                    {
                        "200": {
                            "description": _events_description(),
                            "content": {"text/event-stream": {"schema": SSE_EVENT}},
                            "x-stipple-events": {name: _ref(t.__name__) for name, t in EVENTS.items()},
                        }
                    },
                    [404, 503],
                ),
            }
        },
        "/v1/tasks/{task_id}/images/{index}": {
            "get": {
                "summary": "One image of a task that succeeded",
                "operationId": "getImage",
                "security": KEYED,
                "parameters": [
                    TASK_ID,
                    {"name": "index", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": _responses(
                    {
                        "200": {
                            "description": "The PNG.",
                            "content": {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}},
                        }
                    },
                    [404, 409, 410, 502, 503],
                ),
            }
        },
        "/v1/nodes": {
            "get": {
                "summary": "Registered nodes, their models and liveness",
                "operationId": "listNodes",
                "security": KEYED,
                "responses": _responses({"200": {"description": "The nodes.", "content": _json("NodesView")}}, []),
            }
        },
        "/v1/webhook-secret": {
            "get": {
                "summary": "The calling app's webhook signing secret (Standard Webhooks; docs/api.md, Webhooks)",
                "description": "Derived from the gateway's STIPPLE_WEBHOOK_SECRET and the caller's API key id: "
                "each API key has its own. With API keys off there is one app, and anyone may read its secret.",
                "operationId": "getWebhookSecret",
                "security": KEYED,
                "responses": _responses(
                    {
                        "200": {"description": "The secret.", "content": _json("WebhookSecret")},
                        "404": {
                            "description": "The gateway has no STIPPLE_WEBHOOK_SECRET (`webhooks_off`).",
                            "content": _json("ErrorBody"),
                        },
                    },
                    [],
                ),
            }
        },
        "/txt2img": {
            "post": {
                "summary": "SDCN text-to-image; waits for the outcome",
                "operationId": "sdcnTxt2Img",
                "security": KEYED,
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": _json("SdcnTxt2Img")},
                "responses": _responses(
                    {"200": {"description": "The images.", "content": _json("SdcnResult")}},
                    [400, 409, 413, 422, 502, 503, 504],
                    sdcn=True,
                ),
            }
        },
        "/img2img": {
            "post": {
                "summary": "SDCN image-to-image (inpainting with `mask`); waits for the outcome",
                "operationId": "sdcnImg2Img",
                "security": KEYED,
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": _json("SdcnImg2Img")},
                "responses": _responses(
                    {"200": {"description": "The images.", "content": _json("SdcnResult")}},
                    [400, 409, 413, 422, 502, 503, 504],
                    sdcn=True,
                ),
            }
        },
        "/v1/images/generations": {
            "post": {
                "summary": "OpenAI images API: generate; waits for the outcome (docs/api.md, OpenAI images)",
                "operationId": "openaiImagesGenerate",
                "security": KEYED,
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": _json("ImageGenerationRequest")},
                "responses": _responses(
                    {"200": {"description": "The images.", "content": _json("ImagesResponse")}},
                    [400, 409, 413, 422, 502, 503, 504],
                    schema="OpenAIError",
                ),
            }
        },
        "/v1/images/edits": {
            "post": {
                "summary": "OpenAI images API: edit (inpaint where the mask is transparent); waits for the outcome",
                "operationId": "openaiImagesEdit",
                "security": KEYED,
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["image", "prompt"],
                                "properties": {
                                    "image": {"type": "string", "format": "binary", "description": "One PNG."},
                                    "mask": {
                                        "type": "string",
                                        "format": "binary",
                                        "description": "A PNG of the image's size: its transparent pixels are painted.",
                                    },
                                    "prompt": {"type": "string"},
                                    "model": {"type": "string"},
                                    "n": {"type": "integer", "minimum": 1, "maximum": 10},
                                    "size": {"type": "string", "description": "WxH; default: the image's size"},
                                    "response_format": {"type": "string", "enum": ["b64_json", "url"]},
                                    "user": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": _responses(
                    {"200": {"description": "The images.", "content": _json("ImagesResponse")}},
                    [400, 409, 413, 422, 502, 503, 504],
                    schema="OpenAIError",
                ),
            }
        },
        "/v1/models": {
            "get": {
                "summary": "OpenAI API: the models live nodes serve",
                "operationId": "openaiModels",
                "security": KEYED,
                "responses": _responses(
                    {"200": {"description": "The models.", "content": _json("ModelList")}}, [], schema="OpenAIError"
                ),
            }
        },
        **_a1111_paths(),
        **horde.openapi_paths(),
        "/healthz": {
            "get": {
                "summary": "Liveness: connected to NATS",
                "operationId": "healthz",
                "security": [],
                "responses": {
                    "200": {"description": "Connected.", "content": _json("Health")},
                    "503": {"description": "Not connected to NATS.", "content": _json("Health")},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "security": [],
                "responses": {"200": {"description": "Text exposition format.", "content": {"text/plain": {}}}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}}},
            }
        },
        "/docs/assets/{name}": {
            "get": {
                "summary": "Swagger UI's script and stylesheet (vendored swagger-ui-dist)",
                "operationId": "docsAsset",
                "security": [],
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": sorted(SWAGGER_UI_ASSETS)},
                    }
                ],
                "responses": {
                    "200": {"description": "The file.", "content": {"text/javascript": {}, "text/css": {}}},
                    "404": {"description": "No such asset.", "content": _json("ErrorBody")},
                },
            }
        },
        "/docs": {
            "get": {
                "summary": "This document in Swagger UI (its assets served here: no internet needed)",
                "operationId": "docs",
                "security": [],
                "responses": {"200": {"description": "An HTML page.", "content": {"text/html": {}}}},
            }
        },
    }
    network.add_openapi(paths, schemas, KEYED, _responses, _json)  # the network's JSON and the web pages
    for operations in paths.values():  # any caller without a key has a per-IP limit, on every route
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "delete", "head", "patch"):
                continue  # a path's shared `parameters`
            operation["responses"].setdefault(
                "429",
                {
                    "description": "The client IP (a caller without an API key) is over its rate limit "
                    "(`rate_limited`, STIPPLE_ANON_RATE_PER_MINUTE); `Retry-After` says when to try again.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Stipple gateway",
            "version": "1",
            "description": "The REST API of the Stipple network: the native asynchronous /v1 API, and the "
            "SDCN, AUTOMATIC1111 (/sdapi/v1), OpenAI images (/v1/images) and AI Horde (/api/v2) APIs over the "
            "same tasks; the web pages and their JSON. The prose contract is docs/api.md.",
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key's secret, when the gateway runs with STIPPLE_API_KEYS; "
                    "without it every route is open.",
                }
            },
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


@functools.cache
def document_bytes() -> bytes:
    return render().encode()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stdout.write(render())
        return 0
    Path(args[0]).write_text(render())
    print(f"wrote {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
