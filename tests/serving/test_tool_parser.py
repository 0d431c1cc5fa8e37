"""The ``<tool_call>`` parser: what a whole answer holds (content and calls), and the same again
however the answer is cut into stream pieces."""

import json

import pytest

from mmserve.serving.router.tool_parser import Parsed, ToolCall, ToolCallParser, parse_tool_calls

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
NOW = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
WEATHER_CALL = ToolCall("get_weather", '{"city": "Paris", "days": 2}')
NOW_CALL = ToolCall("now", "{}")

CASES = {
    "plain_text": ("Just an answer, no calls.\n", Parsed("Just an answer, no calls.\n")),
    "whitespace_kept_without_calls": ("  two  spaces \n\n", Parsed("  two  spaces \n\n")),
    "one_call": (WEATHER, Parsed("", [WEATHER_CALL])),
    "content_then_calls": (f"Let me check.\n{WEATHER}\n{NOW}", Parsed("Let me check.", [WEATHER_CALL, NOW_CALL])),
    "text_after_a_call": (f"{NOW}\n\nIt is noon. ", Parsed("It is noon. ", [NOW_CALL])),
    "compact_and_unicode": ('<tool_call>{"name":"say","arguments":{"text":"東京 \\u00e9"}}</tool_call>',
                            Parsed("", [ToolCall("say", '{"text": "東京 é"}')])),
    "arguments_omitted": ('<tool_call>{"name": "now"}</tool_call>', Parsed("", [NOW_CALL])),
    "not_json_stays_content": (f"a\n<tool_call>\nnot json\n</tool_call> b\n{NOW}",
                               Parsed("a\n<tool_call>\nnot json\n</tool_call> b", [NOW_CALL])),
    "no_name_stays_content": ('<tool_call>{"arguments": {}}</tool_call>',
                              Parsed('<tool_call>{"arguments": {}}</tool_call>')),
    "arguments_not_an_object": ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
                                Parsed('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')),
    "nan_is_not_json": ('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
                        Parsed('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>')),
    "a_number_past_a_double_is_not_a_call": ('<tool_call>{"name": "f", "arguments": {"x": -1e999}}</tool_call>',
                                            Parsed('<tool_call>{"name": "f", "arguments": {"x": -1e999}}</tool_call>')),
    "unclosed_call_is_content": (f'ok {NOW}\n<tool_call>\n{{"name": "get_w',
                                 Parsed('ok<tool_call>\n{"name": "get_w', [NOW_CALL])),
    "partial_marker_at_the_end": ("see <tool_c", Parsed("see <tool_c")),
    "marker_lookalike": ("a <tool_cal> b <", Parsed("a <tool_cal> b <")),
}


@pytest.mark.parametrize("text, want", CASES.values(), ids=CASES.keys())
def test_whole_answer(text, want):
    assert parse_tool_calls(text) == want


@pytest.mark.parametrize("text, want", CASES.values(), ids=CASES.keys())
def test_streamed_in_two_pieces_cut_anywhere_gives_the_whole_answer(text, want):
    for cut in range(len(text) + 1):
        parser = ToolCallParser()
        assert parser.feed(text[:cut]).add(parser.feed(text[cut:])).add(parser.finish()) == want, cut


@pytest.mark.parametrize("text, want", CASES.values(), ids=CASES.keys())
def test_streamed_one_character_at_a_time_gives_the_whole_answer(text, want):
    parser, got = ToolCallParser(), Parsed()
    for character in text:
        got = got.add(parser.feed(character))
    assert got.add(parser.finish()) == want


def test_content_streams_before_the_answer_ends_and_a_call_arrives_when_it_closes():
    parser = ToolCallParser()
    assert parser.feed("Let me") == Parsed("Let me")
    assert parser.feed(" check.\n<tool") == Parsed(" check.")  # the newline may precede a call: held
    assert parser.feed(WEATHER.removeprefix("<tool")[:-3]) == Parsed()
    assert parser.feed("ll>") == Parsed("", [WEATHER_CALL])
    assert parser.finish() == Parsed()


def test_arguments_are_json_text_of_the_model_s_object():
    call = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"n": 1.5, "l": [true, null]}}</tool_call>')
    assert json.loads(call.calls[0].arguments) == {"n": 1.5, "l": [True, None]}


def test_a_block_nested_deeper_than_json_parses_stays_content():
    """``json.loads`` raises RecursionError (not a ValueError) past ~1000 levels: such a block is
    content like any other that is not a call, whole or streamed (it was a 500, or a stream cut)."""
    deep = "<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>"
    text = f"{NOW}\n{deep}"
    assert parse_tool_calls(text) == Parsed(deep, [NOW_CALL])
    parser = ToolCallParser()
    parsed = parser.feed(text[:7000]).add(parser.feed(text[7000:])).add(parser.finish())
    assert parsed == Parsed(deep, [NOW_CALL])
