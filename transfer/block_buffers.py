"""Device-resident pools of blocks, one per field, written and read by jitted programs: a
sender's. (A receiver keeps each chunk as pulled and holds no pool: ``BlockLayout`` alone.)
A run of a larger array can also be taken as rows of its own (``BlockLayout.rows_of``), which a
sender offers without touching its pool.

Each field's pool is token-major, ``[num_blocks * block_size, *shape]``, so an allocation's
tokens are one contiguous run of rows. Writes scatter into the pool with the pool donated (it
is never copied whole); reads gather into fresh arrays. Both take the run's start and length
as traced scalars and pad the row count to a bucket, so positions never recompile and lengths
compile once per bucket. Padding rows are dropped on write and zero-filled on read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import msgspec
import numpy as np

from transfer.allocator import Allocation, blocks_for
from transfer.fields import Field, check_fields

Arrays = dict[str, jax.Array]


def bucket_tokens(num_tokens: int, block_size: int) -> int:
    """Rows a run of ``num_tokens`` is padded to: whole blocks, four buckets per octave.

    That bounds padding to 25% of the payload (plus under one block) while keeping the
    number of compiled shapes logarithmic in the pool size.
    """
    blocks = blocks_for(num_tokens, block_size)
    if blocks > 4:
        step = 1 << (blocks.bit_length() - 3)
        blocks = -(-blocks // step) * step
    return blocks * block_size


def bucket_list(max_tokens: int, block_size: int, num_blocks: int) -> list[int]:
    """Every padded row count a run of 1 to ``max_tokens`` tokens (at most a pool of ``num_blocks``)
    can have: the shapes a reader of the pool's rows compiles for."""
    most = min(max_tokens, num_blocks * block_size)
    return sorted({bucket_tokens(blocks * block_size, block_size) for blocks in range(1, blocks_for(most, block_size) + 1)})


