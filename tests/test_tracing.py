"""Tracing: off costs nothing and records nothing; on, a span's context crosses a process boundary
in gRPC-style metadata and the file exporter writes OpenTelemetry's span JSON, one per line."""

import json
import os
import subprocess
import sys

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from mmserve.tracing import JsonLinesExporter, TracingConfig, extract, inject


def test_off_by_default():
    assert not TracingConfig().enabled
    code = ("from mmserve.tracing import TracingConfig, configure_tracing, inject, tracer\n"
            "assert configure_tracing(TracingConfig(), 'mmserve-test') is False\n"
            "with tracer.start_as_current_span('x') as span:\n"
            "    assert not span.is_recording()\n"
            "    assert inject() == []\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ["PYTHONPATH"]})


def test_a_child_in_another_process_joins_the_trace(tmp_path):
    provider = TracerProvider()
    path = tmp_path / "spans.jsonl"
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("router chat") as parent:
        metadata = inject()
    assert [key for key, _ in metadata] == ["traceparent"]
    with tracer.start_as_current_span("prefill", context=extract(metadata + [("auth", b"bytes")])) as child:
        pass
    provider.shutdown()
    spans = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["name"] for s in spans] == ["router chat", "prefill"]
    assert spans[1]["parent_id"] == f"0x{parent.get_span_context().span_id:016x}"
    assert spans[0]["context"]["trace_id"] == spans[1]["context"]["trace_id"]
    assert child.get_span_context().trace_id == parent.get_span_context().trace_id
