"""A light client for streamed chat completions, for the serving benchmarks.

Why not the ``openai`` package: on a small host the client shares the CPU with the server it
measures, and the SDK spends ~0.4 ms of CPU on each streamed chunk (its SSE decoder, a pydantic
model per chunk, its HTTP stack): a run of 128 image chats at concurrency 16 on the 2-core test
VM took 2.2 s of the client's CPU, as much as the colocated server itself, and the server's
numbers were the client's (docs/status.md, "The data path"). vLLM's ``benchmark_serving.py``
parses the stream by hand for the same reason. This client keeps one HTTP/1.1 connection per
thread (stdlib ``http.client``) and reads each ``data:`` line with ``json.loads``: ~0.55 s for
the same run.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import threading
import time
import urllib.parse


@dataclasses.dataclass
class Streamed:
    """One streamed answer: when each token arrived, and the server's usage counts."""

    start: float
    arrivals: list[float]
    text: str
    completion_tokens: int
    prompt_tokens: int

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


class StreamClient:
    """Streams ``/v1/chat/completions`` from ``url``; safe to use from many threads (each has its own
    connection). The key is ``$MMSERVE_API_KEY`` when set, as the server reads it."""

    def __init__(self, url: str, model: str, timeout_s: float = 600.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// servers, got {url!r}")
        self._host, self._port, self._timeout_s = parts.hostname, parts.port or 80, timeout_s
        self.model = model
        self._headers = {"Content-Type": "application/json"}
        if os.environ.get("MMSERVE_API_KEY"):
            self._headers["Authorization"] = f"Bearer {os.environ['MMSERVE_API_KEY']}"
        self._local = threading.local()

    def connect(self) -> None:
        """Opens this thread's connection (and checks the server answers), outside any clock."""
        status, body = self._send("GET", "/v1/models", None)
        if status != 200:
            raise RuntimeError(f"GET /v1/models: {status} {body[:200]!r}")

    def chat(self, messages: list[dict], max_tokens: int) -> Streamed:
        """A greedy streamed chat of exactly ``max_tokens`` tokens (``ignore_eos``)."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
        start = time.perf_counter()
        response = self._request("POST", "/v1/chat/completions", body)
        if response.status != 200:
            raise RuntimeError(f"POST /v1/chat/completions: {response.status} {response.read()[:500]!r}")
        out = Streamed(start, [], "", 0, 0)
        while line := response.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream ended with an error: {chunk['error']}")
            if _arrived(chunk, out.arrivals):
                out.arrivals.append(time.perf_counter())
                out.text += chunk["choices"][0]["delta"].get("content") or ""
            if chunk.get("usage"):
                out.completion_tokens = chunk["usage"]["completion_tokens"]
                out.prompt_tokens = chunk["usage"]["prompt_tokens"]
        response.read()  # the rest of the chunked body, so the connection can carry the next request
        return out

    def _send(self, method: str, path: str, body: str | None) -> tuple[int, bytes]:
        response = self._request(method, path, body)
        return response.status, response.read()

    def _request(self, method: str, path: str, body: str | None) -> http.client.HTTPResponse:
        """Sends on this thread's connection; once more on a new one when the server had closed it
        while idle (its keep-alive timeout), which shows before any byte of the answer."""
        for attempt in range(2):
            connection = getattr(self._local, "connection", None)
            if connection is None:
                connection = self._local.connection = http.client.HTTPConnection(self._host, self._port,
                                                                                 timeout=self._timeout_s)
            try:
                connection.request(method, path, body, self._headers)
                return connection.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection.close()
                self._local.connection = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _arrived(chunk: dict, arrivals: list[float]) -> bool:
    """Whether a streamed chunk is a token's arrival: it brings text, or it ends an answer that
    brought none (a random model's tokens can all detokenize to nothing, and its answer still has a
    first-token time)."""
    choices = chunk.get("choices")
    if not choices:
        return False
    return bool(choices[0]["delta"].get("content") or (choices[0].get("finish_reason") and not arrivals))
