"""Encoded images and videos kept by their content key (``Visual.content_key``), so the same picture
is encoded once."""

from __future__ import annotations

import collections

import numpy as np


class EmbeddingCache:
    """A least-recently-used map from content key to (embeddings, deepstack)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, features: tuple[np.ndarray, np.ndarray]) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
