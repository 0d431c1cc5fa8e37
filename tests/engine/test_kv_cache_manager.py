"""KV cache page bookkeeping: allocate, append, free, and no page ever leaks or is shared."""

import random

import numpy as np
import pytest

from mmserve.kv_cache_manager import SCRATCH_PAGE, KVCacheManager, OutOfPagesError


def test_allocate_takes_whole_pages_and_never_the_scratch_page():
    manager = KVCacheManager(num_pages=8, page_size=4)
    assert manager.num_free_pages == 7
    manager.allocate("a", 9)
    assert len(manager.page_table("a")) == 3
    assert SCRATCH_PAGE not in manager.page_table("a")
    assert manager.num_free_pages == 4
    assert manager.num_tokens("a") == 9


def test_append_takes_a_page_only_when_crossing_a_boundary():
    manager = KVCacheManager(num_pages=8, page_size=4)
    manager.allocate("a", 3)
    manager.append("a")
    assert len(manager.page_table("a")) == 1
    manager.append("a")
    assert len(manager.page_table("a")) == 2
    manager.append("a", n_tokens=4)
    assert len(manager.page_table("a")) == 3
    assert manager.num_tokens("a") == 9


def test_can_allocate_is_false_when_pages_run_out():
    manager = KVCacheManager(num_pages=4, page_size=4)
    assert manager.can_allocate(12)
    assert not manager.can_allocate(13)
    manager.allocate("a", 12)
    assert not manager.can_allocate(1)
    assert manager.can_allocate(0)
    with pytest.raises(OutOfPagesError):
        manager.allocate("b", 1)
    assert "b" not in manager


def test_can_append_is_false_when_the_next_token_needs_a_missing_page():
    manager = KVCacheManager(num_pages=3, page_size=2)
    manager.allocate("a", 3)
    assert manager.can_append("a")
    manager.append("a")
    assert not manager.can_append("a")
    with pytest.raises(OutOfPagesError):
        manager.append("a")
    assert manager.num_tokens("a") == 4


def test_free_returns_every_page():
    manager = KVCacheManager(num_pages=10, page_size=4)
    manager.allocate("a", 10)
    manager.allocate("b", 5)
    manager.free("a")
    manager.free("b")
    assert manager.num_free_pages == 9


def test_double_free_and_unknown_ids_raise():
    manager = KVCacheManager(num_pages=4, page_size=4)
    manager.allocate("a", 1)
    with pytest.raises(ValueError, match="already"):
        manager.allocate("a", 1)
    manager.free("a")
    with pytest.raises(KeyError):
        manager.free("a")
    for call in (manager.append, manager.can_append, manager.page_table, manager.num_tokens):
        with pytest.raises(KeyError):
            call("nobody")


def test_random_operations_never_leak_or_share_pages():
    rng = random.Random(0)
    manager = KVCacheManager(num_pages=64, page_size=4)
    lengths = {}
    for step in range(3000):
        op = rng.random()
        if op < 0.3:
            n_tokens = rng.randint(0, 40)
            if manager.can_allocate(n_tokens):
                manager.allocate(step, n_tokens)
                lengths[step] = n_tokens
        elif op < 0.8 and lengths:
            seq_id = rng.choice(list(lengths))
            n_tokens = rng.randint(1, 6)
            if manager.can_append(seq_id, n_tokens):
                manager.append(seq_id, n_tokens)
                lengths[seq_id] += n_tokens
        elif lengths:
            seq_id = rng.choice(list(lengths))
            manager.free(seq_id)
            del lengths[seq_id]
        tables = {seq_id: manager.page_table(seq_id) for seq_id in lengths}
        owned = [page for table in tables.values() for page in table]
        assert len(owned) == len(set(owned)) and SCRATCH_PAGE not in owned
        assert len(owned) + manager.num_free_pages == 63
        assert all(len(tables[s]) == -(-lengths[s] // 4) for s in lengths)
    for seq_id in list(lengths):
        manager.free(seq_id)
    assert manager.num_free_pages == 63


def test_num_pages_for_budget_counts_keys_and_values_of_every_layer():
    page_bytes = 2 * 28 * 4 * 128 * 16 * 2  # K and V, layers, kv heads, head_dim, page, bf16
    pages = KVCacheManager.num_pages_for_budget(10 * page_bytes + 1, num_layers=28, num_kv_heads=4,
                                                head_dim=128, page_size=16, dtype="bfloat16")
    assert pages == 10
    assert KVCacheManager.num_pages_for_budget(page_bytes, 28, 4, 128, 16, np.float32) == 0


def test_constructor_rejects_a_cache_without_a_usable_page():
    with pytest.raises(ValueError, match="scratch"):
        KVCacheManager(num_pages=1, page_size=16)
