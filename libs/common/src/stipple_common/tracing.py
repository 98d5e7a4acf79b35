"""OpenTelemetry traces, carried between services in NATS headers (W3C ``traceparent``/``tracestate``).

One task is one trace. Its root is the gateway's HTTP span (``POST /v1/tasks``, or the
SDCN endpoints); every publish through `stipple_common.bus.publish` injects the current
context into the message headers, and the consumer loop (`bus.consume`) extracts it and
runs the handler inside a ``handle <STREAM> <event>`` span that continues the trace.
Work a service starts outside a message handler (the dispatcher's queue pump and its
replacement timer) runs in a `task_span` whose parent is the task's stored ``traceparent``
(`carrier()`), so it joins the task's trace too. docs/observability.md lists the spans.

`task_span` and `bind_task` also bind ``task_id``, ``node_id`` and ``trace_id`` into
structlog's context variables, so every log line written inside them carries them.

Export: with ``STIPPLE_OTLP_ENDPOINT`` set (an OTLP/HTTP endpoint: ``http://host:4318``,
``/v1/traces`` appended when no path is given), spans go through a BatchSpanProcessor to
an OTLPSpanExporter, under the resource ``service.name = stipple-<service>``; `flush()`
runs when a service closes, and the SDK shuts the provider down at process exit.

Recording (`RecordWhileExporting`, the provider's sampler): a process that exports records
every span, whatever a parent's sampled flag says; one that does not records none. An
unrecorded span still has its trace and span ids, so ids propagate and logs carry them as
before, but nothing is timed, attributed or handed to processors (a third of a span's
cost; the control plane makes about twenty spans per task). The parent's flag is not
obeyed because the peers that send "not sampled" are ours (a service or node that does not
export) or a hostile node hiding its work from the trace; an app's sampling decision is
not ours to follow either: the network's traces are kept by its operator's collector.

Not exporting, a process makes no span at all where it has a trace to continue (`task_span`,
and `handling` for a delivery): the incoming context (a stored carrier, a message's headers,
the current span) becomes the current one as it is, so the logs name its trace and what is
published inside carries it on, for 12 µs instead of an unrecorded span's 21
(bench/hot_paths.py). Only where there is none (a message without ``traceparent``, work
outside any task) is an unrecorded span made, for a trace id of its own. What changes is
only which span id the next message names as its parent: the last one made, which, in a
process that exports, is one its collector has, where an unrecorded span's id was a
parent no collector had.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import Token
from typing import Any
from urllib.parse import urlsplit

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

TASK_ID = "stipple.task_id"
NODE_ID = "stipple.node_id"

_exporting: set[str] = set()  # endpoints this process exports to


def otlp_traces_url(endpoint: str) -> str:
    """The traces URL of an OTLP/HTTP endpoint: ``/v1/traces`` appended to a bare host:port."""
    endpoint = endpoint.strip()
    if "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    if urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return endpoint


class RecordWhileExporting(Sampler):
    """Record every span once the process exports (`export_to`), none before: see the
    module's docstring. Not recorded, a span keeps its parent's trace id (or a new one)."""

    def __init__(self) -> None:
        self.exporting = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        decide = ALWAYS_ON if self.exporting else ALWAYS_OFF
        return decide.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return "RecordWhileExporting"


_sampler = RecordWhileExporting()
# One tracer for the spans made without one. `get_tracer` builds a new tracer at every call
# (a tenth of a small span's cost); made before `setup_tracing`, this is OpenTelemetry's
# proxy, which binds to the provider once one is set.
_tracer = trace.get_tracer("stipple")


def setup_tracing(service: str, otlp_endpoint: str = "") -> trace.Tracer:
    """The process's tracer provider (once per process, named ``stipple-<service>``),
    exporting over OTLP/HTTP to `otlp_endpoint` when one is given."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        resource = Resource.create({"service.name": f"stipple-{service}"})
        trace.set_tracer_provider(TracerProvider(resource=resource, sampler=_sampler))
    if otlp_endpoint and otlp_endpoint not in _exporting:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        export_to(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_traces_url(otlp_endpoint))))
        _exporting.add(otlp_endpoint)
    return trace.get_tracer(f"stipple.{service}")


def exporting() -> bool:
    """Whether this process exports its spans (and so makes and records them)."""
    return _sampler.exporting


def _to_carry(context: Context | None) -> trace.Span | None:
    """In a process that does not export, the span of `context` (None: of the current
    context) when it holds a trace to carry on as is; else None: a span is to be made."""
    if exporting():
        return None
    span = trace.get_current_span(context)
    return span if span.get_span_context().is_valid else None


