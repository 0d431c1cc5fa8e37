"""Full KV pages kept by key after their sequences let go, so that a later prompt with the same
prefix takes them instead of recomputing them (keys: :mod:`mmserve.engine.page_hash`).

A cached page is either held (some sequence's page table has it) or idle (nobody holds it). Idle
pages still count as free: when the cache manager needs a fresh page and has no blank one, it
evicts the least recently idled page, forgetting its key.

A sequence's last page, when partial, is kept too, as a *tail*: named by the keys of each of its
first tokens (:meth:`~mmserve.engine.page_hash.PageKeys.tail_keys`), idle, evicted with the
cached pages. A chat's next turn repeats the last turn's prompt and answer and goes on past
them: its page at that place starts with the tail's tokens, so it takes the tail instead of
computing (or, on decode, receiving) them again. A tail has one taker: it becomes that
sequence's own page, written past the tokens it held, and leaves the cache. Tails make no KV
events (vLLM's and SGLang's events name full blocks only).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence


class PrefixCache:
    def __init__(self, on_evict: Callable[[bytes], None] | None = None):
        """on_evict(key): a page's key was forgotten (KV events)."""
        self._on_evict = on_evict
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first
        self._tail_of: dict[bytes, int] = {}
        self._tail_keys: dict[int, list[bytes]] = {}

    def __len__(self) -> int:
        """Pages with a key, held or idle."""
        return len(self._page_of)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def is_cached(self, page: int) -> bool:
        return page in self._key_of

    def key_of(self, page: int) -> bytes | None:
        return self._key_of.get(page)

    def is_idle(self, page: int) -> bool:
        return page in self._idle

    def is_tail(self, page: int) -> bool:
        return page in self._tail_keys

    @property
    def num_tails(self) -> int:
        return len(self._tail_keys)

    def longest_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """The pages of the longest run keys[0..n) that are all cached."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def longest_tail(self, keys: Sequence[bytes]) -> tuple[int, int] | None:
        """(page, j) of the tail holding the most tokens of a page whose first ``j`` tokens have key
        ``keys[j - 1]``; None when no tail starts with them."""
        for j in range(len(keys), 0, -1):
            page = self._tail_of.get(keys[j - 1])
            if page is not None:
                return page, j
        return None

    def add_tail(self, page: int, keys: Sequence[bytes]) -> None:
        """Keeps a released partial page, idle, under the keys of its first tokens (a newer tail
        with the same first tokens is the one found)."""
        self._tail_keys[page] = list(keys)
        for key in keys:
            self._tail_of[key] = page
        self._idle[page] = None

    def take_tail(self, page: int) -> None:
        """A sequence takes the tail as its own page: it is forgotten."""
        self._drop_tail(page)
        del self._idle[page]

    def add(self, page: int, key: bytes) -> bool:
        """Names a held page by ``key``; False (nothing changes) when another page already has it:
        that one stays the cached copy and this one stays private."""
        if key in self._page_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        return True

    def idle(self, page: int) -> None:
        """The last holder let go of a cached page: it becomes the most recent eviction candidate."""
        self._idle[page] = None

    def hold(self, page: int) -> None:
        """An idle page was taken by a sequence: it is no longer evictable."""
        del self._idle[page]

    def evict(self) -> int:
        """Forgets the least recently idled page and returns it, blank."""
        page, _ = self._idle.popitem(last=False)
        if page in self._tail_keys:
            self._drop_tail(page)
            return page
        key = self._key_of.pop(page)
        del self._page_of[key]
        if self._on_evict is not None:
            self._on_evict(key)
        return page

    def _drop_tail(self, page: int) -> None:
        for key in self._tail_keys.pop(page):
            if self._tail_of.get(key) == page:
                del self._tail_of[key]
