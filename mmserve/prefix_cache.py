"""Full KV pages kept by key after their sequences let go, so that a later prompt with the same
prefix takes them instead of recomputing them (keys: :mod:`mmserve.engine.page_hash`).

A cached page is either held (some sequence's page table has it) or idle (nobody holds it). Idle
pages still count as free: when the cache manager needs a fresh page and has no blank one, it
evicts the least recently idled page, forgetting its key.
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

    def longest_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """The pages of the longest run keys[0..n) that are all cached."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

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
        key = self._key_of.pop(page)
        del self._page_of[key]
        if self._on_evict is not None:
            self._on_evict(key)
        return page
