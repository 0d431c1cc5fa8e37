"""Continuous batching: which requests run in the next step, and with which KV pages.

A step is either a prefill step (chunks of prompts, within a token budget) or a decode step (one
token for every running request that has finished its prompt). Prefill and decode steps alternate
while both have work, so new prompts are admitted between decode steps and the running batch keeps
decoding. A request that does not fit waits; when decode runs out of pages the newest running
request is preempted: its pages are freed and it is prefilled again later (recompute), which gives
the same output.

With prefix caching, a request admitted (fresh, or again after preemption) takes the cached pages
of the longest prefix of its tokens, and the tail (a released sequence's partial last page) that
the next page starts with, and is prefilled from there, like a prompt whose first chunks are done;
its last token is always computed, so that there are logits to sample. Its pages join the
cache as they fill (:meth:`Scheduler.cache_computed`). A prompt whose first page another prompt is
computing right now (``n`` siblings, a burst sharing a system prompt) waits for those pages rather
than computing them again beside it: it shares them from the cache a step later.

A running request's last token without KV is computed by a decode row (a one-token prefill) when
the engine decodes and the token is not a picture's placeholder (a decode row has no visual input).
So a prompt found cached but for its last token (asked again after a short answer: its tail holds
the rest) is admitted straight into the running batch, and a burst of them runs as one decode step,
not a one-row prefill step each. An engine that only prefills (the prefill role) computes every prompt
token, the last included, in prefill steps: it has no decode program.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

from mmserve.engine.config import EngineConfig
from mmserve.engine.page_hash import PageKeys
from mmserve.engine.program_grid import ProgramGrid
from mmserve.engine.request import Request, Status
from mmserve.kv_cache_manager import KVCacheManager


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    request: Request
    start: int
    length: int

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the request's last token, so a token is sampled after it."""
        return self.start + self.length == self.request.num_tokens


@dataclasses.dataclass(frozen=True)
class Reservation:
    """What a request prefilled elsewhere holds here: its sampling slot, and how many of its
    prompt's first tokens have their KV in pages this engine had cached (full pages, then perhaps
    a tail)."""

    slot: int
    held_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class HeldPrefix:
    """What a sequence finds of its prefix here: the cached full pages, then perhaps a tail with
    the first tokens of its next page."""

    pages: list[int]
    tail: int | None
    num_tokens: int
    """Tokens whose KV these pages hold."""


NOTHING_HELD = HeldPrefix([], None, 0)