class _Current:
    """`context` made the current one for a block (None: the current one stays)."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: Context | None) -> None:
        self._context = context
        self._token: Token[Context] | None = None

    def __enter__(self) -> None:
        if self._context is not None:
            self._token = otel_context.attach(self._context)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)


def export_to(processor: SpanProcessor) -> None:
    """Hand every span from now on to `processor` (an exporter's), and so record them all."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "setup_tracing() first"
    provider.add_span_processor(processor)
    _sampler.exporting = True


def flush(timeout_millis: int = 5_000) -> None:
    """Export the spans still buffered (a service's last act; the provider stays usable)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis)


def inject(headers: dict[str, str]) -> dict[str, str]:
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


def carrier() -> dict[str, str]:
    """The current trace context as headers (``traceparent``, ``tracestate``): what to keep
    with a task's state, for work done later outside the message handler."""
    return inject({})


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def trace_id_of(headers: Mapping[str, str] | None) -> str:
    """The trace id in a stored carrier ("" when it holds none)."""
    ctx = trace.get_current_span(extract(headers)).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def _tag(span: trace.Span, task_id: str, node_id: str) -> dict[str, str]:
    """Set stipple.task_id / stipple.node_id on `span`; the log fields that go with them."""
    values: dict[str, str] = {"trace_id": current_trace_id()}
    if task_id:
        span.set_attribute(TASK_ID, task_id)
        values["task_id"] = task_id
    if node_id:
        span.set_attribute(NODE_ID, node_id)
        values["node_id"] = node_id
    return values


def bind_task(task_id: str = "", node_id: str = "") -> None:
    """Tag the current span and the log context with the task (and node) it is about."""
    structlog.contextvars.bind_contextvars(**_tag(trace.get_current_span(), task_id, node_id))


@contextlib.contextmanager
def task_span(
    name: str,
    *,
    task_id: str = "",
    node_id: str = "",
    parent: Mapping[str, str] | None = None,
    tracer: trace.Tracer | None = None,
    **attributes: Any,
) -> Iterator[trace.Span]:
    """A span about one task: a child of the current span, or of the stored `parent`
    carrier when given (work started outside the task's message handler); tagged with
    stipple.task_id / stipple.node_id, and with task_id, node_id and trace_id bound into
    the log context for its duration (restored after)."""
    context = extract(parent) if parent is not None else None
    carried = _to_carry(context)
    if carried is not None:
        with _Current(context), structlog.contextvars.bound_contextvars(**_tag(carried, task_id, node_id)):
            yield carried
        return
    tracer = tracer or _tracer
    with tracer.start_as_current_span(name, context=context) as span:
        for key, value in attributes.items():
            span.set_attribute(f"stipple.{key}", value)
        with structlog.contextvars.bound_contextvars(**_tag(span, task_id, node_id)):
            yield span


@contextlib.contextmanager
def handling(
    name: str, headers: Mapping[str, str] | None, tracer: trace.Tracer, attributes: Callable[[], Attributes]
) -> Iterator[None]:
    """The span of one delivery (a consumer's): a child of the trace in the message's
    headers; or, in a process that does not export, that trace made current as it is, with
    no span (the module's docstring). `attributes` are asked for only when a span is made."""
    context = extract(headers)
    if _to_carry(context) is not None:
        with _Current(context):
            yield
        return
    with tracer.start_as_current_span(name, context=context, kind=SpanKind.CONSUMER, attributes=attributes()):
        yield


@contextlib.contextmanager
def batch_span(
    name: str, carriers: list[Mapping[str, str] | None], tracer: trace.Tracer | None = None, **attributes: Any
) -> Iterator[trace.Span]:
    """A span for work on many tasks at once (the chain-indexer's settlement batches): a
    root of its own, with a span link to each task's trace (the carriers of its messages)."""
    tracer = tracer or _tracer
    links = []
    for headers in carriers:
        context = trace.get_current_span(extract(headers)).get_span_context()
        if context.is_valid:
            links.append(trace.Link(context))
    attributes = {f"stipple.{key}": value for key, value in attributes.items()}
    with (
        tracer.start_as_current_span(name, context=Context(), links=links, attributes=attributes) as span,
        structlog.contextvars.bound_contextvars(trace_id=current_trace_id()),  # (inside the span)
    ):
        yield span


@contextlib.contextmanager
def task_logs(task_id: str, parent: Mapping[str, str] | None) -> Iterator[None]:
    """Log lines about a task written outside its spans (no span of their own): task_id
    and the task's trace_id from its stored carrier."""
    with structlog.contextvars.bound_contextvars(task_id=task_id, trace_id=trace_id_of(parent)):
        yield
