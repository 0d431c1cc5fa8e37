"""``tools`` and ``tool_choice`` at the router, over a scripted backend and the openai client: the
prompt is what transformers renders with Qwen3-VL's own template, the answer's ``<tool_call>``
blocks come back as ``tool_calls`` (whole and streamed), required and named choices send their
grammar, and every bad tool is a 400 before the backend sees anything."""

import dataclasses
import json
from pathlib import Path

import openai
import pytest
from transformers import PreTrainedTokenizerFast

from mmserve.serving.backend import TokenEvent
from mmserve.serving.router import RouterSettings
from mmserve.serving.router.chat_messages import chat_prompt
from mmserve.serving.router.media import MediaReader
from mmserve.structured_output.tool_calls import tool_calls_output
from models.qwen3_vl_moe import load_model
from models.qwen3_vl_moe.tokenizer import Tokenizer
from scripted_backend import grammar_and_plain_servers, openai_client
from served_model import random_image
from server_process import png_data_url

QWEN3_VL_TEMPLATE = (Path(__file__).resolve().parents[1] / "qwen3_vl_chat_template.jinja").read_text()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, NOW]
FUNCTIONS = [WEATHER["function"], NOW["function"]]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
]
CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')


def answer(text: str, finish_reason: str = "stop", pieces: int = 7) -> list[TokenEvent]:
    """The backend's events for ``text``, arriving in ``pieces`` cumulative steps."""
    cuts = [len(text) * i // pieces for i in range(1, pieces + 1)]
    return [TokenEvent("", [11], text=text[:cut], finish_reason=finish_reason if cut == len(text) else None)
            for cut in cuts]


@pytest.fixture(scope="module")
def qwen_template_model():
    """The tiny model with Qwen3-VL's real chat template in place of the tiny one."""
    tiny = load_model("tiny", weights=False)
    return dataclasses.replace(tiny, tokenizer=Tokenizer(tiny.tokenizer.backend, QWEN3_VL_TEMPLATE,
                                                         tiny.tokenizer.config))


@pytest.fixture(scope="module")
def hf(qwen_template_model):
    return PreTrainedTokenizerFast(tokenizer_object=qwen_template_model.tokenizer.backend, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=QWEN3_VL_TEMPLATE)


@pytest.fixture(scope="module")
def servers(qwen_template_model):
    with grammar_and_plain_servers(qwen_template_model, 4096) as up:
        yield up


client = openai_client


@pytest.fixture
def grammar(servers):
    server, backend = servers[0]
    backend.script, backend.requests = answer("ok"), []
    return client(server), backend


def chat(openai_client, messages=QUESTION, **fields):
    return openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **fields)


@pytest.mark.parametrize("messages", [QUESTION, HISTORY], ids=["question", "history"])
def test_prompt_is_what_transformers_renders_with_qwen3_vl_template(grammar, hf, qwen_template_model, messages):
    openai_client, backend = grammar
    chat(openai_client, messages, tools=TOOLS)
    chat(openai_client, messages, tools=TOOLS, tool_choice="none")
    for_hf = [m | {"content": m["content"] or ""} for m in messages]  # OpenAI's null content is empty text
    want = [hf.apply_chat_template(for_hf, tools=tools, tokenize=False, add_generation_prompt=True)
            for tools in (TOOLS, None)]
    assert "# Tools" in want[0] and "<tools>" in want[0] and "# Tools" not in want[1]
    assert [r.prompt.token_ids for r in backend.requests] == [qwen_template_model.tokenizer.encode(w) for w in want]


