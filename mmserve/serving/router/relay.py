"""One request's trip through the backend, as every endpoint makes it.

``Relay`` runs the backend's stream in a task of its own and hands the events on through a bounded
buffer. It times the stream (TTFT, ITL), counts it, guarantees that it ends with a finishing or an
error event, releases the request's admission slot, and aborts the request in the backend
whenever it ends early: the client stopped listening, the request passed its deadline, or the
client stopped reading and the buffer stayed full for ``stall_timeout_s`` (so a slow or stalled
reader never holds a slot, pages or memory for longer than that).
``collect`` gathers a whole answer for the non-streaming endpoints, and ``unless_disconnected``
cancels that wait when the client hangs up, which a non-streaming handler would not notice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
import msgspec
import numpy as np
from opentelemetry import trace
from opentelemetry.context import Context
from starlette.requests import Request

from mmserve.serving.backend import Backend, GenerateRequest, TokenEvent, TokenLogprob
from mmserve.serving.router.admission import Ticket
from mmserve.serving.router.internal_addresses import redact
from mmserve.serving.router.metrics import RouterMetrics
from mmserve.tracing import tracer

log = logging.getLogger(__name__)

T = TypeVar("T")
UNFINISHED_STREAM = "the backend ended the stream without finishing the request"
BUFFER_EVENTS = 64
"""Events held for a client that does not read (after the socket's own buffers are full)."""
_RUNNING: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks


@dataclasses.dataclass(frozen=True)
class RelayLimits:
    """deadline_s: the longest a request may take from admission to its last token (None: no
    limit). stall_timeout_s: how long a full buffer may wait for the client before the request
    is cut."""

    deadline_s: float | None = None
    stall_timeout_s: float = 30.0


@dataclasses.dataclass
class Answer:
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    invalid: bool = False


class Relay:
    """An async iterator over one request's events; ``aclose`` (the client left) aborts it."""

    def __init__(self, backend: Backend, request: GenerateRequest, metrics: RouterMetrics, endpoint: str,
                 arrival: float, ticket: Ticket, limits: RelayLimits, trace_parent: Context | None = None):
        if limits.deadline_s is not None:
            request = dataclasses.replace(request, deadline=time.monotonic() + limits.deadline_s)
        self._backend, self._request, self._metrics = backend, request, metrics
        self._endpoint, self._arrival, self._ticket, self._limits = endpoint, arrival, ticket, limits
        self._buffer: collections.deque[TokenEvent] = collections.deque()
        self._arrived = asyncio.Event()
        self._taken = asyncio.Event()
        self._ended = False
        self._settled = False
        self._read = False
        """The client has started reading: only from then on may a full buffer cut the request."""
        self._tail_merged = False  # the last buffered event is a merge of several (see _put)
        self._held_tokens = 0  # in the buffer
        metrics.in_flight.inc()
        # the request's trace: its context rides on the pump task into the backend's calls
        self._span = tracer.start_span(f"router {endpoint}", context=trace_parent, kind=trace.SpanKind.SERVER,
                                       attributes={"mmserve.request_id": request.request_id,
                                                   "mmserve.prompt_tokens": len(request.prompt.token_ids),
                                                   "mmserve.max_tokens": request.params.max_tokens})
        self._task = asyncio.get_running_loop().create_task(self._pump(), name=f"relay {request.request_id}")
        _RUNNING.add(self._task)
        self._task.add_done_callback(_RUNNING.discard)

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> TokenEvent:
        self._read = True
        if self._ended:
            raise StopAsyncIteration
        while not self._buffer:
            self._arrived.clear()
            await self._arrived.wait()
        event = self._buffer.popleft()
        self._held_tokens -= len(event.token_ids)
        self._taken.set()
        self._ended = event.error is not None or event.finish_reason is not None
        return event

    async def aclose(self) -> None:
        self._ended = True
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self._settled:  # cancelled before it ever ran (n > 1: a later choice was refused at once)
            self._settle("aborted")
            self._span.end()

    async def _pump(self) -> None:
        with trace.use_span(self._span, end_on_exit=True):
            await self._run()

    def _settle(self, outcome: str, error: str | None = None) -> None:
        """The request's end, once, however it ended: its admission ticket back, its outcome counted."""
        self._settled = True
        self._span.set_attribute("mmserve.outcome", outcome)
        if error is not None:
            self._span.set_status(trace.StatusCode.ERROR, error)
        self._ticket.release()
        self._metrics.in_flight.dec()
        self._metrics.requests.labels(self._endpoint, outcome).inc()

    async def _run(self) -> None:
        rid, outcome, last_token_at, failed = self._request.request_id, "aborted", None, False
        error: str | None = None
        try:
            async with asyncio.timeout(self._limits.deadline_s):
                async with aclosing(self._backend.generate(self._request)) as events:
                    async for event in events:
                        if last_token_at is None and event.token_ids:
                            self._span.add_event("first token")
                            self._metrics.prompt_tokens.inc(len(self._request.prompt.token_ids))  # prefilled
                        last_token_at = _time_tokens(self._metrics, event, self._arrival, last_token_at)
                        if event.error is not None or event.finish_reason is not None:
                            # a refusal of the request as given is the client's (a 400), not an error
                            outcome = ("rejected" if event.invalid else "error") if event.error is not None \
                                else "finished"
                            if outcome == "finished":
                                self._metrics.e2e.observe(time.monotonic() - self._arrival)
                            if outcome == "error":  # the cluster's failure: the client is not told where
                                error = redact(event.error)
                                if error != event.error:
                                    log.info("request %s failed: %s", rid, event.error)
                                    event = dataclasses.replace(event, error=error)
                            self._put(event)
                            return
                        if not await self._room():
                            outcome = "cut"
                            error = f"the client did not read its stream for {self._limits.stall_timeout_s:g} s: cut"
                            self._put(TokenEvent(rid, [], error=error))
                            return
                        self._put(event)
            outcome, error = "error", UNFINISHED_STREAM
            self._put(TokenEvent(rid, [], error=error))
        except TimeoutError:
            outcome, error = "timeout", f"the request passed its deadline of {self._limits.deadline_s:g} s"
            self._put(TokenEvent(rid, [], error=error))
        except Exception as exception:  # a bug behind the backend: the client hears of it, the backend frees it
            outcome, failed = "error", True
            error = redact(f"internal error: {type(exception).__name__}: {exception}")
            log.exception("request %s failed in the backend", rid)
            self._put(TokenEvent(rid, [], error=error))
        finally:
            self._settle(outcome, error)
            if outcome in ("aborted", "cut", "timeout") or failed:
                with anyio.CancelScope(shield=True):  # the client is gone, but its pages must be freed
                    await self._backend.abort(rid)

    def _put(self, event: TokenEvent) -> None:
        """Buffers an event. Before the client reads at all (the router holding a choice back while
        it admits the others of ``n``), events of tokens past the first ``BUFFER_EVENTS`` join the
        last one buffered, as vLLM's output collector merges outputs nobody took yet: each carries
        the whole text so far, so buffering them one by one held memory growing with the square of
        the answer's length."""
        self._held_tokens += len(event.token_ids)
        last = self._buffer[-1] if self._buffer else None
        if (not self._read and len(self._buffer) >= BUFFER_EVENTS and last is not None and _progress(last)
                and _progress(event)):
            if not self._tail_merged:  # lists of its own, extended in place from here on
                last = dataclasses.replace(last, token_ids=list(last.token_ids),
                                           logprobs=None if last.logprobs is None else list(last.logprobs))
                self._tail_merged = True
            last.token_ids.extend(event.token_ids)
            if last.logprobs is not None:
                last.logprobs.extend(event.logprobs or [])
            self._buffer[-1] = dataclasses.replace(last, text=event.text)
        else:
            self._buffer.append(event)
            self._tail_merged = False
        self._arrived.set()

    async def _room(self) -> bool:
        """False when the buffer stayed full for the stall timeout: the client is not reading.

        Before the client reads at all the buffer holds up to the request's own length: the router
        itself holds the reading back while it admits a request's other choices (``n``), which
        may wait for the slots these choices free by finishing."""
        if not self._read and self._held_tokens <= self._request.params.max_tokens:
            return True
        deadline = time.monotonic() + self._limits.stall_timeout_s
        while len(self._buffer) >= BUFFER_EVENTS:
            self._taken.clear()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):  # not wait_for: see admission
                    await self._taken.wait()
            except TimeoutError:
                return False
        return True


