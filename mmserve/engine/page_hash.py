"""Keys of full KV pages: equal keys mean equal KV, so a prompt may take another's pages.

The KV of a token depends on every input up to it: the token ids and, at image or video
placeholders, the visual embeddings. A page's key is therefore a sha256 chained through the
sequence: (the previous page's key, the page's token ids, and the key and offset of every image or
video that has a placeholder token in the page). Two prompts with the same text and different
pictures differ in the visual keys, so they never share a page, nor any page after it.

A visual's key is a sha256 of its embedding rows as the engine received them (encoded here or sent
by the encode role, which sends no pixels), so a page is reused only when its inputs are the very
bytes that a recomputation would use. The deepstack rows come from the same pixels through the same
tower and are not hashed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

ROOT_KEY = b""
"""The parent key of a sequence's first page."""


@dataclasses.dataclass(frozen=True)
class VisualSpan:
    """The placeholder tokens [start, end) of one image or video (a video's frames have timestamp
    tokens between them: the span covers them too) and the visual's content key."""

    start: int
    end: int
    key: bytes


def visual_key(embeddings: np.ndarray) -> bytes:
    rows = np.ascontiguousarray(embeddings, np.float32)
    digest = hashlib.sha256(np.asarray(rows.shape, np.int64).tobytes())
    digest.update(rows.tobytes())
    return digest.digest()


def visual_spans(token_ids: Sequence[int], embeddings: np.ndarray | None,
                 placeholders: Sequence[tuple[int, Sequence[int]]]) -> list[VisualSpan]:
    """The span and key of every visual of a prompt. ``embeddings`` [S, H]: the prompt's visual rows
    in place (zero at text tokens); ``placeholders``: (placeholder token id, token count of each of
    its visuals, in prompt order) per modality."""
    ids = np.asarray(token_ids)
    spans = []
    for token, counts in placeholders:
        where = np.flatnonzero(ids == token)
        offset = 0
        for count in counts:
            at = where[offset:offset + count]
            spans.append(VisualSpan(int(at[0]), int(at[-1]) + 1, visual_key(embeddings[at])))
            offset += count
    return sorted(spans, key=lambda s: s.start)


def page_key(parent: bytes, token_ids: Sequence[int], visuals: Sequence[tuple[int, bytes]]) -> bytes:
    """visuals: (offset of the visual's first token from the page's first, visual key)."""
    digest = hashlib.sha256(parent)
    digest.update(np.asarray(token_ids, np.int64).tobytes())
    for offset, key in visuals:
        digest.update(np.int64(offset).tobytes())
        digest.update(key)
    return digest.digest()


@dataclasses.dataclass
class PageKeys:
    """The keys of one sequence's full pages, computed once each as the sequence grows (its tokens
    only ever get appended, so a page's key never changes)."""

    page_size: int
    visuals: list[VisualSpan]
    _keys: list[bytes] = dataclasses.field(default_factory=list)

    def first(self, num_pages: int, token_ids: Callable[[int, int], list[int]]) -> list[bytes]:
        """Keys of pages 0..num_pages-1; ``token_ids(start, end)`` reads the sequence, whose first
        ``num_pages`` pages must be full."""
        size = self.page_size
        for page in range(len(self._keys), num_pages):
            start, end = page * size, (page + 1) * size
            parent = self._keys[-1] if self._keys else ROOT_KEY
            visuals = [(v.start - start, v.key) for v in self.visuals if v.start < end and v.end > start]
            self._keys.append(page_key(parent, token_ids(start, end), visuals))
        return self._keys[:num_pages]
