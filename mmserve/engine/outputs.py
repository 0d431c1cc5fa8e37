"""What a finished (or streaming) request returns, in vLLM's shape."""

from __future__ import annotations

import dataclasses

from mmserve.engine.request import Request, TokenLogprobs


@dataclasses.dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None

    @property
    def cumulative_logprob(self) -> float | None:
        """The chosen tokens' logprobs summed (vLLM's field), when logprobs were asked for (0 top
        ones will do); None otherwise."""
        return None if self.logprobs is None else float(sum(lp.logprob for lp in self.logprobs))


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt: str | None = None
    """The prompt's text where it was given as text (the offline ``LLM`` fills it in, as vLLM's
    ``output.prompt``); None for token ids."""

    @classmethod
    def of(cls, request: Request) -> RequestOutput:
        finish = request.finish
        completion = CompletionOutput(
            index=0,
            text=finish.text if finish else request.text,
            token_ids=list(request.output_ids),
            logprobs=list(request.logprobs) if request.params.logprobs is not None else None,
            finish_reason=str(finish.reason) if finish else None,
            stop_reason=finish.stop_reason if finish else None,
        )
        return cls(request.request_id, list(request.prompt_ids), [completion], finish is not None)
