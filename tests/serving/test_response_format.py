"""``response_format`` at the router, over a scripted backend: parsed into the request's
structured_output, a bad schema or format is a 400 before the backend sees anything, and a
backend that cannot enforce grammars (no grammar library) refuses it rather than ignore it."""

import json

import openai
import pytest

from mmserve.serving.backend import TokenEvent
from mmserve.structured_output import StructuredOutput
from models.qwen3_vl_moe import load_model
from scripted_backend import grammar_and_plain_servers, openai_client
from server_process import request

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
DONE = TokenEvent("", [11], text='{"a":1}', finish_reason="stop")


def nested(levels: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.fixture(scope="module")
def servers():
    with grammar_and_plain_servers(load_model("tiny", weights=False), 256) as up:
        yield up


client = openai_client


@pytest.fixture
def grammar(servers):
    server, backend = servers[0]
    backend.script, backend.requests = [DONE], []
    return client(server), backend


@pytest.mark.parametrize("response_format, want", [
    (JSON_SCHEMA, StructuredOutput.from_schema(SCHEMA)),
    ({"type": "json_object"}, StructuredOutput.any_object()),
    ({"type": "text"}, None),
])
def test_response_format_reaches_the_backend(grammar, response_format, want):
    chat, backend = grammar
    chat.chat.completions.create(response_format=response_format, **CHAT)
    chat.completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body={"response_format": response_format})
    assert [r.params.structured_output for r in backend.requests] == [want, want]


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}, "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}}},
     "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "name must be a non-empty string"),
    ({"type": "json_schema"}, "must be an object with a name and a schema"),
    ({"type": "yaml"}, "response_format.type must be"),
    ({"type": "json_object", "schema": SCHEMA}, "does not take schema"),
    # xgrammar took seconds over 450 levels on every check, one on the engine's thread, stalling all
    # others (a body past 128 levels is refused before this: test_json_body.py)
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": nested(40)}}, "nested 81 levels deep"),
    # and 25 s over a pattern repeating 12,000 times (the check's cost grows with the count's square)
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "b{12000}"}}},
     "counted repetitions .* add up to 12000"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,300}"} for i in range(10)}}}},
     "add up to 3000"),
    # and seconds to minutes compiling an object of 1,000 optional properties (~cube of their count)
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}}}},
     "300 optional object properties"),
    # and 19 s and 471 MB compiling a const of 1,000,000 characters (a grammar state and mask each)
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": "y" * 200_000}}},
     "consts add up to 200002 characters"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": ["a"], "properties": {"a": {"enum": ["z" * 999] * 121}}}}},
     "add up to 121122 characters"),
])
def test_bad_response_format_is_a_400_before_anything_is_queued(grammar, response_format, message):
    chat, backend = grammar
    with pytest.raises(openai.BadRequestError, match=message) as error:
        chat.chat.completions.create(response_format=response_format, **CHAT)
    assert error.value.body["param"] == "response_format"
    assert backend.requests == []


def test_patterns_within_the_repetition_bound_are_taken(grammar):
    chat, backend = grammar
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": r"^[A-Z]{3}-\d{4}\{x\}$"}},
              "patternProperties": {"^x{2}$": {"type": "integer"}}}
    chat.chat.completions.create(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
                                 **CHAT)
    assert [r.params.structured_output for r in backend.requests] == [StructuredOutput.from_schema(schema)]


