"""One request's output as a stream of deltas: what is new since the last event, the same for every
path that streams (the colocated backend to the router, the decode role over the wire).

Each delta carries the new tokens (and their logprobs) and the new text that is safe to show: while
the request runs, text that could still turn out to be the start of a stop string is held back
(``streamable_text``; an incomplete UTF-8 character never reaches the text at all, see
``TextStream``); the last delta completes the final text, stop strings cut.
"""

from __future__ import annotations

import dataclasses

from mmserve.engine.outputs import RequestOutput
from mmserve.engine.request import TokenLogprobs
from mmserve.sampling_params import SamplingParams
from mmserve.stop import streamable_text


@dataclasses.dataclass(frozen=True)
class OutputDelta:
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    text_delta: str
    text: str
    """The whole text shown so far, ``text_delta`` included."""
    finish_reason: str | None
    stop_reason: int | str | None
    """The stop token's id (an int) or the stop string that finished the request."""


class OutputStream:
    def __init__(self, params: SamplingParams):
        self.params = params
        self._tokens_sent = 0
        self._text_sent = ""

    def delta(self, output: RequestOutput) -> OutputDelta:
        completion = output.outputs[0]
        new = slice(self._tokens_sent, len(completion.token_ids))
        text = completion.text if output.finished else streamable_text(self.params, completion.text)
        delta = OutputDelta(completion.token_ids[new],
                            None if completion.logprobs is None else completion.logprobs[new],
                            text[len(self._text_sent):], text, completion.finish_reason, completion.stop_reason)
        self._tokens_sent, self._text_sent = len(completion.token_ids), text
        return delta
