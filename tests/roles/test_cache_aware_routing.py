"""Cache-aware routing with real processes: two prefill and two decode workers publishing their KV
events, a router following them. Requests sharing a prefix (a system prompt, an image) go to the
prefill worker holding it, and to the decode worker holding it; restarted with
``--routing-policy round_robin`` the same router spreads them over both. That router knows of no
worker's pages, so it calls encode at once with prefill; when prefill's ack says it holds the
picture's pages (the third and fourth request repeat the first two, on the same workers), encode's
request is aborted and leaves nothing behind."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from cluster import Cluster, get_json

pytestmark = pytest.mark.slow

EVENTS = ["--kv-events-endpoint", "tcp://127.0.0.1:*", "--kv-events-replay-endpoint", "tcp://127.0.0.1:*"]
PREFILLS, DECODES = ("prefill-a", "prefill-b"), ("decode-a", "decode-b")
SYSTEM = "You answer questions about pictures carefully, in one short sentence. " * 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster("tiny", tmp_path_factory.mktemp("logs"), role_flags={"prefill": EVENTS, "decode": EVENTS})
    try:
        _start_router(cluster, [])
        cluster.start_worker("encode")
        # the second worker of each role starts once the first is serving, so that it loads the
        # programs the first compiled (the servers share a compilation cache) instead of compiling
        # them too, on the same two cores at the same time
        cluster.start_worker("prefill", PREFILLS[0])
        cluster.start_worker("decode", DECODES[0])
        cluster.wait_healthy()
        cluster.start_worker("prefill", PREFILLS[1])
        cluster.start_worker("decode", DECODES[1])
        _wait_registered(cluster, timeout=300)
        yield cluster
    finally:
        cluster.stop()


def _start_router(cluster: Cluster, flags: list[str]) -> None:
    cluster.start_role("router", ["--port", str(cluster.port), "--registry-port", str(cluster.registry_port),
                                  "--bootstrap-port", str(cluster.bootstrap_port), *flags])


def _wait_registered(cluster: Cluster, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while set(_prefills(cluster)) != set(PREFILLS) or len(_workers(cluster, "decode")) != 2:
        assert time.monotonic() < deadline, "the workers did not all register"
        time.sleep(0.5)


def _workers(cluster: Cluster, role: str) -> dict[str, dict]:
    try:
        status, body = cluster.health()
    except OSError:
        return {}
    return {w["name"]: w for w in body.get("roles", {}).get(role, []) if "error" not in w} if status == 200 else {}


def _prefills(cluster: Cluster) -> dict[str, dict]:
    return _workers(cluster, "prefill")


def _picture(seed: int) -> str:
    """A 64x64 PNG data URL (the same seed, the same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ask(cluster: Cluster, question: str, picture: str) -> None:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=120, max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": question}]}]
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)


def _served(before: dict[str, dict], after: dict[str, dict], names=PREFILLS) -> dict[str, int]:
    """Prompt tokens each worker looked up in its cache between two health reads: > 0 for every
    worker that served something."""
    return {name: after[name]["prefix_cache_queries"] - before[name]["prefix_cache_queries"] for name in names}


def test_requests_sharing_a_prefix_go_to_the_worker_holding_it(cluster):
    picture = _picture(40)
    before, decodes_before = _prefills(cluster), _workers(cluster, "decode")
    _ask(cluster, "What is in the picture?", picture)
    first, decodes_first = _prefills(cluster), _workers(cluster, "decode")
    (holder,) = [name for name, tokens in _served(before, first).items() if tokens > 0]
    (decode_holder,) = [name for name, tokens in _served(decodes_before, decodes_first, DECODES).items() if tokens]
    time.sleep(1)  # decode publishes the pages it cached after its next step: let the router hear of them
    for question in ("What colour is it?", "Is it large?", "Where was it taken?"):
        _ask(cluster, question, picture)  # same system prompt and image: the holder's pages
    after, decodes_after = _prefills(cluster), _workers(cluster, "decode")
    other = next(name for name in PREFILLS if name != holder)
    assert _served(first, after)[other] == 0, "a request sharing the prefix went to the worker without it"
    assert after[holder]["prefix_cache_hits"] - first[holder]["prefix_cache_hits"] >= 3 * 16
    other_decode = next(name for name in DECODES if name != decode_holder)
    assert _served(decodes_first, decodes_after, DECODES)[other_decode] == 0, "decode went to the worker without it"
    held = decodes_after[decode_holder]["prefix_cache_hits"] - decodes_first[decode_holder]["prefix_cache_hits"]
    assert held >= 3 * 16
    with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    routed = next(line for line in metrics.splitlines() if line.startswith("mmserve_backend_prefix_routed_requests "))
    assert float(routed.split()[1]) >= 3


