"""``POST /v1/chat/completions``: OpenAI chat, streamed as server-sent events or answered whole; with
``tools``, the answer's calls parsed into ``tool_calls`` (``tools.py``, ``tool_parser.py``)."""

from __future__ import annotations

import asyncio
import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from mmserve.sampling_params import MAX_LOGPROBS
from mmserve.serving.backend import GenerateRequest, TokenEvent, TokenLogprob
from mmserve.serving.router.chat_messages import TEMPLATE_FIELDS, answer_opens_thinking, chat_prompt, template_options
from mmserve.serving.router.context import RouterContext, new_request_id
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.fields import (COMMON_FIELDS, CommonFields, check_known, common_fields, json_object,
                                           requested_int, sampling_params)
from mmserve.serving.router.json_body import json_body
from mmserve.serving.router.logprobs import chat_logprobs
from mmserve.serving.router.openai_response import OpenAIResponse
from mmserve.serving.router.prompts import max_tokens_in_context, prepare
from mmserve.serving.router.reasoning_parser import CLOSE as THINK_END, ReasoningParser, Split, split_reasoning
from mmserve.serving.router.relay import Answer
from mmserve.serving.router.response_format import FIELDS as RESPONSE_FORMAT_FIELDS, given_field, structured_output
from mmserve.serving.router.tool_parser import ToolCall, ToolCallParser, parse_tool_calls
from mmserve.serving.router.tools import FIELDS as TOOLS_FIELDS, Tools, requested_tools

ENDPOINT = "chat"
CHAT_FIELDS = COMMON_FIELDS | RESPONSE_FORMAT_FIELDS | TOOLS_FIELDS | TEMPLATE_FIELDS | {
    "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs"}


