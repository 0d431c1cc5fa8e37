"""The colocated backend: one LLMEngine, owned by one background thread, behind the Backend protocol.

The engine is not thread-safe, so only its thread touches it. A request's encoded images and videos
are decoded and processed in a worker thread before they reach it (:mod:`picture_decodes`), so
neither the event loop nor the engine's steps wait on that CPU work. The event loop talks to that thread
through a thread-safe inbox (add, abort); the thread answers each request through the request's own
asyncio queue, scheduled onto the request's loop with ``call_soon_threadsafe``. Whatever happens
(a bad request, a crashed step, shutdown), every open stream receives a last event, so no caller
waits forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from mmserve.engine.output_stream import OutputStream
from mmserve.engine.outputs import RequestOutput
from mmserve.engine.rejected import RequestRejected
from mmserve.engine.step_failed import StepFailed
from mmserve.serving.backend import NO_CLAIM, GenerateRequest, KVClaim, TokenEvent, TokenLogprob
from mmserve.serving.picture_decodes import PictureDecodes
from mmserve.structured_output import AVAILABLE as STRUCTURED_OUTPUT_AVAILABLE
from models.qwen3_vl_moe import Model

IDLE_WAIT_S = 0.5  # how long an idle engine thread sleeps on its inbox before looking again


@dataclasses.dataclass(frozen=True)
class _Add:
    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclasses.dataclass
class _Stream:
    """The engine thread's view of one request's client: where to send and what was sent."""

    add: _Add
    output: OutputStream

    def send(self, event: TokenEvent) -> None:
        try:
            self.add.loop.call_soon_threadsafe(self.add.events.put_nowait, event)
        except RuntimeError:  # the client's loop has closed: nobody is listening any more
            pass


class ColocatedBackend:
    """Serves the Backend protocol from one in-process engine (no transfer)."""

    supports_structured_output = STRUCTURED_OUTPUT_AVAILABLE

    def __init__(self, model: Model, engine_config: EngineConfig, layout: MeshLayout | None = None,
                 lockstep: Lockstep | None = None):
        self._engine = LLMEngine(model, engine_config, layout=layout, lockstep=lockstep)
        self._inbox: queue.Queue[_Add | _Abort | None] = queue.Queue()
        # Guards ``_accepting`` together with the inbox: once the thread stops accepting and drains
        # the inbox, no request can slip in behind the drain and wait forever.
        self._lock = threading.Lock()
        self._accepting = True
        self._streams: dict[str, _Stream] = {}
        self._stats = self._engine.stats()
        self._last_turn = time.monotonic()
        self._failure: str | None = None
        self._stopping = False
        self._media = PictureDecodes(self._engine.encoder)
        self._thread = threading.Thread(target=self._run, name="colocated-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        visuals = (*request.prompt.images, *request.prompt.videos)
        if any(visual.pixel_values is None for visual in visuals):
            try:  # the router sends encoded images and videos; decoding them is CPU work for neither loop
                prompt = await self._media.with_pixels(request.prompt)
            except ValueError as error:
                yield TokenEvent(request.request_id, [], error=str(error), invalid=isinstance(error, RequestRejected))
                return
            request = dataclasses.replace(request, prompt=prompt)
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        with self._lock:
            accepted = self._accepting and not self._stopping
            if accepted:
                self._inbox.put(_Add(request, asyncio.get_running_loop(), events))
        if not accepted:
            yield TokenEvent(request.request_id, [], error=self._down_reason)
            return
        done = False
        try:
            while not done:
                event = await events.get()
                done = event.finish_reason is not None or event.error is not None
                yield event
        finally:
            if not done:  # the caller stopped listening: free what the request holds
                self._inbox.put(_Abort(request.request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def capacity(self) -> int:
        return self._engine.config.max_num_seqs

    def kv_capacity(self) -> None:
        return None  # the engine admits by pages itself, and preempts

    def kv_demand(self, request: GenerateRequest) -> int:
        return 0

    def kv_claim(self, request: GenerateRequest) -> KVClaim:
        return NO_CLAIM

    def unavailable(self, request: GenerateRequest) -> str | None:
        """Why no request can be served (the engine failed or is stopping): a 503 at the door."""
        return None if self._healthy else self._down_reason

    async def health(self) -> dict:
        healthy = self._healthy
        return {
            "healthy": healthy,
            "engine": "running" if healthy else self._down_reason,
            "seconds_since_engine_turn": round(time.monotonic() - self._last_turn, 3),
            **self._stats,
        }

    def metrics(self) -> dict[str, float]:
        return {**self._stats, "engine_alive": float(self._healthy)}

    def close(self) -> None:
        """Stops the engine thread; requests still open end with an error."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join()
        self._media.close()

    @property
    def _healthy(self) -> bool:
        return self._accepting and self._failure is None and not self._stopping

    @property
    def _down_reason(self) -> str:
        return self._failure or ("the server is shutting down" if self._stopping else "the engine thread has stopped")

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_commands(block=not self._engine.has_unfinished())
                try:
                    outputs = self._engine.step() if self._engine.has_unfinished() else []
                except StepFailed as failure:  # its requests were let go; the engine goes on, as the roles' do
                    outputs = failure.outputs
                    self._fail(failure.request_ids, str(failure))
                # Published before the events, so a client that has its last token sees the pages freed.
                self._stats = self._engine.stats()
                self._last_turn = time.monotonic()
                self._deliver(outputs)
        except Exception as error:  # a step that raised leaves the engine in an unknown state
            self._failure = f"the engine failed: {type(error).__name__}: {error}"
        finally:
            with self._lock:
                self._accepting = False
            self._fail_all(self._down_reason)

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                self._apply(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, command: _Add | _Abort | None) -> None:
        if isinstance(command, _Add):
            request = command.request
            stream = _Stream(command, OutputStream(request.params))
            try:
                self._engine.add_request(request.prompt, request.params, request.request_id)
            except RequestRejected as error:  # add_request changes nothing until it succeeds
                stream.send(TokenEvent(request.request_id, [], error=str(error), invalid=True))
                return
            except Exception as error:
                reason = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
                stream.send(TokenEvent(request.request_id, [], error=reason))
                return
            self._streams[request.request_id] = stream
        elif isinstance(command, _Abort):
            self._engine.abort(command.request_id)
            self._streams.pop(command.request_id, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.send(self._event(output, stream))
            if output.finished:
                del self._streams[output.request_id]

    @staticmethod
    def _event(output: RequestOutput, stream: _Stream) -> TokenEvent:
        delta = stream.output.delta(output)
        logprobs = None if delta.logprobs is None else [TokenLogprob(lp.token_id, lp.logprob, lp.top)
                                                         for lp in delta.logprobs]
        return TokenEvent(output.request_id, delta.token_ids, logprobs, delta.finish_reason, delta.stop_reason,
                          delta.text)

    def _fail(self, request_ids: list[str], reason: str) -> None:
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.send(TokenEvent(request_id, [], error=reason))

    def _fail_all(self, reason: str) -> None:
        self._fail(list(self._streams), reason)
        while True:  # requests that arrived but were never added
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                _Stream(command, OutputStream(command.request.params)).send(TokenEvent(command.request.request_id, [], error=reason))
