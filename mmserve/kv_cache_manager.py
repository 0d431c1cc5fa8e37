"""Which KV cache pages each sequence owns: host-side bookkeeping for the paged cache.

The cache is `num_pages` pages of `page_size` token slots. A sequence owns a page table, the list of
its pages in token order; token i of the sequence lives in slot i % page_size of page
table[i // page_size].

Page 0 is never handed out: it is the scratch page that padded batch rows and the padding of page
tables point at, so their writes land somewhere harmless and every real page stays private to its
sequence.
"""

import collections
from collections.abc import Hashable

import jax.numpy as jnp

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
        self._free_pages = collections.deque(range(SCRATCH_PAGE + 1, num_pages))
        self._page_tables: dict[Hashable, list[int]] = {}
        self._num_tokens: dict[Hashable, int] = {}

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
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._page_tables

    def num_tokens(self, seq_id: Hashable) -> int:
        self._require(seq_id)
        return self._num_tokens[seq_id]

    def page_table(self, seq_id: Hashable) -> list[int]:
        self._require(seq_id)
        return list(self._page_tables[seq_id])

    def can_allocate(self, n_tokens: int) -> bool:
        return self._pages_for(n_tokens) <= self.num_free_pages

    def allocate(self, seq_id: Hashable, n_tokens: int) -> None:
        """Gives a new sequence pages for its first `n_tokens` tokens."""
        if seq_id in self._page_tables:
            raise ValueError(f"sequence {seq_id!r} already has pages")
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        self._page_tables[seq_id] = self._take(self._pages_for(n_tokens))
        self._num_tokens[seq_id] = n_tokens

    def can_append(self, seq_id: Hashable, n_tokens: int = 1) -> bool:
        return self._new_pages_for_append(seq_id, n_tokens) <= self.num_free_pages

    def append(self, seq_id: Hashable, n_tokens: int = 1) -> None:
        """Makes room for `n_tokens` more tokens, taking new pages when the last one fills up."""
        self._page_tables[seq_id].extend(self._take(self._new_pages_for_append(seq_id, n_tokens)))
        self._num_tokens[seq_id] += n_tokens

    def free(self, seq_id: Hashable) -> None:
        """Returns a sequence's pages (on finish, abort or preemption)."""
        self._require(seq_id)
        self._free_pages.extend(self._page_tables.pop(seq_id))
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
        return [self._free_pages.popleft() for _ in range(count)]

    def _require(self, seq_id: Hashable) -> None:
        if seq_id not in self._page_tables:
            raise KeyError(f"unknown sequence {seq_id!r} (never allocated, or already freed)")
