"""Overlapped decode steps (``EngineConfig.async_scheduling``, vLLM's async scheduling).

While a decode step's tokens are still being computed, the next step of the same requests is
dispatched on them, read from the device (each request holds a placeholder for its unread token,
so its page room and sampling counts are those of the next step), then the first step's tokens are
read, replace the placeholders and are detokenized and checked while the device runs the next.
Only a step that would run the same requests anyway overlaps: nothing waiting or joining, no
grammar (its mask needs the token), none at its length limit; a request that stops on a token
(EOS, a stop string) drops its row of the step already dispatched, whose KV lands in pages it has
freed, before any later program can reuse them.

A mixin of :class:`~mmserve.engine.engine.LLMEngine`, kept apart so that the engine's file is its
step loop: these methods use the engine's scheduler, cache manager (``kv``), runner, request table
(``_requests``, ``_prefilled``, ``_awaiting_grammar``, ``_failure``), its step in flight
(``_in_flight``) and its ``_append``, ``_fail``, ``_finished``, ``_load_slots``, ``_bitmask``,
``_drop_dead_ends`` and ``_publish_events``.
"""

from __future__ import annotations

import dataclasses

from mmserve.engine.outputs import RequestOutput
from mmserve.engine.request import Request
from mmserve.sampler import SamplerOutput

PLACEHOLDER = -1
"""In a request's ``output_ids`` while its newest token is computed but not read (an overlapped step)."""


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A decode step dispatched and not read yet: its requests, in row order, and its samples on device."""

    batch: list[Request]
    out: SamplerOutput


class OverlappedDecode:
    def _dispatch_decode(self, batch: list[Request], follows_sample: bool = False) -> InFlight:
        """Dispatches a decode step and its sample, reading nothing. ``follows_sample``: on the ids
        of the step in flight, still on device (each request's newest token is a placeholder until
        they are read)."""
        self._load_slots(batch)  # a request admitted with all but its last token cached
        tables = [self.kv.page_table(r.request_id) for r in batch]
        self.runner.decode(batch, tables, follows_sample)
        self.decode_steps += 1
        self.overlapped_steps += follows_sample
        for request in batch:
            request.num_computed += 1
            if not follows_sample:  # else its newest page is keyed once its token is read
                self.scheduler.cache_computed(request)
        bitmask, dead = self._bitmask(batch)
        in_flight = InFlight(list(batch), self.runner.dispatch_sample(list(batch), bitmask))
        self._drop_dead_ends(dead)  # their rows are skipped when the step is read
        return in_flight

    def _read_in_flight(self) -> list[RequestOutput]:
        """Reads the decode step in flight, after dispatching the next one on its tokens when it
        overlaps; returns the outputs of the requests that are still there."""
        current, self._in_flight = self._in_flight, None
        try:
            if self._overlaps(current.batch):
                for request in current.batch:
                    request.output_ids.append(PLACEHOLDER)
                self._in_flight = self._dispatch_decode(current.batch, follows_sample=True)
            sampled = self.runner.read_sample(current.batch, current.out)
        except Exception as error:
            self._in_flight = None
            self._fail([r.request_id for r in current.batch if self._requests.get(r.request_id) is r], error)
        overlapped = self._in_flight is not None
        outputs = []
        request = None
        try:
            for i, request in enumerate(current.batch):
                if self._requests.get(request.request_id) is not request:
                    continue  # aborted since the step was dispatched
                self._append(request, sampled.row(i), placeholder=overlapped)
                output = RequestOutput.of(request)
                if overlapped:  # the pages the step in flight fills, keyed by real ids now (its last one too)
                    self.scheduler.cache_computed(request)
                if request.finish is not None:
                    self._finished(request)  # its row of the step in flight is dropped
                outputs.append(output)
        except Exception as error:  # no placeholder may outlive the read: what is left of the batch goes
            self._in_flight = None  # (the rows read before it are the step's outputs, a finished one's too)
            failed = [r.request_id for r in current.batch if self._requests.get(r.request_id) is r]
            if request is not None and request.request_id not in failed + [o.request_id for o in outputs]:
                failed.append(request.request_id)  # its finish hook raised: it is gone, and failed
            self._fail(failed, error, [o for o in outputs if o.request_id not in failed])
        self._forget_dead_in_flight()
        self._publish_events()
        return outputs

    def _forget_dead_in_flight(self) -> None:
        """Lets go of the step in flight once none of its requests is left (they stopped or were
        aborted): nothing reads it, and the engine has nothing unfinished. The device still runs it,
        before any later program (which takes the cache and sampling state it returns)."""
        if self._in_flight is not None and not any(self._requests.get(r.request_id) is r
                                                   for r in self._in_flight.batch):
            self._in_flight = None

    def _overlaps(self, batch: list[Request]) -> bool:
        """Whether the next step may be dispatched before ``batch``'s tokens are read: it would run
        these requests, in this order, whatever the tokens are (it takes room for them if so)."""
        running = self.scheduler.running
        if (not self._overlapping or self.scheduler.waiting or self._awaiting_grammar or self._prefilled
                or self._failure is not None or len(running) != len(batch)
                or any(a is not b for a, b in zip(running, batch))):
            return False
        for request in batch:  # the unread token must not end it by length, nor its next need a mask
            if (request.grammar is not None or len(request.output_ids) + 1 >= request.params.max_tokens
                    or request.num_tokens + 1 >= self.max_sequence_tokens):
                return False
        return self.scheduler.extend_decode(batch)
