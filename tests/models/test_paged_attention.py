"""Attention over the paged cache equals a plain softmax over each row's keys, written here in numpy.

The cases the engine's batches mix: ragged chunk lengths, chunks continuing a cached prefix,
padding tokens and padding rows, grouped query heads, and contexts spanning several blocks of
pages with the last block partly filled (and a page table whose width is not a whole number of
blocks).
"""

import functools

import jax
import numpy as np
import pytest

from models.qwen3_vl_moe.paged_attention import attend, attend_dense

PAGE = 4
HEADS, KV_HEADS, DIM = 6, 2, 8
WIDTH = 7  # pages a row: with 2-page blocks the last block reads one page past the table

IMPLS = {
    "blocked_2_pages": functools.partial(attend, block_tokens=2 * PAGE),
    "blocked_3_pages": functools.partial(attend, block_tokens=3 * PAGE),
    "blocked_one_page": functools.partial(attend, block_tokens=1),
    "blocked_default": attend,
    "dense": attend_dense,
}


def reference(q, k_layer, v_layer, table, positions, scale):
    """q [T, heads, d] of one row at ``positions`` [T] against keys 0..position of its pages."""
    keys = k_layer[table].reshape(-1, KV_HEADS, DIM)  # token j of the row at index j
    values = v_layer[table].reshape(-1, KV_HEADS, DIM)
    out = np.zeros((len(positions), HEADS, DIM))
    for i, pos in enumerate(positions):
        for h in range(HEADS):
            kv = h // (HEADS // KV_HEADS)
            scores = keys[: pos + 1, kv].astype(np.float64) @ q[i, h].astype(np.float64) * scale
            weights = np.exp(scores - scores.max())
            out[i, h] = (weights / weights.sum()) @ values[: pos + 1, kv]
    return out.reshape(len(positions), HEADS * DIM)


def check(impl, starts, lengths, t, rng, padding_rows=()):
    rows = len(starts)
    num_pages = rows * WIDTH + 1
    k_layer = rng.standard_normal((num_pages, PAGE, KV_HEADS, DIM)).astype(np.float32)
    v_layer = rng.standard_normal((num_pages, PAGE, KV_HEADS, DIM)).astype(np.float32)
    tables = rng.permutation(np.arange(1, num_pages)).reshape(rows, WIDTH).astype(np.int32)
    for r in padding_rows:
        tables[r] = 0  # the engine points a padding row at its scratch page
    q = rng.standard_normal((rows, t, HEADS, DIM)).astype(np.float32)
    query_pos = (np.asarray(starts)[:, None] + np.arange(t)[None]).astype(np.int32)
    scale = DIM**-0.5
    out = np.asarray(jax.jit(impl, static_argnums=5)(q, k_layer, v_layer, tables, query_pos, scale))
    assert out.shape == (rows, t, HEADS * DIM)
    for r in range(rows):
        if r in padding_rows:
            continue
        n = lengths[r]
        want = reference(q[r, :n], k_layer, v_layer, tables[r], query_pos[r, :n], scale)
        np.testing.assert_allclose(out[r, :n], want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_ragged_prefill_chunks_some_continuing(impl, rng):
    # Row 0 a fresh prompt, row 1 a chunk continuing 13 cached tokens into a partly filled last
    # block, row 2 a short chunk with padding tokens, row 3 a padding row, row 4 nearly full.
    starts = [0, 13, 5, 0, 20]
    lengths = [8, 6, 2, 0, 7]
    check(IMPLS[impl], starts, lengths, t=8, rng=rng, padding_rows=(3,))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_decode_ragged_contexts(impl, rng):
    # One query a row at contexts 1 .. WIDTH * PAGE: first slot, page edges, block edges, last slot.
    starts = [0, 3, 4, 7, 8, 15, 16, 17, 26, WIDTH * PAGE - 1]
    check(IMPLS[impl], starts, [1] * len(starts), t=1, rng=rng)


def test_decode_padding_rows_are_finite_and_short_batches_match(rng):
    # All rows short: the blocked loop stops after the first block; a padding row (start 0) too.
    check(IMPLS["blocked_2_pages"], [0, 2, 5], [1, 1, 1], t=1, rng=rng, padding_rows=(0,))
    q = np.ones((1, 1, HEADS, DIM), np.float32)
    kv = np.ones((3, PAGE, KV_HEADS, DIM), np.float32)
    out = attend(q, kv, kv, np.zeros((1, WIDTH), np.int32), np.full((1, 1), -1, np.int32), 1.0, block_tokens=PAGE)
    np.testing.assert_array_equal(np.asarray(out), 0.0)  # a query that sees no key gets zeros, not NaN


def test_layer_of_the_whole_cache_equals_the_sliced_layer(rng):
    """The model passes the whole cache and its layer (no copy of the layer before the loop)."""
    cache = rng.standard_normal((3, 2 * WIDTH + 1, PAGE, KV_HEADS, DIM)).astype(np.float32)
    tables = rng.permutation(np.arange(1, 2 * WIDTH + 1)).reshape(2, WIDTH).astype(np.int32)
    q = rng.standard_normal((2, 3, HEADS, DIM)).astype(np.float32)
    query_pos = np.array([[9, 10, 11], [20, 21, 22]], np.int32)
    whole = attend(q, cache, cache[::-1], tables, query_pos, 0.3, block_tokens=2 * PAGE, layer=1)
    sliced = attend(q, cache[1], cache[1], tables, query_pos, 0.3, block_tokens=2 * PAGE)
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(sliced))
