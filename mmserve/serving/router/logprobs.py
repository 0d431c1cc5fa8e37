"""Logprobs in the two shapes OpenAI returns: per-token objects (chat) and parallel lists (completions)."""

from __future__ import annotations

from collections.abc import Callable

from mmserve.serving.backend import TokenLogprob

TokenText = Callable[[int], str]


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenText) -> dict:
    return {"content": [_chat_entry(e.token_id, e.logprob, text_of)
                        | {"top_logprobs": [_chat_entry(t, lp, text_of) for t, lp in _ranked(e.top)]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], text_of: TokenText, text_offset: int) -> dict:
    tokens = [text_of(e.token_id) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        # the sampled token too, as OpenAI's legacy completions and vLLM give it (up to k + 1 entries)
        "top_logprobs": [{text_of(t): lp for t, lp in _ranked(e.top)} | {text_of(e.token_id): e.logprob}
                         for e in entries],
        "text_offset": offsets,
    }


def _chat_entry(token_id: int, logprob: float, text_of: TokenText) -> dict:
    text = text_of(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _ranked(top: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(top.items(), key=lambda item: -item[1])
