"""A sequence's KV moved between the paged cache and token-major rows: a read takes each token
from its page and slot and leaves nothing of what else the pages hold in its padding rows (they
travel to decode as they are); a write lands each row in its page and slot and drops padding."""

from __future__ import annotations

import numpy as np
import pytest

from mmserve.engine.kv_rows import gather_rows, scatter_rows
from models.qwen3_vl_moe.kv_cache import KVCache

LAYERS, PAGES, PAGE, HEADS, DIM = 2, 6, 4, 2, 3


def cache(seed: int) -> KVCache:
    rng = np.random.default_rng(seed)
    shape = (LAYERS, PAGES, PAGE, HEADS, DIM)
    return KVCache(k=rng.standard_normal(shape).astype(np.float32), v=rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("start", [0, 3, 6])
def test_a_read_takes_each_token_from_its_page_and_zeroes_the_padding(start):
    pages = cache(0)
    table = np.array([4, 1, 5, 0], np.int32)  # tokens 0-3 on page 4, 4-7 on page 1, 8-11 on page 5
    k, v = gather_rows(pages, table, 16, np.int32(start), np.int32(10))
    assert k.shape == (16, LAYERS, HEADS, DIM)
    for row, token in enumerate(range(start, 10)):
        page, slot = table[token // PAGE], token % PAGE
        np.testing.assert_array_equal(np.asarray(k)[row], pages.k[:, page, slot])
        np.testing.assert_array_equal(np.asarray(v)[row], pages.v[:, page, slot])
    assert not np.asarray(k)[10 - start:].any() and not np.asarray(v)[10 - start:].any()


def test_a_write_lands_rows_from_a_start_and_drops_the_padding():
    before = cache(1)
    rows = cache(2)
    k_rows = np.swapaxes(rows.k[:, 0], 0, 1)[:4].copy()  # 4 rows, the last one padding
    v_rows = np.swapaxes(rows.v[:, 0], 0, 1)[:4].copy()
    table = np.array([3, 2, 0, 0], np.int32)
    after = scatter_rows(KVCache(k=before.k.copy(), v=before.v.copy()), table, k_rows, v_rows, np.int32(2),
                         np.int32(3))
    expected_k, expected_v = before.k.copy(), before.v.copy()
    for row, token in enumerate(range(2, 5)):  # tokens 2, 3 on page 3, token 4 on page 2
        page, slot = table[token // PAGE], token % PAGE
        expected_k[:, page, slot] = k_rows[row]
        expected_v[:, page, slot] = v_rows[row]
    np.testing.assert_array_equal(np.asarray(after.k), expected_k)
    np.testing.assert_array_equal(np.asarray(after.v), expected_v)
