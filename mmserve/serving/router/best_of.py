"""``best_of``: generate that many completions and return the ``n`` most likely.

OpenAI's legacy completions parameter: the server samples ``best_of`` candidates and answers with
the ``n`` most likely, best first; it cannot be streamed (the best are known only once all have
finished) and every candidate's tokens count in the usage. Candidates are ranked as vLLM ranks
them, by cumulative log probability (the sum over their tokens; OpenAI's documentation says per
token, which favours long answers where the sum favours short ones). The
candidates are ordinary siblings (``siblings.py``: their own seeds, the prompt's pages shared);
each is asked for its chosen tokens' log probabilities (``logprobs=0``) even when the client did
not ask for any, and the choices then carry none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mmserve.sampling_params import MAX_N, SamplingParams
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.fields import requested_int
from mmserve.serving.router.relay import Answer


def requested_best_of(body: Mapping[str, Any], n: int, stream: bool) -> int:
    """The candidates to generate: ``best_of`` when given, else ``n``; a 400 for a value below
    ``n``, above the sibling limit, or with ``stream``."""
    best_of = requested_int(body, "best_of")
    if best_of is None:
        return n
    if not n <= best_of <= MAX_N:
        raise InvalidRequest(f"best_of must be an integer in [n, {MAX_N}] (n is {n}), got {best_of}", "best_of")
    if stream and best_of > n:
        raise InvalidRequest("best_of cannot be streamed: the best are known only once every candidate has "
                             "finished", "best_of")
    return best_of


def scored(params: SamplingParams) -> SamplingParams:
    """``params`` asking for at least the chosen tokens' log probabilities (what a candidate is
    ranked by)."""
    return params if params.logprobs is not None else dataclasses.replace(params, logprobs=0)


def cumulative_logprob(answer: Answer) -> float:
    """The log probability of a finished candidate's tokens (0 for one with none)."""
    return math.fsum(entry.logprob for entry in answer.logprobs)


def best(answers: Sequence[Answer], n: int) -> list[int]:
    """Indices of the ``n`` most likely answers, best first (a tie goes to the earlier candidate)."""
    return sorted(range(len(answers)), key=lambda i: (-cumulative_logprob(answers[i]), i))[:n]
