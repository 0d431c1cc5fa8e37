"""Structured output in the engine's steps: requests waiting for their grammar, each step's token
bitmask, and each emitted token advancing its request's matcher.

A request with ``structured_output`` waits outside the scheduler until its grammar is compiled (in
:class:`~mmserve.structured_output.grammars.Grammars`' thread); a request prefilled elsewhere joins
with its first token once its grammar is. A mixin of :class:`~mmserve.engine.engine.LLMEngine`,
kept apart so that the engine's file is its step loop: these methods use the engine's model,
scheduler, request tables (``_requests``, ``_awaiting_grammar``, ``_prefilled``), ``_grammars``,
``eos_token_ids``, ``_failure``, ``abort`` and ``_take_prefilled``.
"""

from __future__ import annotations

import concurrent.futures
import logging

import numpy as np

from mmserve.engine.outputs import RequestOutput
from mmserve.engine.request import Request
from mmserve.engine.step_failed import StepFailed
from mmserve.sampler import all_allowed_bitmask
from mmserve.stop import Finish, FinishReason
from mmserve.structured_output.matcher import empty_rows, fill_bitmask

log = logging.getLogger(__name__)

GRAMMAR_WAIT_S = 0.05
"""How long a step with nothing to run but requests awaiting their grammar waits for one to compile."""


class GrammarDeadEnd(ValueError):
    """A request's grammar allows no next token."""


class GrammarSteps:
    @property
    def grammars(self):
        """The engine's :class:`~mmserve.structured_output.grammars.Grammars`: made with the
        engine when it compiles its programs, else on the first structured request."""
        if self._grammars is None:
            self._grammars = self._make_grammars()
        return self._grammars

    def _make_grammars(self):
        from mmserve.structured_output.grammars import Grammars

        return Grammars(self.model.tokenizer, self.model.config.text.vocab_size, self.eos_token_ids)

    def _schedule_compiled(self) -> list[RequestOutput]:
        """Hands the requests whose grammar has compiled to the scheduler, in arrival order; a
        prefilled one joins the batch with its first token, and its output is returned. With
        nothing else to run, waits a little for a grammar rather than spin."""
        if not self.scheduler.has_work():
            concurrent.futures.wait([r.grammar.compiled for r in self._awaiting_grammar.values()],
                                    GRAMMAR_WAIT_S, concurrent.futures.FIRST_COMPLETED)
        ready = [r for r in self._awaiting_grammar.values() if r.grammar.ready]
        outputs, failed, cause = [], [], None
        for request in ready:
            del self._awaiting_grammar[request.request_id]
            if request.grammar.compiled.exception() is None and request.request_id not in self._prefilled:
                self.scheduler.add(request)
                continue
            try:  # a grammar that did not compile fails its own request here, not the step it would join
                request.grammar.compiled.result()
                outputs.append(self._take_prefilled(request))
            except Exception as error:
                self.abort(request.request_id)
                failed.append(request.request_id)
                cause = error
        if failed:
            self._failure = StepFailed(failed, cause)
            self._failure.__cause__ = cause
        return outputs

    def _bitmask(self, samplers: list[Request | None]) -> tuple[np.ndarray | None, list[str]]:
        """The step's token mask, and the requests whose grammar allows no next token (a pattern
        no character matches: the output cannot be completed), whose rows allow every token.
        Filled while the forward just dispatched runs on device: the mask costs the step only what
        the host takes beyond the forward, plus its copy to the device."""
        vocab_size = self.model.config.text.vocab_size
        bitmask = fill_bitmask([r.grammar if r is not None else None for r in samplers], len(samplers), vocab_size)
        short = [(i, r) for i, r in enumerate(samplers) if r is not None and len(r.output_ids) < r.params.min_tokens]
        if short:  # min_tokens: no stop token yet (a row's output counts the token not read yet too)
            bitmask = all_allowed_bitmask(len(samplers), vocab_size) if bitmask is None else bitmask
            words = bitmask.view(np.uint32)
            for row, request in short:
                grammar_row = words[row].copy() if request.grammar is not None else None
                for token in request.params.stop_ids_held(self.eos_token_ids):
                    if token < vocab_size:
                        words[row, token >> 5] &= ~np.uint32(1 << (token & 31))
                if grammar_row is not None and empty_rows(bitmask, [row], vocab_size):
                    words[row] = grammar_row  # a complete grammar still ends it (SamplingParams.min_tokens)
        if bitmask is None:
            return None, []
        dead = empty_rows(bitmask, [i for i, r in enumerate(samplers) if r is not None and r.grammar is not None],
                          vocab_size)
        bitmask[dead] = -1
        return bitmask, [samplers[row].request_id for row in dead]

    def _drop_dead_ends(self, request_ids: list[str]) -> None:
        """Lets go of the requests whose grammar allowed no next token, once their sample is
        dispatched (their rows' samples are dropped with them): they fail at the next step, as a
        grammar that did not compile does. (They drew a forbidden token and ended with ``stop``,
        their output cut short of what the client asked.)"""
        if not request_ids:
            return
        for request_id in request_ids:
            self.abort(request_id)
        cause = GrammarDeadEnd("the output so far leaves its grammar no next token: the schema, pattern or "
                               "tool format cannot be completed")
        earlier = self._failure.request_ids if self._failure is not None else []
        self._failure = StepFailed(earlier + request_ids, cause)
        self._failure.__cause__ = cause

    def _advance_grammar(self, request: Request, token: int, new_chars: int) -> None:
        """The matcher takes the emitted token; a complete grammar stops the request (even with
        ignore_eos; a stop token adds no text). A token the grammar refuses can only come from a
        stop the request set itself (a stop token id), which ends it anyway."""
        if not request.grammar.accept(token):
            if request.finish is None:
                log.warning("request %s: token %d breaks its grammar; stopping it", request.request_id, token)
                request.finish = Finish(FinishReason.STOP, request.text[:len(request.text) - new_chars], None)
        elif request.finish is None and request.grammar.terminated:
            request.finish = Finish(FinishReason.STOP, request.text, None)
        if request.finish is not None:
            request.grammar = None