class Chunk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one transfer carries: tokens ``[offset, offset + num_tokens)`` of a room, padded."""

    offset: int
    num_tokens: int
    padded_tokens: int


@functools.partial(jax.jit, donate_argnums=0)
def _scatter(pools: Arrays, rows: Arrays, start: jax.Array, count: jax.Array, source: jax.Array) -> Arrays:
    """pool[start + i] = rows[source + i] for i < count."""
    out = {}
    for name, pool in pools.items():
        n = rows[name].shape[0]
        position = jnp.arange(n, dtype=jnp.int32)
        index = jnp.where(position < count, start + position, pool.shape[0])
        values = jnp.take(rows[name], source + position, axis=0, mode="clip")
        out[name] = pool.at[index].set(values, mode="drop")
    return out


@functools.partial(jax.jit, static_argnums=3)
def _gather(pools: Arrays, start: jax.Array, count: jax.Array, num_rows: int) -> Arrays:
    """Rows ``[start, start + count)`` of the pools, then zero rows up to ``num_rows``."""
    position = jnp.arange(num_rows, dtype=jnp.int32)
    size = next(iter(pools.values())).shape[0]
    index = jnp.where(position < count, start + position, size)
    return {name: pool.at[index].get(mode="fill", fill_value=0) for name, pool in pools.items()}


class BlockLayout:
    """How rows of one side of a transfer are shaped and bucketed: the fields, the block size
    and the device, without the pools (a receiver keeps what it pulls as pulled and holds none)."""

    def __init__(self, fields: Sequence[Field], num_blocks: int, block_size: int,
                 device: jax.Device | None = None) -> None:
        self.fields = tuple(fields)
        check_fields(self.fields)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device or jax.local_devices()[0]

    @property
    def sharding(self) -> jax.sharding.Sharding:
        return jax.sharding.SingleDeviceSharding(self.device)

    def bucket(self, num_tokens: int) -> int:
        return bucket_tokens(num_tokens, self.block_size)

    def buckets(self, max_tokens: int) -> list[int]:
        return bucket_list(max_tokens, self.block_size, self.num_blocks)

    def check_rows(self, arrays: Mapping[str, jax.Array], num_rows: int | None = None) -> int:
        """The row count of arrays holding rows of every field (and only those), each of its
        field's shape and dtype, all of one row count (``num_rows`` when given)."""
        names = {f.name for f in self.fields}
        if set(arrays) != names:
            raise ValueError(f"rows of exactly the fields {sorted(names)} expected, got {sorted(arrays)}")
        counts = {int(a.shape[0]) for a in arrays.values()}
        if len(counts) != 1 or (num_rows is not None and counts != {num_rows}):
            raise ValueError(f"every field needs {num_rows or 'the same number of'} rows, got {sorted(counts)}")
        for f in self.fields:
            array = arrays[f.name]
            if tuple(array.shape[1:]) != f.shape or array.dtype != f.np_dtype:
                raise ValueError(f"field {f.name!r}: rows of {f.shape} {f.dtype} expected, "
                                 f"got {tuple(array.shape[1:])} {array.dtype}")
        return counts.pop()

    def specs(self, num_rows: int) -> list[jax.ShapeDtypeStruct]:
        """Shapes of one padded chunk, in field order, as a puller must declare them."""
        return [jax.ShapeDtypeStruct((num_rows, *f.shape), f.np_dtype, sharding=self.sharding)
                for f in self.fields]

    def rows_of(self, arrays: Mapping[str, jax.Array], start: int, count: int) -> Arrays:
        """Rows ``[start, start + count)`` of arrays holding every field (a larger array's run,
        as a picture's rows are of their vision call's output), as rows of their own padded to
        ``bucket(count)`` with zero rows: what :meth:`Sender.send` offers as they are. One
        program per (source row count, bucket) pair (:meth:`BlockBuffers.programs`)."""
        rows = self.check_rows(arrays)
        if not (0 <= start and 0 < count and start + count <= rows):
            raise ValueError(f"rows [{start}, {start + count}) outside 0..{rows}")
        arrays = {name: jax.device_put(a, self.sharding) for name, a in arrays.items()}
        return _gather(arrays, np.int32(start), np.int32(count), self.bucket(count))

    def chunk(self, allocation: Allocation, offset_tokens: int, max_tokens: int) -> Chunk:
        """The next transfer of an allocation: from ``offset_tokens``, at most ``max_tokens``."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0 <= offset_tokens < allocation.num_tokens:
            raise ValueError(f"offset {offset_tokens} outside the {allocation.num_tokens} tokens held")
        count = min(allocation.num_tokens - offset_tokens, max_tokens)
        return Chunk(offset_tokens, count, self.bucket(count))


class BlockBuffers(BlockLayout):
    """The pools of one side of a transfer, addressed by the allocator's allocations."""

    def __init__(self, fields: Sequence[Field], num_blocks: int, block_size: int,
                 device: jax.Device | None = None) -> None:
        super().__init__(fields, num_blocks, block_size, device)
        rows = num_blocks * block_size
        self._pools: Arrays = {
            f.name: jax.device_put(jnp.zeros((rows, *f.shape), f.np_dtype), self.device)
            for f in self.fields
        }
        self._zeros: dict[int, Arrays] = {}

    @property
    def pools(self) -> Mapping[str, jax.Array]:
        """The current pool arrays; a later write donates them, so do not hold on to them."""
        return dict(self._pools)

    def write(self, allocation: Allocation, offset: int, arrays: Mapping[str, jax.Array],
              num_tokens: int | None = None, source_start: int = 0) -> None:
        """Stores ``num_tokens`` rows of every field, from row ``source_start`` of the arrays, at
        ``offset`` within the allocation.

        Arrays may carry rows besides those (padding, or other runs: pass ``num_tokens`` and
        ``source_start``); all fields are required and must share a row count, and that row count
        picks the compiled program, whatever the offsets.
        """
        rows = self.check_rows(arrays)
        count = rows - source_start if num_tokens is None else num_tokens
        if not (0 <= source_start and 0 <= count and source_start + count <= rows):
            raise ValueError(f"rows [{source_start}, {source_start + count}) outside 0..{rows}")
        self._check_run(allocation, offset, count)
        # Rows from another device (or the host) come here first, and rows here are committed here,
        # so that every write of a row count runs the one program ``compile`` made.
        arrays = {name: jax.device_put(a, self.sharding) for name, a in arrays.items()}
        self._pools = _scatter(self._pools, arrays, np.int32(allocation.start_token + offset), np.int32(count),
                               np.int32(source_start))

    def programs(self, max_tokens: int, source_rows: Sequence[int] = ()) -> list[Callable[[], None]]:
        """Callables that each run one program a run of up to ``max_tokens`` tokens can need, writing
        nothing: the write of each bucket and its read, and from arrays of ``source_rows`` rows
        (other arrays a writer takes runs of) the writes and the runs taken as rows of their own
        (:meth:`rows_of`: to each bucket a run of such an array can have). Run them all before
        serving and nothing compiles on a first transfer."""
        buckets = self.buckets(max_tokens)

        def zeros(rows):
            return {f.name: jax.device_put(np.zeros((rows, *f.shape), f.np_dtype), self.sharding) for f in self.fields}

        def write(rows):
            self._pools = _scatter(self._pools, zeros(rows), np.int32(0), np.int32(0), np.int32(0))
            jax.block_until_ready(self._pools)

        def read(rows):
            jax.block_until_ready(_gather(self._pools, np.int32(0), np.int32(0), rows))

        def take(rows, bucket):
            jax.block_until_ready(_gather(zeros(rows), np.int32(0), np.int32(0), bucket))

        sources = sorted(set(source_rows))
        return ([functools.partial(write, rows) for rows in sorted(set(buckets) | set(sources))]
                + [functools.partial(read, rows) for rows in buckets]
                + [functools.partial(take, rows, b) for rows in sources for b in buckets if b <= self.bucket(rows)])

    def read(self, allocation: Allocation, offset: int, num_tokens: int) -> Arrays:
        """Rows ``[offset, offset + num_tokens)`` of the allocation, padded to ``bucket(num_tokens)``
        with zero rows."""
        self._check_run(allocation, offset, num_tokens)
        return _gather(self._pools, np.int32(allocation.start_token + offset), np.int32(num_tokens),
                       self.bucket(num_tokens))

    def zeros(self, num_tokens: int) -> Arrays:
        """``bucket(num_tokens)`` zero rows of every field: the read of that bucket with nothing
        to read, so no other program and no host copy. One set per bucket, made once and offered
        under every uuid that needs it: a peer registering and aborting rooms with posted pulls
        made the sender hold a fresh set for each until its offer expired."""
        bucket = self.bucket(num_tokens)
        if bucket not in self._zeros:
            self._zeros[bucket] = _gather(self._pools, np.int32(0), np.int32(0), bucket)
        return self._zeros[bucket]

    def _check_run(self, allocation: Allocation, offset: int, count: int) -> None:
        if allocation.block_size != self.block_size or allocation.start_block + allocation.num_blocks > self.num_blocks:
            raise ValueError(f"{allocation} does not belong to a pool of {self.num_blocks} blocks")
        if offset < 0 or count < 0 or offset + count > allocation.capacity_tokens:
            raise ValueError(f"run [{offset}, {offset + count}) outside the allocation's "
                             f"{allocation.capacity_tokens} tokens")
