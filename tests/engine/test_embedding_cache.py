"""Encode's embedding cache holds at most its byte budget, counting the vision call outputs its
pictures keep alive: the least recently used picture goes first, a picture larger than the whole
budget is not kept, a budget of 0 keeps nothing, and putting a key again replaces it without
counting it twice."""

import jax.numpy as jnp

from mmserve.engine.embedding_cache import EmbeddingCache
from mmserve.engine.visual_rows import VisualRows


def features(tokens: int, value: float = 0.0, packed_with: int = 0) -> VisualRows:
    """``tokens`` x 64 float32 embeddings and 3 deepstack levels: 1 KiB per token, as a run of a
    vision call's output that also holds ``packed_with`` other pictures' tokens."""
    rows = tokens + packed_with
    return VisualRows(jnp.full((rows, 64), value, jnp.float32), jnp.full((rows, 3 * 64), value, jnp.float32),
                      packed_with, tokens)


def test_the_least_recently_used_picture_goes_first_when_the_budget_is_full():
    cache = EmbeddingCache(capacity_bytes=3 * 1024)
    cache.put(b"a", features(1))
    cache.put(b"b", features(1))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"c", features(2))  # 4 KiB > 3 KiB: b, the least recent, goes
    assert b"b" not in cache and b"a" in cache and b"c" in cache
    assert cache.bytes == 3 * 1024 and len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 0)


def test_a_picture_larger_than_the_budget_is_not_kept_and_evicts_nothing():
    cache = EmbeddingCache(capacity_bytes=2 * 1024)
    cache.put(b"small", features(1))
    cache.put(b"huge", features(3))
    assert b"huge" not in cache and b"small" in cache and cache.bytes == 1024


def test_a_zero_budget_keeps_nothing():
    cache = EmbeddingCache(capacity_bytes=0)
    cache.put(b"a", features(1))
    assert len(cache) == 0 and cache.bytes == 0 and cache.get(b"a") is None and cache.misses == 1


def test_putting_a_key_again_replaces_it():
    cache = EmbeddingCache(capacity_bytes=4 * 1024)
    cache.put(b"a", features(1, 1.0))
    cache.put(b"a", features(2, 2.0))
    assert cache.bytes == 2 * 1024 and len(cache) == 1
    assert cache.get(b"a").host()[0][0, 0] == 2.0


def test_pictures_count_the_vision_call_output_they_keep_alive_once_and_whole():
    """A picture's rows are a run of its vision call's output, which stays alive whole while any
    of them is cached. Counting only each picture's own rows, a 256 MiB budget could keep 20-60
    times that alive (small clips cached from calls shared with large images)."""
    call = features(2, packed_with=14)  # a 16-token output: 2 tokens of this picture, 14 of others
    mate = VisualRows(call.embeddings, call.deepstack, 0, 14)
    cache = EmbeddingCache(capacity_bytes=40 * 1024)
    cache.put(b"clip", call)
    cache.put(b"image", mate)
    assert cache.bytes == 16 * 1024  # one output, counted once
    cache.put(b"other clip", features(2, packed_with=14))
    assert cache.bytes == 32 * 1024
    # 48 KiB alive: "clip" goes first, which frees nothing while "image" holds its output; then "image"
    cache.put(b"third clip", features(2, packed_with=14))
    assert b"clip" not in cache and b"image" not in cache and cache.bytes == 32 * 1024
    cache.put(b"image", mate)  # its output back: "other clip", now the least recent, goes
    cache.put(b"x", features(1))
    assert b"other clip" not in cache and cache.bytes == (16 + 16 + 1) * 1024


def test_a_picture_of_a_call_larger_than_the_budget_is_not_kept():
    cache = EmbeddingCache(capacity_bytes=4 * 1024)
    cache.put(b"a", features(1, packed_with=7))
    assert b"a" not in cache and cache.bytes == 0