def test_data_and_names_that_look_like_schemas_are_not_counted(grammar):
    """A default, an example or an enum is data, and a property may be named "properties": none of
    them is an object schema or a pattern (a schema requiring every property was refused for the
    300 "optional properties" of its default)."""
    chat, backend = grammar
    schema = {"type": "object", "required": ["properties", "settings"], "properties": {
        "properties": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
        "settings": {"type": "object", "default": {"properties": {f"p{i}": i for i in range(300)}},
                     "examples": [{"pattern": "b{5000}"}], "enum": [{"pattern": "c{5000}"}]}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    chat.chat.completions.create(response_format=response_format, **CHAT)
    assert [r.params.structured_output for r in backend.requests] == [StructuredOutput.from_schema(schema)]


def test_guided_json_extra_is_a_schema_too(grammar):
    chat, backend = grammar
    chat.chat.completions.create(extra_body={"guided_json": SCHEMA}, **CHAT)
    chat.chat.completions.create(extra_body={"guided_json": '{"type": "object"}'}, **CHAT)
    assert [r.params.structured_output for r in backend.requests] == [StructuredOutput.from_schema(SCHEMA),
                                                                      StructuredOutput.any_object()]
    with pytest.raises(openai.BadRequestError, match="give one of response_format, guided_json, not several"):
        chat.chat.completions.create(response_format=JSON_SCHEMA, extra_body={"guided_json": SCHEMA}, **CHAT)
    with pytest.raises(openai.BadRequestError, match="invalid JSON schema") as error:
        chat.chat.completions.create(extra_body={"guided_json": {"type": "objectx"}}, **CHAT)
    assert error.value.body["param"] == "guided_json"


def test_backend_without_grammars_refuses_response_format(servers):
    server, backend = servers[1]
    backend.script, backend.requests = [DONE], []
    with pytest.raises(openai.BadRequestError, match="not supported by this server: it needs the grammar library"):
        client(server).chat.completions.create(response_format=JSON_SCHEMA, **CHAT)
    client(server).chat.completions.create(response_format={"type": "text"}, **CHAT)
    assert len(backend.requests) == 1


@pytest.mark.parametrize("extra", [
    {"extra_body": {"guided_json": "[" * 5000 + "]" * 5000}},  # past the interpreter's recursion limit as text
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": nested(150)}}}]}]},
], ids=["guided_json text", "tool call arguments"])
def test_json_nested_past_what_is_walked_is_a_400_not_a_500(grammar, extra):
    chat, backend = grammar
    with pytest.raises(openai.BadRequestError, match="levels deep|must be a JSON schema"):
        chat.chat.completions.create(**(CHAT | extra))
    assert backend.requests == []


CHOICES = ["yes", 'a "quoted" no']


@pytest.mark.parametrize("extra, want", [
    ({"structured_outputs": {"regex": r"\d+"}}, StructuredOutput.from_regex(r"\d+")),
    ({"structured_outputs": {"choice": CHOICES}}, StructuredOutput.from_choice(CHOICES)),
    ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, StructuredOutput.from_grammar('root ::= "a" | "b"')),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput.from_schema(SCHEMA)),
    ({"structured_outputs": {"json": '{"type": "object"}', "regex": None, "json_object": False}},
     StructuredOutput.any_object()),
    ({"structured_outputs": {"json_object": True}}, StructuredOutput.any_object()),
    ({"guided_regex": r"\d+"}, StructuredOutput.from_regex(r"\d+")),
    ({"guided_choice": CHOICES}, StructuredOutput.from_choice(CHOICES)),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutput.from_grammar('root ::= "a"')),
    ({"structured_outputs": None, "guided_regex": None}, None),
], ids=["regex", "choice", "grammar", "json", "json_text", "json_object", "guided_regex", "guided_choice",
        "guided_grammar", "nulls"])
def test_structured_outputs_reach_the_backend(grammar, extra, want):
    """vLLM's ``structured_outputs`` (and its older ``guided_*`` fields), in chat and completions."""
    chat, backend = grammar
    chat.chat.completions.create(extra_body=extra, **CHAT)
    chat.completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body=extra)
    assert [r.params.structured_output for r in backend.requests] == [want, want]