def _progress(event: TokenEvent) -> bool:
    """An event of tokens, neither the last of its stream nor an error."""
    return event.finish_reason is None and event.error is None


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
    """``work()``'s result (or its exception, as it is: an ``Overloaded`` stays a 429), or None once
    the client has disconnected (``work`` is then cancelled, and waits for its cancellation)."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work()), asyncio.ensure_future(watch())
    left = False
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            left = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    # decided by who cancelled it, not by ``task.cancelled()``: ``work`` may return an
    # ``asyncio.gather`` future, whose cancellation ends it with a CancelledError as its exception
    if not left:
        return task.result()
    if not task.cancelled() and task.exception() is None:
        # Python 3.11's ``wait_for`` can swallow a cancel that lands as what it waits for ends
        # (admission's queue): the work then finished anyway, and what it started (relays holding
        # slots) is let go here, not left to run to its end for nobody.
        made = task.result()
        for relay in made if isinstance(made, list) else [made]:
            if hasattr(relay, "aclose"):
                await relay.aclose()
    return None


def sse(data: Any) -> str:
    """One server-sent event as OpenAI streams them: ``data: <json>`` and a blank line. msgspec
    writes the JSON (compact, UTF-8 as is): one per token, ~7x faster than ``json.dumps``."""
    return f"data: {data if isinstance(data, str) else _JSON.encode(data).decode()}\n\n"


def _plain(value: Any) -> Any:
    """What msgspec does not encode itself: numpy scalars (json.dumps took np.float64, a float)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_JSON = msgspec.json.Encoder(enc_hook=_plain)
