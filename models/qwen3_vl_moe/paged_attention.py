"""Causal GQA attention of a batch of token chunks against the paged KV cache.

One function serves prefill (a chunk of T tokens per sequence, possibly continuing earlier
chunks) and decode (T = 1). Row b of the batch holds tokens ``starts[b] .. starts[b] +
lengths[b] - 1`` of its sequence; rows and tokens past ``lengths`` are padding, whose cache
writes are dropped (they are aimed past the last page) and whose outputs are ignored.

:func:`attend` walks the page table in blocks of pages with an online (flash-style) softmax:
each block's pages are gathered once, scored, and folded into a running max, sum and output, so
the whole context ([B, pages * page_size, kv, d]) and the whole score matrix are never
materialised, and blocks past the batch's last query position are not visited at all (the loop
runs to a bound computed on device). :func:`attend_dense` is the plain gather-everything softmax it
replaced, kept as the reference of tests and benchmarks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

BLOCK_TOKENS = 64
"""The fewest keys a block of :func:`attend` holds (rounded down to whole pages, at least one)."""
BLOCK_BYTES = 256 * 1024
"""Keys of one block over the whole batch, in bytes, that :func:`attend` grows a block to (in powers
of two of :data:`BLOCK_TOKENS`): a small batch of narrow heads otherwise pays the loop's per-block
cost on tiny blocks. On CPU (scripts/bench_attention.py) no one size wins every shape: large
batches' decode likes 32-64 keys, one row of the bench shape (256 bytes a key) a single block of
2048; this rule gives 64 keys at 8-32 rows of the 30b layer, 128 at one row, 1024 at one row of
the bench shape (decode)."""
SCORE_BYTES = 8 * 1024 * 1024
"""A block's fp32 scores over the whole batch (rows x query heads x queries x keys), in bytes, that
:func:`attend` stops growing a block at. Decode's scores are smaller than its keys, and a fresh prompt
of up to 512 tokens still fits its table in one block, so this bounds only long chunks continuing a
context: they run in a table of their bucket's width (up to 4x what they reach), and smaller blocks
let the loop stop after the last query's block instead of scoring blocks of keys no query sees.
``scripts/bench_attention.py --reach``: a 512-token chunk reaching 30-100% of a 2048-key table ran
1.2-1.5x faster in 512-key blocks than in 1024 (bench shape), 1.6-3x in 1024 than in 2048 (tiny);
the 30b shape keeps its 128 keys (64 were slower)."""


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


def attend(q, k_layer, v_layer, page_tables, query_pos, scale: float, block_tokens: int | None = None,
           layer: int | None = None):
    """q [B, T, heads, d] against the pages in ``page_tables`` [B, max_pages]; causal by position.

    k_layer, v_layer [pages, page_size, kv_heads, d]; query_pos [B, T] the position of each query
    (key j of a row is the token at index j of its page table, visible when j <= query_pos).
    Returns [B, T, heads * d]. A query that sees no key (query_pos < 0) gets zeros. block_tokens:
    keys a block (default: :data:`BLOCK_TOKENS`, doubled while the batch's keys of a block stay
    within :data:`BLOCK_BYTES`). layer: k_layer and v_layer are then the whole caches
    [layers, pages, page_size, kv_heads, d] and the blocks gather this layer's pages straight from
    them (slicing the layer out first would copy it whole before the loop, at every step).
    """
    k_layer, v_layer, page_tables = jnp.asarray(k_layer), jnp.asarray(v_layer), jnp.asarray(page_tables)
    if layer is None:
        k_layer, v_layer, layer = k_layer[None], v_layer[None], 0
    page_size, kv_heads = k_layer.shape[2], k_layer.shape[3]
    b, t, heads, d = q.shape
    g = heads // kv_heads
    width = page_tables.shape[1]
    if block_tokens is None:
        block_tokens = default_block_tokens(b, t, heads, kv_heads, d, k_layer.dtype.itemsize)
    block_pages = max(1, min(block_tokens // page_size, width))
    num_blocks = -(-width // block_pages)
    if num_blocks * block_pages > width:  # the last block reads page 0 past the table: masked below
        page_tables = jnp.pad(page_tables, ((0, 0), (0, num_blocks * block_pages - width)))
    block_len = block_pages * page_size
    # Queries of one KV head side by side: [B, kv, T * g, d], rows ordered (t, g).
    qh = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, d)

    def block(i, carry):
        m, l, acc = carry  # running max, sum of exp, unnormalised output (fp32)
        pages = lax.dynamic_slice_in_dim(page_tables, i * block_pages, block_pages, axis=1)
        at = (jnp.full_like(pages, layer), pages)  # one gather of (layer, page) pairs
        k = k_layer[at].reshape(b, block_len, kv_heads, d).transpose(0, 2, 1, 3)  # [B, kv, S, d]
        v = v_layer[at].reshape(b, block_len, kv_heads, d).transpose(0, 2, 1, 3)
        s = jnp.einsum("bkqd,bksd->bkqs", qh, k, preferred_element_type=jnp.float32) * scale
        key_pos = i * block_len + jnp.arange(block_len)
        visible = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, T, S]
        s = jnp.where(visible[:, None, :, None], s.reshape(b, kv_heads, t, g, block_len), -jnp.inf)
        s = s.reshape(b, kv_heads, t * g, block_len)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: exp(-inf - 0) = 0
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + p.sum(axis=-1)
        pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc * alpha[..., None] + pv

    init = (jnp.full((b, kv_heads, t * g), -jnp.inf, jnp.float32), jnp.zeros((b, kv_heads, t * g), jnp.float32),
            jnp.zeros((b, kv_heads, t * g, d), jnp.float32))
    if num_blocks == 1:
        _, l, acc = block(0, init)
    else:
        # Blocks wholly past every query of the batch are skipped: the loop's bound is on device.
        used = jnp.clip(jnp.max(query_pos) // block_len + 1, 0, num_blocks)
        _, l, acc = lax.fori_loop(0, used, block, init)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    out = out.reshape(b, kv_heads, t, g, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, heads * d).astype(q.dtype)


def default_block_tokens(rows: int, queries: int, heads: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Keys a block of :func:`attend` holds: :data:`BLOCK_TOKENS`, doubled while the batch's keys of
    a block stay within :data:`BLOCK_BYTES` and its scores within :data:`SCORE_BYTES`."""
    tokens = BLOCK_TOKENS
    while (2 * tokens * rows * kv_heads * head_dim * itemsize <= BLOCK_BYTES
           and 2 * tokens * rows * heads * queries * 4 <= SCORE_BYTES):
        tokens *= 2
    return tokens


def attend_dense(q, k_layer, v_layer, page_tables, query_pos, scale: float):
    """:func:`attend` by gathering every page of each row at once and one softmax over them all."""
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
