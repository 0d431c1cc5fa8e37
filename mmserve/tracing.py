"""One trace per request across the processes of a deployment, with OpenTelemetry.

Off unless asked for: with no exporter configured, OpenTelemetry's API hands out non-recording
spans and nothing is collected or sent (the cost is a few attribute lookups per span). A process
exports its spans over OTLP/gRPC (``--otlp-traces-endpoint``, vLLM's flag, or the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and/or appends them as JSON lines to a file
(``--trace-file``, for local use: ``scripts/trace_timeline.py`` draws one request's timeline from
it).

The router starts each request's trace, or joins the client's when the HTTP request carries a
W3C ``traceparent`` (then every choice of an ``n > 1`` request is in that one trace; without it,
each choice starts its own); its context crosses to the workers in the gRPC metadata, so each
role's spans (encode, prefill, the KV transfer, decode) are children of the router's span for
that request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
tracer = trace.get_tracer("mmserve")


@dataclasses.dataclass(frozen=True)
class TracingConfig:
    """Where a process's spans go; neither set: nowhere, at no cost."""

    otlp_traces_endpoint: str | None = None
    """an OTLP/gRPC collector (host:port or URL) every span is exported to (default:
    $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else none)"""
    trace_file: Path | None = None
    """append every span to this file as one JSON object per line, for local use; the processes of
    --role all share it"""

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_traces_endpoint or os.environ.get(ENDPOINT_ENV) or self.trace_file)


def configure_tracing(config: TracingConfig, service: str) -> bool:
    """Installs this process's exporters, named ``service`` (``mmserve-prefill``, ...); False when
    tracing is off."""
    if not config.enabled:
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    endpoint = config.otlp_traces_endpoint or os.environ.get(ENDPOINT_ENV)
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if config.trace_file is not None:
        provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(config.trace_file)))
    trace.set_tracer_provider(provider)
    return True


def shutdown_tracing() -> None:
    """Flushes what is buffered (the batch processors export every few seconds)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def role_span(role: str, request_id: str, parent: context.Context | None) -> trace.Span:
    """A request's span in one role, a child of the router's span whose context ``parent`` is."""
    return tracer.start_span(role, context=parent, attributes={"mmserve.request_id": request_id})


def inject() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata (empty when nothing is being traced)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def span_carrier(span: trace.Span) -> dict[str, str]:
    """``span``'s context as W3C headers (``traceparent``), for a message that is not a gRPC call
    (a transfer's ``TransferInfo.aux``); empty when the span is not recorded."""
    carrier: dict[str, str] = {}
    if span.is_recording():
        propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def link_from(span: trace.Span, carrier: Mapping[str, object]) -> None:
    """Links ``span`` to the span whose context ``carrier`` holds (the other side of a transfer)."""
    headers = {k: v for k, v in carrier.items() if k in ("traceparent", "tracestate") and isinstance(v, str)}
    peer = trace.get_current_span(propagate.extract(headers)).get_span_context()
    if peer.is_valid and span.is_recording():
        span.add_link(peer)


def http_parent(headers: Mapping[str, str]) -> context.Context | None:
    """The trace context a client sent with its HTTP request (W3C ``traceparent``), which the
    router's span for it joins, as vLLM's does; None when it sent none."""
    carrier = {key: headers[key] for key in ("traceparent", "tracestate") if key in headers}
    return propagate.extract(carrier) if "traceparent" in carrier else None


def extract(metadata: Iterable[tuple[str, str | bytes]]) -> context.Context:
    """The trace context a peer sent in its gRPC metadata."""
    carrier: Mapping[str, str] = {key: value for key, value in metadata if isinstance(value, str)}
    return propagate.extract(carrier)


class JsonLinesExporter(SpanExporter):
    """Each span as one JSON line (OpenTelemetry's own span JSON, compacted), appended to a file."""

    def __init__(self, path: Path):
        self._file: IO[str] = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: "Iterable[ReadableSpan]") -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(span.to_json())) + "\n" for span in spans)
        with self._lock:
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()
