"""W3C trace context carried in NATS headers (``traceparent``/``tracestate``).

Every publish through `stipple_common.nats.publish` injects the current context; the
consumer loop extracts it and runs the handler inside a span that continues the trace.
Spans are exported over OTLP only when an endpoint is configured (a later issue wires
the exporter); otherwise they stay in process, which still propagates the trace id.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider


def setup_tracing(service: str) -> trace.Tracer:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # once per process
        trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": f"stipple-{service}"})))
    return trace.get_tracer(f"stipple.{service}")


def inject(headers: dict[str, str]) -> dict[str, str]:
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
