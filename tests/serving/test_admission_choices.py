"""``n`` choices under admission: each choice is a request of its own to the backend, holding a slot
of its own; the choices that wait for a slot, that are refused or whose client left give their
places back, and a whole answer's choices end together. Over a real uvicorn server in this
process, in front of a scripted backend, as tests/serving/test_admission.py."""

import asyncio
import json
import socket
import time

import pytest

from mmserve.serving.backend import TokenEvent
from mmserve.serving.router import RouterSettings, build_app
from scripted_backend import HANG, ScriptedBackend, ThreadedServer
from scripted_router import CHAT, DONE, TOKEN, model, served  # noqa: F401 (fixtures)
from server_process import metric, request
from waiting import wait_for


def _running(url: str) -> float:
    return metric(url, "mmserve_requests_in_flight")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_more_choices_than_slots_run_as_the_slots_free(served, stream):
    """``n`` = 3 on 2 slots, each choice longer than a stream's buffer: the third choice waits for a
    slot, the first two run to their end meanwhile (nobody reads them yet, and that is the
    router's doing, not the client's: they were once cut as stalled, a 500), then it runs."""
    server, backend = served
    backend.script = [TOKEN] * 100 + [DONE]
    body = CHAT | {"n": 3, "stream": stream, "max_tokens": 101}
    status, body = request("POST", f"{server.url}/v1/chat/completions", body, timeout=30)
    assert status == 200, body
    if stream:
        events = [json.loads(line.removeprefix("data: ")) for line in body.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        finished = sorted(e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"])
        assert finished == [0, 1, 2]
    else:
        assert [c["finish_reason"] for c in body["choices"]] == ["stop"] * 3
    assert len(backend.requests) == 3 and backend.aborted == [] and _running(server.url) == 0


def test_choices_started_before_one_refused_at_once_give_their_slots_back(model):
    """``n`` = 2 with one slot and no queue: the second choice is refused (429) before the first
    one's relay has run at all. The first gave nothing back (its ticket, the in-flight count) and
    every later request got 429 for good."""
    backend = ScriptedBackend()
    backend.slots, backend.script = 1, [DONE]
    server = ThreadedServer(build_app(backend, model, RouterSettings("tiny", 256, max_queued_requests=0)))
    try:
        assert request("POST", f"{server.url}/v1/chat/completions", CHAT | {"n": 2}, timeout=30)[0] == 429
        assert metric(server.url, "mmserve_requests_in_flight") == 0
        assert metric(server.url, 'mmserve_requests_total{endpoint="chat",outcome="aborted"}') == 1
        # n = 4: the first started (and aborted), the second refused, the last two never tried;
        # each choice is counted once, as when the client leaves (the last two were not counted)
        assert request("POST", f"{server.url}/v1/chat/completions", CHAT | {"n": 4}, timeout=30)[0] == 429
        assert metric(server.url, 'mmserve_requests_total{endpoint="chat",outcome="aborted"}') == 2
        assert metric(server.url, 'mmserve_requests_total{endpoint="chat",outcome="overloaded"}') == 1 + 3
        for _ in range(2):
            assert request("POST", f"{server.url}/v1/chat/completions", CHAT, timeout=30)[0] == 200
    finally:
        server.stop()


def test_a_client_leaving_choices_running_and_queued_counts_each_choice_aborted_once(model):
    backend = ScriptedBackend()
    backend.slots, backend.script = 1, [HANG]
    server = ThreadedServer(build_app(backend, model, RouterSettings("tiny", 256)))
    try:
        host, port = server.url.removeprefix("http://").split(":")
        leaving = socket.create_connection((host, int(port)))
        payload = json.dumps(CHAT | {"n": 2}).encode()
        leaving.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        wait_for(lambda: metric(server.url, "mmserve_requests_queued") == 1)  # one running, one queued
        leaving.close()
        wait_for(lambda: metric(server.url, "mmserve_requests_in_flight") == 0)
        wait_for(lambda: len(backend.aborted) == 1)
        assert metric(server.url, 'mmserve_requests_total{endpoint="chat",outcome="aborted"}') == 2
    finally:
        server.stop()


class GrowingText(ScriptedBackend):
    """Each event carries the whole text so far as a string of its own, as the real backends send it."""

    async def generate(self, request):
        self.requests.append(request)
        for i in range(1, TOKENS_HELD_BACK):
            yield TokenEvent(request.request_id, [11], text="x" * (20 * i))
        yield TokenEvent(request.request_id, [12], text="x" * (20 * TOKENS_HELD_BACK), finish_reason="stop")


TOKENS_HELD_BACK = 2000


def test_choices_held_back_for_the_others_keep_memory_linear(model):
    """``n`` = 3 on 1 slot: the first choices run while the last waits, unread meanwhile. Their
    events each held the whole text so far (~20 MB a choice for 2,000 tokens of 20 characters,
    growing with the square of the length); they are merged while nobody reads them."""
    import tracemalloc

    backend = GrowingText()
    backend.slots = 1
    server = ThreadedServer(build_app(backend, model, RouterSettings("tiny", 4096, queue_timeout_s=30.0)))
    try:
        tracemalloc.start()
        status, body = request("POST", f"{server.url}/v1/chat/completions",
                               CHAT | {"n": 3, "max_tokens": TOKENS_HELD_BACK}, timeout=60)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert status == 200, body
        assert [len(c["message"]["content"]) for c in body["choices"]] == [20 * TOKENS_HELD_BACK] * 3
        assert body["usage"]["completion_tokens"] == 3 * TOKENS_HELD_BACK
        assert peak < 8 << 20, f"peak {peak >> 20} MiB"
    finally:
        server.stop()


class FirstChoiceFails(ScriptedBackend):
    """The first request fails at once; the others would run until cancelled."""

    async def generate(self, request):
        self.requests.append(request)
        if len(self.requests) == 1:
            yield TokenEvent(request.request_id, [], error="decode worker d failed: UNAVAILABLE")
            return
        yield TokenEvent(request.request_id, [11], text="ab")
        await asyncio.Event().wait()


def test_a_whole_answer_whose_choice_fails_ends_the_other_choices(model):
    """``n`` = 2, not streamed: the failure of one choice is the answer, at once, and the other
    choice is aborted (it used to run to its end, holding its slot, for an answer nobody got)."""
    backend = FirstChoiceFails()
    server = ThreadedServer(build_app(backend, model, RouterSettings("tiny", 256, request_timeout_s=60.0)))
    try:
        began = time.monotonic()
        status, body = request("POST", f"{server.url}/v1/chat/completions", CHAT | {"n": 2}, timeout=30)
        assert status == 500 and "UNAVAILABLE" in str(body), body
        assert time.monotonic() - began < 10
        wait_for(lambda: [r.request_id for r in backend.requests[1:]] == backend.aborted)
        assert _running(server.url) == 0
    finally:
        server.stop()
