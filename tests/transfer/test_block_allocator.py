"""Contiguous, all-or-nothing block allocation."""

from __future__ import annotations

import random
import time

import pytest

from transfer import Allocation, AllocationError, BlockAllocator


def test_allocation_is_contiguous_blocks_rounded_up_from_tokens():
    allocator = BlockAllocator(10, 4)
    a = allocator.alloc(9)
    assert (a.num_blocks, a.num_tokens, a.capacity_tokens, a.start_token) == (3, 9, 12, a.start_block * 4)
    assert allocator.available_blocks() == 7


def test_allocation_is_all_or_nothing():
    allocator = BlockAllocator(10, 4)
    allocator.alloc(4 * 8)
    assert allocator.alloc(4 * 3) is None
    assert allocator.available_blocks() == 2
    assert allocator.alloc(4 * 2) is not None


def test_fragmented_free_space_does_not_satisfy_a_contiguous_request():
    allocator = BlockAllocator(6, 1)
    held = [allocator.alloc(1) for _ in range(6)]
    for a in held[::2]:
        allocator.free(a)
    assert allocator.available_blocks() == 3
    assert allocator.alloc(2) is None
    allocator.free(held[1])
    assert allocator.alloc(3).start_block == 0


def test_free_coalesces_back_to_one_extent():
    allocator = BlockAllocator(100, 2)
    held = [allocator.alloc(2 * n) for n in (5, 10, 20, 30, 35)]
    for a in (held[1], held[3], held[0], held[4], held[2]):
        allocator.free(a)
    assert allocator.alloc(200).num_blocks == 100


def test_best_fit_keeps_large_runs_whole():
    allocator = BlockAllocator(20, 1)
    a, _, c, _ = allocator.alloc(3), allocator.alloc(1), allocator.alloc(10), allocator.alloc(1)
    allocator.free(a)
    allocator.free(c)
    assert allocator.alloc(2).start_block == a.start_block
    assert allocator.alloc(10).start_block == c.start_block


def test_double_free_and_foreign_free_are_errors_and_change_nothing():
    allocator, other = BlockAllocator(8, 1), BlockAllocator(8, 1)
    a = allocator.alloc(3)
    with pytest.raises(AllocationError):
        allocator.free(other.alloc(3))
    with pytest.raises(AllocationError):
        allocator.free(Allocation(a.start_block, a.num_blocks, a.num_tokens, 1))
    allocator.free(a)
    with pytest.raises(AllocationError):
        allocator.free(a)
    assert allocator.available_blocks() == 8


def test_zero_tokens_is_an_error_and_oversized_is_none():
    allocator = BlockAllocator(8, 4)
    with pytest.raises(ValueError):
        allocator.alloc(0)
    assert allocator.alloc(33) is None and not allocator.can_ever_hold(33) and allocator.can_ever_hold(32)


def test_random_churn_keeps_accounting_exact():
    rng = random.Random(0)
    allocator = BlockAllocator(500, 3)
    live: list = []
    for _ in range(5000):
        allocation = None if live and rng.random() < 0.5 else allocator.alloc(rng.randint(1, 60))
        if allocation is None and live:
            allocator.free(live.pop(rng.randrange(len(live))))
        elif allocation is not None:
            live.append(allocation)
        spans = sorted((a.start_block, a.start_block + a.num_blocks) for a in live)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)), "allocations overlap"
        assert allocator.available_blocks() == 500 - sum(a.num_blocks for a in live)
    for a in live:
        allocator.free(a)
    assert allocator.alloc(1500).num_blocks == 500


def test_a_pool_of_100k_blocks_costs_microseconds_per_call():
    rng = random.Random(1)
    allocator = BlockAllocator(100_000, 16)
    live = [allocator.alloc(16 * rng.randint(1, 8)) for _ in range(20_000)]
    for a in live[::2]:
        allocator.free(a)
    calls = 20_000
    start = time.perf_counter()
    for _ in range(calls // 2):
        a = allocator.alloc(16 * rng.randint(1, 8))
        if a is not None:
            allocator.free(a)
    per_call = (time.perf_counter() - start) / calls
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} us per call"
