"""The router admits no more requests than its backend can hold: the rest wait in a bounded queue
for a bounded time and are then refused (429 when the queue is full, 503 when the wait ran out,
both with Retry-After); a request past its deadline, or whose client stopped reading its stream,
is aborted in the backend and gives its slot back. Over a real uvicorn server in this process, in
front of a scripted backend (the roles' own behaviour is tested end to end elsewhere)."""

import itertools
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from mmserve.serving.backend import TokenEvent, TokenLogprob
from mmserve.serving.router import RouterSettings, build_app
from scripted_backend import HANG, ScriptedBackend, ThreadedServer
from scripted_router import CHAT, DONE, TOKEN, model, served  # noqa: F401 (fixtures)
from server_process import metric, request
from waiting import wait_for


def _hold(url: str, body: dict) -> socket.socket:
    """Sends a streaming request and never reads the answer (a small receive buffer, so the
    server's side fills sooner)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    payload = json.dumps(body | {"stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


def _running(url: str) -> float:
    return metric(url, "mmserve_requests_in_flight")


def _queue(url: str, body: dict, queued: int = 1) -> tuple[threading.Thread, list]:
    """Sends ``body`` from a thread and waits until the router has ``queued`` requests queued;
    the answer (status, body) lands in the list once the thread ends."""
    answer: list = []
    waiting = threading.Thread(target=lambda: answer.append(request("POST", f"{url}/v1/chat/completions", body,
                                                                      timeout=60)))
    waiting.start()
    wait_for(lambda: metric(url, "mmserve_requests_queued") >= queued)
    return waiting, answer


def test_beyond_capacity_requests_queue_then_get_503_and_beyond_the_queue_429(served):
    server, backend = served
    backend.script = [TOKEN, HANG]
    held = [_hold(server.url, CHAT) for _ in range(2)]
    wait_for(lambda: len(backend.requests) == 2)
    answers = []
    queued = [threading.Thread(target=lambda: answers.append(request("POST", f"{server.url}/v1/chat/completions",
                                                                       CHAT, timeout=30)))
              for _ in range(2)]
    for thread in queued:
        thread.start()
    wait_for(lambda: metric(server.url, "mmserve_requests_queued") == 2)
    start = time.monotonic()
    status, body = request("POST", f"{server.url}/v1/chat/completions", CHAT, timeout=30)
    assert status == 429 and time.monotonic() - start < 1
    assert "at capacity" in body["error"]["message"] and body["error"]["code"] == "overloaded"
    assert body["error"]["type"] == "server_error"  # the server's condition, not the client's mistake
    for thread in queued:
        thread.join()
    assert [a[0] for a in answers] == [503, 503]
    assert all("no capacity freed" in a[1]["error"]["message"] for a in answers)
    assert all(a[1]["error"]["type"] == "server_error" for a in answers)
    assert len(backend.requests) == 2  # the refused never reached the backend
    for sock in held:
        sock.close()
    wait_for(lambda: _running(server.url) == 0)
    backend.script = [TOKEN, DONE]
    assert request("POST", f"{server.url}/v1/chat/completions", CHAT, timeout=30)[0] == 200


def test_refusals_carry_retry_after(served):
    server, backend = served
    backend.slots = 0  # no worker up
    req = urllib.request.Request(f"{server.url}/v1/chat/completions", json.dumps(CHAT).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    assert backend.requests == []


def test_a_request_whose_stage_has_no_worker_gets_503_with_retry_after_whole_or_streamed(served):
    """Capacity is there, but the backend lacks what this request needs (an image chat while the
    only encode worker restarts): a 503 to retry, not a 500 for a failure, and nothing started."""
    server, backend = served
    backend.missing = "no encode worker is up"
    for body in (CHAT, CHAT | {"stream": True}):
        req = urllib.request.Request(f"{server.url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        assert "no encode worker is up" in json.loads(refused.value.read())["error"]["message"]
    assert backend.requests == [] and _running(server.url) == 0


def test_a_queued_request_runs_when_a_slot_frees(served):
    server, backend = served
    backend.script = [TOKEN, HANG]
    held = [_hold(server.url, CHAT) for _ in range(2)]
    wait_for(lambda: len(backend.requests) == 2)
    waiting, answer = _queue(server.url, CHAT)
    backend.script = [TOKEN, DONE]
    held[0].close()  # its client leaves: aborted, the slot goes to the queued request
    waiting.join()
    assert answer[0][0] == 200 and answer[0][1]["choices"][0]["message"]["content"] == "abc"
    held[1].close()
    wait_for(lambda: _running(server.url) == 0)


def test_a_request_whose_stage_lost_its_worker_while_it_queued_gets_503(served):
    """Admitted once a slot frees, it finds that a role it needs has no worker now (the only encode
    worker died meanwhile, which takes no capacity away): the door's 503 with Retry-After, before
    the backend sees it (it was a 500 from the backend's pick)."""
    server, backend = served
    backend.script = [TOKEN, HANG]
    held = [_hold(server.url, CHAT) for _ in range(2)]
    wait_for(lambda: len(backend.requests) == 2)
    waiting, answer = _queue(server.url, CHAT)
    backend.missing = "no encode worker is up"
    held[0].close()
    waiting.join()
    status, body = answer[0]
    assert status == 503 and "no encode worker is up" in body["error"]["message"]
    assert len(backend.requests) == 2
    held[1].close()
    wait_for(lambda: _running(server.url) == 0)
    assert metric(server.url, "mmserve_requests_queued") == 0


def test_a_request_past_its_deadline_is_aborted_and_frees_its_slot(served):
    server, backend = served
    backend.script = [TOKEN, HANG]
    start = time.monotonic()
    status, body = request("POST", f"{server.url}/v1/chat/completions", CHAT, timeout=30)
    assert status == 500 and "deadline of 3 s" in body["error"]["message"]
    assert 3 <= time.monotonic() - start < 6
    wait_for(lambda: backend.aborted == [backend.requests[0].request_id])
    assert _running(server.url) == 0
    assert metric(server.url, 'mmserve_requests_total{endpoint="chat",outcome="timeout"}') == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_backend_that_raises_answers_with_an_error_and_frees_its_slot(served, stream):
    """A bug behind the backend (an exception out of its stream) reaches the client as an error
    (a 500, or an error event and [DONE]) at once, not as a request that never ends."""
    server, backend = served
    backend.script = [TOKEN, RuntimeError("a backend bug")]
    status, body = request("POST", f"{server.url}/v1/chat/completions", CHAT | {"stream": stream}, timeout=10)
    if stream:
        events = [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        assert "internal error: RuntimeError: a backend bug" in json.loads(events[-2])["error"]["message"]
    else:
        assert status == 500 and "internal error: RuntimeError: a backend bug" in body["error"]["message"]
    wait_for(lambda: backend.aborted == [backend.requests[0].request_id])
    assert _running(server.url) == 0
    backend.script = [TOKEN, DONE]
    assert request("POST", f"{server.url}/v1/chat/completions", CHAT, timeout=30)[0] == 200


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "hi"}),
                                        ("/generate", {"prompt": "hi"})], ids=["chat", "completions", "generate"])
