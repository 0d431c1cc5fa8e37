"""Encoded images and videos kept by their content key (``Visual.content_key``), so the same picture
is encoded once, within a byte budget (a video's features can be hundreds of MB, so a count of
entries would bound nothing). The rows stay on device (``VisualRows``); a picture counts the bytes of
its own rows, though it keeps its whole vision call's output alive (the pictures packed with it,
and the call's padding rows) until the last of that call's pictures is evicted."""

from __future__ import annotations

import collections

from mmserve.engine.visual_rows import VisualRows


class EmbeddingCache:
    """A least-recently-used map from content key to its rows, holding at most
    ``capacity_bytes`` of arrays; an entry larger than the whole budget is not kept."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: collections.OrderedDict[bytes, VisualRows] = collections.OrderedDict()
        self.bytes = 0
        """Bytes of the arrays held."""
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> VisualRows | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, features: VisualRows) -> None:
        size = features.nbytes
        if size > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self._entries[key] = features
        self.bytes += size
        while self.bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
