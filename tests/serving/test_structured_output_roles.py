"""Structured output through ``serve.py --role all`` (a router and a process per role) with the
openai client, on the checkpoint the colocated server serves: prefill samples the first token
under the grammar and decode's matcher continues from it, so the output validates and is the
colocated server's, token for token; a client leaving a structured stream leaves nothing held."""

import json
import re
import time

import jsonschema
import openai
import pytest

from served_model import API_KEY, MODEL_NAME, engine_flags
from server_process import ServerProcess, request, stream_then_hang_up
from test_structured_output_api import JSON_SCHEMA, MESSAGES, SCHEMA, chat

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TOKEN_IDS = {"return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def roles(checkpoint, tmp_path_factory):
    process = ServerProcess(["--role", "all", "--model", str(checkpoint), "--served-model-name", MODEL_NAME,
                             *engine_flags()],
                            tmp_path_factory.mktemp("roles_log") / "serve.log",
                            env={"MMSERVE_API_KEY": API_KEY, "JAX_PLATFORMS": "cpu"})
    yield process
    process.stop()


@pytest.fixture
def roles_client(roles):
    return openai.OpenAI(base_url=f"{roles.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)


def token_ids(choice) -> list[int]:
    return [int(t.token.removeprefix("token_id:")) for t in choice.logprobs.content]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 4}], ids=["greedy", "seeded"])
def test_json_schema_through_the_roles_equals_colocated(client, roles_client, sampling):
    ask = {"response_format": JSON_SCHEMA, "logprobs": True, "extra_body": TOKEN_IDS} | sampling
    want = chat(client, **ask).choices[0]
    got = chat(roles_client, **ask).choices[0]
    assert token_ids(got) == token_ids(want)
    assert (got.message.content, got.finish_reason) == (want.message.content, "stop")
    jsonschema.validate(json.loads(got.message.content), SCHEMA)
    chunks = chat(roles_client, response_format=JSON_SCHEMA, stream=True, **sampling)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == got.message.content


@pytest.mark.parametrize("constraint, matches", [
    ({"regex": r"[a-z]{3}-\d{2}"}, lambda text: re.fullmatch(r"[a-z]{3}-\d{2}", text)),
    ({"choice": ["red", "green", 'a "blue" one']}, lambda text: text in ["red", "green", 'a "blue" one']),
    ({"grammar": 'root ::= "(" [0-9] [0-9]? ("+" [0-9])? ")"'}, lambda text: re.fullmatch(r"\(\d\d?(\+\d)?\)", text)),
], ids=["regex", "choice", "grammar"])
def test_regex_choice_and_grammar_through_the_roles_equal_colocated(client, roles_client, constraint, matches):
    """vLLM's ``structured_outputs``: each kind of constraint travels to prefill and decode and
    gives the colocated server's tokens, matching the constraint."""
    ask = {"temperature": 1.0, "seed": 6, "logprobs": True,
           "extra_body": TOKEN_IDS | {"structured_outputs": constraint}}
    want = chat(client, **ask).choices[0]
    got = chat(roles_client, **ask).choices[0]
    assert token_ids(got) == token_ids(want)
    assert (got.message.content, got.finish_reason) == (want.message.content, "stop")
    assert matches(got.message.content), got.message.content


def test_invalid_schema_is_a_400_at_the_router(roles_client):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objectx"}}}
    with pytest.raises(openai.BadRequestError, match="invalid JSON schema"):
        chat(roles_client, response_format=bad)


def test_a_schema_with_no_way_to_go_on_is_an_error_through_the_roles(roles_client):
    """Decode's engine finds the grammar with no next token (prefill sampled the opening quote):
    the request fails with the reason, and the roles serve the next one."""
    schema = {"type": "string", "pattern": "[^\\s\\S]"}
    with pytest.raises(openai.APIError, match="no next token"):
        chat(roles_client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
             temperature=0)
    answer = chat(roles_client, response_format=JSON_SCHEMA).choices[0]
    jsonschema.validate(json.loads(answer.message.content), SCHEMA)


def test_a_client_leaving_a_structured_stream_frees_every_role(roles):
    """The stream is cut mid-string (the schema asks for more text than max_tokens can write): the
    router aborts it, and decode gives back its pages and slot with its grammar."""
    story = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}},
             "required": ["story"], "additionalProperties": False}
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": story}}}
    stream_then_hang_up(roles, body, AUTH, lines=6)  # the role chunk and a few tokens: decoding
    deadline = time.monotonic() + 60
    while held := _held(roles):
        assert time.monotonic() < deadline, f"still held: {held}"
        time.sleep(0.5)
    metrics = request("GET", f"{roles.url}/metrics")[1]
    assert 'mmserve_requests_total{endpoint="chat",outcome="aborted"}' in metrics


def _held(server) -> dict:
    """What prefill and decode still hold: requests, or pages not back in the pool."""
    roles = request("GET", f"{server.url}/health")[1]["roles"]
    return {w["name"]: w for role in ("prefill", "decode") for w in roles[role]
            if w["in_flight"] or w["free_pages"] != w["total_pages"]}


def test_a_required_tool_call_through_the_roles_equals_colocated(client, roles_client):
    """The tool-call grammar (an xgrammar structural tag) travels to prefill and decode as a schema
    does: the forced call is parsed into tool_calls, valid, and the colocated server's."""
    from test_tools_api import assert_valid, chat as tool_chat

    ask = {"tool_choice": "required", "temperature": 1.0, "seed": 2, "logprobs": True, "extra_body": TOKEN_IDS}
    want = tool_chat(client, **ask).choices[0]
    got = tool_chat(roles_client, **ask).choices[0]
    assert token_ids(got) == token_ids(want)
    assert got.message.tool_calls, got.message.content
    assert_valid(got.message.tool_calls[0])
    assert got.message.tool_calls[0].function.arguments == want.message.tool_calls[0].function.arguments