@pytest.mark.parametrize("extra, param, message", [
    ({"structured_outputs": "regex"}, "structured_outputs", "must be an object"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one of json, regex, choice, grammar, json_object"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs", "does not take whitespace_pattern"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs", "json_object must be a boolean"),
    ({"structured_outputs": {"regex": "a(?=b)"}}, "structured_outputs", "invalid regular expression: .*Lookahead"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs", "regular expression must be a non-empty string"),
    ({"guided_regex": 5}, "guided_regex", "must be a non-empty string"),
    ({"guided_choice": []}, "guided_choice", "non-empty list of non-empty strings"),
    ({"guided_choice": "yes"}, "guided_choice", "non-empty list of non-empty strings"),
    ({"guided_choice": ["a", 3]}, "guided_choice", "non-empty list of non-empty strings"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", "invalid grammar: .*not defined"),
    ({"guided_grammar": "rule ::= \"a\""}, "guided_grammar", "invalid grammar"),
    # a grammar's text is compiled at a cost growing with it (20,000 alternatives: 1 s, 41 MB)
    ({"guided_grammar": "root ::= " + " | ".join(f'"w{i}"' for i in range(20_000))}, "guided_grammar",
     "characters, more than this server accepts"),
    ({"guided_choice": [f"choice {i}" for i in range(12_000)]}, "guided_choice",
     "characters, more than this server accepts"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "give one of guided_regex, guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex",
     "give one of response_format, guided_regex"),
], ids=["not_object", "empty", "two", "unknown_key", "json_object_not_bool", "lookahead", "empty_regex",
        "regex_not_text", "no_choices", "choice_text", "choice_not_text", "undefined_rule", "no_root",
        "grammar_too_long", "choices_too_long", "two_fields", "with_response_format"])
def test_bad_structured_outputs_are_a_400_before_anything_is_queued(grammar, extra, param, message):
    chat, backend = grammar
    with pytest.raises(openai.BadRequestError, match=message) as error:
        chat.chat.completions.create(extra_body=extra, **CHAT)
    assert error.value.body["param"] == param
    assert backend.requests == []


def _generate(server, sampling_params: dict) -> tuple[int, dict]:
    return request("POST", f"{server.url}/generate", {"prompt": "hi", "sampling_params": sampling_params}, timeout=30)


@pytest.mark.parametrize("sampling, want", [
    ({"regex": r"\d+", "temperature": 0}, StructuredOutput.from_regex(r"\d+")),
    ({"ebnf": 'root ::= "a" | "b"'}, StructuredOutput.from_grammar('root ::= "a" | "b"')),
    ({"json_schema": json.dumps(SCHEMA)}, StructuredOutput.from_schema(SCHEMA)),
    ({"json_schema": SCHEMA}, StructuredOutput.from_schema(SCHEMA)),
    ({"regex": None}, None),
], ids=["regex", "ebnf", "json_schema_text", "json_schema_object", "null"])
def test_native_generate_takes_sglangs_constraints(servers, sampling, want):
    server, backend = servers[0]
    backend.script, backend.requests = [DONE], []
    assert _generate(server, sampling)[0] == 200
    assert [r.params.structured_output for r in backend.requests] == [want]


@pytest.mark.parametrize("sampling, param, message", [
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "sampling_params.ebnf", "give one of"),
    ({"regex": "a(?=b)"}, "sampling_params.regex", "invalid regular expression"),
    ({"json_schema": "{not json"}, "sampling_params.json_schema", "must be a JSON schema"),
    ({"structured_output": {"regex": "a"}}, "sampling_params.structured_output", "json_schema, regex or ebnf"),
], ids=["two", "lookahead", "bad_json", "structured_output"])
def test_native_generate_refuses_bad_constraints(servers, sampling, param, message):
    server, backend = servers[0]
    backend.script, backend.requests = [DONE], []
    status, body = _generate(server, sampling)
    assert (status, body["error"]["param"]) == (400, param)
    assert message in body["error"]["message"]
    assert backend.requests == []


@pytest.mark.parametrize("extra, message", [
    # each was taken, then held the engine's one compile thread: 58 s and gigabytes for `a?` x 500
    ({"guided_regex": "a?" * 33}, "33 quantifiers and alternatives inside groups in one expression"),
    ({"guided_regex": "(a|)" * 33}, "33 quantifiers and alternatives"),
    ({"guided_grammar": 'root ::= x\nx ::= "b"\n  ' + "\n  ".join(['"a"?'] * 40)}, "40 quantifiers"),
    ({"guided_grammar": "root ::= " + " ".join(f"r{i}" for i in range(20)) + "\n"
      + "\n".join(f"r{i} ::= " + '"a"? ' * 20 for i in range(20))}, "400 quantifiers and alternatives inside groups "
                                                                     "in all"),
], ids=["optional_run", "empty_alternatives", "continued_rule", "many_rules"])
def test_a_costly_regex_or_grammar_is_a_400(grammar, extra, message):
    chat, backend = grammar
    with pytest.raises(openai.BadRequestError, match=message):
        chat.chat.completions.create(extra_body=extra, **CHAT)
    assert backend.requests == []


def test_regexes_and_grammars_within_the_bounds_are_taken(grammar):
    """A date, an e-mail address, a choice among thousands (alternatives outside groups are cheap)."""
    chat, backend = grammar
    for extra in ({"guided_regex": r"\d{4}-\d{2}-\d{2}"}, {"guided_regex": r"[\w.+-]+@[\w-]+(\.[\w-]+)+"},
                  {"guided_choice": [f"label {i}" for i in range(5000)]},
                  {"guided_grammar": 'root ::= item ("," item)*\nitem ::= [a-z]+ | "(" root ")"'}):
        chat.chat.completions.create(extra_body=extra, **CHAT)
    assert len(backend.requests) == 4
