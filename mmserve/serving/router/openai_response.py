"""What chat and text completions share in their responses: ids, usage and the SSE stream.

A response has one choice per sibling request (``n``, ``siblings.py``), or the ``n`` best of
``best_of`` candidates (``best_of.py``). A stream sends each event's
new text (``event.text`` minus what that choice was sent) as a chunk tagged with the choice's
index, then, when asked, a usage chunk, then ``data: [DONE]``. A backend error becomes an OpenAI
error object in the stream, which the ``openai`` client raises as an APIError, and the stream (all
its choices) ends.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing

from opentelemetry.context import Context
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mmserve.serving.backend import GenerateRequest, TokenEvent
from mmserve.serving.router.best_of import best, scored
from mmserve.serving.router.context import RouterContext
from mmserve.serving.router.admission import Overloaded
from mmserve.serving.router.errors import InvalidRequest, backend_error_response, error_body
from mmserve.serving.router.fields import CommonFields
from mmserve.serving.router.relay import Answer, collect, sse, unless_disconnected
from mmserve.serving.router.siblings import merged, sibling_requests
from mmserve.tracing import http_parent


class OpenAIResponse(abc.ABC):
    """One response's identity, its stream or its whole answer; subclasses shape the choices."""

    chunk_kind = ""

    def __init__(self, router: RouterContext, request: GenerateRequest, common: CommonFields, best_of: int = 0):
        """``request`` as the client asked it; ``requests`` its siblings, one per choice, or one per
        candidate when ``best_of`` asks for more candidates than choices (``best_of.py``)."""
        self.router = router
        self.request = request
        self.candidates = max(best_of, common.n)
        if self.candidates > common.n:
            request = dataclasses.replace(request, params=scored(request.params))
        self.requests = sibling_requests(request, self.candidates)
        self.common = common
        self.created = int(time.time())
        self.started = 0
        """Choices admitted and started (each counts its own outcome as it ends)."""

    async def answer(self, http: Request, endpoint: str, arrival: float, kind: str) -> Response:
        """Admits and starts the choices, then responds (:meth:`respond`); 499 when the client left
        while they waited in the admission queue, whose place is then free at once (it was held
        until the queue timeout, refusing others with 429 meanwhile)."""
        parent = http_parent(http.headers)
        streams = await unless_disconnected(http, lambda: self.start(endpoint, arrival, parent))
        if streams is None:  # the choices started were counted as they stopped; these never started
            self.router.metrics.requests.labels(endpoint, "aborted").inc(self.candidates - self.started)
            return Response(status_code=499)
        return await self.respond(http, streams, kind)

    async def start(self, endpoint: str, arrival: float,
                    trace_parent: Context | None = None) -> list[AsyncIterator[TokenEvent]]:
        """Admits and starts every sibling; if one is refused (``Overloaded``), those started stop
        (each counted as aborted), the refused one is counted by the app's handler, and those never
        tried are counted with it: every choice is counted once, as when the client leaves."""
        started: list[AsyncIterator[TokenEvent]] = []
        try:
            for request in self.requests:
                started.append(await self.router.relay(request, endpoint, arrival, trace_parent))
                self.started += 1
        except BaseException as error:
            for events in started:
                await events.aclose()
            if isinstance(error, InvalidRequest) and (untried := self.candidates - self.started - 1):
                outcome = "overloaded" if isinstance(error, Overloaded) else "rejected"
                self.router.metrics.requests.labels(endpoint, outcome).inc(untried)
            raise
        return started

    def envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.request.request_id, "object": kind, "created": self.created,
                "model": self.router.settings.model_name, "choices": choices}

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = len(self.request.prompt.token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def token_text(self, token_id: int) -> str:
        return self.router.token_text(token_id, self.common.tokens_as_ids)

    def opening_delta(self, index: int) -> dict | None:
        """A choice to send before any token (chat announces the assistant role), or None."""
        return None

    @abc.abstractmethod
    def whole_choice(self, index: int, answer: Answer) -> dict:
        """The choice ``index`` of a whole answer."""

    @abc.abstractmethod
    def delta_choice(self, index: int, event: TokenEvent, delta: str, text_offset: int) -> dict | None:
        """The choice ``index`` of one stream chunk carrying ``delta``, the new text of ``event`` (its first
        logprob token starting at ``text_offset`` in the choice's tokens' text);
        None when there is nothing to send yet (chat holding back what may be a tool call)."""

    async def respond(self, http: Request, streams: list[AsyncIterator[TokenEvent]], kind: str) -> Response:
        """The stream when asked for; otherwise the whole answer (an object of ``kind``) once every
        choice finished, 499 when the client left (every choice was aborted), or the first
        backend error.

        A stream starts once every choice has its first event, so that a request the backend
        refuses before any token (a picture that does not decode, a prompt no worker holds) is
        answered with its real status, as a whole answer is, not a 200 carrying an error event."""
        if self.common.stream:
            firsts = await unless_disconnected(http, lambda: asyncio.gather(*(anext(s, None) for s in streams)))
            refusal = None if firsts is None else next((e for e in firsts if e is not None and e.error), None)
            if firsts is None or refusal is not None:
                for events in streams:
                    await events.aclose()
                if firsts is None:
                    return Response(status_code=499)
                return backend_error_response(refusal.error, refusal.invalid)
            resumed = [_after(first, events) for first, events in zip(firsts, streams)]
            return StreamingResponse(self.stream(resumed), media_type="text/event-stream")
        answers = await unless_disconnected(http, lambda: _collect_all(streams))
        if answers is None:
            return Response(status_code=499)
        for answer in answers:
            if answer.error is not None:
                return backend_error_response(answer.error, answer.invalid)
        chosen = best(answers, self.common.n) if self.candidates > self.common.n else range(len(answers))
        choices = [self.whole_choice(index, answers[i]) for index, i in enumerate(chosen)]
        usage = self.usage(sum(len(answer.token_ids) for answer in answers))
        return JSONResponse(self.envelope(kind, choices) | {"usage": usage})

    async def stream(self, streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[str]:
        """Each choice's chunks; ``offsets`` are where each choice's next logprob token starts in its
        tokens' text, as in the whole answer (the text shown so far can lag behind it, held back
        for a stop string or an unfinished character); ``counts`` its tokens so far."""
        sent, offsets, counts, completion_tokens = [""] * len(streams), [0] * len(streams), [0] * len(streams), 0
        async with AsyncExitStack() as closing:
            for events in streams:
                await closing.enter_async_context(aclosing(events))
            for index in range(len(streams)):
                if (opening := self.opening_delta(index)) is not None:
                    yield self._chunk(opening, 0)
            async with aclosing(merged(streams)) as events:
                async for index, event in events:
                    if event.error is not None:
                        kind, code = ("invalid_request_error", 400) if event.invalid else ("server_error", 500)
                        yield sse(error_body(event.error, kind, None, code))
                        break
                    completion_tokens += len(event.token_ids)
                    counts[index] += len(event.token_ids)
                    delta = event.text[len(sent[index]):]
                    if delta or event.logprobs or event.finish_reason is not None:
                        choice = self.delta_choice(index, event, delta, offsets[index])
                        if choice is not None:
                            yield self._chunk(choice, counts[index])
                    offsets[index] += sum(len(self.token_text(e.token_id)) for e in event.logprobs or ())
                    sent[index] = event.text
                else:
                    if self.common.include_usage:
                        yield sse(self.envelope(self.chunk_kind, []) | {"usage": self.usage(completion_tokens)})
        yield sse("[DONE]")

    def _chunk(self, choice: dict, completion_tokens: int) -> str:
        """``completion_tokens``: the choice's own so far (vLLM's continuous usage stats)."""
        chunk = self.envelope(self.chunk_kind, [choice])
        if not self.common.include_usage:
            return sse(chunk)
        return sse(chunk | {"usage": self.usage(completion_tokens) if self.common.continuous_usage else None})


async def _after(first: TokenEvent | None, events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """``first`` (already taken from ``events``), then the rest of ``events``; closing it closes them."""
    async with aclosing(events):
        if first is not None:
            yield first
            async for event in events:
                yield event


async def _collect_all(streams: list[AsyncIterator[TokenEvent]]) -> list[Answer]:
    """Every choice's whole answer; the first that fails ends the others (closing a stream aborts
    its request), whose slots and pages would otherwise be held until they ran to their end for
    an answer nobody gets. Returns the answers that ended, the failed one among them."""
    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        for ended in asyncio.as_completed(tasks):
            if (await ended).error is not None:
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [task.result() for task in tasks if not task.cancelled()]
