"""Which worker of a role the router sends a request to: the routing policy.

- ``round_robin``: each live worker in turn, whatever it holds.
- ``least_load``: the worker with the lowest load (requests held over capacity, from its own
  heartbeat and this router's count); ties in turn.
- ``cache_aware`` (the default; SGLang's router does the same): for prefill and for decode, the
  worker holding the longest run of the prompt's leading KV pages
  (:class:`~mmserve.roles.prefix_index.PrefixIndex`, kept from the workers' KV events), among
  those with room (load below 1) and within ``cache_aware_max_load_gap`` of the least loaded of
  them, ties by load and then in turn; a request no worker holds a page of goes as ``least_load``
  would. A full worker, or one much busier than another, is passed over even if it holds the
  prefix: waiting behind its queue costs more than recomputing (prefill) or receiving (decode),
  and the first worker to cache a shared system prompt would otherwise take every request
  sharing it until it is full while the others idle. Decode holds the earlier turns of a chat in its own cache and receives only the rest
  of the KV, so a later turn goes back to it. Encode workers go by load: encode's embedding cache
  publishes no events.
  Workers started without ``--kv-events-endpoint`` publish nothing, and hold nothing in the index.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mmserve.engine.inputs import PreparedPrompt
    from mmserve.roles.prefix_index import PrefixIndex

POLICIES = ("round_robin", "least_load", "cache_aware")


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """How the router picks workers (disaggregated roles)."""

    routing_policy: str = "cache_aware"
    """round_robin, least_load, or cache_aware: prefill and decode go to the worker already holding
    the longest prefix of the prompt's KV (from the KV events the workers publish with
    --kv-events-endpoint), balanced against load"""
    cache_aware_max_load_gap: float = 0.5
    """cache_aware: a worker holding more of the prompt is chosen over the least loaded only when its
    load (requests held over capacity) exceeds that worker's by at most this"""

    def __post_init__(self):
        if self.routing_policy not in POLICIES:
            raise ValueError(f"routing_policy must be one of {', '.join(POLICIES)}, got {self.routing_policy!r}")
        if not 0 <= self.cache_aware_max_load_gap <= 1:
            raise ValueError(f"cache_aware_max_load_gap must be within [0, 1], got {self.cache_aware_max_load_gap}")


class Candidate(Protocol):
    name: str
    page_size: int

    @property
    def load(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class Choice:
    worker: Candidate
    matched_pages: int
    """Leading pages of the prompt the chosen worker held, as far as the index knows (0 but for
    cache-aware prefill and decode)."""


class WorkerChooser:
    def __init__(self, config: RoutingConfig, index: PrefixIndex | None,
                 page_keys: Callable[[PreparedPrompt, int], list[bytes]] | None):
        """``page_keys(prompt, page_size)``: the keys of the prompt's full pages (cache-aware only)."""
        self.policy = config.routing_policy
        self.max_load_gap = config.cache_aware_max_load_gap
        self._index = index
        self._page_keys = page_keys
        self._turns: dict[str, itertools.count] = {}

    def choose(self, role: str, candidates: Sequence[Candidate], prompt: PreparedPrompt | None = None) -> Choice:
        if not candidates:
            raise LookupError(f"no {role} worker is up")
        if self.policy == "round_robin":
            return Choice(self._in_turn(role, candidates), 0)
        if (self.policy == "cache_aware" and role in ("prefill", "decode") and prompt is not None
                and self._index is not None):
            return self._by_prefix(role, candidates, prompt)
        return Choice(self._in_turn(role, _least_loaded(candidates)), 0)

    def _by_prefix(self, role: str, candidates: Sequence[Candidate], prompt: PreparedPrompt) -> Choice:
        keys: dict[int, list[bytes]] = {}  # by page size: workers may differ

        def matched(worker: Candidate) -> int:
            if worker.page_size < 1:
                return 0
            if worker.page_size not in keys:
                keys[worker.page_size] = self._page_keys(prompt, worker.page_size)
            return self._index.matched_pages(worker.name, keys[worker.page_size])

        with_room = [w for w in candidates if w.load < 1] or list(candidates)
        lightest = min(w.load for w in with_room)
        near = [w for w in with_room if w.load - lightest <= self.max_load_gap]
        pages = {w.name: matched(w) for w in near}
        most = max(pages.values())
        holders = [w for w in near if pages[w.name] == most]
        return Choice(self._in_turn(role, _least_loaded(holders)), most)

    def _in_turn(self, role: str, tied: Sequence[Candidate]) -> Candidate:
        """One of ``tied``, taking each in turn from call to call (by name, so the order is stable)."""
        turn = next(self._turns.setdefault(role, itertools.count()))
        return sorted(tied, key=lambda w: w.name)[turn % len(tied)]


def _least_loaded(candidates: Sequence[Candidate]) -> list[Candidate]:
    lowest = min(w.load for w in candidates)
    return [w for w in candidates if w.load == lowest]
