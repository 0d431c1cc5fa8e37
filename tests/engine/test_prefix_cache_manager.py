"""Shared KV pages: reference counts, idle cached pages counted free and evicted least recently
released first, and page keys that tell different tokens and different pictures apart."""

import random

import numpy as np
import pytest

from mmserve.engine.page_hash import PageKeys, VisualSpan, visual_spans
from mmserve.kv_cache_manager import SCRATCH_PAGE, KVCacheManager


def keys(*names: str) -> list[bytes]:
    return [name.encode() for name in names]


def cached_sequence(manager, seq_id, names, extra_tokens=0):
    """A sequence of len(names) full pages (plus ``extra_tokens``), its full pages cached."""
    manager.allocate(seq_id, len(names) * manager.page_size + extra_tokens)
    manager.cache_pages(seq_id, keys(*names))
    return manager.page_table(seq_id)


def test_a_released_cached_page_stays_findable_and_counts_as_free():
    manager = KVCacheManager(num_pages=8, page_size=4)
    table = cached_sequence(manager, "a", ["p0", "p1"], extra_tokens=1)
    manager.free("a")
    assert manager.num_free_pages == 7
    assert manager.num_cached_pages == manager.num_evictable_pages == 2
    assert manager.cached_prefix(keys("p0", "p1", "p2")) == table[:2]
    assert manager.cached_prefix(keys("q0", "p1")) == []  # the run stops at the first miss


def test_sharers_hold_one_page_and_it_is_free_only_when_both_let_go():
    manager = KVCacheManager(num_pages=8, page_size=4)
    a = cached_sequence(manager, "a", ["p0", "p1"])
    manager.allocate("b", 10, cached=manager.cached_prefix(keys("p0", "p1")))
    b = manager.page_table("b")
    assert b[:2] == a and len(b) == 3 and b[2] not in a
    assert manager.num_free_pages == 4
    manager.free("a")
    assert manager.num_free_pages == 4 and manager.num_evictable_pages == 0
    manager.free("b")
    assert manager.num_free_pages == 7 and manager.num_evictable_pages == 2


def test_taking_an_idle_cached_page_uses_up_a_free_page():
    manager = KVCacheManager(num_pages=4, page_size=4)  # 3 usable
    cached_sequence(manager, "a", ["p0", "p1"])
    manager.free("a")
    cached = manager.cached_prefix(keys("p0", "p1"))
    assert manager.can_allocate(12, cached)  # 2 idle cached + 1 blank
    assert not manager.can_allocate(16, cached)
    manager.allocate("b", 12, cached)
    assert manager.num_free_pages == 0


def test_blank_pages_go_first_then_the_least_recently_released_cached_ones():
    manager = KVCacheManager(num_pages=6, page_size=4)  # 5 usable
    old = cached_sequence(manager, "old", ["o0", "o1"])
    manager.free("old")
    new = cached_sequence(manager, "new", ["n0", "n1"])
    manager.free("new")
    manager.allocate("x", 4)  # the one blank page
    assert manager.num_cached_pages == 4
    manager.allocate("y", 4)  # evicts old's tail page first (a prefix's tail is shared least)
    assert manager.page_table("y") == [old[1]]
    assert manager.cached_prefix(keys("o0", "o1")) == old[:1]
    manager.allocate("z", 8)
    assert manager.page_table("z") == [old[0], new[1]]
    assert manager.cached_prefix(keys("n0", "n1")) == new[:1]


def test_using_a_cached_page_again_makes_it_recent():
    manager = KVCacheManager(num_pages=3, page_size=4)  # 2 usable
    a = cached_sequence(manager, "a", ["a0"])
    manager.free("a")
    b = cached_sequence(manager, "b", ["b0"])
    manager.free("b")
    manager.allocate("a again", 5, cached=manager.cached_prefix(keys("a0")))
    manager.free("a again")
    manager.allocate("fresh", 4)
    assert manager.page_table("fresh") == b
    assert manager.cached_prefix(keys("a0")) == a


def test_a_page_whose_key_is_already_cached_stays_private():
    manager = KVCacheManager(num_pages=8, page_size=4)
    a = cached_sequence(manager, "a", ["p0"])
    b = cached_sequence(manager, "b", ["p0"])  # computed the same page again
    assert manager.num_cached_pages == 1
    manager.free("b")
    assert manager.num_evictable_pages == 0 and manager.num_free_pages == 6
    assert manager.cached_prefix(keys("p0")) == a and b != a


def test_only_full_pages_are_cached_and_only_cached_pages_shared():
    manager = KVCacheManager(num_pages=8, page_size=4)
    manager.allocate("a", 7)
    with pytest.raises(ValueError, match="full"):
        manager.cache_pages("a", keys("p0", "p1"))
    with pytest.raises(ValueError, match="not cached"):
        manager.allocate("b", 8, cached=manager.page_table("a")[:1])
    cached_sequence(manager, "b", ["p0"])
    with pytest.raises(ValueError, match="more than"):
        manager.allocate("c", 3, cached=manager.cached_prefix(keys("p0")))
    assert "c" not in manager


