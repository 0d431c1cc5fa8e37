"""Structured output on the tiny random model: its weights are noise, so only the grammar can
make its output valid JSON; rows without a grammar sample exactly as they would alone."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from mmserve import LLM, SamplingParams
from mmserve.sampler import all_allowed_bitmask, init_penalty_state, pack_sampling_batch, sample
from mmserve.structured_output import StructuredOutput
from test_batching import greedy, mixed_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "count", "ok"],
    "additionalProperties": False,
}
PROMPT = {"prompt_token_ids": [5, 6, 7, 8, 9, 10]}


def constrained(schema=SCHEMA, **kwargs):
    fields = {"temperature": 0.0, "max_tokens": 96} | kwargs
    return SamplingParams(structured_output=StructuredOutput.from_schema(schema), **fields)


def const_schema(value: str) -> dict:
    return {"type": "object", "properties": {"answer": {"const": value}}, "required": ["answer"],
            "additionalProperties": False}


def assert_valid(output, schema=SCHEMA):
    assert output.finish_reason == "stop", output.text
    jsonschema.validate(json.loads(output.text), schema)


def test_unconstrained_output_is_not_json(llm):
    """The premise of the tests below: without a grammar the random model writes no JSON."""
    text = llm.generate(PROMPT, greedy(40))[0].outputs[0].text
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("params", [constrained(), constrained(temperature=1.0, seed=7),
                                    constrained(temperature=0.8, seed=3, top_p=0.9, repetition_penalty=1.3,
                                                presence_penalty=0.5, frequency_penalty=0.5)],
                         ids=["greedy", "seeded", "penalties"])
def test_json_schema_output_validates(llm, params):
    assert_valid(llm.generate(PROMPT, params)[0].outputs[0])


def test_seeded_structured_output_is_reproducible(llm):
    params = constrained(temperature=1.0, seed=11)
    first, second = (llm.generate(PROMPT, params)[0].outputs[0] for _ in range(2))
    assert first.token_ids == second.token_ids


def test_const_schema_yields_exactly_the_constant(llm):
    output = llm.generate(PROMPT, constrained(const_schema("yes")))[0].outputs[0]
    assert output.text == '{"answer":"yes"}' and output.finish_reason == "stop"


def test_a_grammar_complete_before_min_tokens_still_ends_its_request():
    """Its grammar then allows only end-of-sequence, which min_tokens held back: the row allowed
    nothing, and the request failed as a grammar dead end (a 500 over HTTP). (The built-in tiny
    model: its tokenizer's end-of-sequence is the token that ends a grammar, where the test
    checkpoint's grammars end without one.)"""
    tiny = LLM("tiny", num_pages=64, page_size=8, max_model_len=256, max_prefill_tokens=64, precompile=False)
    assert not tiny.engine.grammars.terminate_without_stop_token
    output = tiny.generate(PROMPT, constrained(const_schema("yes"), min_tokens=40))[0].outputs[0]
    assert output.text == '{"answer":"yes"}' and output.finish_reason == "stop"
    assert not tiny.engine.has_unfinished()


REGEX = r"[a-z]{3}-\d{2}"
CHOICES = ["alpha", 'beta "b"', "γάμμα", "delta\\n"]
GRAMMAR = 'root ::= "(" [0-9] [0-9]? ("+" [0-9])? ")"'


@pytest.mark.parametrize("spec, matches", [
    (StructuredOutput.from_regex(REGEX), lambda text: re.fullmatch(REGEX, text)),
    (StructuredOutput.from_choice(CHOICES), lambda text: text in CHOICES),
    (StructuredOutput.from_grammar(GRAMMAR), lambda text: re.fullmatch(r"\(\d\d?(\+\d)?\)", text)),
], ids=["regex", "choice", "grammar"])
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 9}], ids=["greedy", "seeded"])
def test_regex_choice_and_grammar_outputs_match(llm, spec, matches, sampling):
    seeds = [1, 2, 3] if "seed" in sampling else [None] * 3
    params = [SamplingParams(structured_output=spec, max_tokens=40, **(sampling | {"seed": seed})) for seed in seeds]
    for output in llm.generate([PROMPT] * 3, params):
        assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
        assert matches(output.outputs[0].text), output.outputs[0].text


