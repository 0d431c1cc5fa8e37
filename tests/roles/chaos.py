"""The chaos drill the issue asks of every deployment shape: 16 requests in flight, one process
killed with SIGKILL, then three things checked: every request ended (answered, or a clear error)
within the router's deadline, the cluster answers again once the dead process is back, and every
worker's pools are back to the free counts they had before."""

from __future__ import annotations

import concurrent.futures
import itertools
import time
import urllib.request
from collections.abc import Callable

import openai

from cluster import get_json
from cluster_chats import ask, conversation, expected, image

IN_FLIGHT = 16
DEADLINE_S = 60.0
"""The router's --request-timeout in the drills: the longest any request may take."""
TOKENS = 400
"""Each request decodes this many tokens (EOS ignored), so all 16 are still in flight at the kill
(the tiny model decodes 96 in under a second)."""


def free_counts(url: str) -> dict:
    """Every worker's free blocks, pages and in-flight count, by role and name."""
    status, body = get_json(f"{url}/health")
    assert status == 200, body
    keep = ("free_blocks", "free_embedding_blocks", "free_kv_blocks", "free_pages", "in_flight")
    return {(role, w["name"]): {k: w[k] for k in keep if k in w} for role, ws in body["roles"].items() for w in ws}


_PICTURES = itertools.count(100_000, IN_FLIGHT)
"""Seeds of pictures no drill sent before."""


def router_metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    return next((float(line.split()[1]) for line in lines if line.startswith(name + " ")), 0.0)


_ENDINGS: dict[int, str] = {}
"""How each drill request ended ("answered", or the error), for a drill whose premise failed."""


def _request(client: openai.OpenAI, i: int, seed: int) -> float:
    """One drill request (odd ones carry a picture never sent before, so encode is in their path:
    prefill skips encode for a picture it holds; every other one streams); returns how long it
    took to end, however it ended."""
    _ENDINGS.pop(i, None)
    started = time.monotonic()
    messages = conversation(f"Question {i}.", [image(seed + i, (64, 64))] if i % 2 else [], as_url=True)
    try:
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, temperature=0,
                                               stream=bool(i % 4 // 2), extra_body={"ignore_eos": True})
        if i % 4 // 2:
            for _ in reply:
                pass
        _ENDINGS[i] = "answered"
    except openai.APIError as error:  # refused, failed or cut off: a clear error is an ending too
        _ENDINGS[i] = f"{type(error).__name__}: {error}"[:300]
    return time.monotonic() - started


def kill_with_requests_in_flight(url: str, kill: Callable[[], None]) -> list[float]:
    """Sends IN_FLIGHT requests, calls ``kill`` once every one has reached the router and it still
    holds at least half of them, and returns how long each took to end (the caller checks them
    against DEADLINE_S once the cluster has healed, so a drill that fails leaves the cluster whole
    for the next). On a loaded host the first request could be answered (400 tokens) before the
    last reached the router: answered early is fine, failed before the kill is not."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=DEADLINE_S + 30, max_retries=0)
    ask(client, "Warm up.", [], stream=True)  # the openai client builds its response models once, not in 16 threads
    ask(client, "Warm up.", [], stream=False)
    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        seed = next(_PICTURES)
        asked = [pool.submit(_request, client, i, seed) for i in range(IN_FLIGHT)]
        deadline = time.monotonic() + 30
        while True:
            ended = {i: _ENDINGS.get(i) for i, f in enumerate(asked) if f.done()}  # before the router's count
            held = (router_metric(url, "mmserve_requests_in_flight")
                    + router_metric(url, "mmserve_requests_queued"))  # queued: waiting for decode's KV
            assert all(how == "answered" for how in ended.values()), f"requests failed before the kill: {ended}"
            if held + len(ended) >= IN_FLIGHT and held >= IN_FLIGHT // 2:
                break
            assert time.monotonic() < deadline, f"the router never held the {IN_FLIGHT}: {held} held, {ended} ended"
            time.sleep(0.05)
        kill()
        return [future.result(timeout=DEADLINE_S + 60) for future in asked]


def wait_until_it_answers(url: str, llm, what: str, timeout_s: float = 240) -> None:
    """Asks through every role (a picture: a text-only chat would not need encode) until the
    answer is the colocated engine's."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    deadline = time.monotonic() + timeout_s
    while True:
        picture = [image(next(_PICTURES), (64, 64))]  # never sent before: prefill cannot skip encode
        try:
            if ask(client, "Back again?", picture) == expected(llm, "Back again?", picture):
                return
        except (openai.APIError, OSError):
            pass
        assert time.monotonic() < deadline, f"the cluster did not answer again after {what}"
        time.sleep(1)


def wait_until_free(url: str, before: dict, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (now := free_counts(url)) != before:
        assert time.monotonic() < deadline, f"still held: {now} vs {before}"
        time.sleep(0.5)
