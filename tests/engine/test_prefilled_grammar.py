"""Structured output across the prefill/decode split, on the engine: one engine prefills a prompt
(its first token sampled under the grammar) and hands its KV to ``admit_prefilled`` as decode's
would; decode's matcher must take that first token before the request samples on, so the output
is the colocated engine's, token for token. An abort, while the request waits for its grammar or
after it joined the batch, gives back its pages and slot and drops its grammar."""

import concurrent.futures
import dataclasses

import numpy as np
import pytest

from mmserve.engine.buckets import bucket
from mmserve.engine.engine import LLMEngine
from mmserve.engine.step_failed import StepFailed
from mmserve.engine.kv_rows import KVRows
from mmserve.engine.request import Request
from mmserve.structured_output import StructuredOutput
from test_structured_output import PROMPT, SCHEMA, assert_valid, const_schema, constrained

NO_POSITIONS = np.zeros((3, 0), np.int32)  # decode has no prompt positions: its tokens follow the prompt


class SplitEngine:
    """One engine playing prefill (``prefill``: the first token and the prompt's KV rows, read as
    the prefill role reads them) and decode (``admit``: a reservation, then ``admit_prefilled``)."""

    def __init__(self, llm):
        self.shipped = {}  # by request id: (request, k rows, v rows) of every request that finished
        self.engine = LLMEngine(llm.model, dataclasses.replace(llm.engine.config, precompile=False),
                                on_finish=self._ship)

    def _ship(self, request, page_table):
        rows = self.engine.runner.read_kv(page_table, request.num_computed, bucket(request.num_computed, 16))
        self.shipped[request.request_id] = (request, *rows)

    def prefill(self, request_id, params):
        self.engine.add_request(PROMPT, dataclasses.replace(params, max_tokens=1), request_id)
        while request_id not in self.shipped:
            self.engine.step()
        return self.shipped.pop(request_id)

    def admit(self, request_id, params):
        """The prefilled request admitted on the decode side; None: it waits for its grammar."""
        prefilled, k, v = self.prefill(f"{request_id}-prefill", params)
        prompt = prefilled.prompt_ids
        reservation = self.engine.reserve(request_id, len(prompt) + params.max_tokens)
        request = Request(request_id, list(prompt), params, NO_POSITIONS, prefilled.rope_delta, None,
                          num_computed=len(prompt))
        first = (prefilled.output_ids[0], None, None, None)
        return request, self.engine.admit_prefilled(request, reservation, [KVRows(k, v, 0, len(prompt))], first)

    def run(self, request_id):
        while True:
            for output in self.engine.step():
                if output.request_id == request_id and output.finished:
                    return output.outputs[0]

    def assert_nothing_held(self):
        engine = self.engine
        assert not engine.has_unfinished()
        assert engine.kv.num_free_pages == engine.runner.num_pages - 1  # cached pages nobody holds count
        slots = [engine.reserve(f"slot-{i}", 1) for i in range(engine.config.max_num_seqs)]
        assert None not in slots, "a slot was not given back"
        for i, reservation in enumerate(slots):
            engine.cancel_reservation(f"slot-{i}", reservation.slot)


@pytest.fixture(scope="module")
def split(llm):
    return SplitEngine(llm)


@pytest.mark.parametrize("schema", [const_schema("yes"), SCHEMA], ids=["const", "schema"])
def test_prefilled_request_continues_its_grammar_as_colocated(llm, split, schema):
    params = constrained(schema)
    request, output = split.admit("continues", params)
    assert output is None  # it waits for its grammar before it takes its first token
    got = split.run(request.request_id)
    want = llm.generate(PROMPT, params)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    assert_valid(got, schema)
    if schema == const_schema("yes"):
        assert got.text == '{"answer":"yes"}'
    split.assert_nothing_held()


def test_abort_frees_a_prefilled_request_awaiting_or_following_its_grammar(split):
    waiting, output = split.admit("aborted-waiting", constrained(const_schema("wait")))
    assert output is None
    split.engine.abort(waiting.request_id)
    assert waiting.grammar is None
    split.assert_nothing_held()

    running, _ = split.admit("aborted-running", constrained())
    while not any(o.request_id == running.request_id for o in split.engine.step()):
        pass
    assert running.grammar is not None and len(running.output_ids) >= 1
    split.engine.abort(running.request_id)
    assert running.grammar is None
    split.assert_nothing_held()


def test_a_grammar_that_fails_loses_no_first_token_of_a_request_joining_beside_it(split, monkeypatch):
    """Two prefilled requests whose grammars are done at once, the second's compile failed: the
    first joined the batch with its first token, then the second's failure was raised and took
    the first's output with it, so decode never passed over that token and streamed it again."""
    grammars, compile_ = split.engine.grammars, split.engine.grammars._compile
    broken = StructuredOutput.from_schema(const_schema("broken"))

    def failing(spec):
        if spec == broken:
            raise RuntimeError("the grammar compiler failed")
        return compile_(spec)

    monkeypatch.setattr(grammars, "_compile", failing)
    joins = constrained(const_schema("joins"))
    shipped = [split.prefill(f"{name}-prefill", joins) for name in ("joins", "fails")]  # both before either joins
    request, failed = (admitted(split, name, params, *rows) for name, params, rows in
                       (("joins", joins, shipped[0]), ("fails", dataclasses.replace(joins, structured_output=broken),
                                                       shipped[1])))
    concurrent.futures.wait([request.grammar.compiled, failed.grammar.compiled])
    outputs = split.engine.step()
    assert [o.request_id for o in outputs] == ["joins"] and outputs[0].outputs[0].token_ids == request.output_ids[:1]
    with pytest.raises(StepFailed) as raised:
        split.engine.step()
    assert raised.value.request_ids == ["fails"]
    got = split.run("joins")
    assert got.token_ids == llm_answer(split, joins)
    split.assert_nothing_held()


def llm_answer(split, params):
    engine = LLMEngine(split.engine.model, dataclasses.replace(split.engine.config, precompile=False))
    engine.add_request(PROMPT, params, "reference")
    while True:
        for output in engine.step():
            if output.finished:
                return output.outputs[0].token_ids


def admitted(split, request_id, params, prefilled, k, v) -> Request:
    """A prefilled request admitted on the decode side; it waits for its grammar."""
    prompt = prefilled.prompt_ids
    reservation = split.engine.reserve(request_id, len(prompt) + params.max_tokens)
    request = Request(request_id, list(prompt), params, NO_POSITIONS, prefilled.rope_delta, None,
                      num_computed=len(prompt))
    first = (prefilled.output_ids[0], None, None, None)
    assert split.engine.admit_prefilled(request, reservation, [KVRows(k, v, 0, len(prompt))], first) is None
    return request
