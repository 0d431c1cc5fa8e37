"""The router's span of each request says how it ended: the outcome as an attribute, and for
the server's failures (an error, the deadline) the reason as its error status, which trace
viewers search for; a request refused as given is the client's error, not the server's. In a
process of its own: OpenTelemetry takes its tracer provider once per process."""

import os
import subprocess
import sys
from pathlib import Path

# Each test's script: the process's spans kept in memory, and the router over a scripted backend.
PRELUDE = r'''
import json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
from mmserve.serving.backend import TokenEvent
from mmserve.serving.router import RouterSettings, build_app
from models.qwen3_vl_moe import load_model
from scripted_backend import HANG, ScriptedBackend, ThreadedServer
from server_process import request
'''

CODE = PRELUDE + r'''

backend = ScriptedBackend()
server = ThreadedServer(build_app(backend, load_model("tiny", weights=False),
                                  RouterSettings("tiny", 256, request_timeout_s=0.5)))
chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
statuses = []
for script in ([TokenEvent("", [11], text="ab"), TokenEvent("", [], error="decode worker lost")], [HANG],
               [TokenEvent("", [], error="too long", invalid=True)],
               [TokenEvent("", [11], text="ab", finish_reason="stop")]):
    backend.script = script
    statuses.append(request("POST", server.url + "/v1/chat/completions", chat, timeout=30)[0])
server.stop()
spans = [(s.attributes["mmserve.outcome"], s.status.status_code.name, s.status.description)
         for s in exporter.get_finished_spans() if s.name == "router chat"]
print(json.dumps({"statuses": statuses, "spans": spans}))
'''


def test_the_routers_span_carries_the_outcome_and_the_servers_failures_as_errors():
    here = Path(__file__).parent
    env = os.environ | {"PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", CODE], check=True, capture_output=True, text=True, env=env, timeout=120)
    result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [500, 500, 400, 200]
    assert result["spans"] == [["error", "ERROR", "decode worker lost"],
                               ["timeout", "ERROR", "the request passed its deadline of 0.5 s"],
                               ["rejected", "UNSET", None], ["finished", "UNSET", None]]


CLIENT_TRACE = PRELUDE + r"""

backend = ScriptedBackend()
backend.script = [TokenEvent("", [11], text="ab", finish_reason="stop")]
server = ThreadedServer(build_app(backend, load_model("tiny", weights=False), RouterSettings("tiny", 256)))
parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 3}
statuses = [request("POST", server.url + "/v1/chat/completions", chat, {"traceparent": parent}, timeout=30)[0],
            request("POST", server.url + "/generate", {"prompt": "hi"}, {"traceparent": parent}, timeout=30)[0]]
server.stop()
spans = [(s.name, format(s.context.trace_id, "032x"), format(s.parent.span_id, "016x") if s.parent else None)
         for s in exporter.get_finished_spans() if s.name.startswith("router")]
print(json.dumps({"statuses": statuses, "spans": spans}))
"""


def test_the_routers_spans_join_the_trace_the_client_sent():
    """A client tracing its own calls sends W3C ``traceparent``: each choice's span (three for
    ``n`` = 3) is its child, in its trace, as vLLM's spans are (each started a trace of its own,
    and the three choices of one request were three unrelated traces)."""
    here = Path(__file__).parent
    env = os.environ | {"PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", CLIENT_TRACE], check=True, capture_output=True, text=True, env=env,
                         timeout=120)
    result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [200, 200]
    assert sorted(name for name, _, _ in result["spans"]) == ["router chat"] * 3 + ["router generate"]
    assert {(trace_id, parent) for _, trace_id, parent in result["spans"]} == {
        ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")}
