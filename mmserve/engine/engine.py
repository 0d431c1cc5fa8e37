"""The engine loop: admit requests, run scheduled steps, sample, detokenize, finish.

``add_request`` validates everything before anything is allocated, so a bad request raises a
``ValueError`` and leaves the engine exactly as it was.

A request with ``structured_output`` waits outside the scheduler until its grammar is compiled;
each step its rows' token bitmask is filled on the host while the model's forward runs on device,
and each token it emits advances its matcher (:mod:`mmserve.engine.grammar_steps`). A request
prefilled elsewhere (``admit_prefilled``, :mod:`mmserve.engine.handoff`) with a grammar waits the
same way, holding its page reservation, and takes the first token prefill sampled once the
grammar is compiled: its matcher takes that token before the request samples its next one.

Decode steps overlap (``EngineConfig.async_scheduling``): :mod:`mmserve.engine.overlapped_decode`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.compile_stats import compile_count
from mmserve.engine.config import EngineConfig
from mmserve.engine.encoder import Encoder
from mmserve.engine.grammar_steps import GrammarSteps
from mmserve.engine.handoff import Handoff, Prefilled
from mmserve.engine.inputs import PreparedPrompt, Visual, prepare_prompt
from mmserve.engine.outputs import RequestOutput
from mmserve.engine.overlapped_decode import InFlight, OverlappedDecode
from mmserve.engine.page_hash import PageKeys, prompt_page_keys
from mmserve.engine.rejected import RequestRejected
from mmserve.engine.request import Request, TokenLogprobs
from mmserve.engine.runner import ModelRunner
from mmserve.engine.visual_rows import PromptVisuals, VisualRows
from mmserve.engine.scheduler import Scheduler, Step
from mmserve.engine.step_failed import StepFailed
from mmserve.engine.warmup import compile_programs
from mmserve.kv_cache_manager import KVCacheManager
from mmserve.kv_events import KVEventPublisher
from mmserve.sampling_params import SamplingParams
from mmserve.stop import Finish, FinishReason, check_stop
from mmserve.structured_output import AVAILABLE as STRUCTURED_OUTPUT_AVAILABLE
from models.qwen3_vl_moe import Model
from models.qwen3_vl_moe.rope_index import get_rope_index
from models.qwen3_vl_moe.token_count import TooManyTokens


log = logging.getLogger(__name__)


ALL_PROGRAMS = frozenset({"vision", "prefill", "decode"})


class LLMEngine(Handoff, OverlappedDecode, GrammarSteps):
    def __init__(self, model: Model, config: EngineConfig | None = None,
                 on_finish: Callable[[Request, list[int]], None] | None = None, layout: MeshLayout | None = None,
                 lockstep: Lockstep | None = None, programs: frozenset[str] = ALL_PROGRAMS,
                 kv_events: KVEventPublisher | None = None, arriving_rows: Sequence[int] = (),
                 kv_read_rows: Sequence[int] = ()):
        """on_finish(request, page_table) runs when a request finishes, before its pages are freed
        (prefill uses it to ship the request's KV to decode). On a role spanning several processes
        the ``lockstep`` carries the leader's device calls to the others (see
        :mod:`mmserve.distributed.lockstep`). ``programs``: what this engine runs, and so compiles
        at start with ``config.precompile``: "vision", "prefill", "decode", "kv_read" (a prefill
        worker's reads of finished prompts' KV, in ``kv_read_rows`` rows: the row counts its
        transfer offers them in), "kv_write" (a decode worker's writes of arriving KV).
        ``kv_events``: where the prefix cache's stored and evicted pages are published after each
        step (:mod:`mmserve.kv_events`). ``arriving_rows``: the row counts of the arrays a transfer
        brings this engine rows in (visual rows to a prefill worker, KV rows to a decode worker),
        whose programs are compiled with the rest."""
        self.model = model
        self._arriving_rows = tuple(arriving_rows)
        self._kv_read_rows = tuple(kv_read_rows)
        self.config = config or EngineConfig()
        self.config.check_model(model.config)
        self.runner = ModelRunner(model, self.config, layout, lockstep)
        self.kv = KVCacheManager(self.runner.num_pages, self.config.page_size)
        cache_tokens = (self.runner.num_pages - 1) * self.config.page_size  # page 0 is scratch
        self.max_sequence_tokens = min(self.config.max_model_len, cache_tokens)
        """Where a sequence stops (``length``): the context, or the whole cache when that holds less.
        A sequence that outgrew the cache could never run again once preempted, and every request
        behind it would wait for good."""
        if cache_tokens < self.config.max_model_len:
            log.warning("the KV cache holds %d tokens, fewer than max_model_len %d: sequences stop there (give it "
                        "more memory with --kv-cache-bytes or --num-pages)", cache_tokens, self.config.max_model_len)
        self.scheduler = Scheduler(self.config, self.kv, self.runner.grid, decodes="decode" in programs)
        self.kv_events = kv_events
        if kv_events is not None:
            self.kv.record_events()
        self.encoder = Encoder(model, self.config, layout, self.runner.lockstep)
        self._programs = programs
        self.runner.lockstep.bind("engine", self)
        self.eos_token_ids = set(model.config.eos_token_ids) | set(model.tokenizer.eos_token_ids)
        self._grammars = None
        warm = self.config.precompile and self.runner.lockstep.is_leader  # followers compile when this call reaches them
        importing = None
        if warm and STRUCTURED_OUTPUT_AVAILABLE:
            # Importing xgrammar takes ~3 s (it imports torch): done on the first structured request,
            # it stalled every request of the loop that took it. Here it runs beside the compile.
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-import")
            importing = pool.submit(self._make_grammars)
            pool.shutdown(wait=False)  # its one task still runs
        if warm:
            self.runner.lockstep.call_and_wait(self.run_compile)
        if importing is not None:
            try:
                self._grammars = importing.result()
            except Exception:  # the engine serves the rest; a structured request tries again
                log.exception("the grammar library did not load")
        self._requests: dict[str, Request] = {}
        self._awaiting_grammar: dict[str, Request] = {}  # by id, in arrival order
        self._prefilled: dict[str, Prefilled] = {}  # not in the batch yet: abort frees their reservation
        self._failure: StepFailed | None = None  # for the next step: requests whose grammar failed
        self._in_flight: InFlight | None = None
        self.decode_steps = 0
        self.overlapped_steps = 0
        """Decode steps dispatched, and those of them dispatched on the ids of a step not read yet."""
        self._overlapping = self.config.async_scheduling
        self._ids = itertools.count()
        self._on_finish = on_finish

    def run_compile(self) -> None:
        """Compiles every program this engine runs; through the lockstep every process of a
        multi-host role compiles at the same time, so none waits in a collective for another."""
        vision = self.encoder.programs() if "vision" in self._programs else []
        sources = list(self._arriving_rows) + (self.encoder.output_rows() if "vision" in self._programs else [])
        arriving = self.runner.arrival_programs(self._programs, sources)
        compile_programs(self.runner.programs(self._programs, self._kv_read_rows) + vision + arriving, "engine")

    def prepare(self, prompt) -> PreparedPrompt:
        try:
            return prepare_prompt(prompt, self.model, max_tokens=self.config.max_model_len - 1)
        except TooManyTokens as error:
            raise RequestRejected(self._too_long(error.how_many)) from None

    def _too_long(self, prompt_tokens: str) -> str:
        return (f"the prompt has {prompt_tokens} tokens; the context holds {self.config.max_model_len} "
                "(prompt plus at least one generated token)")

    def encode_prompts(self, prompts: list[PreparedPrompt]) -> list[dict[str, list[VisualRows]]]:
        """The visual rows of several prompts, their images and videos encoded together (as few
        vision calls as the patch buckets allow): ``features`` for :meth:`add_request`."""
        visuals = [v for p in prompts for v in p.images + p.videos]
        encoded = iter(self.encoder.encode_many(visuals))
        return [{"image": [next(encoded) for _ in p.images], "video": [next(encoded) for _ in p.videos]}
                for p in prompts]

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None,
                    features: dict[str, list[VisualRows]] | None = None, rows_arriving: bool = False) -> str:
        """features: {"image"|"video": rows of each picture, in prompt order} already encoded
        elsewhere (the encode role); without them the prompt's pixels are encoded here.
        ``rows_arriving``: the features are the first rows of each kind only, and the rest
        follow (:meth:`rows_arrived`); the prompt is prefilled up to its first visual token
        without a row meanwhile."""
        prepared, params, request_id = self._check_new(prompt, params, request_id)
        if features is None:
            features = self.encode_prompts([prepared])[0]
        visual = self._place(prepared.token_ids, features, partial=rows_arriving)
        page_keys = prompt_page_keys(prepared, self.model, self.config.page_size) if self.config.enable_prefix_caching \
            else None
        self._add(prepared, params, request_id, visual, page_keys)
        return request_id

    def rows_arrived(self, request_id: str, features: dict[str, list[VisualRows]], complete: bool) -> None:
        """More of the visual rows of a request added with ``rows_arriving``: ``features`` are all
        that arrived so far (the earlier rows first, unchanged), every row when ``complete``."""
        request = self._requests[request_id]
        request.visual = self._place(request.prompt_ids, features, partial=not complete)

    def _place(self, token_ids, features: dict[str, list[VisualRows]], partial: bool) -> PromptVisuals | None:
        c = self.model.config
        return PromptVisuals.place(token_ids, c.image_token_id, c.video_token_id, features.get("image", ()),
                                   features.get("video", ()), partial=partial)

    def _check_new(self, prompt, params: SamplingParams,
                   request_id: str | None) -> tuple[PreparedPrompt, SamplingParams, str]:
        """The prompt prepared, the params with ``max_tokens=None`` made the room the context
        leaves, and the request's id."""
        prepared = prompt if isinstance(prompt, PreparedPrompt) else self.prepare(prompt)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_fits(len(prepared.token_ids), params)
        if params.n != 1:
            raise ValueError(f"an engine request is one sequence, got n={params.n}: add each of the n with "
                             "params.sibling(i), as LLM.generate and the router do")
        if params.structured_output is not None:
            params.structured_output.check()
        if params.max_tokens is None:
            room = self.max_sequence_tokens - len(prepared.token_ids)
            params = dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
        return prepared, params, request_id

    def _add(self, prepared: PreparedPrompt, params: SamplingParams, request_id: str, visual,
             page_keys: PageKeys | None) -> Request:
        ids = prepared.token_ids
        positions, delta = get_rope_index(ids, self.model.config, _grids(prepared.images), _grids(prepared.videos))
        request = Request(request_id, list(ids), params, positions, delta, visual, page_keys=page_keys)
        self._requests[request_id] = request
        if params.structured_output is not None:
            request.grammar = self.grammars.state(params.structured_output)
            self._awaiting_grammar[request_id] = request
        else:
            self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self._awaiting_grammar.pop(request_id, None)
        prefilled = self._prefilled.pop(request_id, None)
        if prefilled is not None:
            self.scheduler.cancel_reservation(request_id, prefilled.slot)
        else:
            self.scheduler.finish(request)
        self._unpin(request_id)
        request.grammar = None
        self._forget_dead_in_flight()

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_work() or bool(self._awaiting_grammar) or self._failure is not None
                or self._in_flight is not None)

    def has_runnable(self) -> bool:
        """A step would do something now: not every request waits for visual rows."""
        return (self.scheduler.has_runnable() or bool(self._awaiting_grammar) or self._failure is not None
                or self._in_flight is not None)

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns the requests that produced a token in it.

        Prefilled requests joining with their first token (their grammar compiled meanwhile) are
        returned without a model step: a step that failed would lose their outputs, and a
        request whose first token was streamed must not stream it again. A request whose grammar
        failed raises ``StepFailed`` then, or at the next call when others joined with it."""
        outputs = self._schedule_compiled() if self._awaiting_grammar and self._failure is None else []
        if outputs:
            self._publish_events()
            return outputs
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if self._in_flight is not None:
            return self._read_in_flight()
        step = self.scheduler.schedule()
        if step is None:
            self._publish_events()
            return outputs
        try:
            if step.decode:
                self._in_flight = self._dispatch_decode(step.decode)
            else:
                sampled = self._prefill(step)
        except Exception as error:
            self._fail([ch.request.request_id for ch in step.prefill] + [r.request_id for r in step.decode], error)
        if step.decode:
            return self._read_in_flight()
        try:  # a row that raises (its finish hook, say) fails with the rest, not the rows before it
            for request, row in sampled:
                self._append(request, row)
                output = RequestOutput.of(request)
                if request.finish is not None:
                    self._finished(request)
                outputs.append(output)
        except Exception as error:
            self._fail([r.request_id for r, _ in sampled[len(outputs):]], error, outputs)
        self._publish_events()
        return outputs

    def _fail(self, request_ids: list[str], error: Exception, outputs: list[RequestOutput] | None = None):
        for request_id in request_ids:
            self.abort(request_id)
        self._publish_events()  # what the step cached and evicted before it failed
        raise StepFailed(request_ids, error, outputs) from error

    def _finished(self, request: Request) -> None:
        """Ends a request that finished; its pages and slot are let go even when the finish hook raises."""
        try:
            if self._on_finish is not None:
                self._on_finish(request, self.kv.page_table(request.request_id))
        finally:
            self.scheduler.finish(request)
            self._unpin(request.request_id)
            del self._requests[request.request_id]

    def _publish_events(self) -> None:
        """Publishes what the prefix cache stored and evicted since the last call: after each step,
        and after each call that changes the cache outside one (a decode worker's reservations and
        arrivals), which would otherwise wait, unpublished, for a step that schedules something."""
        if self.kv_events is not None:
            self.kv_events.publish(self.kv.take_events())

    def stats(self) -> dict:
        return {
            "compiles": compile_count(),
            "free_pages": self.kv.num_free_pages,
            "total_pages": self.runner.num_pages - 1,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "embedding_cache_hits": self.encoder.cache.hits,
            "embedding_cache_bytes": self.encoder.cache.bytes,
            "embedding_cache_misses": self.encoder.cache.misses,
            "prefix_cache_queries": self.scheduler.prefix_cache_queries,
            "prefix_cache_hits": self.scheduler.prefix_cache_hits,
            "cached_pages": self.kv.num_cached_pages,
            "decode_steps": self.decode_steps,
            "overlapped_decode_steps": self.overlapped_steps,
        }

    def _prefill(self, step: Step) -> list[tuple[Request, tuple]]:
        """Runs the model over a prefill step and samples; returns (request, sampled row) pairs."""
        self._load_slots(ch.request for ch in step.prefill)
        tables = [self.kv.page_table(ch.request.request_id) for ch in step.prefill]
        self.runner.prefill(step.prefill, tables)
        for chunk in step.prefill:
            chunk.request.num_computed += chunk.length
            self.scheduler.cache_computed(chunk.request)
        samplers = [ch.request if ch.completes else None for ch in step.prefill]
        if not any(samplers):
            return []
        bitmask, dead = self._bitmask(samplers)
        out = self.runner.sample(samplers, bitmask)
        self._drop_dead_ends(dead)
        return [(r, out.row(i)) for i, r in enumerate(samplers) if r is not None and r.request_id not in dead]

    def _load_slots(self, requests) -> None:
        """Loads the sampling slot of each request admitted into a slot since its last step."""
        for request in requests:
            if not request.slot_loaded:
                self.runner.load_slot(request)
                request.slot_loaded = True

    def _append(self, request: Request, row: tuple, placeholder: bool = False) -> None:
        """Appends a sampled token (in the place of its ``PLACEHOLDER`` when ``placeholder``),
        detokenizes it and checks whether the request stops."""
        token, logprob, top_ids, top_logprobs = row
        if placeholder:
            request.output_ids[-1] = int(token)
        else:
            request.output_ids.append(int(token))
        k = request.params.logprobs
        if k is not None:
            top = {int(t): float(lp) for t, lp in zip(top_ids[:k], top_logprobs[:k])}
            request.logprobs.append(TokenLogprobs(int(token), float(logprob), top))
        if request.text_stream is None:
            request.text_stream = self.model.tokenizer.text_stream()
        new_text = request.text_stream.step(token)
        request.text += new_text
        request.finish = check_stop(request.params, self.eos_token_ids, request.output_ids, request.text,
                                    len(new_text))
        if request.grammar is not None:
            self._advance_grammar(request, int(token), len(new_text))
        if request.finish is None and request.num_tokens >= self.max_sequence_tokens:
            request.finish = Finish(FinishReason.LENGTH, request.text, None)

    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        if prompt_len >= self.config.max_model_len:
            raise RequestRejected(self._too_long(str(prompt_len)))
        pages = -(-(prompt_len + 1) // self.config.page_size)
        if pages > self.runner.num_pages - 1:
            raise RequestRejected(f"the prompt needs {pages} KV pages; the cache has {self.runner.num_pages - 1}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        vocab = self.model.config.text.vocab_size
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:
            raise RequestRejected(f"logit_bias names token {params.logit_bias[-1][0]}, outside the model's "
                                  f"vocabulary (size {vocab})")


def _grids(visuals: list[Visual]):
    return np.concatenate([v.grid_thw for v in visuals]) if visuals else None