def test_json_object_yields_an_object(llm):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=200, structured_output=StructuredOutput.any_object())
    output = llm.generate(PROMPT, params)[0].outputs[0]
    assert output.text.startswith("{")
    if output.finish_reason == "stop":
        assert isinstance(json.loads(output.text), dict)


def test_masks_do_not_leak_between_rows(llm):
    """Unconstrained rows (greedy and seeded) beside two different grammars get exactly their
    outputs alone, and each grammar row gets its own constant."""
    crowd = mixed_prompts(5, seed=4)
    free = [greedy(8), greedy(5), SamplingParams(temperature=1.0, seed=9, max_tokens=8, ignore_eos=True),
            greedy(7), greedy(6)]
    alone = [llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(crowd, free)]
    together = llm.generate(crowd[:2] + [PROMPT] + crowd[2:] + [PROMPT],
                            free[:2] + [constrained(const_schema("alpha"))] + free[2:]
                            + [constrained(const_schema("beta"))])
    texts = [o.outputs[0].text for o in together]
    assert texts[2] == '{"answer":"alpha"}' and texts[-1] == '{"answer":"beta"}'
    assert [o.outputs[0].token_ids for o in together[:2] + together[3:-1]] == alone


def test_siblings_of_one_schema_each_follow_their_own_matcher(llm):
    """Same schema (one compiled grammar), different seeds: each output valid on its own."""
    outputs = llm.generate([PROMPT] * 4, [constrained(temperature=1.0, seed=s) for s in range(4)])
    for output in outputs:
        assert_valid(output.outputs[0])
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 1


def test_preempted_structured_requests_keep_their_outputs(llm, reference):
    prompts = mixed_prompts(6, seed=3)
    params = [greedy(24), constrained(), greedy(24), constrained(temperature=1.0, seed=2), greedy(24),
              constrained()]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    small = LLM(reference[1], num_pages=40, page_size=8, max_model_len=256, max_prefill_tokens=64,
                precompile=False)  # the grid is not what this tests: it compiles what the prompts use
    got = small.generate(prompts, params)
    assert small.engine.stats()["preemptions"] > 0
    assert [o.outputs[0].token_ids for o in got] == want
    for output in got[1::2]:
        assert_valid(output.outputs[0])


def test_abort_frees_a_request_waiting_for_or_following_its_grammar(llm):
    engine = llm.engine
    waiting = engine.add_request(PROMPT, constrained({"type": "object", "properties": {"z": {"type": "string"}}}))
    engine.abort(waiting)
    running = engine.add_request(PROMPT, constrained())
    while not any(o.request_id == running for o in engine.step()):
        pass
    engine.abort(running)
    assert not engine.has_unfinished()
    assert engine.kv.num_free_pages == engine.runner.num_pages - 1


def test_a_grammar_that_fails_to_compile_fails_its_own_request_only(llm):
    """A structural tag naming a token past the vocabulary passes ``check`` (it has no tokenizer)
    and fails to compile: its request was handed to the scheduler anyway, the error came out of
    the step's mask, and every request of that step failed with it."""
    from mmserve.engine.step_failed import StepFailed

    engine = llm.engine
    tag = StructuredOutput(structural_tag=json.dumps({"type": "structural_tag",
                                                      "format": {"type": "token", "token": 999999}}))
    bad = engine.add_request(PROMPT, SamplingParams(max_tokens=4, structured_output=tag))
    assert engine.grammars.submit(tag).exception() is not None  # compiled (failed) before the next step
    bystander = engine.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    failed, finished = [], {}
    while engine.has_unfinished():
        try:
            finished |= {o.request_id: o for o in engine.step() if o.finished}
        except StepFailed as failure:
            failed += failure.request_ids
    assert failed == [bad] and len(finished[bystander].outputs[0].token_ids) == 4
    assert engine.kv.num_free_pages == engine.runner.num_pages - 1


def test_a_grammar_with_no_way_to_go_on_fails_its_own_request_only(llm):
    """A pattern no character matches leaves its grammar no token after the opening quote: the
    request drew a token the mask forbade and ended with "stop", its whole output `"` (not JSON).
    Now it fails at the next step; a structured request beside it is not disturbed."""
    from mmserve.engine.grammar_steps import GrammarDeadEnd
    from mmserve.engine.step_failed import StepFailed

    engine = llm.engine
    dead = engine.add_request(PROMPT, constrained({"type": "string", "pattern": "[^\\s\\S]"}))
    bystander = engine.add_request(PROMPT, constrained())
    failures, finished = [], {}
    while engine.has_unfinished():
        try:
            finished |= {o.request_id: o for o in engine.step() if o.finished}
        except StepFailed as failure:
            failures.append(failure)
    assert [f.request_ids for f in failures] == [[dead]] and isinstance(failures[0].__cause__, GrammarDeadEnd)
    assert dead not in finished
    jsonschema.validate(json.loads(finished[bystander].outputs[0].text), SCHEMA)
    assert engine.kv.num_free_pages == engine.runner.num_pages - 1


