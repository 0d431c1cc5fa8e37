"""Overlapped decode steps (``async_scheduling``, on by default) give what steps run in turn give, token
for token, and free what they would: requests stopping mid-batch on a token or a string (whose rows
of the step already dispatched are dropped), seeds, penalties, logprobs, a request aborted while its
step is in flight, one joining while a step is. The engine running steps in turn is the one
``test_generate_vs_transformers.py`` holds to transformers."""

import pytest

from mmserve import LLM, SamplingParams
from test_batching import mixed_prompts

SETTINGS = dict(num_pages=512, page_size=8, max_model_len=512, max_prefill_tokens=128, precompile=False)


@pytest.fixture(scope="module")
def in_turn(reference):
    return LLM(reference[1], async_scheduling=False, **SETTINGS)


@pytest.fixture
def overlapped_dispatches(llm, monkeypatch):
    """How many decode steps ``llm`` dispatched on the tokens of a step not read yet."""
    runner, calls = llm.engine.runner, []
    decode = runner.decode

    def counting(requests, page_tables, follows_sample=False):
        calls.append(follows_sample)
        return decode(requests, page_tables, follows_sample)

    monkeypatch.setattr(runner, "decode", counting)
    return calls


def _answers(outputs):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
             [(lp.token_id, round(lp.logprob, 5), sorted(lp.top)) for lp in o.outputs[0].logprobs or []])
            for o in outputs]


def test_requests_stopping_mid_batch_and_every_kind_of_row_equal_steps_in_turn(llm, in_turn, overlapped_dispatches):
    prompts = mixed_prompts(6, seed=5)
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seen = [o.outputs[0] for o in in_turn.generate(prompts, free)]
    ids = seen[0].token_ids
    stop_at = next(i for i in range(4, len(ids)) if ids[i] not in ids[:i])  # a token it first samples mid-way
    params = [
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ids[stop_at]], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, stop=[seen[1].text[8:12]], ignore_eos=True),  # a stop string
        SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=18, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, max_tokens=22, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),  # ends early: the rest no longer overlap it
    ]
    want = _answers(in_turn.generate(prompts, params))
    engine = llm.engine
    ids = [engine.add_request(prompt, sp) for prompt, sp in zip(prompts, params)]
    last = {}
    while engine.has_unfinished():
        for output in engine.step():
            assert not (output.request_id in last and last[output.request_id].finished), "an output after the last"
            last[output.request_id] = output
    assert _answers([last[i] for i in ids]) == want
    assert want[0][2] == "stop" and len(want[0][0]) == stop_at + 1 and want[1][2] == "stop"
    assert sum(overlapped_dispatches) > 10  # the overlap ran, and rows stopped under it
    assert llm.engine.kv.num_free_pages == llm.engine.runner.num_pages - 1
    assert not llm.engine.has_unfinished()


def test_a_request_aborted_while_its_step_is_in_flight_leaves_the_others_as_they_were(llm, in_turn,
                                                                                     overlapped_dispatches):
    prompts = mixed_prompts(3, seed=6)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in in_turn.generate(prompts, params)]
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] = output.outputs[0].token_ids
        if len(tokens[ids[1]]) == 5 and overlapped_dispatches and overlapped_dispatches[-1]:
            engine.abort(ids[1])  # the step computing its 6th token is in flight
    assert [tokens[ids[0]], tokens[ids[2]]] == [want[0], want[2]]
    assert tokens[ids[1]] == want[1][:5]
    assert engine.kv.num_free_pages == engine.runner.num_pages - 1


def test_a_request_joining_while_a_step_is_in_flight_gets_its_answer_alone(llm, in_turn):
    first, late = mixed_prompts(2, seed=8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [in_turn.generate(p, params)[0].outputs[0].token_ids for p in (first, late)]
    engine = llm.engine
    a = engine.add_request(first, params)
    tokens, b = {}, None
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] = output.outputs[0].token_ids
        if b is None and len(tokens.get(a, ())) == 4:
            b = engine.add_request(late, params)
    assert [tokens[a], tokens[b]] == want
    assert engine.kv.num_free_pages == engine.runner.num_pages - 1


def test_a_request_stopping_on_a_token_under_an_overlapped_step_leaves_nothing_unfinished(llm, in_turn):
    """Its row of the step already dispatched is dropped, and with it the step: the engine is idle."""
    prompt = mixed_prompts(1, seed=5)[0]
    ids = in_turn.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].token_ids
    stop_at = next(i for i in range(4, len(ids)) if ids[i] not in ids[:i])
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ids[stop_at]], ignore_eos=True)
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == ids[:stop_at + 1]
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv.num_free_pages == llm.engine.runner.num_pages - 1
