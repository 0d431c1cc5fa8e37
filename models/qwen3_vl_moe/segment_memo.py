"""Tokenizing a chat's later turns without tokenizing its earlier ones again.

A `tokenizers` tokenizer cuts a text at its added tokens (``<|im_start|>``, ``<|im_end|>``, the
vision markers, ...) before it normalises and pre-tokenizes anything, and tokenizes each stretch
between them on its own. So a text's ids are its stretches' ids with the added tokens' ids between
them, and a stretch tokenized once need not be tokenized again: a chat's turn N repeats turns 1 to
N-1 stretch for stretch (the chat template renders each message between ``<|im_start|>`` and
``<|im_end|>``), and only its new messages are tokenized. That holds only when no added token
strips the whitespace beside it or matches only whole words, when added tokens are matched on
the raw text (not normalised), and when the post-processor adds no ids of its own; a tokenizer
that breaks one of these is tokenized whole (:meth:`SegmentMemo.usable`).

The memo keeps the ids of stretches of at least ``MIN_STRETCH_CHARS`` (shorter ones cost less to
tokenize than to look up), least recently used first out, within ``budget_bytes`` (each entry
counted as its text's size in memory and its ids' bytes).
"""

from __future__ import annotations

import collections
import re
import sys
import threading
from array import array
from collections.abc import Iterator

from tokenizers import Tokenizer as BackendTokenizer

MIN_STRETCH_CHARS = 64
DEFAULT_BUDGET_BYTES = 64 << 20


class SegmentMemo:
    def __init__(self, backend: BackendTokenizer, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self._backend = backend
        self._budget = budget_bytes
        added = backend.get_added_tokens_decoder()
        self._added_ids = {token.content: token_id for token_id, token in added.items()}
        self.added_tokens = tuple(self._added_ids)
        """The added tokens' strings (a text is cut at them)."""
        # longest first: at one position the alternation takes the longest added token, as tokenizers does
        contents = sorted(self._added_ids, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, contents))) if contents else None
        self.usable = self._split is not None and backend.num_special_tokens_to_add(False) == 0 and not any(
            token.lstrip or token.rstrip or token.single_word or token.normalized for token in added.values()) \
            and self._agrees()
        self._entries: collections.OrderedDict[str, array] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def pieces(self, text: str) -> Iterator[tuple[str, int | None]]:
        """The text as (stretch, None) and (added token, its id), in order; empty stretches left out."""
        at = 0
        for match in self._split.finditer(text):
            if match.start() > at:
                yield text[at:match.start()], None
            yield match.group(), self._added_ids[match.group()]
            at = match.end()
        if at < len(text):
            yield text[at:], None

    def get(self, stretch: str) -> list[int] | None:
        """The remembered ids of a stretch with no added token in it, or None."""
        if len(stretch) < MIN_STRETCH_CHARS:
            return None
        with self._lock:
            ids = self._entries.get(stretch)
            if ids is None:
                self.misses += 1
                return None
            self._entries.move_to_end(stretch)
            self.hits += 1
            return ids.tolist()

    def put(self, stretch: str, ids: list[int]) -> None:
        size = sys.getsizeof(stretch) + 4 * len(ids)
        if len(stretch) < MIN_STRETCH_CHARS or size > self._budget:
            return
        with self._lock:
            if stretch in self._entries:
                return
            self._entries[stretch] = array("i", ids)
            self._bytes += size
            while self._bytes > self._budget:
                old, old_ids = self._entries.popitem(last=False)
                self._bytes -= sys.getsizeof(old) + 4 * len(old_ids)

    def _agrees(self) -> bool:
        """Whether a probe text's ids are its pieces' ids end to end (a pre-tokenizer that treats
        a sequence's first word apart, as Metaspace's ``prepend_scheme="first"`` does, is not)."""
        token = next(iter(self._added_ids))
        probe = f"a b{token} c\n d{token}e  f"
        pieced = [i for piece, added in self.pieces(probe)
                  for i in ([added] if added is not None else self._backend.encode(piece, add_special_tokens=False).ids)]
        return pieced == self._backend.encode(probe, add_special_tokens=False).ids
