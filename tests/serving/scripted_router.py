"""A router in this process over a scripted backend, for the admission tests: the tiny model's
tokenizer and template without weights, and the requests' scripted events."""

import pytest

from mmserve.serving.backend import TokenEvent
from mmserve.serving.router import RouterSettings, build_app
from models.qwen3_vl_moe import load_model
from scripted_backend import ScriptedBackend, ThreadedServer

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TOKEN = TokenEvent("", [11], text="ab")
DONE = TokenEvent("", [12], text="abc", finish_reason="stop")


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", weights=False)


@pytest.fixture
def served(model):
    """A router over a backend with 2 slots, a queue of 2 that waits at most 1 s, requests that
    may last 3 s, and streams cut after a client leaves a full buffer unread for 1 s."""
    backend = ScriptedBackend()
    backend.slots = 2
    settings = RouterSettings("tiny", 256, max_queued_requests=2, queue_timeout_s=1.0, request_timeout_s=3.0,
                              stream_stall_timeout_s=1.0)
    server = ThreadedServer(build_app(backend, model, settings))
    yield server, backend
    server.stop()
