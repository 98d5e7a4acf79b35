"""The metrics port: one small threaded HTTP server per service process that answers

- ``GET /metrics``: the service's Prometheus registry (prometheus_client's own WSGI app,
  so content negotiation (OpenMetrics), gzip and ``name[]`` filtering stay as they were);
- ``GET /healthz``: liveness, 200 while the process can answer at all;
- ``GET /readyz``: readiness, 200 only while the service has finished start-up, is not
  shutting down and its NATS connection is connected; 503 with a short JSON reason
  otherwise (``{"status": "unready", "reason": "nats_reconnecting"}``);
- anything else: 404.

It is stdlib ``wsgiref`` with a threading server, the same machinery prometheus_client's
``start_http_server`` uses: /metrics is served by ``make_wsgi_app`` unchanged, and the
two probes are a few lines of WSGI in front of it. Probes never touch the event loop:
readiness reads the NATS client's connection state (an attribute) and the stop Event's
flag from the server's thread, so a stalled loop cannot make a probe hang, and a
disconnect shows at the next probe without depending on a callback having run.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, make_wsgi_app

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Health:
    """What /readyz answers from: start-up done, not stopping, NATS connected.

    The service marks it ready after start-up and stopping at shutdown; the NATS client
    and the stop Event are read at each probe."""

    def __init__(self) -> None:
        self._started = False
        self._stopping = False
        self._nc: NATS | None = None
        self._stop: asyncio.Event | None = None

    def watch(self, nc: NATS | None = None, stop: asyncio.Event | None = None) -> None:
        if nc is not None:
            self._nc = nc
        if stop is not None:
            self._stop = stop

    def mark_ready(self) -> None:
        self._started = True

    def mark_stopping(self) -> None:
        self._stopping = True

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason); the reason is "ready" when ready."""
        if self._stopping or (self._stop is not None and self._stop.is_set()):
            return False, "shutting_down"
        if not self._started:
            return False, "starting"
        nc = self._nc
        if nc is None:
            return False, "nats_not_connected"
        if nc.is_draining:  # is_connected counts draining as connected; it is the way out
            return False, "nats_draining"
        if nc.is_connected:
            return True, "ready"
        if nc.is_reconnecting:
            return False, "nats_reconnecting"
        if nc.is_closed:
            return False, "nats_closed"
        return False, "nats_not_connected"


def _json(start_response: StartResponse, status: str, body: dict[str, str]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Cache-Control", "no-store")],
    )
    return [data]


def make_app(registry: CollectorRegistry, health: Health) -> WSGIApp:
    """The WSGI app of the metrics port (see the module docstring)."""
    metrics_app: WSGIApp = make_wsgi_app(registry)  # typed as a bare Callable by prometheus_client

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path not in ("/metrics", "/healthz", "/readyz"):
            return _json(start_response, "404 Not Found", {"status": "not_found", "path": path})
        if method not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"status": "method_not_allowed"})
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "ok"})
        ready, reason = health.readiness()
        if ready:
            return _json(start_response, "200 OK", {"status": "ready"})
        return _json(start_response, "503 Service Unavailable", {"status": "unready", "reason": reason})

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a probe in flight never holds the process's exit


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no access log
        pass


class HealthServer:
    """The running server: `port` is the bound port; `close()` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port = int(server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(registry: CollectorRegistry, health: Health, port: int, host: str = "127.0.0.1") -> HealthServer:
    """Serve /metrics, /healthz and /readyz in a thread (port -1 or 0: any free port)."""
    server_class = _IPv6Server if ":" in host else _Server
    server = make_server(
        host, max(port, 0), make_app(registry, health), server_class=server_class, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="stipple-metrics", daemon=True
    )
    thread.start()
    return HealthServer(server, thread)