def test_a_client_that_leaves_while_queued_gives_its_place_back_at_once(model, path, body):
    """Its place in the queue is free as soon as it hangs up, not at the queue timeout (30 s
    here): meanwhile the queue refused others with 429 for clients long gone."""
    backend = ScriptedBackend()
    backend.slots, backend.script = 1, [TOKEN, HANG]
    server = ThreadedServer(build_app(backend, model, RouterSettings("tiny", 256, max_queued_requests=1,
                                                                      queue_timeout_s=30.0)))
    try:
        held = _hold(server.url, CHAT)  # the one slot
        wait_for(lambda: len(backend.requests) == 1)
        host, port = server.url.removeprefix("http://").split(":")
        leaving = socket.create_connection((host, int(port)))
        payload = json.dumps(body).encode()
        leaving.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))
        wait_for(lambda: metric(server.url, "mmserve_requests_queued") == 1)
        leaving.close()
        wait_for(lambda: metric(server.url, "mmserve_requests_queued") == 0, limit_s=5)
        backend.script = [TOKEN, DONE]
        waiting, answer = _queue(server.url, CHAT)  # the place is there to take, not a 429
        held.close()
        waiting.join()
        assert answer[0][0] == 200 and len(backend.requests) == 2
    finally:
        server.stop()


