"""One request's place in its grammar, and the per-step token bitmask of a batch.

The matcher advances only on tokens the request has emitted (``accept``, called as each token is
appended), never on a recompute: a preempted request prefills its prompt and output again but emits
nothing new until its next token, so its matcher is already where the output is.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

from mmserve.sampler import all_allowed_bitmask

if TYPE_CHECKING:  # xgrammar (and the torch it imports, seconds) loads with the first grammar
    import xgrammar


class GrammarState:
    def __init__(self, compiled: Future, terminate_without_stop_token: bool = False):
        self.compiled = compiled
        self._terminate_without_stop_token = terminate_without_stop_token
        self._matcher: xgrammar.GrammarMatcher | None = None

    @property
    def ready(self) -> bool:
        return self.compiled.done()

    @property
    def matcher(self) -> xgrammar.GrammarMatcher:
        if self._matcher is None:
            import xgrammar

            self._matcher = xgrammar.GrammarMatcher(
                self.compiled.result(), terminate_without_stop_token=self._terminate_without_stop_token)
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """False when the grammar forbids the token (which the mask should have made impossible)."""
        return self.matcher.accept_token(int(token_id))

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def fill_bitmask(grammars: list[GrammarState | None], rows: int, vocab_size: int) -> np.ndarray | None:
    """i32[rows, words]: each grammar row's allowed next tokens, every bit set on the other rows.
    None when no row has a grammar (the runner then uses its resident all-allowed mask)."""
    if not any(grammars):
        return None
    bitmask = all_allowed_bitmask(rows, vocab_size)
    for row, grammar in enumerate(grammars):
        if grammar is not None:
            grammar.matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def empty_rows(bitmask: np.ndarray, rows: list[int], vocab_size: int) -> list[int]:
    """Those of ``rows`` whose mask allows no token: a grammar with no way to go on (a pattern no
    character matches, an output that cannot be completed), where sampling would draw a forbidden one."""
    return [row for row in rows
            if not np.unpackbits(bitmask[row].view(np.uint8), bitorder="little")[:vocab_size].any()]