def test_random_sharing_never_leaks_and_shares_only_cached_pages():
    """Sequences draw token pages from a small alphabet, so prefixes repeat; every step checks that
    pages are held exactly as many times as tables list them, and free + held == all."""
    rng = random.Random(0)
    size = 4
    manager = KVCacheManager(num_pages=40, page_size=size)
    seqs: dict[int, list[str]] = {}  # id -> names of its pages' contents, a chained prefix
    for step in range(3000):
        op = rng.random()
        if op < 0.35:
            digits = [str(rng.randint(0, 2)) for _ in range(rng.randint(1, 8))]
            chain = ["/".join(digits[: i + 1]) for i in range(len(digits))]
            cached = manager.cached_prefix(keys(*chain[:-1]))
            if manager.can_allocate(len(chain) * size, cached):
                manager.allocate(step, len(chain) * size, cached)
                seqs[step] = chain
        elif op < 0.6 and seqs:
            seq_id = rng.choice(list(seqs))
            manager.cache_pages(seq_id, keys(*seqs[seq_id][: rng.randint(0, len(seqs[seq_id]))]))
        elif op < 0.8 and seqs:
            seq_id = rng.choice(list(seqs))
            if manager.can_append(seq_id, size):
                manager.append(seq_id, size)
                seqs[seq_id].append(seqs[seq_id][-1] + "/x")
        elif seqs:
            seq_id = rng.choice(list(seqs))
            manager.free(seq_id)
            del seqs[seq_id]
        tables = [manager.page_table(s) for s in seqs]
        held = [page for table in tables for page in table]
        assert SCRATCH_PAGE not in held
        assert len(set(held)) + manager.num_free_pages == 39
        shared = {p for p in held if held.count(p) > 1}
        assert all(manager.prefix_cache.is_cached(p) and not manager.prefix_cache.is_idle(p) for p in shared)
        for chain, table in zip(seqs.values(), tables):  # whoever holds a cached page holds its content
            for name, page in zip(chain, table):
                assert manager.prefix_cache.key_of(page) in (None, name.encode())
    for seq_id in list(seqs):
        manager.free(seq_id)
    assert manager.num_free_pages == 39 and manager.num_evictable_pages == manager.num_cached_pages


def tokens_of(ids):
    return lambda start, end: ids[start:end]


def test_page_keys_chain_through_the_sequence():
    ids = list(range(20))
    base = PageKeys(4, []).first(5, tokens_of(ids))
    changed = PageKeys(4, []).first(5, tokens_of(ids[:9] + [99] + ids[10:]))
    assert len(set(base)) == 5
    assert changed[:2] == base[:2] and all(c != b for c, b in zip(changed[2:], base[2:]))
    assert PageKeys(4, []).first(3, tokens_of(ids)) == base[:3]


def test_page_keys_tell_pictures_apart_from_their_first_page_on():
    ids = list(range(20))
    a = PageKeys(4, [VisualSpan(6, 11, b"image a")]).first(5, tokens_of(ids))
    b = PageKeys(4, [VisualSpan(6, 11, b"image b")]).first(5, tokens_of(ids))
    moved = PageKeys(4, [VisualSpan(5, 10, b"image a")]).first(5, tokens_of(ids))
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:]))
    assert a[1] != moved[1]  # same picture, other placement


def first_turn(manager, allocated: int):
    """Sequence "a" of 10 tokens (2 full pages, cached, and 2 tokens) on ``allocated`` tokens' pages:
    (its ids, its page keys, its page table, its tail for ``free``)."""
    ids = list(range(100, 110))
    turn1 = PageKeys(4, [])
    manager.allocate("a", allocated)
    manager.cache_pages("a", turn1.first(2, tokens_of(ids)))
    return ids, manager.page_table("a"), (2, turn1.tail_keys(2, 10, tokens_of(ids)))


def test_a_partial_last_page_is_kept_as_a_tail_and_taken_once():
    manager = KVCacheManager(num_pages=8, page_size=4)
    ids, table, tail = first_turn(manager, 12)
    manager.free("a", tail=tail)
    assert manager.num_tail_pages == 1 and manager.num_free_pages == 7
    assert manager.num_evictable_pages == 3
    turn2 = ids + [7, 8, 9]
    keys2 = PageKeys(4, [])
    cached = manager.cached_prefix(keys2.first(2, tokens_of(turn2)))
    assert cached == table[:2]
    found = manager.longest_tail(keys2.tail_keys(2, 11, tokens_of(turn2)))  # page 2 cut after 1..3 tokens
    assert found == (table[2], 2)
    assert manager.can_allocate(13, cached, found[0])
    manager.allocate("b", 13, cached, tail=found[0])
    assert manager.page_table("b")[:3] == table[:3] and manager.num_tail_pages == 0
    assert manager.num_free_pages == 8 - 1 - 4
    assert manager.longest_tail(keys2.tail_keys(2, 11, tokens_of(turn2))) is None  # one taker
    with pytest.raises(ValueError, match="not a tail"):
        manager.allocate("c", 12, cached, tail=table[2])


