"""``--reasoning-parser qwen3`` at the router, over a scripted backend and the openai client: a
thinking answer's reasoning comes back as ``reasoning_content`` and the rest as content, whole
and streamed alike, under Qwen3-VL's template made a Thinking one (its generation prompt opens
<think>) and under the tiny one (the model writes <think> itself); tool calls are read from the
content only; without the flag an answer is content as written."""

import dataclasses
import json
from pathlib import Path

import pytest

from mmserve.serving.router import RouterSettings, build_app
from models.qwen3_vl_moe import load_model
from models.qwen3_vl_moe.tokenizer import Tokenizer
from scripted_backend import GrammarBackend, ThreadedServer, openai_client
from test_tools import TOOLS, answer

QWEN3_VL_TEMPLATE = (Path(__file__).resolve().parents[1] / "qwen3_vl_chat_template.jinja").read_text()
THINKING_TEMPLATE = QWEN3_VL_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}",
                                              "{{- '<|im_start|>assistant\\n<think>\\n' }}")
QUESTION = [{"role": "user", "content": "How many legs have two cats?"}]


@pytest.fixture(scope="module")
def routers():
    """(thinking template + parser, tiny template + parser, tiny template without the parser)."""
    assert THINKING_TEMPLATE != QWEN3_VL_TEMPLATE
    tiny = load_model("tiny", weights=False)
    thinking = dataclasses.replace(tiny, tokenizer=Tokenizer(tiny.tokenizer.backend, THINKING_TEMPLATE,
                                                             tiny.tokenizer.config))
    up = [(ThreadedServer(build_app(backend, model, RouterSettings("tiny", 4096, reasoning_parser=parser))), backend)
          for model, parser, backend in ((thinking, "qwen3", GrammarBackend()), (tiny, "qwen3", GrammarBackend()),
                                         (tiny, None, GrammarBackend()))]
    try:
        yield up
    finally:
        for server, _ in up:
            server.stop()


def ask(router, text: str, stream: bool, **fields) -> tuple[str | None, str | None, list, str]:
    """(reasoning_content, content, tool calls, finish_reason) of the answer ``text``."""
    server, backend = router
    backend.script, backend.requests = answer(text), []
    client = openai_client(server)
    request = {"model": "tiny", "messages": QUESTION, "max_tokens": 64} | fields
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        message = choice.message.model_dump()
        return message.get("reasoning_content"), message["content"], message["tool_calls"] or [], choice.finish_reason
    chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **request)]
    deltas = [c.delta.model_dump() for c in chunks]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    return (reasoning or None, "".join(d["content"] or "" for d in deltas) or None,
            [call for d in deltas for call in d["tool_calls"] or []], chunks[-1].finish_reason)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_thinking_template_s_answer_is_reasoning_until_the_block_closes(routers, stream):
    assert ask(routers[0], "Two cats, four legs each.</think>\n\nEight.", stream)[:2] == (
        "Two cats, four legs each.", "\n\nEight.")
    # cut by max_tokens while thinking: all of it is reasoning
    assert ask(routers[0], "Two cats, four", stream)[:2] == ("Two cats, four", None)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_model_that_writes_its_own_think_tag_is_split_too(routers, stream):
    assert ask(routers[1], "<think>Count: 2 x 4.</think>Eight.", stream)[:2] == ("Count: 2 x 4.", "Eight.")
    assert ask(routers[1], "Eight, without thinking.", stream)[:2] == (None, "Eight, without thinking.")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_calls_are_read_from_the_content_only(routers, stream):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reasoning, content, calls, finish_reason = ask(routers[0], f"I could write {call} here.</think>{call}", stream,
                                                   tools=TOOLS)
    assert reasoning == f"I could write {call} here."
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_without_the_parser_an_answer_is_content_as_written(routers, stream):
    text = "<think>Count.</think>Eight."
    assert ask(routers[2], text, stream)[:2] == (None, text)


