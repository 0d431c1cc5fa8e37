"""Device block pools: bit-exact scatter/gather, padding never leaks, pools donated, compiles bounded."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from transfer import BlockAllocator, BlockBuffers, bucket_tokens, field
from transfer.block_buffers import _gather, _scatter
from transfer_payload import EMBEDDING_FIELDS, payload

ALL_DTYPES = tuple(field(f"f_{d}", (2,), d) for d in
                   ("bool", "int8", "uint8", "int16", "uint32", "float16", "bfloat16", "float32"))


def pool(fields, num_blocks=16, block_size=4):
    return BlockBuffers(fields, num_blocks, block_size), BlockAllocator(num_blocks, block_size)


def test_write_then_read_is_bit_exact_for_every_dtype():
    buffers, allocator = pool(ALL_DTYPES)
    a = allocator.alloc(7)
    data = payload(ALL_DTYPES, 3, 7)
    data["f_bool"] = np.arange(14).reshape(7, 2) % 3 == 0
    buffers.write(a, 0, data)
    got = buffers.read(a, 0, 7)
    for f in ALL_DTYPES:
        assert got[f.name].shape == (8, 2) and got[f.name].dtype == f.np_dtype
        np.testing.assert_array_equal(np.asarray(got[f.name])[:7], data[f.name])
        assert not np.asarray(got[f.name])[7:].any()


def test_padding_rows_are_dropped_and_neighbours_untouched():
    buffers, allocator = pool(EMBEDDING_FIELDS)
    left, right = allocator.alloc(4), allocator.alloc(4)
    assert right.start_block == left.start_block + 1
    buffers.write(right, 0, payload(EMBEDDING_FIELDS, 1, 4))
    padded = payload(EMBEDDING_FIELDS, 2, 8)
    buffers.write(left, 1, padded, num_tokens=3)
    got_right = buffers.read(right, 0, 4)
    for name, expected in payload(EMBEDDING_FIELDS, 1, 4).items():
        np.testing.assert_array_equal(np.asarray(got_right[name])[:4], expected)
        np.testing.assert_array_equal(np.asarray(buffers.read(left, 1, 3)[name])[:3], padded[name][:3])


def test_write_donates_the_pool_instead_of_copying_it():
    buffers, allocator = pool(EMBEDDING_FIELDS)
    before = buffers.pools["embeddings"]
    buffers.write(allocator.alloc(4), 0, payload(EMBEDDING_FIELDS, 0, 4))
    assert before.is_deleted()


def test_positions_never_recompile_and_lengths_compile_once_per_bucket():
    buffers, allocator = pool(EMBEDDING_FIELDS, num_blocks=64)
    allocations = [allocator.alloc(8) for _ in range(6)]
    buffers.write(allocations[0], 0, payload(EMBEDDING_FIELDS, 0, 8))
    buffers.read(allocations[0], 0, 5)
    scatters, gathers = _scatter._cache_size(), _gather._cache_size()
    for i, a in enumerate(allocations):
        buffers.write(a, i % 3, payload(EMBEDDING_FIELDS, i, 8), num_tokens=5)
        for n in (5, 6, 7, 8):
            buffers.read(a, 0, n)
    assert (_scatter._cache_size(), _gather._cache_size()) == (scatters, gathers)


def test_after_its_programs_ran_no_write_or_read_compiles():
    """What a role runs before serving: afterwards no run length (its rows padded to their bucket, as
    a chunk's are), offset or source array compiles."""
    buffers, allocator = pool(EMBEDDING_FIELDS, num_blocks=16)
    for program in buffers.programs(40, source_rows=[24]):
        program()
    scatters, gathers = _scatter._cache_size(), _gather._cache_size()
    source = {k: jnp.asarray(v) for k, v in payload(EMBEDDING_FIELDS, 9, 24).items()}
    for n in range(1, 41):
        a = allocator.alloc(n)
        buffers.write(a, 0, payload(EMBEDDING_FIELDS, n, bucket_tokens(n, 4)), num_tokens=n)
        buffers.write(a, 0, source, num_tokens=min(n, 24 - n % 5), source_start=n % 5)
        buffers.read(a, 0, n)
        buffers.rows_of(source, n % 5, min(n, 24 - n % 5))
        allocator.free(a)
    assert (_scatter._cache_size(), _gather._cache_size()) == (scatters, gathers)


def test_a_run_taken_as_rows_of_its_own_is_its_rows_then_zeros_to_its_bucket():
    buffers, _ = pool(EMBEDDING_FIELDS, num_blocks=16)
    source = payload(EMBEDDING_FIELDS, 3, 24)
    rows = buffers.rows_of(source, 7, 6)
    for name, expected in source.items():
        got = np.asarray(rows[name])
        assert got.shape == (bucket_tokens(6, 4), *expected.shape[1:])
        np.testing.assert_array_equal(got[:6], expected[7:13])
        assert not got[6:].any()
    assert not any(np.asarray(p).any() for p in buffers.pools.values())
    with pytest.raises(ValueError):
        buffers.rows_of(source, 20, 5)


def test_chunk_describes_at_most_max_tokens_from_the_offset():
    buffers, allocator = pool(EMBEDDING_FIELDS, num_blocks=64)
    a = allocator.alloc(50)
    first = buffers.chunk(a, 0, 16)
    assert (first.offset, first.num_tokens, first.padded_tokens) == (0, 16, 16)
    rest = buffers.chunk(a, 16, 100)
    assert (rest.offset, rest.num_tokens, rest.padded_tokens) == (16, 34, 40)
    with pytest.raises(ValueError):
        buffers.chunk(a, 50, 4)


@pytest.mark.parametrize("bad", ["missing field", "wrong shape", "wrong dtype", "past the allocation"])
def test_write_rejects_what_does_not_fit_the_declaration(bad):
    buffers, allocator = pool(EMBEDDING_FIELDS)
    a = allocator.alloc(4)
    data = payload(EMBEDDING_FIELDS, 0, 4)
    offset = 0
    if bad == "missing field":
        del data["deepstack"]
    elif bad == "wrong shape":
        data["embeddings"] = data["embeddings"][:, :3]
    elif bad == "wrong dtype":
        data["deepstack"] = data["deepstack"].astype(jnp.float32)
    else:
        offset = 1
    with pytest.raises(ValueError):
        buffers.write(a, offset, data)


def test_buckets_pad_at_most_a_quarter_and_stay_few():
    block = 16
    buckets = set()
    for n in range(1, 4096 * block, 7):
        bucket = bucket_tokens(n, block)
        blocks = -(-n // block)
        assert bucket % block == 0 and bucket >= n and bucket // block <= max(blocks, 1.25 * blocks)
        buckets.add(bucket)
    assert len(buckets) <= 4 * 12 + 4
