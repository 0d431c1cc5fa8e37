"""Contiguous, all-or-nothing block allocation by token count.

Transfers move one contiguous run of blocks per chunk, so an allocation is a single extent
``[start_block, start_block + num_blocks)``. Free space is kept as coalesced extents indexed
two ways: by start (to merge neighbours on free) and sorted by (length, start) (best fit by
bisection), so alloc and free cost O(log n) comparisons plus a memmove of the extent list,
which stays in the microseconds for pools of 100k blocks.
"""

from __future__ import annotations

import bisect
import dataclasses


class AllocationError(ValueError):
    """Freeing something this allocator does not hold: a double free or a foreign allocation."""


@dataclasses.dataclass(frozen=True, eq=False)
class Allocation:
    """A live run of blocks; identity matters, so two equal-looking allocations are not the same."""

    start_block: int
    num_blocks: int
    num_tokens: int
    block_size: int

    @property
    def start_token(self) -> int:
        return self.start_block * self.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_by_start: dict[int, int] = {0: num_blocks}
        self._free_by_end: dict[int, int] = {num_blocks: 0}
        self._free_by_size: list[tuple[int, int]] = [(num_blocks, 0)]
        self._live: dict[int, Allocation] = {}
        self._available = num_blocks

    @property
    def total_tokens(self) -> int:
        """The tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    def available_blocks(self) -> int:
        return self._available

    def can_ever_hold(self, num_tokens: int) -> bool:
        """False when the request exceeds the whole pool, so waiting for frees would never help."""
        return blocks_for(num_tokens, self.block_size) <= self.num_blocks

    def alloc(self, num_tokens: int) -> Allocation | None:
        """Best-fit contiguous blocks for ``num_tokens``, or None (nothing taken) if no run fits."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        want = blocks_for(num_tokens, self.block_size)
        index = bisect.bisect_left(self._free_by_size, (want, -1))
        if index == len(self._free_by_size):
            return None
        size, start = self._free_by_size.pop(index)
        del self._free_by_start[start]
        del self._free_by_end[start + size]
        if size > want:
            self._add_extent(start + want, size - want)
        allocation = Allocation(start, want, num_tokens, self.block_size)
        self._live[start] = allocation
        self._available -= want
        return allocation

    def free(self, allocation: Allocation) -> None:
        if self._live.get(allocation.start_block) is not allocation:
            raise AllocationError(f"{allocation} is not live in this allocator (double or foreign free)")
        del self._live[allocation.start_block]
        self._available += allocation.num_blocks
        start, size = allocation.start_block, allocation.num_blocks
        before = self._free_by_end.get(start)
        if before is not None:
            self._remove_extent(before, start - before)
            start, size = before, size + (allocation.start_block - before)
        after_size = self._free_by_start.get(start + size)
        if after_size is not None:
            self._remove_extent(start + size, after_size)
            size += after_size
        self._add_extent(start, size)

    def _add_extent(self, start: int, size: int) -> None:
        self._free_by_start[start] = size
        self._free_by_end[start + size] = start
        bisect.insort(self._free_by_size, (size, start))

    def _remove_extent(self, start: int, size: int) -> None:
        del self._free_by_start[start]
        del self._free_by_end[start + size]
        index = bisect.bisect_left(self._free_by_size, (size, start))
        del self._free_by_size[index]
