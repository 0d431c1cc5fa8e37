"""Encoded images kept by a hash of their pixels, so the same image is encoded once."""

from __future__ import annotations

import collections
import hashlib

import numpy as np


def pixel_key(pixel_values: np.ndarray, grid_thw: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(grid_thw, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(pixel_values).tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """A least-recently-used map from pixel hash to (embeddings, deepstack)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, features: tuple[np.ndarray, np.ndarray]) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
