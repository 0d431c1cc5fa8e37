"""Encoded images and videos kept by their content key (``Visual.content_key``), so the same picture
is encoded once, within a byte budget (a video's features can be hundreds of MB, so a count of
entries would bound nothing). The rows stay on device (``VisualRows``), each a run of its vision
call's output, which it keeps alive whole (the pictures packed with it, the call's padding rows)
until the last of that call's pictures is evicted: so the budget counts each such output once,
whole, while any entry holds it. (Counting each picture's own rows let a budget hold 20-60 times
itself: small clips cached from calls they shared with large images, the images evicted first.)
Copying a picture's rows out of its call's output instead would compile a program per run."""

from __future__ import annotations

import collections

from mmserve.engine.visual_rows import VisualRows


class EmbeddingCache:
    """A least-recently-used map from content key to its rows, holding at most
    ``capacity_bytes`` of arrays; an entry larger than the whole budget is not kept."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: collections.OrderedDict[bytes, VisualRows] = collections.OrderedDict()
        self._outputs: dict[int, int] = {}
        """Entries holding each vision call's output, by the id of its embeddings array."""
        self.bytes = 0
        """Bytes of the arrays held: every output an entry holds, once."""
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
        if _output_bytes(features) > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._let_go(old)
        self._entries[key] = features
        holders = self._outputs.get(id(features.embeddings), 0)
        self._outputs[id(features.embeddings)] = holders + 1
        if holders == 0:
            self.bytes += _output_bytes(features)
        while self.bytes > self.capacity_bytes:
            self._let_go(self._entries.popitem(last=False)[1])

    def _let_go(self, entry: VisualRows) -> None:
        holders = self._outputs.pop(id(entry.embeddings)) - 1
        if holders:
            self._outputs[id(entry.embeddings)] = holders
        else:
            self.bytes -= _output_bytes(entry)


def _output_bytes(features: VisualRows) -> int:
    """Bytes of the whole vision call output a run is part of."""
    return features.embeddings.nbytes + features.deepstack.nbytes
