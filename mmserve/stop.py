"""When a sequence is done, decided on the host after each new token, as vLLM does.

The checks run in vLLM's order: end-of-sequence (unless `ignore_eos`), a stop token id, a stop
string, then `max_tokens`; no stop token before the output has `min_tokens` tokens (the sampler
keeps them from being drawn until then), and no stop string in those tokens' text. A stop string wins over the length limit when both happen on the same
token. The context-length limit is the engine's, not the request's, and is not checked here.
"""

import dataclasses
import enum
from collections.abc import Collection, Sequence

from mmserve.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached


@dataclasses.dataclass(frozen=True)
class Finish:
    reason: FinishReason
    text: str  # the final output text: without the stop token's text, cut before a stop string
    stop_reason: int | str | None  # the stop token id or string that matched (vLLM's field)


def check_stop(params: SamplingParams, eos_token_ids: Collection[int],
               output_token_ids: Sequence[int], output_text: str,
               new_char_count: int) -> Finish | None:
    """Returns how the sequence finished with its newest token, or None if it goes on.

    output_text is the detokenized output so far, new_char_count the characters the newest token
    added to it: a stop token's text is dropped, and the text from a stop string on (with
    ``include_stop_str_in_output``, vLLM's, both are kept, up to the stop string's end), and stop
    strings are searched only where the new characters could complete one.
    """
    if len(output_token_ids) < params.min_tokens:  # at most max_tokens: nothing ends it yet
        return None
    last_token = output_token_ids[-1]
    keep = params.include_stop_str_in_output
    text_before_last = output_text if keep else output_text[:len(output_text) - new_char_count]
    if not params.ignore_eos and last_token in eos_token_ids:
        return Finish(FinishReason.STOP, text_before_last, None)
    if last_token in params.stop_token_ids:
        return Finish(FinishReason.STOP, text_before_last, last_token)
    # vLLM's (v1): stop strings are searched from the token after the min_tokens-th on
    matched = None if len(output_token_ids) <= params.min_tokens else \
        _find_stop_string(params.stop, output_text, new_char_count)
    if matched is not None:
        stop_string, index = matched
        return Finish(FinishReason.STOP, output_text[:index + len(stop_string) if keep else index], stop_string)
    if len(output_token_ids) >= params.max_tokens:
        return Finish(FinishReason.LENGTH, output_text, None)
    return None


def streamable_text(params: SamplingParams, output_text: str) -> str:
    """The prefix of an unfinished output that is safe to stream.

    The last (longest stop string - 1) characters are held back: they may yet become the start of
    a stop string, which must never reach the client. A text shorter than that shows nothing
    yet (a negative end would slice from the back, and the text shown would shrink).
    """
    held_back = max((len(stop) for stop in params.stop), default=1) - 1
    return output_text[:max(len(output_text) - held_back, 0)]


def _find_stop_string(stops: Sequence[str], text: str, new_char_count: int) -> tuple[str, int] | None:
    """The earliest stop string that ends within the new characters, with where it starts."""
    if new_char_count <= 0:
        return None
    earliest = None
    for stop in stops:
        # A match must end after the old text, so it starts at most len(stop) - 1 characters before
        # the new ones.
        start = max(len(text) - new_char_count - len(stop) + 1, 0)
        index = text.find(stop, start)
        if index != -1 and (earliest is None or index < earliest[1]):
            earliest = (stop, index)
    return earliest
