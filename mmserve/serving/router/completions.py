"""``POST /v1/completions``: OpenAI's legacy text completion over a string or token-id prompt."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mmserve.serving.backend import GenerateRequest, TokenEvent, TokenLogprob
from mmserve.serving.router.best_of import requested_best_of
from mmserve.serving.router.context import RouterContext, new_request_id
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.fields import (COMMON_FIELDS, check_known, common_fields, json_object, requested_int,
                                           sampling_params)
from mmserve.serving.router.json_body import json_body
from mmserve.serving.router.logprobs import completion_logprobs
from mmserve.serving.router.openai_response import OpenAIResponse
from mmserve.serving.router.prompts import max_tokens_in_context, prepare
from mmserve.serving.router.relay import Answer
from mmserve.serving.router.response_format import FIELDS as RESPONSE_FORMAT_FIELDS, structured_output

ENDPOINT = "completions"
COMPLETION_FIELDS = COMMON_FIELDS | RESPONSE_FORMAT_FIELDS | {"prompt", "max_tokens", "logprobs", "best_of"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


async def completions(request: Request) -> Response:
    router = RouterContext.of(request)
    body = json_object(await json_body(request))
    check_known(body, COMPLETION_FIELDS)
    common = common_fields(body, router.settings, router.model.sampling_defaults)
    best_of = requested_best_of(body, common.n, common.stream)
    structured = await structured_output(body, router.backend)
    prompt = await prepare(lambda: _prompt(body.get("prompt")), router.model, router.settings.max_model_len, "prompt",
                           body)
    max_tokens = max_tokens_in_context(len(prompt.token_ids), requested_int(body, "max_tokens"), DEFAULT_MAX_TOKENS,
                                       router.settings.max_model_len, "prompt", "max_tokens")
    params = sampling_params(common.sampling | {"max_tokens": max_tokens, "logprobs": requested_int(body, "logprobs"),
                                               "structured_output": structured},
                             vocab_size=router.model.config.text.vocab_size)
    completion = CompletionResponse(router, GenerateRequest(new_request_id("cmpl"), prompt, params), common, best_of)
    arrival = time.monotonic()  # prepared: from here on the server's time (metrics.py)
    return await completion.answer(request, ENDPOINT, arrival, "text_completion")


def _prompt(prompt: Any) -> dict[str, Any]:
    """One prompt: a string or a list of token ids (a batch of exactly one of either is accepted)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and not any(isinstance(p, (str, list)) for p in prompt):
        return {"prompt_token_ids": prompt}
    raise InvalidRequest("prompt must be a string or a non-empty list of token ids (batches are not supported)",
                         "prompt")


class CompletionResponse(OpenAIResponse):
    chunk_kind = "text_completion"

    def choice(self, index: int, text: str, entries: list[TokenLogprob], text_offset: int,
               finish_reason: str | None, stop_reason: int | str | None) -> dict:
        logprobs = None
        if self.request.params.logprobs is not None:
            logprobs = completion_logprobs(entries, self.token_text, text_offset)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": stop_reason}

    def whole_choice(self, index: int, answer: Answer) -> dict:
        return self.choice(index, answer.text, answer.logprobs, 0, answer.finish_reason, answer.stop_reason)

    def delta_choice(self, index: int, event: TokenEvent, delta: str, text_offset: int) -> dict:
        return self.choice(index, delta, event.logprobs or [], text_offset, event.finish_reason, event.stop_reason)
