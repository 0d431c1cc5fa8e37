"""Counting a text's tokens a piece at a time, stopping once past a limit: what a client's
megabytes of text cost before they are refused is what the limit's tokens cost, not what the
whole text would (an encoding holds ~200 bytes per token: a 32 MiB body would take gigabytes).

A piece ends where Qwen's pre-tokenizer splits anyway: before a space that follows a non-space, or
before punctuation that follows a letter or digit, and never inside an added token. No pre-token
spans such a cut and no look-ahead reaches across it (nor does NFC: neither character composes),
so for Qwen's tokenizers the pieces' counts add up to the whole text's (without what a
post-processor adds); another tokenizer is allowed a token per cut. A piece with no such place (a
64 Ki-character word) is cut where it ends, and allowed ``FORCED_CUT_TOKENS``: BPE then tokenizes
the two halves of that word apart.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from tokenizers import Tokenizer as BackendTokenizer

COUNT_PIECE_CHARS = 1 << 16  # a text longer than this is counted piece by piece before it is encoded
FORCED_CUT_TOKENS = 16  # what a cut inside a word may add to the pieces' count
CUT_PUNCTUATION = {"Pd", "Ps", "Pe", "Pi", "Pf", "Po"}  # not "Pc" ("_"), common inside added tokens


class TooManyTokens(ValueError):
    """A text has more than ``limit`` tokens: ``counted`` of them (``exact``), or at least that
    many (counting stopped there)."""

    def __init__(self, counted: int, limit: int, exact: bool):
        self.counted, self.limit, self.exact = counted, limit, exact
        super().__init__(f"the text has {self.how_many} tokens, more than {limit}")

    @property
    def how_many(self) -> str:
        """"N" or "at least N": what a refusal says the prompt holds."""
        return f"{'' if self.exact else 'at least '}{self.counted}"


def count_tokens(backend: BackendTokenizer, added_tokens: Sequence[str], text: str, limit: int,
                 piece_chars: int = COUNT_PIECE_CHARS) -> int:
    """``text``'s tokens (without the special tokens a post-processor adds), counted a piece of
    about ``piece_chars`` at a time; raises TooManyTokens once those counted hold more than
    ``limit``. ``added_tokens``: the tokenizer's added tokens' strings, never cut."""
    counted, allowed, start = 0, 0, 0
    while start < len(text):
        end, clean = _cut(text, start + piece_chars, start + 2 * piece_chars, added_tokens)
        counted += len(backend.encode(text[start:end], add_special_tokens=False).ids)
        if end < len(text):
            allowed += 1 if clean else FORCED_CUT_TOKENS
        if counted - allowed > limit:
            raise TooManyTokens(counted - allowed, limit, exact=False)
        start = end
    return counted


def _cut(text: str, at: int, before: int, added_tokens: Sequence[str]) -> tuple[int, bool]:
    """Where the piece from before ``at`` ends: the first clean cut in [at, before), the text's end
    when that comes first, else ``at``."""
    for i in range(at, min(before, len(text))):
        here, previous = text[i], text[i - 1]
        if ((here == " " and not previous.isspace())
                or (previous.isalnum() and unicodedata.category(here) in CUT_PUNCTUATION)) \
                and not _inside_added_token(text, i, added_tokens):
            return i, True
    return (len(text), True) if before >= len(text) else (at, False)


def _inside_added_token(text: str, i: int, added_tokens: Sequence[str]) -> bool:
    return any(token in text[max(0, i - len(token) + 1):i + len(token) - 1] for token in added_tokens)
