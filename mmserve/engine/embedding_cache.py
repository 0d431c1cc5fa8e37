"""Encoded images and videos kept by their content key (``Visual.content_key``), so the same picture
is encoded once, within a byte budget (a video's features can be hundreds of MB, so a count of
entries would bound nothing)."""

from __future__ import annotations

import collections

import numpy as np


class EmbeddingCache:
    """A least-recently-used map from content key to (embeddings, deepstack), holding at most
    ``capacity_bytes`` of arrays; an entry larger than the whole budget is not kept."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: collections.OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self.bytes = 0
        """Bytes of the arrays held."""
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, features: tuple[np.ndarray, np.ndarray]) -> None:
        size = _size(features)
        if size > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= _size(old)
        self._entries[key] = features
        self.bytes += size
        while self.bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _size(evicted)


def _size(features: tuple[np.ndarray, np.ndarray]) -> int:
    return sum(int(np.asarray(a).nbytes) for a in features)
