"""The router's behaviour when its backend fails: an error response with the reason (500 whole,
an SSE error object then the end when streaming), never a hang; a departed client is aborted;
/health answers 503 with the details when the backend is not healthy."""

import http.client
import json
import time

import openai
import pytest

from mmserve.serving.backend import TokenEvent
from mmserve.serving.router import RouterSettings, build_app
from models.qwen3_vl_moe import load_model
from scripted_backend import HANG, ScriptedBackend, ThreadedServer
from server_process import prometheus_value, request

TOKEN = TokenEvent("", [11], text="ab")
LOST = TokenEvent("", [], error="decode worker lost")
REFUSED = TokenEvent("", [], error="the prompt needs 9 KV pages; the cache has 4", invalid=True)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def served():
    backend = ScriptedBackend()
    server = ThreadedServer(build_app(backend, load_model("tiny", weights=False), RouterSettings("tiny", 256)))
    yield server, backend
    server.stop()


@pytest.fixture
def backend(served):
    served[1].script, served[1].health_answer = [], {"healthy": True}
    return served[1]


@pytest.fixture
def url(served):
    return served[0].url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_error_mid_stream_is_an_sse_error_object_then_the_end(url, client, backend):
    backend.script = [TOKEN, LOST]
    connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(CHAT | {"stream": True}),
                       {"Content-Type": "application/json"})
    events = [line[len("data: "):] for line in connection.getresponse().read().decode().splitlines() if line]
    assert json.loads(events[-2])["error"]["message"] == "decode worker lost"
    assert events[-1] == "[DONE]"
    with pytest.raises(openai.APIError, match="decode worker lost"):
        list(client.chat.completions.create(stream=True, **CHAT))


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT),
                                        ("/v1/completions", {"model": "tiny", "prompt": "hi"}),
                                        ("/generate", {"prompt": "hi"})])
def test_error_without_streaming_is_a_500_with_the_reason(url, backend, path, body):
    backend.script = [TOKEN, LOST]
    status, answer = request("POST", f"{url}{path}", body, timeout=30)
    assert status == 500
    assert answer["error"]["message"] == "decode worker lost"
    assert answer["error"]["type"] == "server_error"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_failures_reason_reaches_the_client_without_the_clusters_addresses(url, backend, stream):
    """Transfer and gRPC failures name their peer; the client reads what failed, not where."""
    backend.script = [TOKEN, TokenEvent("", [], error=(
        "room 5 failed: no heartbeat from tcp://10.1.2.3:5555; prefill worker prefill-0 failed: UNAVAILABLE: "
        "ipv4:10.0.0.7:50051: Connection refused; unix:/tmp/mmserve-x/decode.sock; [fd00::5]:8476; "
        "prefill-0.mmserve.svc.cluster.local:50051"))]
    status, answer = request("POST", f"{url}/v1/chat/completions", CHAT | {"stream": stream}, timeout=30)
    text = json.dumps(answer)
    for address in ("10.1.2.3", "5555", "10.0.0.7", "50051", "/tmp/mmserve", "fd00", "8476", "svc.cluster"):
        assert address not in text
    assert "room 5 failed: no heartbeat from <internal address>" in text and "Connection refused" in text
    assert status == (200 if stream else 500)


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT),
                                        ("/v1/completions", {"model": "tiny", "prompt": "hi"}),
                                        ("/generate", {"prompt": "hi"})])
def test_a_request_the_backend_refuses_is_a_400_with_the_reason(url, backend, path, body):
    backend.script = [REFUSED]
    status, answer = request("POST", f"{url}{path}", body, timeout=30)
    assert status == 400
    assert answer["error"]["message"] == REFUSED.error
    assert answer["error"]["type"] == "invalid_request_error"


def _stream(url: str, body: dict) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(body | {"stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read().decode()


def test_a_stream_refused_before_its_first_token_is_a_400_with_the_reason(url, backend):
    """Not a 200 whose stream carries the error (a picture that does not decode is found out by the
    backend, after the door's checks): the status says it, as for a whole answer and in vLLM."""
    backend.script = [REFUSED]
    status, body = _stream(url, CHAT)
    error = json.loads(body)["error"]
    assert status == 400
    assert (error["type"], error["message"]) == ("invalid_request_error", REFUSED.error)


def test_a_stream_that_fails_after_its_first_token_ends_with_an_error_event(url, backend):
    backend.script = [TOKEN, LOST]
    status, body = _stream(url, CHAT)
    events = [line[len("data: "):] for line in body.splitlines() if line]
    error = json.loads(events[-2])["error"]
    assert status == 200 and events[-1] == "[DONE]"
    assert (error["type"], error["code"], error["message"]) == ("server_error", 500, "decode worker lost")


def test_a_stream_that_ends_unfinished_is_an_error(client, backend):
    backend.script = [TOKEN]
    with pytest.raises(openai.InternalServerError, match="without finishing"):
        client.chat.completions.create(**CHAT)


def test_finished_answer_carries_text_and_usage(client, backend):
    backend.script = [TOKEN, TokenEvent("", [12], finish_reason="stop", text="abc")]
    got = client.chat.completions.create(**CHAT)
    assert got.choices[0].message.content == "abc"
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == 2
    assert backend.requests[-1].params.max_tokens == 4


def test_client_that_hangs_up_is_aborted(url, backend):
    backend.script = [HANG]
    before = len(backend.requests)
    connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(CHAT), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while len(backend.requests) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    connection.sock.shutdown(2)
    connection.close()
    request_id = backend.requests[-1].request_id
    while request_id not in backend.aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request_id in backend.aborted


@pytest.mark.parametrize("answer", [{"healthy": False, "decode": "down"}, RuntimeError("registry unreachable")])
def test_health_is_503_with_details_when_the_backend_is_not_healthy(url, backend, answer):
    backend.health_answer = answer
    status, body = request("GET", f"{url}/health")
    assert status == 503
    assert body["healthy"] is False
    assert ("decode" in body) if isinstance(answer, dict) else "registry unreachable" in body["error"]


def test_metrics_export_the_backend_gauges(url):
    text = request("GET", f"{url}/metrics")[1]
    assert prometheus_value(text, "mmserve_backend_free_pages") == 7
    assert prometheus_value(text, "mmserve_backend_waiting") == 2
