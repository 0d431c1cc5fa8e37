"""The tool-call grammar (``tool_calls_output``) on the tiny random model: its weights are noise,
so only the grammar can make it write a ``<tool_call>`` whose arguments fit the function; and the
grammar's vocabulary lets a model emit Qwen's ``<tool_call>`` as the one token it was trained on."""

import json

import jsonschema
import pytest
import xgrammar

from mmserve import SamplingParams
from mmserve.serving.router.tool_parser import parse_tool_calls
from mmserve.structured_output.grammars import tokenizer_info
from mmserve.structured_output.tool_calls import tool_calls_output
from models.qwen3_vl_moe.tiny_tokenizer import TINY_SPECIAL_IDS, TINY_TOOL_TOKEN_IDS, build_tiny_tokenizer

SET_LIGHT = {"name": "set_light", "parameters": {
    "type": "object",
    "properties": {"room": {"enum": ["kitchen", "hall"]}, "level": {"type": "integer", "minimum": 0, "maximum": 9},
                   "on": {"type": "boolean"}},
    "required": ["room", "level", "on"], "additionalProperties": False}}
NOW = {"name": "now", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}
PROMPT = {"prompt_token_ids": [5, 6, 7, 8, 9, 10]}


def call_params(forced=None, **kwargs):
    fields = {"temperature": 0.0, "max_tokens": 200} | kwargs  # a random model pads with whitespace
    return SamplingParams(structured_output=tool_calls_output([SET_LIGHT, NOW], forced), **fields)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "seeded"])
def test_named_choice_yields_exactly_one_valid_call(llm, sampling):
    output = llm.generate(PROMPT, call_params("set_light", **sampling))[0].outputs[0]
    parsed = parse_tool_calls(output.text)
    assert output.finish_reason == "stop" and parsed.content == ""
    assert [call.name for call in parsed.calls] == ["set_light"]
    jsonschema.validate(json.loads(parsed.calls[0].arguments), SET_LIGHT["parameters"])


@pytest.mark.parametrize("seed", range(3))
def test_required_choice_starts_with_a_valid_call(llm, seed):
    output = llm.generate(PROMPT, call_params(temperature=1.0, seed=seed))[0].outputs[0]
    assert output.text.startswith("<tool_call>")
    first = parse_tool_calls(output.text).calls[0]
    function = {"set_light": SET_LIGHT, "now": NOW}[first.name]
    jsonschema.validate(json.loads(first.arguments), function["parameters"])


@pytest.mark.parametrize("seed", range(3))
def test_required_choice_without_parallel_calls_yields_exactly_one_valid_call(llm, seed):
    params = SamplingParams(structured_output=tool_calls_output([SET_LIGHT, NOW], parallel=False), temperature=1.0,
                            seed=seed, max_tokens=200)
    output = llm.generate(PROMPT, params)[0].outputs[0]
    parsed = parse_tool_calls(output.text)
    assert output.finish_reason == "stop" and parsed.content == "", output.text
    assert len(parsed.calls) == 1
    function = {"set_light": SET_LIGHT, "now": NOW}[parsed.calls[0].name]
    jsonschema.validate(json.loads(parsed.calls[0].arguments), function["parameters"])


def test_grammar_vocabulary_keeps_the_tool_call_markers_and_blanks_special_tokens():
    vocab = tokenizer_info(build_tiny_tokenizer(), 1011, [TINY_SPECIAL_IDS["<|im_end|>"]]).decoded_vocab
    assert [vocab[i] for i in TINY_TOOL_TOKEN_IDS.values()] == [t.encode() for t in TINY_TOOL_TOKEN_IDS]
    assert all(vocab[i] == b"" for i in TINY_SPECIAL_IDS.values())


def test_a_forced_call_may_open_with_the_single_tool_call_token():
    info = tokenizer_info(build_tiny_tokenizer(), 1011, [TINY_SPECIAL_IDS["<|im_end|>"]])
    compiled = xgrammar.GrammarCompiler(info).compile_structural_tag(tool_calls_output([NOW], "now").structural_tag)
    matcher = xgrammar.GrammarMatcher(compiled)
    assert matcher.accept_token(TINY_TOOL_TOKEN_IDS["<tool_call>"])
