"""Moving one sequence's KV between the paged cache and token-major rows [tokens, layers, kv, d].

Rows are the unit the transfer layer carries (one row per token), so prefill gathers a finished
prompt's pages into rows and decode scatters arriving rows into its own pages. Both are jitted
per token bucket; the scatter donates the cache.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.qwen3_vl_moe.kv_cache import KVCache


class KVRows(NamedTuple):
    """KV rows [rows, layers, kv, d] holding a sequence's tokens ``[start, start + count)`` in
    their first ``count`` rows (the rest is padding)."""

    k: jax.Array
    v: jax.Array
    start: int
    count: int


def _slots(page_table, start, num_rows: int, page_size: int):
    """(page, slot) of tokens start..start+num_rows-1 of the sequence."""
    index = start + jnp.arange(num_rows)
    return page_table[index // page_size], index % page_size


@functools.partial(jax.jit, static_argnums=2)
def gather_rows(cache: KVCache, page_table, num_rows: int, start, num_tokens):
    """(k, v) rows [num_rows, layers, kv, d] of tokens start..num_tokens-1 of the sequence, zero
    past them: padding rows carry nothing of whatever the pages held before (another request's
    KV). ``start`` and ``num_tokens`` are traced: one program per row count."""
    page, slot = _slots(page_table, start, num_rows, cache.page_size)
    kept = (jnp.arange(num_rows) < num_tokens - start)[:, None, None, None]

    def rows(pages):
        return jnp.where(kept, jnp.swapaxes(pages[:, page, slot], 0, 1), 0)

    return rows(cache.k), rows(cache.v)


@functools.partial(jax.jit, donate_argnums=0)
def scatter_rows(cache: KVCache, page_table, k_rows, v_rows, start, num_tokens) -> KVCache:
    """Writes rows 0..num_tokens-1 as tokens start..start+num_tokens-1 of the sequence (decode holds
    the tokens before ``start`` already); padding rows are dropped. ``start`` is traced: one
    program per row bucket, whatever the offset."""
    page, slot = _slots(page_table, start, k_rows.shape[0], cache.page_size)
    page = jnp.where(jnp.arange(k_rows.shape[0]) < num_tokens, page, cache.num_pages)
    k = cache.k.at[:, page, slot].set(jnp.swapaxes(k_rows, 0, 1).astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, page, slot].set(jnp.swapaxes(v_rows, 0, 1).astype(cache.v.dtype), mode="drop")
    return KVCache(k=k, v=v)
