"""The OpenAPI document: generated from the code, served, complete, and in sync with
docs/openapi.json."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import msgspec
import pytest

from stipple_gateway import openapi
from stipple_gateway.app import create_app
from stipple_gateway.views import ErrorBody, TaskAccepted, TaskView

DOCS = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"
TASK = {"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"image_width": 64, "image_height": 64, "steps": 2}}


def test_docs_openapi_json_is_what_the_code_generates():
    generated = openapi.render()
    current = DOCS.read_text() if DOCS.exists() else ""
    if current != generated:
        diff = "".join(
            list(difflib.unified_diff(current.splitlines(True), generated.splitlines(True), "docs", "code"))[:40]
        )
        pytest.fail(f"docs/openapi.json is out of date; regenerate it with:\n    {openapi.REGENERATE}\n{diff}")


@pytest.mark.integration
async def test_every_route_is_documented_and_served(make_gateway, asgi_client):
    gw = await make_gateway()
    document = openapi.build()
    routes = {
        (re.sub(r":\w+}", "}", route.path), method.lower())
        for route in create_app(gw).routes
        for method in route.methods  # type: ignore[attr-defined]
        if method != "HEAD"
    }
    documented = {
        (path, method) for path, item in document["paths"].items() for method in item if method != "parameters"
    }
    assert routes == documented
    async with asgi_client(gw) as http:
        served = await http.get("/openapi.json")
        assert served.status_code == 200
        assert served.json() == document
        page = await http.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert 'url: "/openapi.json"' in page.text
        assert "https://" not in page.text  # no CDN: the page works with no internet
        for name, kind in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
            assert f'"/docs/assets/{name}"' in page.text
            asset = await http.get(f"/docs/assets/{name}")
            assert asset.status_code == 200
            assert asset.headers["content-type"].startswith(kind)
            assert len(asset.content) > 100_000
        assert (await http.get("/docs/assets/..%2F..%2Fapp.py")).status_code == 404  # only the two files
        missing = await http.get("/docs/assets/app.py")
        assert missing.status_code == 404
        assert missing.json()["error"]["field"] == "name"


@pytest.mark.integration
async def test_answers_match_their_documented_schemas(make_gateway, asgi_client):
    """The schemas come from the types the handlers encode: decoding real answers with
    them is the check that the document describes what the gateway sends."""
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        accepted = await http.post("/v1/tasks", json=TASK)
        msgspec.json.decode(accepted.content, type=TaskAccepted)
        task_id = accepted.json()["task_id"]
        view = msgspec.json.decode((await http.get(f"/v1/tasks/{task_id}")).content, type=TaskView)
        assert view.status == "pending"
        cancelled = msgspec.json.decode((await http.delete(f"/v1/tasks/{task_id}")).content, type=TaskView)
        assert cancelled.outcome is not None
        for response in (
            await http.delete(f"/v1/tasks/{task_id}"),
            await http.post("/v1/tasks", json={**TASK, "steps": 3}),
            await http.get("/v1/tasks/" + "0" * 32),
        ):
            error = msgspec.json.decode(response.content, type=ErrorBody).error
            assert error.code in ("already_finished", "invalid_input", "not_found")
    schemas = openapi.build()["components"]["schemas"]
    assert "webhook_url" in schemas["TaskRequest"]["properties"]
    assert schemas["TaskRequest"]["properties"]["prompt"] == schemas["TaskSpec"]["properties"]["prompt"]
    assert set(schemas["TaskView"]["required"]) >= {"task_id", "status", "nodes", "task"}
    assert json.dumps(schemas)  # plain JSON
