"""Which KV cache pages each sequence owns: host-side bookkeeping for the paged cache.

The cache is `num_pages` pages of `page_size` token slots. A sequence owns a page table, the list of
its pages in token order; token i of the sequence lives in slot i % page_size of page
table[i // page_size].

Page 0 is never handed out: it is the scratch page that padded batch rows and the padding of page
tables point at, so their writes land somewhere harmless.

Pages are reference-counted. A full page may be named by a key (:meth:`cache_pages`) and then
shared: a new sequence may start with the cached pages of its prefix (:meth:`cached_prefix`,
``allocate(..., cached=...)``). A sequence only ever writes past its cached pages, so a shared
page is never written. A cached page that nobody holds stays in the :class:`PrefixCache`, counted
as free, until a fresh page is needed and it is evicted (least recently released first). A
sequence released with its last page partial may leave that page as a tail (``free(...,
tail=)``), which one later sequence starting with the same tokens takes as its own page
(:meth:`longest_tail`, ``allocate(..., tail=)``) and writes past them. A reader may hold a
sequence's pages past its end (:meth:`share`): they stay as they are until it frees them too,
and a tail the sequence left becomes one when the last holder lets go.
"""

import collections
from collections.abc import Callable, Hashable, Sequence

import jax.numpy as jnp

from mmserve.kv_events import BlockRemoved, BlockStored
from mmserve.prefix_cache import PrefixCache

SCRATCH_PAGE = 0


