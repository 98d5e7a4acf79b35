"""tracing.py: the OTLP URL, spans about a task (their parent, attributes and the log
context they bind), and batch spans linked to many tasks' traces."""

from __future__ import annotations

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from stipple_common import tracing


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    tracing.setup_tracing("test")
    exporter = InMemorySpanExporter()
    tracing.export_to(SimpleSpanProcessor(exporter))
    return exporter


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("collector:4318", "http://collector:4318/v1/traces"),
        ("https://tempo.example/otlp/v1/traces", "https://tempo.example/otlp/v1/traces"),
    ],
)
def test_otlp_traces_url(endpoint: str, url: str) -> None:
    assert tracing.otlp_traces_url(endpoint) == url


def test_a_task_span_continues_a_stored_carrier_and_binds_the_log_context(spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("request"):
        stored = tracing.carrier()
        request_trace = tracing.current_trace_id()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id="other", trace_id="0" * 32)
    with tracing.task_span("dispatch.assign", task_id="t1", node_id="n1", parent=stored, attempt=2) as span:
        bound = structlog.contextvars.get_contextvars()
        assert bound == {"task_id": "t1", "node_id": "n1", "trace_id": request_trace}
        assert tracing.current_trace_id() == request_trace
        with tracing.task_span("inner"):  # no parent given: a child of the current span
            assert tracing.current_trace_id() == request_trace
    assert structlog.contextvars.get_contextvars() == {"task_id": "other", "trace_id": "0" * 32}  # restored
    structlog.contextvars.clear_contextvars()
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert finished["dispatch.assign"].attributes == {
        "stipple.task_id": "t1",
        "stipple.node_id": "n1",
        "stipple.attempt": 2,
    }
    assert finished["dispatch.assign"].parent.span_id == finished["request"].context.span_id
    assert finished["inner"].parent.span_id == span.get_span_context().span_id
    assert tracing.trace_id_of(stored) == request_trace
    assert tracing.trace_id_of({}) == ""


def test_a_batch_span_is_a_root_linked_to_each_task(spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")
    carriers = []
    for name in ("a", "b"):
        with tracer.start_as_current_span(name):
            carriers.append(tracing.carrier())
    with tracer.start_as_current_span("outer"), tracing.batch_span("chain.settle", [*carriers, None], events=3):
        batch_trace = tracing.current_trace_id()
    batch = next(s for s in spans.get_finished_spans() if s.name == "chain.settle")
    assert batch.parent is None
    assert batch_trace not in {tracing.trace_id_of(c) for c in carriers}
    assert [format(link.context.trace_id, "032x") for link in batch.links] == [tracing.trace_id_of(c) for c in carriers]
    assert batch.attributes == {"stipple.events": 3}


class _NoSpans:
    """A tracer that must not be asked for a span."""

    def start_as_current_span(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("a span was made")


def test_a_process_that_does_not_export_makes_no_span_where_it_has_a_trace_to_carry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not exporting, the incoming trace is made current as it is: the logs name it and the
    next message carries it (naming the same parent span), whatever its sampled flag; only
    where there is none is a span made, for a trace id of its own, and not recorded."""
    monkeypatch.setattr(tracing._sampler, "exporting", False)
    assert not tracing.exporting()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    for flags in ("01", "00"):
        parent = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-{flags}"}
        with tracing.task_span("quiet", task_id="t1", parent=parent, tracer=_NoSpans()) as span:  # type: ignore[arg-type]
            assert not span.is_recording()
            assert span.get_span_context().span_id == 0x00F067AA0BA902B7  # the parent's: no span of its own
            assert tracing.current_trace_id() == trace_id
            assert structlog.contextvars.get_contextvars()["trace_id"] == trace_id
            assert tracing.carrier()["traceparent"] == parent["traceparent"]
            with tracing.task_span("inner", node_id="n1", tracer=_NoSpans()):  # type: ignore[arg-type]
                assert tracing.current_trace_id() == trace_id  # (the current trace, carried on)
                assert structlog.contextvars.get_contextvars()["node_id"] == "n1"
        assert tracing.current_trace_id() == ""  # the carried context is let go
        with tracing.handling("handle TASKS started", parent, _NoSpans(), dict):  # type: ignore[arg-type]
            assert tracing.carrier()["traceparent"] == parent["traceparent"]
        assert tracing.current_trace_id() == ""
    provider = TracerProvider(sampler=tracing.RecordWhileExporting())  # (records nothing: not exporting)
    for parent_headers in ({}, {"traceparent": "not one"}):  # nothing to carry: a trace of its own
        with tracing.task_span("fresh", parent=parent_headers, tracer=provider.get_tracer("test")) as span:
            assert not span.is_recording()
            assert len(tracing.current_trace_id()) == 32
        with tracing.handling("handle TASKS submitted", parent_headers, provider.get_tracer("test"), dict):
            assert len(tracing.current_trace_id()) == 32
    with tracing.task_span("root", tracer=provider.get_tracer("test")):  # no parent, no current span
        assert len(tracing.current_trace_id()) == 32


def test_a_process_that_exports_records_every_span_whatever_the_parent_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the process exports, every span is made and recorded, also under a parent that
    says "not sampled" (a peer that does not export, or a node hiding its work)."""
    sampler = tracing.RecordWhileExporting()
    provider = TracerProvider(sampler=sampler)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    sampler.exporting = True
    monkeypatch.setattr(tracing._sampler, "exporting", True)
    for flags in ("01", "00"):
        parent = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-{flags}"}
        with tracing.task_span(f"recorded {flags}", task_id="t1", parent=parent, tracer=tracer) as span:
            assert span.is_recording()
        with tracing.handling(f"handle {flags}", parent, tracer, lambda: {"stipple.delivered": 1}):
            assert trace.get_current_span().is_recording()
    finished = {s.name: s for s in exporter.get_finished_spans()}
    assert set(finished) == {"recorded 01", "recorded 00", "handle 01", "handle 00"}
    assert all(format(s.context.trace_id, "032x") == trace_id for s in finished.values())
    assert all(s.parent.span_id == 0x00F067AA0BA902B7 for s in finished.values())
    assert finished["recorded 00"].attributes == {"stipple.task_id": "t1"}
    assert finished["handle 00"].attributes == {"stipple.delivered": 1}
    assert finished["handle 00"].kind == trace.SpanKind.CONSUMER
