"""One request's trip through the backend, as every endpoint makes it.

``relay`` times the stream (TTFT, ITL), counts it, guarantees that it ends with a finishing or an
error event, and aborts the request in the backend whenever the client stops listening first.
``collect`` gathers a whole answer for the non-streaming endpoints, and ``unless_disconnected``
cancels that wait when the client hangs up, which a non-streaming handler would not notice.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from mmserve.serving.backend import Backend, GenerateRequest, TokenEvent, TokenLogprob
from mmserve.serving.router.metrics import RouterMetrics

T = TypeVar("T")
UNFINISHED_STREAM = "the backend ended the stream without finishing the request"


@dataclasses.dataclass
class Answer:
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    invalid: bool = False


async def relay(backend: Backend, request: GenerateRequest, metrics: RouterMetrics, endpoint: str,
                arrival: float) -> AsyncIterator[TokenEvent]:
    metrics.in_flight.inc()
    metrics.prompt_tokens.inc(len(request.prompt.token_ids))
    outcome, last_token_at = "aborted", None
    try:
        async with aclosing(backend.generate(request)) as events:
            async for event in events:
                last_token_at = _time_tokens(metrics, event, arrival, last_token_at)
                if event.error is not None or event.finish_reason is not None:
                    outcome = "error" if event.error is not None else "finished"
                    if outcome == "finished":
                        metrics.e2e.observe(time.monotonic() - arrival)
                    yield event
                    return
                yield event
        outcome = "error"
        yield TokenEvent(request.request_id, [], error=UNFINISHED_STREAM)
    finally:
        metrics.in_flight.dec()
        metrics.requests.labels(endpoint, outcome).inc()
        if outcome == "aborted":
            with anyio.CancelScope(shield=True):  # the client is gone, but its pages must be freed
                await backend.abort(request.request_id)


def _time_tokens(metrics: RouterMetrics, event: TokenEvent, arrival: float, last: float | None) -> float | None:
    if not event.token_ids:
        return last
    now = time.monotonic()
    metrics.generation_tokens.inc(len(event.token_ids))
    if last is None:
        metrics.ttft.observe(now - arrival)
    else:
        for _ in event.token_ids:  # tokens that arrive together share the gap
            metrics.itl.observe((now - last) / len(event.token_ids))
    return now


async def collect(events: AsyncIterator[TokenEvent]) -> Answer:
    answer = Answer()
    async with aclosing(events):
        async for event in events:
            answer.token_ids += event.token_ids
            answer.logprobs += event.logprobs or []
            answer.text = event.text
            answer.finish_reason, answer.stop_reason, answer.error = (event.finish_reason, event.stop_reason,
                                                                      event.error)
            answer.invalid = event.invalid
    return answer


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """``work()``'s result, or None once the client has disconnected (``work`` is then cancelled)."""
    result = None
    async with anyio.create_task_group() as group:
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        result = await work()
        group.cancel_scope.cancel()
    return result


def sse(data: Any) -> str:
    """One server-sent event as OpenAI streams them: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
