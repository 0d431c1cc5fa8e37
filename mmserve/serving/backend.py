"""What the HTTP router asks of whatever generates: one colocated engine or a disaggregated triple.

The router prepares each request itself (chat template, tokenizer, image decoding and the
processor, placeholder expansion), so a backend receives token ids and pixel patches, never raw
HTTP input, and every validation error has already become a 400.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

from mmserve.engine.inputs import PreparedPrompt
from mmserve.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams
    deadline: float | None = None
    """``time.monotonic()`` past which the router cuts the request (its --request-timeout), set at
    admission; None: no deadline. The disaggregated backend sends each worker the time left, so
    every role frees the request by itself once it passes."""


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request. The last event has ``finish_reason`` set (or ``error``)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    """The output text so far that is safe to show (a possible stop string held back); on the last
    event the final text, stop strings cut. A streaming client gets the new suffix each time."""
    error: str | None = None
    """Why the request failed (a lost peer, a timeout, an abort); the stream ends with it."""
    invalid: bool = False
    """With ``error``: the backend refused the request as given (e.g. a prompt its KV cache cannot
    hold), the client's fault and a 400, not a failure of the server."""


class KVClaim(Protocol):
    """KV reserved for one request by ``Backend.kv_claim``."""

    def release(self) -> None:
        """Gives it back; idempotent."""


class _NoClaim:
    def release(self) -> None:
        pass


NO_CLAIM = _NoClaim()
"""The claim of a backend that reserves no KV up front."""


class Backend(Protocol):
    supports_structured_output: bool
    """Whether requests' ``structured_output`` grammars are enforced; the router refuses
    ``response_format`` (a 400) where not, and treats a backend without the attribute as False."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Streams the request's tokens; ends after the event with finish_reason or error."""

    def capacity(self) -> int:
        """Requests it can hold at once now; the router admits no more (0: none can be taken)."""

    def kv_capacity(self) -> int | None:
        """The most tokens of KV one request may reserve (the largest place it could run: a request
        needing more is a 400); None where requests do not reserve KV up front (the colocated
        engine preempts)."""

    def kv_demand(self, request: GenerateRequest) -> int:
        """The tokens of KV ``request`` reserves (checked against ``kv_capacity``)."""

    def kv_claim(self, request: GenerateRequest) -> KVClaim | None:
        """Reserves ``request``'s KV where it will run, now (a decode worker with room, chosen
        here and kept for its ``generate``), or None while nowhere has room: the router's
        admission holds the request until a claim succeeds, and releases the claim when the
        request ends. A backend that reserves nothing claims nothing (``NO_CLAIM``)."""

    def unavailable(self, request: GenerateRequest) -> str | None:
        """Why ``request`` cannot be served now though others can (a stage it needs has no live
        worker: an image chat while the only encode worker restarts); the router answers 503 with
        Retry-After, as when nothing is up. None when it can be served."""

    async def abort(self, request_id: str) -> None:
        """Stops a request (a client that went away); frees everything it holds."""

    async def health(self) -> dict:
        """{"healthy": bool, ...details such as which roles are up}."""

    def metrics(self) -> dict[str, float]:
        """Gauges to export: queue depths, free blocks/pages, ..."""