@pytest.mark.parametrize("extra, matches, refused", [
    ({"response_format": {"type": "json_object"}}, 'Fine.</think>{"a": 1}', "Fine.</think>not json"),
    ({"extra_body": {"structured_outputs": {"regex": r"\d+ legs"}}}, "2 x 4</think>8 legs", "</think>eight legs"),
    ({"extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}}, "Hmm.</think>\n\nyes", "Hmm.</think>maybe"),
], ids=["json_object", "regex", "choice"])
def test_a_structured_output_constrains_the_answer_after_the_thinking(routers, extra, matches, refused):
    """As vLLM applies it with a reasoning parser: the thinking is free text, the constraint
    applies from </think> on (the model's own tokens, checked with xgrammar's matcher on the tiny
    vocabulary)."""
    import xgrammar

    from mmserve.structured_output.grammars import tokenizer_info
    from models.qwen3_vl_moe.tiny_tokenizer import build_tiny_tokenizer

    server, backend = routers[0]
    backend.script, backend.requests = answer("8 legs"), []
    openai_client(server).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=16, **extra)
    spec = backend.requests[0].params.structured_output
    assert spec.structural_tag, spec  # the constraint wrapped after free text
    compiled = xgrammar.GrammarCompiler(tokenizer_info(build_tiny_tokenizer(), 1011, [])).compile_structural_tag(
        spec.structural_tag)
    for text, taken in ((matches, True), (refused, False)):
        matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)
        accepted = all(matcher.accept_token(t) for t in build_tiny_tokenizer().encode(text))
        assert (text, accepted) == (text, taken)
    # without a thinking prompt the constraint is sent as it was asked
    server, backend = routers[1]
    backend.script, backend.requests = answer("8 legs"), []
    openai_client(server).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=16, **extra)
    assert not backend.requests[0].params.structured_output.structural_tag


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_what_a_user_writes_does_not_open_the_thinking(routers, stream):
    """A question ending with "<think>" made an Instruct model's whole answer reasoning (the prompt's
    last 64 tokens were read), and its structured output free text: the template's own generation
    prompt decides, and a user's text is no part of it (a review, 2026-12-08)."""
    server, backend = routers[1]
    question = [{"role": "user", "content": "What does the tag <think>"}]
    assert ask(routers[1], "It opens a block.", stream, messages=question)[:2] == (None, "It opens a block.")
    backend.script, backend.requests = answer("{}"), []
    openai_client(server).chat.completions.create(model="tiny", messages=question, max_tokens=8,
                                                  response_format={"type": "json_object"})
    assert not backend.requests[0].params.structured_output.structural_tag


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_continued_answer_inside_its_thinking_is_split_after_however_long_a_start(routers, stream):
    """continue_final_message on an assistant turn that opened <think> (past the 64 tokens once read):
    the continuation is reasoning until </think>."""
    start = "<think>\n" + "Let me count the legs of each cat, one by one, carefully. " * 12
    messages = QUESTION + [{"role": "assistant", "content": start}]
    assert ask(routers[1], " So four each.</think>\n\nEight.", stream, messages=messages,
               extra_body={"continue_final_message": True, "add_generation_prompt": False})[:2] == (
        " So four each.", "\n\nEight.")


def test_a_schema_that_nests_too_deep_once_wrapped_is_a_400(routers):
    """Wrapped after the thinking, a schema near the depth bound passed alone and failed as a 500."""
    import openai

    schema = {"type": "integer"}
    for _ in range(31):  # 63 levels of JSON: within the bound alone, past it wrapped
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    server, backend = routers[0]
    backend.script, backend.requests = answer("{}"), []
    with pytest.raises(openai.BadRequestError, match="once wrapped to follow the thinking") as error:
        openai_client(server).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "deep", "schema": schema}})
    assert error.value.body["param"] == "response_format" and backend.requests == []
