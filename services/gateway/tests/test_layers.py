"""The gateway's layers: the task service (tasks.py) knows no web framework; the HTTP
layer (app.py) builds on it; the names other code imports from app.py still resolve."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client import CollectorRegistry

from stipple_gateway import app, service, tasks
from stipple_gateway.metrics import GatewayMetrics
from stipple_gateway.settings import GatewaySettings


def test_the_task_service_imports_no_web_framework():
    code = "import sys, stipple_gateway.tasks; print(*sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "stipple_gateway" in loaded
    assert "starlette" not in loaded
    assert "uvicorn" not in loaded


def test_old_import_paths_still_work():
    assert app.Gateway is tasks.TaskService
    assert app.GatewaySettings is service.GatewaySettings is GatewaySettings


def names(registry: CollectorRegistry) -> set[str]:
    return {metric.name for metric in registry.collect()}


def test_gateway_metrics_leave_out_webhooks_when_webhooks_are_off():
    full, bare = CollectorRegistry(), CollectorRegistry()
    GatewayMetrics(full)
    GatewayMetrics(bare, webhooks=False)
    assert names(full) - names(bare) == {"stipple_gateway_webhooks"}