async def chat_completions(request: Request) -> Response:
    router = RouterContext.of(request)
    body = json_object(await json_body(request))
    check_known(body, CHAT_FIELDS)
    common = common_fields(body, router.settings, router.model.sampling_defaults)
    tools = await requested_tools(body, router.backend)
    structured = await structured_output(body, router.backend)
    if tools is not None and tools.grammar is not None:
        if structured is not None:
            raise InvalidRequest("a required or named tool_choice forces a tool call; it cannot be combined with "
                                 "response_format, structured_outputs or guided_*", "tool_choice")
        structured = tools.grammar
    logprobs = _logprobs(body)
    limit_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    requested_int(body, "max_tokens")  # checked when max_completion_tokens, which wins, is sent too
    requested = requested_int(body, limit_name)
    options = template_options(body, router.model.tokenizer)
    prompt = await prepare(lambda: chat_prompt(body.get("messages"), router.model.tokenizer, router.media_reader(),
                                               tools.definitions if tools else None, options),
                           router.model, router.settings.max_model_len, "messages", body)
    max_tokens = max_tokens_in_context(len(prompt.token_ids), requested, None, router.settings.max_model_len,
                                       "messages", limit_name)
    thinks = None  # no reasoning parser; else whether the answer starts inside a think block
    if router.settings.reasoning_parser is not None:
        thinks = answer_opens_thinking(body, router.model.tokenizer, options)  # the messages passed: a list
        if thinks and structured is not None:  # the answer is constrained, not the thinking before it
            structured = structured.after_reasoning(THINK_END)
            try:
                await asyncio.to_thread(structured.check)
            except ValueError as error:  # the constraint passed alone (nested near the depth bound, say)
                raise InvalidRequest(f"{error} (once wrapped to follow the thinking)",
                                     "tool_choice" if tools is not None and tools.grammar is not None
                                     else given_field(body)) from None
    params = sampling_params(common.sampling | {"max_tokens": max_tokens, "logprobs": logprobs,
                                                  "structured_output": structured},
                             {"max_tokens": limit_name, "logprobs": "top_logprobs"},
                             router.model.config.text.vocab_size)
    chat = ChatResponse(router, GenerateRequest(new_request_id("chatcmpl"), prompt, params), common, tools, thinks)
    arrival = time.monotonic()  # prepared: from here on the server's time (metrics.py)
    return await chat.answer(request, ENDPOINT, arrival, "chat.completion")


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
    """With a reasoning parser (``--reasoning-parser``), each choice's text is first split into its
    ``reasoning_content`` and its content (``reasoning_parser.py``). With tools, the content goes
    through its own ``ToolCallParser``: the message holds the content outside the calls and the
    calls, and an answer that called and then stopped finishes with "tool_calls" (one cut by
    max_tokens keeps "length")."""

    chunk_kind = "chat.completion.chunk"

    def __init__(self, router: RouterContext, request: GenerateRequest, common: CommonFields, tools: Tools | None,
                 thinks: bool | None = None):
        super().__init__(router, request, common)
        self.thinks = thinks
        self.reasoners = [ReasoningParser(thinks) for _ in self.requests] if thinks is not None else None
        self.parsers = [ToolCallParser() for _ in self.requests] if tools is not None else None
        self.max_calls = None if tools is None or tools.parallel else 1  # an answer's calls past it are dropped
        self.calls_sent = [0] * len(self.requests)  # per streamed choice

    def logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        return None if self.request.params.logprobs is None else chat_logprobs(entries, self.token_text)

    def whole_choice(self, index: int, answer: Answer) -> dict:
        split = Split(content=answer.text) if self.thinks is None else split_reasoning(answer.text, self.thinks)
        message = {"role": "assistant", "content": split.content if self.thinks is None else split.content or None}
        if self.thinks is not None:
            message["reasoning_content"] = split.reasoning or None
        finish_reason = answer.finish_reason
        if self.parsers is not None:
            parsed = parse_tool_calls(split.content)
            if parsed.calls:
                calls = parsed.calls[:self.max_calls]
                message |= {"content": parsed.content or None, "tool_calls": [_call(call) for call in calls]}
                finish_reason = _finish_reason(finish_reason, called=True)
        return {"index": index, "message": message, "logprobs": self.logprobs(answer.logprobs),
                "finish_reason": finish_reason, "stop_reason": answer.stop_reason}

    def opening_delta(self, index: int) -> dict:
        return self._choice(index, {"role": "assistant", "content": ""}, None, None)

    def delta_choice(self, index: int, event: TokenEvent, delta: str, text_offset: int) -> dict | None:
        logprobs = self.logprobs(event.logprobs or [])
        if self.reasoners is None and self.parsers is None:
            return self._choice(index, {"content": delta} if delta else {}, logprobs, event)
        split = Split(content=delta)
        if self.reasoners is not None:
            split = self.reasoners[index].feed(delta)
            if event.finish_reason is not None:
                split = split.add(self.reasoners[index].finish())
        message = {"reasoning_content": split.reasoning} if split.reasoning else {}
        if self.parsers is None:
            if split.content:
                message["content"] = split.content
            if not (message or logprobs or event.finish_reason is not None):
                return None
            return self._choice(index, message, logprobs, event)
        parsed = self.parsers[index].feed(split.content)
        if event.finish_reason is not None:
            parsed = parsed.add(self.parsers[index].finish())
        if self.max_calls is not None:
            parsed.calls = parsed.calls[:max(self.max_calls - self.calls_sent[index], 0)]
        if not (message or parsed.content or parsed.calls or logprobs or event.finish_reason is not None):
            return None
        if parsed.content:
            message["content"] = parsed.content
        if parsed.calls:  # a delta numbers its calls within the choice
            first = self.calls_sent[index]
            message["tool_calls"] = [{"index": first + i} | _call(call) for i, call in enumerate(parsed.calls)]
            self.calls_sent[index] += len(parsed.calls)
        choice = self._choice(index, message, logprobs, event)
        choice["finish_reason"] = _finish_reason(event.finish_reason, self.calls_sent[index] > 0)
        return choice

    @staticmethod
    def _choice(index: int, delta: dict, logprobs: dict | None, event: TokenEvent | None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": event.finish_reason if event else None,
                "stop_reason": event.stop_reason if event else None}


def _call(call: ToolCall) -> dict:
    """A call as OpenAI writes one in a message."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _finish_reason(finish_reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