class OutOfPagesError(RuntimeError):
    """Raised when an allocation was attempted without checking that the pages exist."""


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page {SCRATCH_PAGE} is scratch), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free_pages = collections.deque(range(SCRATCH_PAGE + 1, num_pages))  # blank: no key
        self._page_tables: dict[Hashable, list[int]] = {}
        self._num_tokens: dict[Hashable, int] = {}
        self._refs = [0] * num_pages
        self._tails_held: dict[int, Sequence[bytes]] = {}
        """Partial pages released as tails while a reader still held them: page -> its tail keys."""
        self.prefix_cache = PrefixCache(on_evict=self._evicted)
        self.events: list[BlockStored | BlockRemoved] | None = None
        """When a list (``record_events``), every page cached and evicted is appended to it as a KV
        event (:mod:`mmserve.kv_events`) until ``take_events``."""

    @staticmethod
    def num_pages_for_budget(budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int,
                             page_size: int, dtype) -> int:
        """How many pages (scratch page included) a cache of `budget_bytes` holds.

        A page stores keys and values of `page_size` tokens in every layer. `dtype` may be any name
        or type jax knows ("bfloat16", jnp.float32).
        """
        page_bytes = 2 * num_layers * num_kv_heads * head_dim * page_size * jnp.dtype(dtype).itemsize
        return budget_bytes // page_bytes

    @property
    def num_reservable_pages(self) -> int:
        """Pages sequences may hold at once: all but the scratch page."""
        return self.num_pages - (SCRATCH_PAGE + 1)

    @property
    def num_free_pages(self) -> int:
        """Pages a sequence may take: blank ones and cached ones that nobody holds (evictable)."""
        return len(self._free_pages) + self.prefix_cache.num_idle

    @property
    def num_evictable_pages(self) -> int:
        """Cached pages that nobody holds, and tails (counted in ``num_free_pages``)."""
        return self.prefix_cache.num_idle

    @property
    def num_cached_pages(self) -> int:
        """Pages with a key, held or not."""
        return len(self.prefix_cache)

    @property
    def num_tail_pages(self) -> int:
        """Released partial pages kept for a sequence that starts with their tokens (all evictable)."""
        return self.prefix_cache.num_tails

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._page_tables

    def num_tokens(self, seq_id: Hashable) -> int:
        self._require(seq_id)
        return self._num_tokens[seq_id]

    def page_table(self, seq_id: Hashable) -> list[int]:
        self._require(seq_id)
        return list(self._page_tables[seq_id])

    def cached_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest prefix of a sequence whose full pages have ``keys``."""
        return self.prefix_cache.longest_prefix(keys)

    def longest_tail(self, keys: Sequence[bytes]) -> tuple[int, int] | None:
        """(page, tokens) of the tail holding the most first tokens of a page whose first ``j``
        tokens have key ``keys[j - 1]`` (:meth:`PageKeys.tail_keys`), or None."""
        return self.prefix_cache.longest_tail(keys)

    def can_allocate(self, n_tokens: int, cached: Sequence[int] = (), tail: int | None = None) -> bool:
        taken = list(cached) + ([] if tail is None else [tail])
        idle_taken = sum(self.prefix_cache.is_idle(page) for page in taken)
        return self._pages_for(n_tokens) - len(taken) <= self.num_free_pages - idle_taken

    def allocate(self, seq_id: Hashable, n_tokens: int, cached: Sequence[int] = (), tail: int | None = None) -> None:
        """Gives a new sequence pages for its first `n_tokens` tokens: the ``cached`` pages of its
        prefix (from :meth:`cached_prefix`), the ``tail`` its next page starts with (from
        :meth:`longest_tail`; it becomes the sequence's own), then fresh ones."""
        if seq_id in self._page_tables:
            raise ValueError(f"sequence {seq_id!r} already has pages")
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        taken = len(cached) + (tail is not None)
        if len(cached) * self.page_size + (tail is not None) > n_tokens:
            raise ValueError(f"{len(cached)} cached pages{' and a tail' if tail is not None else ''} hold more "
                             f"than the {n_tokens} tokens asked for")
        if not self.can_allocate(n_tokens, cached, tail):
            raise OutOfPagesError(f"need {self._pages_for(n_tokens) - taken} pages, {self.num_free_pages} free")
        for page in cached:
            if not self.prefix_cache.is_cached(page):
                raise ValueError(f"page {page} is not cached")
        if tail is not None and not self.prefix_cache.is_tail(tail):
            raise ValueError(f"page {tail} is not a tail")
        for page in cached:
            self._hold(page)
        own = []
        if tail is not None:
            self.prefix_cache.take_tail(tail)
            self._refs[tail] = 1
            own.append(tail)
        self._page_tables[seq_id] = list(cached) + own + self._take(self._pages_for(n_tokens) - taken)
        self._num_tokens[seq_id] = n_tokens

    def share(self, seq_id: Hashable, reader: Hashable) -> None:
        """``reader`` holds the sequence's pages as they are now, partial ones too, until
        ``free(reader)``: it reads them and never writes them (prefill keeps a finished prompt's KV
        until decode says which of its tokens to send). Nothing may write past the sequence's
        tokens in a page a reader holds, so a sequence shared so should be done writing."""
        self._require(seq_id)
        if reader in self._page_tables:
            raise ValueError(f"sequence {reader!r} already has pages")
        table = self._page_tables[seq_id]
        for page in table:
            self._hold(page)
        self._page_tables[reader] = list(table)
        self._num_tokens[reader] = self._num_tokens[seq_id]

    def cache_pages(self, seq_id: Hashable, keys: Sequence[bytes],
                    token_ids: Callable[[int, int], list[int]] | None = None) -> None:
        """Names the sequence's first ``len(keys)`` pages (full, their KV written) by ``keys``, so
        that other sequences may find them. A page whose key another page already has stays
        private. ``token_ids(start, end)``: the sequence's tokens, for the KV events."""
        self._require(seq_id)
        table = self._page_tables[seq_id]
        if len(keys) * self.page_size > self._num_tokens[seq_id]:
            raise ValueError(f"only full pages are cached: {len(keys)} keys for {self._num_tokens[seq_id]} tokens")
        for i, (page, key) in enumerate(zip(table, keys)):
            if not self.prefix_cache.is_cached(page) and self.prefix_cache.add(page, key) and self.events is not None:
                tokens = token_ids(i * self.page_size, (i + 1) * self.page_size) if token_ids else []
                self.events.append(BlockStored([key], keys[i - 1] if i else None, tokens, self.page_size))

    def record_events(self) -> None:
        """From now on, keep the KV events for ``take_events``."""
        self.events = []

    def take_events(self) -> list[BlockStored | BlockRemoved]:
        """The events since the last call (none unless ``record_events``)."""
        if self.events is None:
            return []
        events, self.events = self.events, []
        return events

    def _evicted(self, key: bytes) -> None:
        if self.events is not None:
            self.events.append(BlockRemoved([key]))

    def can_append(self, seq_id: Hashable, n_tokens: int = 1) -> bool:
        return self._new_pages_for_append(seq_id, n_tokens) <= self.num_free_pages

    def append(self, seq_id: Hashable, n_tokens: int = 1) -> None:
        """Makes room for `n_tokens` more tokens, taking new pages when the last one fills up."""
        self._page_tables[seq_id].extend(self._take(self._new_pages_for_append(seq_id, n_tokens)))
        self._num_tokens[seq_id] += n_tokens

    def free(self, seq_id: Hashable, tail: tuple[int, Sequence[bytes]] | None = None) -> None:
        """Returns a sequence's pages (on finish, abort or preemption). ``tail`` = (i, keys): its
        page i is partial, its KV written for the first ``len(keys)`` tokens, which ``keys`` name
        (:meth:`PageKeys.tail_keys`); it is kept as a tail once no reader (:meth:`share`) holds it."""
        self._require(seq_id)
        table = self._page_tables.pop(seq_id)
        tail_page = table[tail[0]] if tail is not None and tail[1] else None
        # The last page first: a prefix's end is the least likely part to be shared, so it is
        # the first evicted.
        for page in reversed(table):
            self._refs[page] -= 1
            if page == tail_page:
                self._tails_held[page] = tail[1]
            if self._refs[page] == 0:
                tail_keys = self._tails_held.pop(page, None)
                if self.prefix_cache.is_cached(page):
                    self.prefix_cache.idle(page)
                elif tail_keys is not None:
                    self.prefix_cache.add_tail(page, tail_keys)
                else:
                    self._free_pages.append(page)
        del self._num_tokens[seq_id]

    def _pages_for(self, n_tokens: int) -> int:
        return (n_tokens + self.page_size - 1) // self.page_size

    def _new_pages_for_append(self, seq_id: Hashable, n_tokens: int) -> int:
        self._require(seq_id)
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        return self._pages_for(self._num_tokens[seq_id] + n_tokens) - len(self._page_tables[seq_id])

    def _take(self, count: int) -> list[int]:
        if count > self.num_free_pages:
            raise OutOfPagesError(f"need {count} pages, {self.num_free_pages} free")
        pages = [self._free_pages.popleft() if self._free_pages else self.prefix_cache.evict() for _ in range(count)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def _hold(self, page: int) -> None:
        if self._refs[page] == 0:
            self.prefix_cache.hold(page)
        self._refs[page] += 1

    def _require(self, seq_id: Hashable) -> None:
        if seq_id not in self._page_tables:
            raise KeyError(f"unknown sequence {seq_id!r} (never allocated, or already freed)")