@dataclasses.dataclass(frozen=True)
class Step:
    prefill: list[PrefillChunk] = dataclasses.field(default_factory=list)
    decode: list[Request] = dataclasses.field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, grid: ProgramGrid, decodes: bool = True):
        """decodes: the engine runs decode steps (it has their programs)."""
        self.config = config
        self.decodes = decodes
        self.kv = kv
        self.grid = grid
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self._reserved_tails: dict[str, tuple[int, list[bytes]]] = {}
        """Reservations not admitted yet that took a tail: (its page index, the keys of the tokens
        it held), so that a cancelled one gives the tail back as a tail, not as a blank page."""
        self._last_was_prefill = False
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        """Tokens of admitted requests looked up in the prefix cache."""
        self.prefix_cache_hits = 0
        """Of those, tokens found (their KV not computed again)."""
        self.short_of_pages = False
        """The last schedule left a prompt waiting (or preempted one) for want of free pages."""

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_runnable(self) -> bool:
        """Some request has a token it can compute now (not all wait for visual rows)."""
        return any(not r.blocked for r in (*self.waiting, *self.running))

    def schedule(self) -> Step | None:
        self.short_of_pages = False
        decodable = self._decodable()
        if not (self._last_was_prefill and decodable):
            chunks = self._schedule_prefill()
            if chunks:
                self._last_was_prefill = True
                return Step(prefill=chunks)
            decodable = self._decodable()  # with any prompt it admitted for a decode row
        self._last_was_prefill = False
        batch = self._schedule_decode(decodable)
        if batch:
            return Step(decode=batch)
        chunks = self._schedule_prefill()
        return Step(prefill=chunks) if chunks else None

    def reserve(self, request_id: str, num_tokens: int, prompt_ids: Sequence[int] = (),
                page_keys: PageKeys | None = None) -> Reservation | None:
        """Pages for ``num_tokens`` and a slot for a request whose prompt is prefilled elsewhere, or
        None (nothing taken) when either is short. With the prompt's ``page_keys`` its longest
        cached prefix is taken from the cache (all but its last token at most): those tokens' KV
        is held here already and need not arrive."""
        def token_ids(start, end):
            return list(prompt_ids[start:end])

        held = self.held_prefix(page_keys, len(prompt_ids), token_ids)
        if not self._free_slots or not self.kv.can_allocate(num_tokens, held.pages, held.tail):
            return None
        self.kv.allocate(request_id, num_tokens, held.pages, held.tail)
        if held.tail is not None:  # its tokens stay as they were: arriving rows are written past them
            page = len(held.pages)
            self._reserved_tails[request_id] = (page, page_keys.tail_keys(page, held.num_tokens, token_ids))
        if page_keys is not None and self.config.enable_prefix_caching:
            self.prefix_cache_queries += len(prompt_ids)
            self.prefix_cache_hits += held.num_tokens
        return Reservation(self._free_slots.pop(), held.num_tokens)

    def cancel_reservation(self, request_id: str, slot: int) -> None:
        self.kv.free(request_id, tail=self._reserved_tails.pop(request_id, None))
        self._free_slots.append(slot)

    def add_reserved(self, request: Request, slot: int) -> None:
        """Admits a request into the pages and slot reserved for it."""
        self._reserved_tails.pop(request.request_id, None)
        request.slot, request.slot_loaded = slot, False
        request.status = Status.RUNNING
        self.running.append(request)

    def finish(self, request: Request) -> None:
        """Frees what a finished or aborted request holds, wherever it is."""
        if request in self.running:
            self._release(request)
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = Status.FINISHED

    def cache_computed(self, request: Request) -> None:
        """Offers the request's full, computed pages to the prefix cache (after a step wrote them)."""
        if self.config.enable_prefix_caching and request.request_id in self.kv:
            self.kv.cache_pages(request.request_id, request.full_page_keys(), request.token_ids)

    def extend_decode(self, batch: list[Request]) -> bool:
        """Room for one more token of each request of a decode batch, taken only from free pages
        (nothing preempted); False when it is short. For a decode step of the same batch
        dispatched before the last one's tokens are read (``LLMEngine``'s overlapped steps), which
        must not change the batch. Room taken before a False stays taken: the next step uses it."""
        for request in batch:
            need = request.num_computed + 1 - self.kv.num_tokens(request.request_id)
            if need > 0:
                if not self.kv.can_append(request.request_id, need):
                    return False
                self.kv.append(request.request_id, need)
        return True

    def _schedule_prefill(self) -> list[PrefillChunk]:
        budget = self.config.max_prefill_tokens
        chunks: list[PrefillChunk] = []
        # A waiting request whose cached pages are pinned for it goes first: its pins shrink the
        # pool for every other request, and it fits alone, as it did before it was preempted.
        prefilling = [r for r in self.running if not self._decodes_next(r, r.num_computed)]
        candidates = prefilling + sorted(self.waiting, key=lambda r: not r.pinned)
        computing = {self._first_page_key(r) for r in prefilling} - {None}
        for request in candidates:
            if len(chunks) == self.config.max_prefill_seqs or budget == 0:
                break
            admits = request.status is Status.WAITING
            held = self._held_prefix(request) if admits else NOTHING_HELD
            if admits and not held.pages and self._first_page_key(request) in computing:
                continue  # another prompt computes its first page now: take that from the cache later
            start = held.num_tokens if admits else request.num_computed
            if admits and start and self._decodes_next(request, start):  # all but its last token cached
                if not self._can_admit(start + 1, held):
                    break
                self._admit(request, start + 1, held)  # its last token runs in the next decode step
                continue
            length = min(request.ready_until(start) - start, budget)
            if length <= 0:
                continue  # its next token waits for a visual row still arriving
            if chunks and not self._joins(chunks, start, length):
                break
            if admits:
                if not self._can_admit(start + length, held):
                    break
                self._admit(request, start + length, held)
            elif not self._grow(request, start + length):
                self.short_of_pages = True
                break
            chunks.append(PrefillChunk(request, start, length))
            computing |= {self._first_page_key(request)} - {None}
            budget -= length
        return chunks

    def cached_prefix(self, page_keys: PageKeys | None, num_tokens: int,
                      token_ids: Callable[[int, int], list[int]]) -> list[int]:
        """Cached pages of the longest cached prefix of a sequence of ``num_tokens`` tokens, leaving
        at least its last token to compute (or to receive)."""
        if not self.config.enable_prefix_caching or page_keys is None:
            return []
        return self.kv.cached_prefix(page_keys.shareable(num_tokens, token_ids))

    def held_prefix(self, page_keys: PageKeys | None, num_tokens: int,
                    token_ids: Callable[[int, int], list[int]]) -> HeldPrefix:
        """The cached pages of a sequence's longest cached prefix and the tail its next page starts
        with, leaving at least its last token to compute (or to receive)."""
        pages = self.cached_prefix(page_keys, num_tokens, token_ids)
        start = len(pages) * self.kv.page_size
        end = min(start + self.kv.page_size - 1, num_tokens - 1)
        if not self.config.enable_prefix_caching or page_keys is None or end <= start:
            return HeldPrefix(pages, None, start)
        found = self.kv.longest_tail(page_keys.tail_keys(len(pages), end, token_ids))
        if found is None:
            return HeldPrefix(pages, None, start)
        return HeldPrefix(pages, found[0], start + found[1])

    def _held_prefix(self, request: Request) -> HeldPrefix:
        return self.held_prefix(request.page_keys, request.num_tokens, request.token_ids)

    def _first_page_key(self, request: Request) -> bytes | None:
        """The key of the request's first page, if prefix caching could ever find it (a full page
        before its last token); None otherwise."""
        if not self.config.enable_prefix_caching or request.page_keys is None:
            return None
        return next(iter(request.page_keys.shareable(request.num_tokens, request.token_ids)), None)

    def _decodable(self) -> list[Request]:
        return [r for r in self.running if self._decodes_next(r, r.num_computed) and not r.blocked]

    def _decodes_next(self, request: Request, start: int) -> bool:
        """Whether a decode row computes the request's tokens from ``start``: only its last is left,
        this engine decodes, and it is not a picture's placeholder."""
        if start < request.num_tokens - 1 or not self.decodes:
            return False
        return start >= len(request.prompt_ids) or request.visual is None or not request.visual.in_span(start, start + 1)

    def _joins(self, chunks: list[PrefillChunk], start: int, length: int) -> bool:
        """Whether a chunk [start, start + length) of a prompt may join the step: its padded size
        stays in the program grid, and a chunk that continues a prompt (its earlier pages count, so
        it needs the widest program) runs alone."""
        continues = start > 0 or any(ch.start > 0 for ch in chunks)
        return not continues and self.grid.prefill_fits(len(chunks) + 1, max(length, *(ch.length for ch in chunks)))

    def _schedule_decode(self, decodable: list[Request]) -> list[Request]:
        batch = []
        for request in decodable[: self.config.max_num_seqs]:
            if request.status is Status.RUNNING and self._grow(request, request.num_computed + 1):
                batch.append(request)
        return [r for r in batch if r.status is Status.RUNNING]

    def _can_admit(self, num_tokens: int, held: HeldPrefix) -> bool:
        if not self._free_slots:
            return False
        if not self.kv.can_allocate(num_tokens, held.pages, held.tail):
            self.short_of_pages = True
            return False
        return True

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Makes room for ``num_tokens`` tokens of ``request``, preempting newer requests if needed.
        False if the request itself had to be preempted."""
        need = num_tokens - self.kv.num_tokens(request.request_id)
        if need <= 0:
            return True
        while not self.kv.can_append(request.request_id, need):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        self.kv.append(request.request_id, need)
        return True

    def _admit(self, request: Request, num_tokens: int, held: HeldPrefix) -> None:
        self.waiting.remove(request)
        self.kv.allocate(request.request_id, num_tokens, held.pages, held.tail)
        request.num_computed = request.num_cached_tokens = held.num_tokens
        if request.page_keys is not None and self.config.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += request.num_computed
        request.slot, request.slot_loaded = self._free_slots.pop(), False
        request.status = Status.RUNNING
        self.running.append(request)

    def _preempt(self, request: Request) -> None:
        self._release(request)
        self.running.remove(request)
        request.num_computed = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _release(self, request: Request) -> None:
        """Frees the request's pages, keeping its last page as a tail when it is partial."""
        tail = None
        full, part = divmod(request.num_computed, self.kv.page_size)
        if self.config.enable_prefix_caching and request.page_keys is not None and part:
            tail = (full, request.page_keys.tail_keys(full, request.num_computed, request.token_ids))
        self.kv.free(request.request_id, tail)
        self._free_slots.append(request.slot)
        request.slot = None
