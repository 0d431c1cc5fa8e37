"""A Backend that plays a script of events, for testing the router's failure paths in-process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time

import uvicorn

from mmserve.serving.backend import NO_CLAIM, GenerateRequest, TokenEvent
from mmserve.serving.header_timeout import HEADER_TIMEOUT_S, WRITE_STALL_S
from mmserve.serving.http_server import uvicorn_config
from server_process import free_port

HANG = "hang"  # a script step that waits until the request is cancelled


class ScriptedBackend:
    def __init__(self):
        self.script: list[TokenEvent | str | Exception] = []
        self.health_answer: dict | Exception = {"healthy": True}
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.slots = 64
        self.kv_tokens: int | None = None
        """KV the backend reserves requests from, like decode (None: not limited by KV)."""
        self.kv_claimed = 0
        self.missing: str | None = None
        """What the backend says it lacks for every request (``unavailable``), like a stage with no worker."""

    async def generate(self, request: GenerateRequest):
        self.requests.append(request)
        for step in self.script:
            if step == HANG:
                await asyncio.Event().wait()
            if isinstance(step, Exception):  # a bug behind the backend
                raise step
            yield dataclasses.replace(step, request_id=request.request_id)

    def capacity(self) -> int:
        return self.slots

    def kv_capacity(self) -> int | None:
        return self.kv_tokens

    def kv_demand(self, request: GenerateRequest) -> int:
        return len(request.prompt.token_ids) + request.params.max_tokens

    def kv_claim(self, request: GenerateRequest):
        """One pool of ``kv_tokens``, like a single decode worker's."""
        if self.kv_tokens is None:
            return NO_CLAIM
        demand = self.kv_demand(request)
        if self.kv_claimed + demand > self.kv_tokens:
            return None
        self.kv_claimed += demand
        return _Claim(self, demand)

    def unavailable(self, request: GenerateRequest) -> str | None:
        return self.missing

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def health(self) -> dict:
        if isinstance(self.health_answer, Exception):
            raise self.health_answer
        return self.health_answer

    def metrics(self) -> dict[str, float]:
        return {"free_pages": 7.0, "waiting": 2.0}


class _Claim:
    def __init__(self, backend: ScriptedBackend, tokens: int):
        self._backend, self._tokens = backend, tokens

    def release(self) -> None:
        self._backend.kv_claimed -= self._tokens
        self._tokens = 0


class ThreadedServer:
    """uvicorn serving ``app`` from a background thread of the test process."""

    def __init__(self, app, header_timeout_s: float = HEADER_TIMEOUT_S, write_stall_s: float = WRITE_STALL_S):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, "warning", header_timeout_s,
                                                     write_stall_s))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


class GrammarBackend(ScriptedBackend):
    """A scripted backend that says it enforces grammars (structured output, forced tool calls)."""

    supports_structured_output = True


@contextlib.contextmanager
def grammar_and_plain_servers(model, max_model_len: int):
    """A router over a GrammarBackend and one over a plain ScriptedBackend (which refuses grammars):
    yields [(server, backend), (server, backend)] in that order."""
    from mmserve.serving.router import RouterSettings, build_app

    up = [(ThreadedServer(build_app(b, model, RouterSettings("tiny", max_model_len))), b)
          for b in (GrammarBackend(), ScriptedBackend())]
    try:
        yield up
    finally:
        for server, _ in up:
            server.stop()


def openai_client(server: ThreadedServer):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
