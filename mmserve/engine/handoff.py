"""The engine's side of disaggregation: what lets a request cross between processes.

- A request prefilled elsewhere (decode): :meth:`Handoff.reserve` its pages before the KV moves,
  then :meth:`Handoff.admit_prefilled` with its KV rows and the first token prefill sampled.
- A finished prompt's KV kept for another process to read (prefill): :meth:`Handoff.keep_kv`,
  :meth:`Handoff.read_kept_kv` (only the tokens the reader lacks), :meth:`Handoff.release_kv`.
- A later turn added without its pictures' embeddings when the pages holding them are cached
  (prefill skipping encode): :meth:`Handoff.add_request_on_cached_pictures`, pins and all.

A mixin of :class:`~mmserve.engine.engine.LLMEngine`, kept apart so that the engine's file is its
step loop: these methods use the engine's scheduler, cache manager (``kv``), runner, request table
(``_requests``, ``_prefilled``, ``_awaiting_grammar``) and its ``_add``, ``_append``,
``_load_slots`` and ``_publish_events``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mmserve.engine.kv_rows import KVRows
from mmserve.engine.outputs import RequestOutput
from mmserve.engine.page_hash import PageKeys, prompt_page_keys
from mmserve.engine.request import Request
from mmserve.engine.scheduler import Reservation
from mmserve.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class Prefilled:
    """A request prefilled elsewhere that has not joined the batch yet: the slot of its page
    reservation, and the first token prefill sampled (token, logprob, top ids, top logprobs)."""

    slot: int
    first: tuple


class Handoff:
    def reserve(self, request_id: str, num_tokens: int, prompt_ids: list[int] | None = None,
                page_keys: PageKeys | None = None) -> Reservation | None:
        """Reserves pages (and a sampling slot) for a request that another process will prefill:
        all it may ever need, so it is never preempted (decode could not recompute it); None when
        they are short. With its prompt and page keys (:func:`prompt_page_keys` at this engine's
        page size) the pages of its longest cached prefix are shared: ``held_tokens`` of its
        prompt need not arrive."""
        reservation = self.scheduler.reserve(request_id, num_tokens, prompt_ids or (), page_keys)
        self._publish_events()  # pages it evicted
        return reservation

    def cancel_reservation(self, request_id: str, slot: int) -> None:
        self.scheduler.cancel_reservation(request_id, slot)
        self._publish_events()

    def admit_prefilled(self, request: Request, reservation: Reservation, kv: Sequence[KVRows],
                        first: tuple) -> RequestOutput | None:
        """Takes a request prefilled elsewhere (``num_computed`` = its prompt, no output yet) into
        its reservation: its KV rows (the prompt's tokens past the ``held_tokens`` the reservation
        found cached, in runs laid end to end) go into its pages, which join the prefix cache when
        the request has page keys, and the first token prefill sampled, ``first`` = (token,
        logprob, top ids, top logprobs), is appended and checked like any other.

        A request with ``structured_output`` first waits for its grammar, like a new one (its
        reservation held, the step loop free), and takes its first token in a later :meth:`step`,
        whose outputs include it: this returns None. Submit its grammar (``grammars.submit``) when
        the request arrives, and it compiles while the KV is in flight.

        The reservation is the engine's from here on: rows it refuses, or a write that fails,
        give it back before the error is raised (the caller has nothing left to cancel)."""
        if request.request_id in self._requests:  # its pages are that request's: nothing to give back
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        self._prefilled[request.request_id] = Prefilled(reservation.slot, first)
        try:
            covered = reservation.held_tokens
            for rows in kv:
                if rows.start != covered:
                    raise ValueError(f"KV rows from token {rows.start} where token {covered} comes next")
                covered += rows.count
            if covered != request.num_computed:
                raise ValueError(f"KV rows end at token {covered}, the prompt at {request.num_computed}")
            table = self.kv.page_table(request.request_id)
            for rows in kv:
                self.runner.write_kv(table, rows.k, rows.v, rows.start, rows.count)
        except BaseException:
            self.abort(request.request_id)  # a prefilled request's abort cancels its reservation
            self._publish_events()
            raise
        self.scheduler.cache_computed(request)
        self._publish_events()  # the pages it stored
        if request.params.structured_output is not None:
            request.grammar = self.grammars.state(request.params.structured_output)
            self._awaiting_grammar[request.request_id] = request
            return None
        return self._take_prefilled(request)

    def _take_prefilled(self, request: Request) -> RequestOutput:
        """Puts a prefilled request into the batch with its first token (its matcher, if any, takes it)."""
        prefilled = self._prefilled.pop(request.request_id)
        self.scheduler.add_reserved(request, prefilled.slot)
        self._append(request, prefilled.first)
        self._load_slots([request])
        output = RequestOutput.of(request)
        if request.finish is not None:
            self.scheduler.finish(request)
            del self._requests[request.request_id]
        return output

    def keep_kv(self, request_id: str) -> None:
        """Called from ``on_finish``: the finishing request's pages, and the KV in them, stay as
        they are after it ends, until :meth:`release_kv`. Prefill keeps a finished prompt's KV
        so until decode says which of its tokens it holds, and then reads only the rest
        (:meth:`read_kept_kv`), straight from the pages."""
        self.kv.share(request_id, _kept(request_id))

    @property
    def short_of_pages(self) -> bool:
        """The last step left a prompt waiting for want of free pages: pages kept by
        :meth:`keep_kv` are wanted back (those of sequences running free themselves)."""
        return self.scheduler.short_of_pages

    def read_kept_kv(self, request_id: str, num_tokens: int, rows: int, start: int = 0):
        """(k, v) rows of a kept request's tokens ``start..num_tokens-1`` (as ``runner.read_kv``)."""
        return self.runner.read_kv(self.kv.page_table(_kept(request_id)), num_tokens, rows, start)

    def release_kv(self, request_id: str) -> None:
        """Lets go of a kept request's pages (none kept: nothing to do)."""
        if _kept(request_id) in self.kv:
            self.kv.free(_kept(request_id))

    def add_request_on_cached_pictures(self, prompt, params: SamplingParams, request_id: str) -> bool:
        """Adds a prompt without its pictures' embeddings when every image and video placeholder
        lies in pages this engine holds cached (a later turn about the same picture): only tokens
        past those pages are computed, so the embeddings would never be read. The pages holding
        the pictures are pinned until the request ends, so that even a preempted request finds
        them again (it goes first among waiting requests: its pins shrink the pool). False,
        and nothing added, when the cache does not cover every picture (or caching is off)."""
        prepared, params, request_id = self._check_new(prompt, params, request_id)
        if not self.config.enable_prefix_caching:
            return False
        page_keys = prompt_page_keys(prepared, self.model, self.config.page_size)
        if not page_keys.visuals:
            return False
        ids, size = prepared.token_ids, self.config.page_size
        cached = self.scheduler.cached_prefix(page_keys, len(ids), lambda start, end: ids[start:end])
        pictures = -(-max(v.end for v in page_keys.visuals) // size)  # pages up to the last picture's end
        if len(cached) < pictures or not self._pins_leave_room(request_id, len(ids) + params.max_tokens,
                                                               cached[:pictures]):
            return False
        self.kv.allocate(_pin(request_id), pictures * size, cached[:pictures])
        try:
            self._add(prepared, params, request_id, None, page_keys).pinned = True
        except Exception:
            self._unpin(request_id)
            raise
        return True

    def _pins_leave_room(self, request_id: str, num_tokens: int, pins: list[int]) -> bool:
        """Whether every request on pinned pages, this new one of ``num_tokens`` tokens at most
        included, could still take all the pages it needs while the others' pins stay held. Pins
        are not given up for a request that waits (it has no embeddings to compute its pictures
        from), so two waiting requests whose pins each left the other too little room would wait
        for good, and every request queued behind them too (pinned ones go first). When they
        would, the new one is not pinned: its pictures come from encode, as for a first turn."""
        pinned = {other.request_id: (other.num_tokens + other.params.max_tokens - len(other.output_ids),
                                     set(self.kv.page_table(_pin(other.request_id))))
                  for other in self._requests.values() if other.pinned}
        pinned[request_id] = (num_tokens, set(pins))
        for name, (tokens, own) in pinned.items():
            others = set().union(*(held for other, (_, held) in pinned.items() if other != name)) - own
            pages = -(-min(tokens, self.max_sequence_tokens) // self.config.page_size)
            if pages + len(others) > self.kv.num_reservable_pages:
                return False
        return True

    def _unpin(self, request_id: str) -> None:
        """Lets go of the cached pages pinned for a request added on cached pictures, if any."""
        if _pin(request_id) in self.kv:
            self.kv.free(_pin(request_id))


def _pin(request_id: str) -> tuple[str, str]:
    """The cache manager's sequence holding the pages pinned for a request (never a request id: a tuple)."""
    return ("pinned", request_id)


def _kept(request_id: str) -> tuple[str, str]:
    """The cache manager's sequence holding a finished request's pages for :meth:`LLMEngine.keep_kv`."""
    return ("kept", request_id)
