"""Tool calls through ``serve.py --role colocated`` with the openai client: the random checkpoint
calls a tool only because a required or named ``tool_choice`` makes its grammar do so, and the
router parses that call into ``tool_calls`` whose arguments fit the tool's schema."""

import json

import jsonschema
import pytest

from served_model import MODEL_NAME

pytestmark = pytest.mark.slow

LIGHT = {"type": "function", "function": {
    "name": "light", "parameters": {"type": "object",
                                    "properties": {"room": {"enum": ["hall", "den"]},
                                                   "level": {"type": "integer", "minimum": 0, "maximum": 9}},
                                    "required": ["room", "level"], "additionalProperties": False}}}
TOOLS = [LIGHT]
"""One small tool: the tiny tokenizer spends about 385 of the served model's 512 tokens of context
on the tools block (the router test and the engine test choose among several)."""
MESSAGES = [{"role": "user", "content": "Dim the hall light."}]


def chat(client, max_tokens=120, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=max_tokens,
                                          **kwargs)


def assert_valid(call):
    assert (call.type, call.function.name) == ("function", "light") and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), LIGHT["function"]["parameters"])


def test_named_choice_calls_that_function_whole_and_streamed(client):
    named = {"type": "function", "function": {"name": "light"}}
    choice = chat(client, tool_choice=named, temperature=0).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert_valid(call)
    chunks = [c.choices[0] for c in chat(client, tool_choice=named, temperature=0, stream=True) if c.choices]
    [streamed] = [d for c in chunks for d in c.delta.tool_calls or []]
    assert (streamed.index, streamed.function.name, streamed.function.arguments) == (0, "light",
                                                                                     call.function.arguments)
    assert "".join(c.delta.content or "" for c in chunks) == "" and chunks[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize("seed", [1, 2])
def test_required_choice_starts_with_a_valid_call(client, seed):
    choice = chat(client, tool_choice="required", temperature=1.0, seed=seed).choices[0]
    assert choice.message.tool_calls, choice.message.content
    assert_valid(choice.message.tool_calls[0])


def test_auto_without_a_grammar_returns_what_the_model_wrote(client):
    """The random model does not call by itself: its text comes back as content, no call invented."""
    choice = chat(client, temperature=0, max_tokens=16).choices[0]
    assert choice.message.tool_calls is None and choice.message.content


@pytest.mark.parametrize("function", [{"name": "now"}, {"name": "now", "strict": False, "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc"]}}, "required": ["zone"]}}],
    ids=["no_parameters", "strict_false"])
def test_a_forced_call_of_a_function_without_a_strict_schema_is_a_call(client, function):
    """xgrammar turns missing parameters and ``"strict": false`` into the schema ``true``: the
    forced call's arguments could be any JSON value (a string, ``true``), which is no call, and the
    answer came back as plain content."""
    choice = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=[{"type": "function", "function": function}],
        tool_choice={"type": "function", "function": {"name": "now"}}, max_tokens=120, temperature=1.0,
        seed=0).choices[0]
    [call] = choice.message.tool_calls
    assert call.function.name == "now" and isinstance(json.loads(call.function.arguments), dict)