def test_compiled_grammars_are_held_only_by_the_bounded_cache(llm):
    """xgrammar's compiler keeps every grammar it compiled unless told not to: the engine's
    cache of compiled grammars evicts, and nothing else holds them."""
    from mmserve.structured_output.grammars import Grammars

    model = llm.engine.model
    grammars = Grammars(model.tokenizer, model.config.text.vocab_size, set(model.config.eos_token_ids))
    try:
        for i in range(20):
            grammars.submit(StructuredOutput.from_schema(
                {"type": "object", "properties": {f"k{i}_{j}": {"type": "integer"} for j in range(5)}})).result()
        assert grammars._compiler.get_cache_size_bytes() == 0
    finally:
        grammars.close()


def test_invalid_schema_is_refused_before_anything_is_queued(llm):
    with pytest.raises(ValueError, match="invalid JSON schema"):
        llm.engine.add_request(PROMPT, constrained({"type": "objectx"}))
    assert not llm.engine.has_unfinished()


def test_sampler_bitmask_allows_only_its_tokens_and_leaves_other_rows_alone():
    vocab = 70
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, vocab)), jnp.float32)
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=2)]
    batch = pack_sampling_batch(params, [0, 0], [0, 1], 2)
    bitmask = all_allowed_bitmask(2, vocab)
    bitmask[0] = 0
    bitmask[0, 65 // 32] = 1 << (65 % 32)  # row 0 may take token 65 only
    key = jax.random.PRNGKey(0)
    masked, _ = sample(logits, batch, init_penalty_state(2, vocab), key, token_bitmask=jnp.asarray(bitmask))
    free, _ = sample(logits, batch, init_penalty_state(2, vocab), key)
    assert int(masked.token_ids[0]) == 65
    assert int(masked.token_ids[1]) == int(free.token_ids[1])
    assert float(masked.logprobs[1]) == float(free.logprobs[1])  # logprobs stay the model's


@pytest.mark.parametrize("fields", [{}, {"json_schema": '{"type":"object"}', "structural_tag": '{"type":"x"}'},
                                    {"regex": "a", "grammar": 'root ::= "a"'},
                                    {"json_schema": {"type": "object"}}], ids=["none", "two", "two_more", "not_text"])
def test_a_spec_is_exactly_one_constraint_as_text(fields):
    with pytest.raises(ValueError):
        StructuredOutput(**fields)


def test_an_engine_that_compiles_its_programs_has_loaded_the_grammar_library_before_serving():
    """Importing xgrammar takes seconds (it imports torch): done on the first structured request,
    it stalled every request of the loop that took it (the colocated server's, decode's). A fresh
    process, so that nothing imported it before; a decode worker's engine, whose grid is small."""
    code = textwrap.dedent("""
        import sys, time
        from mmserve import SamplingParams
        from mmserve.engine.config import EngineConfig
        from mmserve.engine.engine import LLMEngine
        from mmserve.roles.decode import DECODE_PROGRAMS
        from mmserve.structured_output import StructuredOutput
        from models.qwen3_vl_moe import load_model
        config = EngineConfig(num_pages=16, page_size=8, max_model_len=32, max_num_seqs=2, max_prefill_tokens=16,
                              max_prefill_seqs=1)
        engine = LLMEngine(load_model("tiny"), config, programs=DECODE_PROGRAMS)
        loaded = "xgrammar" in sys.modules
        start = time.monotonic()
        engine.add_request({"prompt_token_ids": [5, 6, 7]},
                           SamplingParams(max_tokens=2, structured_output=StructuredOutput.any_object()))
        print(loaded, time.monotonic() - start)
    """)
    env = {k: v for k, v in os.environ.items() if k != "MMSERVE_COMPILATION_CACHE"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env, check=True)
    loaded, took = out.stdout.split()
    assert loaded == "True"
    assert float(took) < 1.0