def test_tool_response_with_an_image_renders_as_transformers_does(hf, qwen_template_model):
    image = random_image(2)
    messages = HISTORY[:3] + [
        {"role": "tool", "tool_call_id": "call_1",
         "content": [{"type": "text", "text": "the sky: "}, {"type": "image_url", "image_url": {"url": png_data_url(image)}}]},
        HISTORY[4]]
    reader = MediaReader(RouterSettings("tiny", 4096), qwen_template_model.processor)
    prompt = chat_prompt(messages, qwen_template_model.tokenizer, reader, TOOLS)
    for_hf = [m | {"content": m["content"] or ""} for m in messages]
    for_hf[3] = for_hf[3] | {"content": [{"type": "text", "text": "the sky: "}, {"type": "image"}]}
    assert prompt["prompt"] == hf.apply_chat_template(for_hf, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert len(prompt["multi_modal_data"]["image"]) == 1


@pytest.mark.parametrize("tool_choice, want", [
    (None, None),
    ("auto", None),
    ("required", tool_calls_output(FUNCTIONS)),
    ({"type": "function", "function": {"name": "now"}}, tool_calls_output(FUNCTIONS, "now")),
], ids=["default", "auto", "required", "named"])
def test_tool_choice_sends_its_grammar(grammar, tool_choice, want):
    openai_client, backend = grammar
    chat(openai_client, tools=TOOLS, **({} if tool_choice is None else {"tool_choice": tool_choice}))
    assert backend.requests[0].params.structured_output == want


def test_parallel_tool_calls_false_forces_one_call_at_most(grammar):
    openai_client, backend = grammar
    chat(openai_client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    one = backend.requests[0].params.structured_output
    assert one == tool_calls_output(FUNCTIONS, parallel=False) != tool_calls_output(FUNCTIONS)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_parallel_tool_calls_false_keeps_an_answer_s_first_call(grammar, stream):
    """An answer that calls twice anyway (tool_choice "auto" has no grammar): the first call only,
    as vLLM answers."""
    openai_client, backend = grammar
    backend.script = answer(CALLS)
    if stream:
        chunks = [c.choices[0] for c in chat(openai_client, tools=TOOLS, parallel_tool_calls=False, stream=True)]
        calls = [call for c in chunks for call in c.delta.tool_calls or []]
        content = "".join(c.delta.content or "" for c in chunks)
        finish_reason = chunks[-1].finish_reason
    else:
        choice = chat(openai_client, tools=TOOLS, parallel_tool_calls=False).choices[0]
        calls, content, finish_reason = choice.message.tool_calls, choice.message.content, choice.finish_reason
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert (content, finish_reason) == ("Let me check.", "tool_calls")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_calls_in_the_answer_become_tool_calls(grammar, stream):
    openai_client, backend = grammar
    backend.script = answer(CALLS)
    if stream:
        chunks = [c.choices[0] for c in chat(openai_client, tools=TOOLS, stream=True)]
        content = "".join(c.delta.content or "" for c in chunks)
        deltas = [call for c in chunks for call in c.delta.tool_calls or []]
        finish_reason = chunks[-1].finish_reason
        assert all(c.finish_reason is None for c in chunks[:-1])
    else:
        choice = chat(openai_client, tools=TOOLS).choices[0]
        content, deltas, finish_reason = choice.message.content, choice.message.tool_calls, choice.finish_reason
    assert content == "Let me check."
    assert [(c.index if stream else i, c.type, c.function.name, json.loads(c.function.arguments))
            for i, c in enumerate(deltas)] == [(0, "function", "get_weather", {"city": "Paris"}),
                                               (1, "function", "now", {})]
    assert all(c.id.startswith("call_") for c in deltas) and deltas[0].id != deltas[1].id
    assert finish_reason == "tool_calls"


def test_an_answer_s_calls_sent_back_render_as_the_model_wrote_them(grammar, qwen_template_model):
    """The openai client's own message, sent back with the tools' results, is taken as it is, and
    the prompt shows the calls as the model wrote them."""
    openai_client, backend = grammar
    backend.script = answer(CALLS)
    message = chat(openai_client, tools=TOOLS).choices[0].message
    results = [{"role": "tool", "tool_call_id": call.id, "content": "done"} for call in message.tool_calls]
    chat(openai_client, QUESTION + [message.model_dump(exclude_none=True)] + results, tools=TOOLS)
    prompt = qwen_template_model.tokenizer.decode(backend.requests[1].prompt.token_ids, skip_special_tokens=False)
    assert CALLS + "<|im_end|>\n<|im_start|>user\n<tool_response>\ndone\n</tool_response>\n<tool_response>" in prompt


def test_a_message_sent_back_with_null_fields_renders_as_without_them(grammar):
    """The openai client's ``model_dump()`` of a reply holds nulls (refusal, audio, function_call,
    annotations): absent fields to OpenAI and vLLM, as the body's own nulls are. So are a tool
    call's, and an assistant's refusal text is taken and not rendered."""
    openai_client, backend = grammar
    backend.script = answer(CALLS)
    message = chat(openai_client, tools=TOOLS).choices[0].message
    results = [{"role": "tool", "tool_call_id": call.id, "content": "done"} for call in message.tool_calls]
    dumped = message.model_dump()
    assert {"refusal", "audio", "function_call"} <= {key for key, value in dumped.items() if value is None}
    dumped["tool_calls"][0]["type"] = None
    dumped["tool_calls"][1]["function"]["extra"] = None
    backend.script = answer("ok")
    for sent in (message.model_dump(exclude_none=True), dumped, dumped | {"refusal": "I would rather not."}):
        chat(openai_client, QUESTION + [sent] + results, tools=TOOLS)
    first, *others = [r.prompt.token_ids for r in backend.requests[1:]]
    assert others == [first, first]


def test_null_tool_fields_are_absent(grammar):
    openai_client, backend = grammar
    chat(openai_client, tools=[WEATHER, {"type": "function", "function": {"name": "now"}}])
    chat(openai_client, tools=[WEATHER, {"type": "function", "function": {
        "name": "now", "description": None, "parameters": None, "strict": None}}])
    assert backend.requests[0].prompt.token_ids == backend.requests[1].prompt.token_ids


@pytest.mark.parametrize("text, finish_reason, want", [
    ("No tool needed: 4.", "stop", ("No tool needed: 4.", None, "stop")),
    ('<tool_call>\n{"name": "now", "argu', "length", ('<tool_call>\n{"name": "now", "argu', None, "length")),
    (CALLS, "length", ("Let me check.", 2, "length")),
], ids=["no_call", "cut_inside_a_call", "cut_after_calls"])
def test_answers_without_a_finished_call(grammar, text, finish_reason, want):
    openai_client, backend = grammar
    backend.script = answer(text, finish_reason)
    choice = chat(openai_client, tools=TOOLS).choices[0]
    calls = choice.message.tool_calls
    assert (choice.message.content, len(calls) if calls else None, choice.finish_reason) == want


def test_without_tools_calls_stay_text(grammar):
    openai_client, backend = grammar
    backend.script = answer(CALLS)
    choice = chat(openai_client).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (CALLS, None, "stop")


def bad_tool(**function):
    return [{"type": "function", "function": {"name": "f"} | function}]


BAD = {
    "no_name": ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "function.name must be",
                "tools[0].function.name"),
    "bad_name": ({"tools": bad_tool(name="get weather")}, "function.name must be", "tools[0].function.name"),
    "duplicate_names": ({"tools": TOOLS + [NOW]}, "two tools are named 'now'", "tools[2].function.name"),
    "not_a_function": ({"tools": [{"type": "web_search"}]}, "type must be 'function'", "tools[0]"),
    "parameters_not_an_object": ({"tools": bad_tool(parameters=[1])}, "parameters must be a JSON schema of an object",
                                 "tools[0].function.parameters"),
    # the arguments of a call are an object: a string schema's forced call came back as plain text
    "parameters_of_a_string": ({"tools": bad_tool(parameters={"type": "string"})},
                               "parameters must be a JSON schema of an object", "tools[0].function.parameters"),
    "invalid_parameters_schema": ({"tools": bad_tool(parameters={"type": "object", "properties": {
        "a": {"type": "objectx"}}})}, "invalid JSON schema",
                                  "tools[0].function.parameters"),
    "invalid_schema_with_auto": ({"tools": bad_tool(parameters={"type": "object", "properties": 3}),
                                  "tool_choice": "auto"}, "invalid JSON schema", "tools[0].function.parameters"),
    "unknown_function_field": ({"tools": bad_tool(returns="int")}, "does not take returns", "tools[0].function"),
    # each function within the bounds, together past them: checked one by one, 128 such took 22 s of CPU
    "patterns_of_all_functions_together": ({"tools": [
        {"type": "function", "function": {"name": f"f{i}", "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "pattern": "b{1000}"}}}}} for i in range(3)]},
        "counted repetitions .* add up to 3000", "tools"),
    "optional_properties_of_all_functions_together": ({"tools": [
        {"type": "function", "function": {"name": f"f{i}", "parameters": {
            "type": "object", "properties": {f"p{j}": {"type": "integer"} for j in range(100)}}}} for i in range(3)]},
        "300 optional object properties", "tools"),
    "literals_of_all_functions_together": ({"tools": [
        {"type": "function", "function": {"name": f"f{i}", "parameters": {
            "type": "object", "properties": {"a": {"const": "c" * 49_998}}, "required": ["a"]}}} for i in range(3)]},
        "add up to 150003 characters", "tools"),
    "empty_tools": ({"tools": []}, "non-empty list", "tools"),
    "named_choice_not_among_tools": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                                     "'x', which is not among tools", "tool_choice"),
    "choice_without_tools": ({"tool_choice": "auto"}, "tool_choice needs tools", "tool_choice"),
    "parallel_without_tools": ({"parallel_tool_calls": False}, "parallel_tool_calls needs tools",
                               "parallel_tool_calls"),
    "parallel_not_bool": ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls must be a boolean",
                          "parallel_tool_calls"),
    "unknown_choice": ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice must be one of", "tool_choice"),
    "malformed_named_choice": ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "now"}},
                               "a named tool_choice is", "tool_choice"),
    "required_with_response_format": ({"tools": TOOLS, "tool_choice": "required",
                                       "response_format": {"type": "json_object"}}, "cannot be combined",
                                      "tool_choice"),
    "tool_calls_on_a_user_message": ({"messages": [QUESTION[0] | {"tool_calls": []}]},
                                     "only an assistant message has tool_calls", "messages[0].tool_calls"),
    "tool_call_without_arguments": ({"messages": QUESTION + [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "now"}}]}]}, "needs a string name and arguments",
        "messages[1].tool_calls[0].function"),
    "refusal_on_a_user_message": ({"messages": [QUESTION[0] | {"refusal": "no"}]},
                                  "only an assistant message has a refusal", "messages[0].refusal"),
    "audio_on_an_assistant_message": ({"messages": QUESTION + [{"role": "assistant", "audio": {"id": "a"}}]},
                                      "unsupported message field", "messages[1]"),
}


@pytest.mark.parametrize("fields, message, param", BAD.values(), ids=BAD.keys())
def test_bad_tools_are_a_400_before_anything_is_queued(grammar, fields, message, param):
    openai_client, backend = grammar
    with pytest.raises(openai.BadRequestError, match=message) as error:
        openai_client.chat.completions.create(**{"model": "tiny", "messages": QUESTION, "max_tokens": 8} | fields)
    assert error.value.body["param"] == param
    assert backend.requests == []


def test_backend_without_grammars_refuses_forced_calls_but_serves_auto(servers):
    server, backend = servers[1]
    backend.script, backend.requests = answer(CALLS), []
    for tool_choice in ("required", {"type": "function", "function": {"name": "now"}}):
        with pytest.raises(openai.BadRequestError, match="not supported by this server"):
            chat(client(server), tools=TOOLS, tool_choice=tool_choice)
    assert backend.requests == []
    assert len(chat(client(server), tools=TOOLS).choices[0].message.tool_calls) == 2