def test_a_stream_whose_client_stops_reading_is_cut_and_frees_its_slot(served):
    server, backend = served
    # a chunk per event, endlessly: more than the server's socket buffers (at most 4 MiB) hold
    backend.script = itertools.repeat(TokenEvent("", [11], [TokenLogprob(11, -0.5, {})], text="ab"))
    stalled = _hold(server.url, CHAT)
    wait_for(lambda: backend.aborted and backend.aborted == [r.request_id for r in backend.requests], limit_s=15)
    assert _running(server.url) == 0
    assert metric(server.url, 'mmserve_requests_total{endpoint="chat",outcome="cut"}') == 1
    stalled.close()
    backend.script = [TOKEN, DONE]
    assert request("POST", f"{server.url}/v1/chat/completions", CHAT, timeout=30)[0] == 200


def test_requests_are_admitted_by_the_kv_they_reserve_not_only_by_slots(served):
    """Decode reserves prompt + max_tokens for each request up front: one whose KV does not fit
    waits at the router (slots free or not) instead of inside decode; one that could never fit
    is a 400 at once."""
    server, backend = served
    backend.kv_tokens = 150  # one request of max_tokens 100 fits, two do not; slots are 2
    backend.script = [TOKEN, HANG]
    long = CHAT | {"max_tokens": 100}
    held = _hold(server.url, long)
    wait_for(lambda: len(backend.requests) == 1)
    waiting, answer = _queue(server.url, long)
    assert len(backend.requests) == 1 and _running(server.url) == 1  # a slot is free, the KV is not
    status, body = request("POST", f"{server.url}/v1/chat/completions", CHAT | {"max_tokens": 200}, timeout=30)
    assert status == 400 and "KV cache" in body["error"]["message"] and body["error"]["param"] == "max_tokens"
    backend.script = [TOKEN, DONE]
    held.close()  # its client leaves: aborted, its KV goes to the queued request
    waiting.join()
    assert answer[0][0] == 200
    wait_for(lambda: _running(server.url) == 0)
    assert request("POST", f"{server.url}/v1/chat/completions", long, timeout=30)[0] == 200  # all KV given back


def test_queued_requests_are_refused_once_no_worker_of_a_role_is_left(model):
    """A role's last worker dies while requests queue: they get the door's 503 within a recheck,
    not after the queue timeout (the kill drills' requests must end within their deadline)."""
    backend = ScriptedBackend()
    backend.slots = 1
    server = ThreadedServer(build_app(backend, model, RouterSettings("tiny", 256, queue_timeout_s=30.0)))
    try:
        backend.script = [TOKEN, HANG]
        held = _hold(server.url, CHAT)
        wait_for(lambda: len(backend.requests) == 1)
        waiting, answer = _queue(server.url, CHAT)
        start = time.monotonic()
        backend.slots = 0
        waiting.join()
        assert answer[0][0] == 503 and "none is up" in answer[0][1]["error"]["message"]
        assert time.monotonic() - start < 5
        held.close()
    finally:
        server.stop()


class _BrokenDemand(ScriptedBackend):
    def kv_demand(self, request):
        raise RuntimeError("a backend bug: no answer from 10.0.0.5:50051")


def test_a_500_from_a_handler_and_a_401_are_counted(model):
    """Counted, and the 500's reason reaches the client without the cluster's addresses."""
    server = ThreadedServer(build_app(_BrokenDemand(), model, RouterSettings("tiny", 256, api_key="k" * 20)))
    try:
        headers = {"Authorization": "Bearer " + "k" * 20}
        status, body = request("POST", f"{server.url}/v1/chat/completions", CHAT, timeout=30, headers=headers)
        assert status == 500
        assert body["error"]["message"] == "internal error: RuntimeError: a backend bug: no answer from <internal address>"
        assert request("POST", f"{server.url}/v1/chat/completions", CHAT, timeout=30)[0] == 401
        assert metric(server.url, 'mmserve_requests_total{endpoint="chat",outcome="error"}') == 1
        assert metric(server.url, 'mmserve_requests_total{endpoint="chat",outcome="rejected"}') == 1
    finally:
        server.stop()


def test_time_to_first_token_leaves_out_a_slow_upload(served):
    """The client sends its body 1.5 s after its headers, and the backend answers at once: the
    server's TTFT is the backend's time, not the upload's (it was timed from the handler's start,
    so every slow client or remote image counted as server latency)."""
    server, backend = served
    backend.script = [TOKEN, DONE]
    body = json.dumps(CHAT).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:10])
        time.sleep(1.5)
        sock.sendall(body[10:])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    finally:
        sock.close()
    assert reply.split()[1] == b"200"
    assert metric(server.url, "mmserve_time_to_first_token_seconds_count") == 1
    assert metric(server.url, "mmserve_time_to_first_token_seconds_sum") < 0.5
