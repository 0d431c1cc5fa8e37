"""``POST /v1/chat/completions``: OpenAI chat, streamed as server-sent events or answered whole."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from mmserve.sampling_params import MAX_LOGPROBS
from mmserve.serving.backend import GenerateRequest, TokenEvent, TokenLogprob
from mmserve.serving.router.chat_messages import chat_prompt
from mmserve.serving.router.context import RouterContext, new_request_id
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.fields import (COMMON_FIELDS, check_known, common_fields, json_object, requested_int,
                                           sampling_params)
from mmserve.serving.router.json_body import json_body
from mmserve.serving.router.logprobs import chat_logprobs
from mmserve.serving.router.openai_response import OpenAIResponse
from mmserve.serving.router.prompts import max_tokens_in_context, prepare
from mmserve.serving.router.relay import Answer
from mmserve.serving.router.response_format import FIELDS as RESPONSE_FORMAT_FIELDS, structured_output

ENDPOINT = "chat"
CHAT_FIELDS = COMMON_FIELDS | RESPONSE_FORMAT_FIELDS | {"messages", "max_tokens", "max_completion_tokens", "logprobs",
                                                        "top_logprobs"}


async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()
    router = RouterContext.of(request)
    body = json_object(await json_body(request))
    check_known(body, CHAT_FIELDS)
    common = common_fields(body, router.settings)
    structured = await structured_output(body, router.backend)
    logprobs = _logprobs(body)
    limit_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    requested = requested_int(body, limit_name)
    prompt = await prepare(lambda: chat_prompt(body.get("messages"), router.model.tokenizer, router.media_reader()),
                           router.model, "messages")
    max_tokens = max_tokens_in_context(len(prompt.token_ids), requested, None, router.settings.max_model_len,
                                       "messages", limit_name)
    params = sampling_params(common.sampling | {"max_tokens": max_tokens, "logprobs": logprobs,
                                                  "structured_output": structured},
                             {"max_tokens": limit_name, "logprobs": "top_logprobs"})
    chat = ChatResponse(router, GenerateRequest(new_request_id("chatcmpl"), prompt, params), common)
    return await chat.respond(request, await chat.start(ENDPOINT, arrival), "chat.completion")


def _logprobs(body: dict) -> int | None:
    """OpenAI's chat asks ``logprobs: true`` plus ``top_logprobs: k``; the engine takes k (or None)."""
    wanted = body.get("logprobs", False)
    if not isinstance(wanted, bool):
        raise InvalidRequest("logprobs must be a boolean", "logprobs")
    top = requested_int(body, "top_logprobs")
    if top is not None and not wanted:
        raise InvalidRequest("top_logprobs needs logprobs set to true", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    return (top or 0) if wanted else None


class ChatResponse(OpenAIResponse):
    chunk_kind = "chat.completion.chunk"

    def logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        return None if self.request.params.logprobs is None else chat_logprobs(entries, self.token_text)

    def whole_choice(self, index: int, answer: Answer) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": answer.text},
                "logprobs": self.logprobs(answer.logprobs), "finish_reason": answer.finish_reason,
                "stop_reason": answer.stop_reason}

    def opening_delta(self, index: int) -> dict:
        return self._choice(index, {"role": "assistant", "content": ""}, None, None)

    def delta_choice(self, index: int, event: TokenEvent, delta: str, text_offset: int) -> dict:
        return self._choice(index, {"content": delta} if delta else {}, self.logprobs(event.logprobs or []), event)

    @staticmethod
    def _choice(index: int, delta: dict, logprobs: dict | None, event: TokenEvent | None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": event.finish_reason if event else None,
                "stop_reason": event.stop_reason if event else None}
