"""A request as the engine tracks it, from admission to finish.

Invariant while decoding: every token but the newest has its KV in the cache
(``num_computed == num_tokens - 1``); the newest is the next decode input. While a decode step is
in flight (dispatched, its token not read: between two overlapped steps, see ``LLMEngine``)
``num_computed == num_tokens``: the step in flight computes the newest token's KV. A preempted request
loses its cache (``num_computed = 0``) and is prefilled again over prompt and output, which
reproduces the same next token. With prefix caching a request (fresh or preempted) starts with
``num_computed`` at the end of its cached prefix, as if those chunks had been prefilled.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from mmserve.engine.page_hash import PageKeys
from mmserve.sampling_params import SamplingParams
from mmserve.structured_output.matcher import GrammarState
from mmserve.stop import Finish
from mmserve.engine.visual_rows import PromptVisuals
from models.qwen3_vl_moe.tokenizer import TextStream


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's logprob and, when asked, the top-k alternatives (id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_positions: np.ndarray  # [3, P] MRoPE positions of the prompt
    rope_delta: int
    visual: PromptVisuals | None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    num_cached_tokens: int = 0  # of its prompt, found in the prefix cache when it was (last) admitted
    status: Status = Status.WAITING
    slot: int | None = None
    slot_loaded: bool = False  # its sampling slot (penalties) holds its tokens; loaded before its first row runs
    text: str = ""
    text_stream: TextStream | None = None  # the engine's incremental decoder of output_ids into text
    finish: Finish | None = None
    page_keys: PageKeys | None = None  # None: its pages are never cached (nor looked up)
    grammar: GrammarState | None = None  # with params.structured_output: where its output is in the grammar
    pinned: bool = False  # added on cached pictures: the pages holding them are pinned while it lives

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def ready_until(self, start: int) -> int:
        """The end of the run of tokens from ``start`` whose inputs are all here: visual rows still
        arriving from another process stop it at the first token that lacks its row."""
        end = self.num_tokens
        return end if self.visual is None else self.visual.ready_until(start, end)

    @property
    def blocked(self) -> bool:
        """Its next token to compute waits for a visual row that has not arrived."""
        return self.ready_until(self.num_computed) == self.num_computed < self.num_tokens

    def full_page_keys(self) -> list[bytes]:
        """The keys of the pages whose KV is computed and full (none without ``page_keys``)."""
        if self.page_keys is None:
            return []
        return self.page_keys.first(self.num_computed // self.page_keys.page_size, self.token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt = len(self.prompt_ids)
        return (self.prompt_ids[start:end] if end <= prompt
                else self.prompt_ids[start:] + self.output_ids[max(start - prompt, 0):end - prompt])

    def positions(self, start: int, end: int) -> np.ndarray:
        """MRoPE positions [3, end - start]: the prompt's, then ``index + rope_delta`` on every axis."""
        prompt = len(self.prompt_ids)
        head = self.prompt_positions[:, start:min(end, prompt)]
        tail = np.arange(max(start, prompt), end) + self.rope_delta
        return np.concatenate([head, np.broadcast_to(tail, (3, tail.size))], axis=1).astype(np.int32)