def test_a_router_with_round_robin_spreads_them(cluster):
    cluster.kill("router")
    _start_router(cluster, ["--routing-policy", "round_robin"])
    cluster.wait_healthy()
    _wait_registered(cluster)
    picture = _picture(41)
    before, decodes_before, (encode_before,) = _prefills(cluster), _workers(cluster, "decode"), \
        _workers(cluster, "encode").values()
    for question in ("One?", "Two?", "One?", "Two?"):
        _ask(cluster, question, picture)
    after = _prefills(cluster)
    served = _served(before, after)
    assert all(tokens > 0 for tokens in served.values()), served
    assert [after[n]["pictures_held"] - before[n]["pictures_held"] for n in PREFILLS] == [1, 1]
    (encode_after,) = _workers(cluster, "encode").values()
    assert encode_after["accepted"] - encode_before["accepted"] == 4  # called with prefill, held or not
    deadline = time.monotonic() + 30
    while _workers(cluster, "encode")[encode_after["name"]]["in_flight"]:  # the aborted ones end at once
        assert time.monotonic() < deadline, "encode kept requests prefill did not need"
        time.sleep(0.2)
    decodes = _served(decodes_before, _workers(cluster, "decode"), DECODES)
    assert all(tokens > 0 for tokens in decodes.values()), decodes
    status, body = get_json(f"{cluster.url}/health")
    assert status == 200 and all(w["in_flight"] == 0 for w in body["roles"]["prefill"])


def test_a_prefill_worker_whose_answer_is_decoding_takes_the_next_prompt(cluster):
    """The router counts a request against its encode and prefill workers only until its first
    token: with ``least_load`` a prefill worker whose earlier answer is still being decoded is as
    free as the other (before, it counted as busy until that answer's last token, and every
    prompt meanwhile went to the other worker)."""
    cluster.kill("router")
    _start_router(cluster, ["--routing-policy", "least_load"])
    cluster.wait_healthy()
    _wait_registered(cluster)
    time.sleep(1.5)  # a heartbeat since the last test's requests: the workers report nothing held
    ended = {}

    def long_answer():
        connection = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=120)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        line, events = b"-", 0
        while reply.status == 200 and line and events < 2:  # the role's chunk, then the first token's
            line = reply.fp.readline()
            events += line.startswith(b"data: ")
        ended["first"] = time.monotonic() if events == 2 else None
        while line and not line.startswith(b"data: [DONE]"):  # the chunked body's lines, read as they come
            line = reply.fp.readline()
        ended["last"] = time.monotonic()
        connection.close()

    story = threading.Thread(target=long_answer)
    story.start()
    deadline = time.monotonic() + 60
    while "first" not in ended:
        assert time.monotonic() < deadline, "no first token"
        time.sleep(0.005)
    before = _prefills(cluster)
    for question in ("One?", "Two?"):  # both workers equally free: one each, in turn
        connection = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=60)
        connection.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 1}),
            {"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
        connection.close()
    decoding = sum(w["in_flight"] for w in _workers(cluster, "decode").values())
    served = _served(before, _prefills(cluster))
    story.join(timeout=120)
    assert ended["first"] is not None and decoding, f"the long answer ended before the others were asked: {ended}"
    assert all(tokens > 0 for tokens in served.values()), served
