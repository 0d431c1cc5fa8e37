"""From a request's prompt to a PreparedPrompt that fits the context, or a 400 saying why not.

Decoding images and running the processor take CPU time, so they run in a worker thread and the
event loop keeps serving streams meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio.to_thread

from mmserve.engine.inputs import PreparedPrompt, prepare_prompt
from mmserve.serving.router.errors import InvalidRequest
from models.qwen3_vl_moe import Model
from models.qwen3_vl_moe.token_count import TooManyTokens


async def prepare(build_prompt: Callable[[], dict[str, Any]], model: Model, max_model_len: int, param: str,
                  body: Mapping[str, Any]) -> PreparedPrompt:
    """Builds the prompt (it may raise InvalidRequest itself) and expands it with the processor; a
    text longer than the context is refused once counting passes ``max_model_len``. The request
    ``body``'s ``cache_salt`` (vLLM's field) goes with the prompt."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise InvalidRequest("cache_salt must be a non-empty string", "cache_salt")

    def work() -> PreparedPrompt:
        try:
            prompt = build_prompt()
            return prepare_prompt(prompt if salt is None else prompt | {"cache_salt": salt}, model,
                                  max_tokens=max_model_len - 1)
        except TooManyTokens as error:
            raise _too_long(max_model_len, error.how_many, param) from None
        except ValueError as error:
            raise InvalidRequest(str(error), param) from None
    return await anyio.to_thread.run_sync(work)


def max_tokens_in_context(prompt_tokens: int, requested: int | None, default: int | None, max_model_len: int,
                          prompt_param: str, limit_param: str) -> int:
    """The request's max_tokens; ``default`` None means all the room the context leaves.

    As OpenAI does, a request whose prompt plus max_tokens exceeds the context is refused rather
    than cut short."""
    room = max_model_len - prompt_tokens
    if room < 1:
        raise _too_long(max_model_len, str(prompt_tokens), prompt_param)
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise InvalidRequest(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                             f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for "
                             "the completion)", limit_param, "context_length_exceeded")
    return requested


def _too_long(max_model_len: int, prompt_tokens: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
                          f"{prompt_tokens} tokens (at least one token must be left to generate)", param,
                          "context_length_exceeded")
