"""Keys of full KV pages: equal keys mean equal KV, so a prompt may take another's pages.

The KV of a token depends on every input up to it: the token ids and, at image or video
placeholders, the visual embeddings. A page's key is therefore a sha256 chained through the
sequence: (the previous page's key, the page's token ids, and the key and offset of every image or
video that has a placeholder token in the page). Two prompts with the same text and different
pictures differ in the visual keys, so they never share a page, nor any page after it.

A visual's key is its ``content_key`` (:class:`~mmserve.engine.inputs.Visual`): a sha256 of the
file the client sent (or of the patches given directly), made where the visual was first read and
carried with it to every role. The router computes the same keys from the same prompt, which is
how it knows which prefill worker holds a prompt's pages (:mod:`mmserve.roles.routing`).

A prompt's ``cache_salt`` (vLLM's request field) replaces the first page's parent, and is hashed
into its pictures' content keys (:func:`salted_content_key`), so that only prompts with the same
salt share pages or encoded pictures: a tenant whose requests carry a secret salt of its own
cannot learn, from a faster answer or a hit counter, whether another tenant sent a prefix it guesses.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mmserve.engine.inputs import PreparedPrompt
    from models.qwen3_vl_moe import Model

ROOT_KEY = b""
"""The parent key of a sequence's first page (without a cache salt)."""
SALT_DOMAIN = b"cache_salt:"
"""Prefixed to a cache salt before it is hashed into a first page's parent."""
TAIL_DOMAIN = b"tail:"
"""Prefixed to the parent of a partial page's key, so that no partial page's key can equal a
full page's."""
TOKEN_BYTES = np.dtype(np.int64).itemsize
"""A token id's width in a key (int64, the machine's byte order)."""


@dataclasses.dataclass(frozen=True)
class VisualSpan:
    """The placeholder tokens [start, end) of one image or video (a video's frames have timestamp
    tokens between them: the span covers them too) and the visual's content key."""

    start: int
    end: int
    key: bytes


def visual_spans(token_ids: Sequence[int],
                 placeholders: Sequence[tuple[int, Sequence[tuple[int, bytes]]]]) -> list[VisualSpan]:
    """The span and key of every visual of a prompt. ``placeholders``: per modality, (its placeholder
    token id, (token count, content key) of each of its visuals in prompt order); ValueError when
    they do not fill the prompt's placeholder tokens exactly."""
    ids = np.asarray(token_ids)
    spans = []
    for token, visuals in placeholders:
        where = np.flatnonzero(ids == token)
        if where.size != sum(count for count, _ in visuals):
            raise ValueError(f"the prompt has {where.size} placeholder tokens {token} but its pictures fill "
                             f"{sum(count for count, _ in visuals)}")
        offset = 0
        for count, key in visuals:
            at = where[offset:offset + count]
            spans.append(VisualSpan(int(at[0]), int(at[-1]) + 1, key))
            offset += count
    return sorted(spans, key=lambda s: s.start)


def prompt_page_keys(prompt: PreparedPrompt, model: Model, page_size: int) -> PageKeys:
    """The page keys of a prepared prompt, the same in the engine that caches its pages and in the
    router that routes it to them."""
    config, count = model.config, model.processor.num_image_tokens
    return PageKeys(page_size, visual_spans(prompt.token_ids, [
        (config.image_token_id, [(count(v.grid_thw[0]), v.content_key) for v in prompt.images]),
        (config.video_token_id, [(count(v.grid_thw[0]), v.content_key) for v in prompt.videos])]),
        root=root_key(prompt.cache_salt))


def salted_content_key(content_key: bytes, cache_salt: str) -> bytes:
    """A picture's content key within a salted prompt: the embedding cache, which looks pictures up
    by it, then finds a picture only for prompts of the same salt, as the prefix cache does."""
    return hashlib.sha256(SALT_DOMAIN + content_key + cache_salt.encode()).digest()


def root_key(cache_salt: str | None) -> bytes:
    """The parent of a sequence's first page: ROOT_KEY, or a digest of the prompt's cache salt."""
    if cache_salt is None:
        return ROOT_KEY
    return hashlib.sha256(SALT_DOMAIN + cache_salt.encode()).digest()


def page_key(parent: bytes, token_ids: Sequence[int], visuals: Sequence[tuple[int, bytes]]) -> bytes:
    """visuals: (offset of the visual's first token from the page's first, visual key)."""
    return _key(parent, np.asarray(token_ids, np.int64).tobytes(), visuals)


def _key(parent: bytes, token_bytes: bytes, visuals: Sequence[tuple[int, bytes]]) -> bytes:
    digest = hashlib.sha256(parent)
    digest.update(token_bytes)
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
    root: bytes = ROOT_KEY
    """The first page's parent (:func:`root_key`)."""
    _keys: list[bytes] = dataclasses.field(default_factory=list)
    _tail: tuple[int, int, list[bytes]] | None = None
    """The last ``tail_keys`` answer: a waiting request asks again at every step, with the same
    tokens."""

    def first(self, num_pages: int, token_ids: Callable[[int, int], list[int]]) -> list[bytes]:
        """Keys of pages 0..num_pages-1; ``token_ids(start, end)`` reads the sequence, whose first
        ``num_pages`` pages must be full. The new pages' tokens are read and converted at once, not
        page by page: the router keys every prompt it routes (~70 pages for 1,100 tokens)."""
        size, done = self.page_size, len(self._keys)
        if num_pages > done:
            raw = np.asarray(token_ids(done * size, num_pages * size), np.int64).tobytes()
            width = size * TOKEN_BYTES
            parent = self._keys[-1] if self._keys else self.root
            for i, start in enumerate(range(done * size, num_pages * size, size)):
                visuals = [(v.start - start, v.key) for v in self.visuals if v.start < start + size and v.end > start]
                parent = _key(parent, raw[i * width:(i + 1) * width], visuals)
                self._keys.append(parent)
        return self._keys[:num_pages]

    def tail_keys(self, page: int, num_tokens: int, token_ids: Callable[[int, int], list[int]]) -> list[bytes]:
        """The keys of page ``page`` cut after each of its first tokens, up to the sequence's
        ``num_tokens`` (within the page): ``keys[j - 1]`` names its first ``j`` tokens. A sequence
        that ends inside a page leaves it as a tail (:class:`~mmserve.prefix_cache.PrefixCache`);
        a later sequence takes it when its own page starts with the same tokens and pictures after
        the same parent."""
        size = self.page_size
        start = page * size
        if not 0 < num_tokens - start < size:
            raise ValueError(f"{num_tokens} tokens do not end inside page {page} of {size} tokens")
        if self._tail is not None and self._tail[:2] == (page, num_tokens):
            return self._tail[2]
        parent = TAIL_DOMAIN + (self.first(page, token_ids)[-1] if page else self.root)
        ids = token_ids(start, num_tokens)
        keys = []
        for j in range(1, len(ids) + 1):
            visuals = [(v.start - start, v.key) for v in self.visuals if v.start < start + j and v.end > start]
            keys.append(page_key(parent, ids[:j], visuals))
        self._tail = (page, num_tokens, keys)
        return keys

    def shareable(self, num_tokens: int, token_ids: Callable[[int, int], list[int]]) -> list[bytes]:
        """Keys of the full pages before the last of a sequence's ``num_tokens`` tokens: those it may
        take from a cache (its last token is always computed, or received, so there is a next one)."""
        return self.first((num_tokens - 1) // self.page_size, token_ids)
