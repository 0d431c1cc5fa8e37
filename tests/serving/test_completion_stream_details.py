"""What a completion's details say, whole and streamed alike, over a scripted backend: logprobs in
OpenAI's legacy shape (the sampled token among the top ones; text offsets of the tokens, not of the
text shown so far), each choice's own usage in continuous usage stats, and the request counters
for a refusal and for a client that left while queued."""

import http.client
import json
import re
import time

import pytest

from mmserve.serving.backend import TokenEvent, TokenLogprob
from mmserve.serving.router import RouterSettings, build_app
from models.qwen3_vl_moe import load_model
from scripted_backend import HANG, ScriptedBackend, ThreadedServer
from server_process import request

# token 11's text is held back at first (a possible stop string), then shown with token 12's
SCRIPT = [TokenEvent("", [11], [TokenLogprob(11, -0.5, {13: -0.25})], text=""),
          TokenEvent("", [12], [TokenLogprob(12, -0.75, {12: -0.75})], text="xy"),
          TokenEvent("", [14], [TokenLogprob(14, -1.0, {15: -0.1})], text="xyz", finish_reason="length")]
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "logprobs": 1}


@pytest.fixture(scope="module")
def served():
    backend = ScriptedBackend()
    app = build_app(backend, load_model("tiny", weights=False), RouterSettings("tiny", 256))
    server = ThreadedServer(app)
    yield server, backend, app
    server.stop()


@pytest.fixture
def backend(served):
    served[1].script, served[1].slots = list(SCRIPT), 64
    return served[1]


def streamed(url: str, body: dict) -> list[dict]:
    connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps(body | {"stream": True}), {"Content-Type": "application/json"})
    lines = connection.getresponse().read().decode().splitlines()
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]


def test_top_logprobs_hold_the_sampled_token_as_in_openais_legacy_completions(served, backend):
    status, whole = request("POST", f"{served[0].url}/v1/completions", COMPLETION)
    assert status == 200
    tops = whole["choices"][0]["logprobs"]["top_logprobs"]
    text = served[2].state.router.token_text
    assert [set(top) for top in tops] == [{text(13, False), text(11, False)}, {text(12, False)},
                                          {text(15, False), text(14, False)}]
    assert tops[0][text(11, False)] == -0.5


def test_streamed_text_offsets_equal_the_whole_answers(served, backend):
    status, whole = request("POST", f"{served[0].url}/v1/completions", COMPLETION)
    chunks = streamed(served[0].url, COMPLETION)
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == whole["choices"][0]["logprobs"]["text_offset"]


def test_continuous_usage_counts_each_choices_own_tokens(served, backend):
    chunks = streamed(served[0].url, COMPLETION | {"n": 2, "stream_options": {"include_usage": True,
                                                                             "continuous_usage_stats": True}})
    per_choice = {0: [], 1: []}
    for chunk in chunks:
        if chunk["choices"]:
            per_choice[chunk["choices"][0]["index"]].append(chunk["usage"]["completion_tokens"])
    assert per_choice == {0: [1, 2, 3], 1: [1, 2, 3]}
    assert chunks[-1]["usage"]["completion_tokens"] == 6  # the whole answer's, both choices


def metric(url: str, endpoint: str, outcome: str) -> float:
    text = request("GET", f"{url}/metrics")[1]
    found = re.search(rf'^mmserve_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def prompt_tokens(url: str) -> float:
    text = request("GET", f"{url}/metrics")[1]
    return float(re.search(r"^mmserve_prompt_tokens_total (\S+)$", text, re.M).group(1))


def test_a_refusal_counts_as_rejected_and_prefills_no_prompt_token(served, backend):
    url = served[0].url
    backend.script = [TokenEvent("", [], error="the picture does not decode", invalid=True)]
    before = (metric(url, "completions", "rejected"), metric(url, "completions", "error"), prompt_tokens(url))
    assert request("POST", f"{url}/v1/completions", COMPLETION)[0] == 400
    after = (metric(url, "completions", "rejected"), metric(url, "completions", "error"), prompt_tokens(url))
    assert after == (before[0] + 1, before[1], before[2])


def test_a_client_that_leaves_while_queued_counts_as_aborted(served, backend):
    url = served[0].url
    backend.slots, backend.script = 1, [HANG]
    hog = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    hog.request("POST", "/v1/completions", json.dumps(COMPLETION), {"Content-Type": "application/json"})
    before = metric(url, "completions", "aborted")
    leaver = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=1)
    leaver.request("POST", "/v1/completions", json.dumps(COMPLETION), {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        leaver.getresponse()  # queued behind the hog
    leaver.close()
    hog.close()
    deadline = time.monotonic() + 10
    while metric(url, "completions", "aborted") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "completions", "aborted") == before + 2  # the hog, and the one that left while queued
