"""Structured output through ``serve.py --role colocated`` with the openai client: the random
checkpoint writes JSON only because the grammar makes it."""

import json

import jsonschema
import openai
import pytest

from served_model import MODEL_NAME

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]},
                   "count": {"type": "integer", "minimum": 0, "maximum": 99},
                   "ok": {"type": "boolean"}},
    "required": ["color", "count", "ok"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a thing as JSON."}]


def chat(client, max_tokens=96, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=max_tokens, **kwargs)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 4}], ids=["greedy", "seeded"])
def test_json_schema_chat_validates_whole_and_streamed(client, sampling):
    whole = chat(client, response_format=JSON_SCHEMA, **sampling).choices[0]
    assert whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), SCHEMA)
    chunks = list(chat(client, response_format=JSON_SCHEMA, stream=True, **sampling))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.message.content


def test_json_schema_with_n_gives_valid_choices(client):
    answer = chat(client, response_format=JSON_SCHEMA, n=3, temperature=1.0, seed=9)
    assert len(answer.choices) == 3
    for choice in answer.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_schema_completion_validates(client):
    answer = client.completions.create(model=MODEL_NAME, prompt="A thing:", max_tokens=96, temperature=0,
                                       extra_body={"response_format": JSON_SCHEMA})
    jsonschema.validate(json.loads(answer.choices[0].text), SCHEMA)


def test_json_object_starts_an_object(client):
    choice = chat(client, response_format={"type": "json_object"}, temperature=1.0, seed=1, max_tokens=200).choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)


def test_a_schema_with_no_way_to_go_on_is_an_error_and_the_server_goes_on(client):
    """A pattern no character matches: the answer was `"` with finish_reason "stop" (a token the
    grammar forbade drawn after it). A request the engine fails on its own no longer stops the
    colocated engine either (every request failed after it, the server unhealthy for good)."""
    schema = {"type": "string", "pattern": "[^\\s\\S]"}
    dead = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.APIError, match="no next token"):
        chat(client, response_format=dead, temperature=0)
    answer = chat(client, response_format=JSON_SCHEMA, temperature=0).choices[0]
    jsonschema.validate(json.loads(answer.message.content), SCHEMA)


def test_invalid_schema_is_a_400(client):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objectx"}}}
    with pytest.raises(openai.BadRequestError, match="invalid JSON schema"):
        chat(client, response_format=bad)