def test_a_tail_is_found_by_its_first_tokens_after_the_same_parent_only():
    manager = KVCacheManager(num_pages=8, page_size=4)
    ids = [1, 2, 3, 4, 5, 6, 7]  # a full page and 3 tokens
    manager.allocate("a", 8)
    manager.free("a", tail=(1, PageKeys(4, []).tail_keys(1, 7, tokens_of(ids))))
    page = manager.longest_tail(PageKeys(4, []).tail_keys(1, 7, tokens_of([1, 2, 3, 4, 5, 9, 9])))
    assert page is not None and page[1] == 1  # only its first token matches
    assert manager.longest_tail(PageKeys(4, []).tail_keys(1, 7, tokens_of([1, 2, 3, 0, 5, 6, 7]))) is None
    assert manager.longest_tail(PageKeys(4, []).tail_keys(1, 5, tokens_of([1, 2, 3, 4, 9]))) is None


def test_tails_are_evicted_with_cached_pages_and_make_no_kv_events():
    manager = KVCacheManager(num_pages=4, page_size=4)  # 3 usable
    manager.record_events()
    ids = list(range(6))
    keys_a = PageKeys(4, [])
    manager.allocate("a", 8)
    manager.cache_pages("a", keys_a.first(1, tokens_of(ids)), tokens_of(ids))
    manager.free("a", tail=(1, keys_a.tail_keys(1, 6, tokens_of(ids))))
    assert [type(e).__name__ for e in manager.take_events()] == ["BlockStored"]
    manager.allocate("b", 8)  # the blank page, then the least recently released: the tail
    assert manager.num_tail_pages == 0 and manager.num_cached_pages == 1
    assert manager.take_events() == []
    manager.allocate("c", 4)  # then the cached page
    assert manager.num_cached_pages == 0
    assert [type(e).__name__ for e in manager.take_events()] == ["BlockRemoved"]


def test_tail_keys_tell_pictures_apart_and_are_never_full_page_keys():
    ids = list(range(7))
    a = PageKeys(4, [VisualSpan(5, 6, b"image a")])
    b = PageKeys(4, [VisualSpan(5, 6, b"image b")])
    tail_a, tail_b = a.tail_keys(1, 7, tokens_of(ids)), b.tail_keys(1, 7, tokens_of(ids))
    assert tail_a[0] == tail_b[0]  # before the picture
    assert tail_a[1] != tail_b[1] and tail_a[2] != tail_b[2]
    # The same tokens after the same parent as a full page of a smaller size: still another key.
    assert PageKeys(4, []).tail_keys(0, 3, tokens_of(ids))[2] != PageKeys(3, []).first(1, tokens_of(ids))[0]
    with pytest.raises(ValueError, match="inside page"):
        PageKeys(4, []).tail_keys(1, 8, tokens_of(ids + [0]))


def test_visual_spans_split_each_modality_by_counts_and_carry_each_visuals_key():
    ids = np.array([1, 9, 9, 2, 9, 9, 9, 3, 8, 4, 8])
    spans = visual_spans(ids, [(9, [(2, b"a"), (3, b"b")]), (8, [(2, b"v")])])
    assert [(s.start, s.end, s.key) for s in spans] == [(1, 3, b"a"), (4, 7, b"b"), (8, 11, b"v")]


def test_a_reader_holds_a_sequences_pages_past_its_end_and_its_tail_comes_after():
    """``share``: prefill keeps a finished prompt's pages, partial last page included, until decode
    says what to read. Nothing is handed out again while the reader holds it; the tail the
    sequence left becomes one when the reader lets go (not a blank page)."""
    manager = KVCacheManager(num_pages=8, page_size=4)
    ids, table, tail = first_turn(manager, 10)
    manager.share("a", "reader")
    manager.free("a", tail=tail)
    assert manager.page_table("reader") == table and manager.num_tokens("reader") == 10
    assert manager.num_free_pages == 4 and manager.num_tail_pages == 0  # 7 - the reader's 3
    manager.allocate("b", 16)  # every free page: none of the reader's
    assert not set(manager.page_table("b")) & set(table)
    manager.free("b")
    manager.free("reader")
    assert manager.num_free_pages == 7 and manager.num_tail_pages == 1
    turn2 = ids + [7, 8, 9]
    assert manager.longest_tail(PageKeys(4, []).tail_keys(2, 11, tokens_of(turn2))) == (table[2], 2)
    with pytest.raises(ValueError, match="already has pages"):
        manager.allocate("c", 4)
        manager.share("c", "c")
