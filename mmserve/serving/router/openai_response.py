"""What chat and text completions share in their responses: ids, usage and the SSE stream.

A stream sends each event's new text (``event.text`` minus what was sent), then, when asked, a
usage chunk, then ``data: [DONE]``. A backend error becomes an OpenAI error object in the stream,
which the ``openai`` client raises as an APIError, and the stream ends.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mmserve.serving.backend import GenerateRequest, TokenEvent
from mmserve.serving.router.context import RouterContext
from mmserve.serving.router.errors import backend_error_response, error_body
from mmserve.serving.router.fields import CommonFields
from mmserve.serving.router.relay import collect, sse, unless_disconnected


class OpenAIResponse(abc.ABC):
    """One response's identity, its stream or its whole answer; subclasses shape the choices."""

    chunk_kind = ""

    def __init__(self, router: RouterContext, request: GenerateRequest, common: CommonFields):
        self.router = router
        self.request = request
        self.common = common
        self.created = int(time.time())

    def envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.request.request_id, "object": kind, "created": self.created,
                "model": self.router.settings.model_name, "choices": choices}

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = len(self.request.prompt.token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def token_text(self, token_id: int) -> str:
        return self.router.token_text(token_id, self.common.tokens_as_ids)

    def opening_delta(self) -> dict | None:
        """A choice to send before any token (chat announces the assistant role), or None."""
        return None

    @abc.abstractmethod
    def delta_choice(self, event: TokenEvent, delta: str, text_offset: int) -> dict:
        """The choice of one stream chunk carrying ``delta``, the new text of ``event``."""

    async def respond(self, http: Request, events: AsyncIterator[TokenEvent],
                      whole: Callable[[TokenEvent], dict]) -> Response:
        """The stream when asked for; otherwise ``whole(answer)`` once the request finished, 499
        when the client left (the request was aborted), or the backend's error."""
        if self.common.stream:
            return StreamingResponse(self.stream(events), media_type="text/event-stream")
        answer = await unless_disconnected(http, lambda: collect(events))
        if answer is None:
            return Response(status_code=499)
        if answer.error is not None:
            return backend_error_response(answer.error, answer.invalid)
        return JSONResponse(whole(answer))

    async def stream(self, events: AsyncIterator[TokenEvent]) -> AsyncIterator[str]:
        sent, completion_tokens = "", 0
        async with aclosing(events):
            if (opening := self.opening_delta()) is not None:
                yield self._chunk(opening)
            async for event in events:
                if event.error is not None:
                    kind, code = ("invalid_request_error", 400) if event.invalid else ("server_error", 500)
                    yield sse(error_body(event.error, kind, None, code))
                    break
                completion_tokens += len(event.token_ids)
                delta = event.text[len(sent):]
                if delta or event.logprobs or event.finish_reason is not None:
                    yield self._chunk(self.delta_choice(event, delta, len(sent)))
                sent = event.text
            else:
                if self.common.include_usage:
                    yield sse(self.envelope(self.chunk_kind, []) | {"usage": self.usage(completion_tokens)})
        yield sse("[DONE]")

    def _chunk(self, choice: dict) -> str:
        chunk = self.envelope(self.chunk_kind, [choice])
        return sse(chunk | {"usage": None} if self.common.include_usage else chunk)
