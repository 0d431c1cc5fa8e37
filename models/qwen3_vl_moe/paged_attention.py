"""Causal GQA attention of a batch of token chunks against the paged KV cache.

One function serves prefill (a chunk of T tokens per sequence, possibly continuing earlier
chunks) and decode (T = 1). Row b of the batch holds tokens ``starts[b] .. starts[b] +
lengths[b] - 1`` of its sequence; rows and tokens past ``lengths`` are padding, whose cache
writes are dropped (they are aimed past the last page) and whose outputs are ignored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_slots(page_tables, starts, lengths, num_tokens: int, page_size: int, num_pages: int):
    """Page and slot of every (row, token); padding tokens get page ``num_pages`` (out of range)."""
    t = jnp.arange(num_tokens)
    pos = starts[:, None] + t[None, :]
    page = jnp.take_along_axis(page_tables, jnp.minimum(pos // page_size, page_tables.shape[1] - 1), axis=1)
    page = jnp.where(t[None, :] < lengths[:, None], page, num_pages)
    return page, pos % page_size, pos


def write_kv(cache, layer: int, new, page, slot):
    """cache [layers, pages, page_size, kv, d] with new [B, T, kv, d] written at (layer, page, slot)."""
    return cache.at[layer, page, slot].set(new.astype(cache.dtype), mode="drop")


def attend(q, k_layer, v_layer, page_tables, query_pos, scale: float):
    """q [B, T, heads, d] against the pages in ``page_tables`` [B, max_pages]; causal by position."""
    b, t, heads, d = q.shape
    kv_heads = k_layer.shape[2]
    ctx_k = k_layer[page_tables].reshape(b, -1, kv_heads, d)
    ctx_v = v_layer[page_tables].reshape(b, -1, kv_heads, d)
    q = q.reshape(b, t, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, ctx_k).astype(jnp.float32) * scale
    key_pos = jnp.arange(ctx_k.shape[1])
    causal = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, T, S]
    scores = jnp.where(causal[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(ctx_v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, ctx_v)
    return out.reshape(b, t, heads * d)
