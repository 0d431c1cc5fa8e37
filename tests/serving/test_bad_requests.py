"""Malformed requests get a 400 with an OpenAI error body naming the reason, change nothing on the
server (no pages taken, nothing running), and the server serves the next request as before."""

import base64

import pytest

from served_model import MODEL_NAME, random_image
from server_process import png_base64, png_data_url, request

pytestmark = pytest.mark.slow
CHAT = "/v1/chat/completions"


def chat(content="hi", **fields):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2} | fields


def with_image(url):
    return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}])


BAD = {
    "bad_json": (CHAT, b'{"model": "x", "messages": [', "not valid JSON"),
    "too_many_json_values": (CHAT, b'{"messages": [' + b",".join([b"[]"] * 1_100_000) + b"]}", "JSON values"),
    "not_an_object": (CHAT, [1, 2], "JSON object"),
    "bad_base64": (CHAT, with_image("data:image/png;base64,@@not*base64@@"), "not valid base64"),
    "not_an_image": (CHAT, with_image("data:image/png;base64," + base64.b64encode(b"plain text").decode()),
                     "not an image"),
    "truncated_image": (CHAT, with_image("data:image/png;base64," + png_base64(random_image(4))[:200]),
                        "cannot be decoded"),
    "not_an_image_type": (CHAT, with_image("data:text/plain;base64,aGk="), "not an image type"),
    "remote_url": (CHAT, with_image("https://example.com/cat.png"), "does not fetch"),
    "file_outside_allowed_dir": (CHAT, with_image("/etc/hostname"), "outside the allowed directory"),
    "unknown_model": (CHAT, chat(model="gpt-4o"), "does not exist"),
    "oversize_prompt": (CHAT, chat("word " * 600), "maximum context length"),
    "oversize_max_tokens": (CHAT, chat(max_tokens=10_000), "maximum context length"),
    "negative_max_tokens": (CHAT, chat(max_tokens=-1), "max_tokens must be >= 1"),
    "non_int_max_tokens": (CHAT, chat(max_completion_tokens="many"), "max_completion_tokens must be an integer"),
    "unknown_field": (CHAT, chat(frobnicate=True), "Unrecognized request argument supplied: frobnicate"),
    "tool_without_name": (CHAT, chat(tools=[{"type": "function", "function": {}}]), "function.name must be"),
    "n_too_many": (CHAT, chat(n=17), "n must be an integer in [1, 16]"),
    "n_zero": (CHAT, chat(n=0), "n must be an integer in [1, 16]"),
    "bad_temperature": (CHAT, chat(temperature="hot"), "temperature must be a number"),
    "top_logprobs_without_logprobs": (CHAT, chat(top_logprobs=3), "needs logprobs"),
    "stream_options_without_stream": (CHAT, chat(stream_options={"include_usage": True}), "only allowed when stream"),
    "no_messages": (CHAT, chat() | {"messages": []}, "non-empty list"),
    "bad_role": (CHAT, chat() | {"messages": [{"role": "wizard", "content": "hi"}]}, "role must be one of"),
    "user_not_a_string": (CHAT, chat(user={"id": 1}), "user must be a string"),
    "message_name_not_a_string": (CHAT, chat() | {"messages": [{"role": "user", "content": "hi", "name": 5}]},
                                  "name must be a string"),
    "max_tokens_beside_max_completion_tokens": (CHAT, chat(max_tokens="abc", max_completion_tokens=2),
                                                "max_tokens must be an integer"),
    "audio_part": (CHAT, chat([{"type": "input_audio", "input_audio": {}}]), "unsupported content part type"),
    "completion_batch": ("/v1/completions", {"model": MODEL_NAME, "prompt": ["a", "b"]}, "batches"),
    "completion_token_outside_vocab": ("/v1/completions", {"model": MODEL_NAME, "prompt": [1, 99999]},
                                       "outside the vocabulary"),
    "best_of_below_n": ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": 3, "best_of": 2},
                        "best_of must be an integer in [n, 16]"),
    "best_of_streamed": ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "best_of": 2, "stream": True},
                         "cannot be streamed"),
    "empty_cache_salt": (CHAT, chat(cache_salt=""), "cache_salt must be a non-empty string"),
    "cache_salt_not_a_string": ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "cache_salt": 5},
                                "cache_salt must be a non-empty string"),
    "generate_cache_salt_not_a_string": ("/generate", {"prompt": "hi", "cache_salt": ["a"]},
                                         "cache_salt must be a non-empty string"),
    "add_generation_prompt_not_bool": (CHAT, chat(add_generation_prompt="yes"),
                                       "add_generation_prompt must be a boolean"),
    "continue_with_generation_prompt": (CHAT, chat(continue_final_message=True),
                                        "continue_final_message needs add_generation_prompt set to false"),
    "continue_nothing": (CHAT, chat(continue_final_message=True, add_generation_prompt=False) | {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]}, "no text to continue"),
    "template_kwargs_not_object": (CHAT, chat(chat_template_kwargs=["add_vision_id"]),
                                   "chat_template_kwargs must be an object"),
    "template_kwargs_reserved": (CHAT, chat(chat_template_kwargs={"messages": []}),
                                 "chat_template_kwargs cannot set messages"),
    # a 500 each: the template's own global, and apply_chat_template's own argument
    "template_kwargs_global": (CHAT, chat(chat_template_kwargs={"namespace": 1}),
                               "chat_template_kwargs cannot set namespace"),
    "template_kwargs_self": (CHAT, chat(chat_template_kwargs={"self": 1}), "chat_template_kwargs cannot set self"),
    "logit_bias_outside_vocab": (CHAT, chat(logit_bias={"99999": 5}), "logit_bias names token 99999, outside"),
    "logit_bias_not_a_number": (CHAT, chat(logit_bias={"5": "high"}), "logit_bias values must be numbers"),
    "logit_bias_not_an_id": (CHAT, chat(logit_bias={"five": 1}), "logit_bias keys must be token ids"),
    "logit_bias_too_many": (CHAT, chat(logit_bias={str(i): 1 for i in range(301)}), "at most 300 tokens"),
    "best_of_in_chat": (CHAT, chat(best_of=2), "Unrecognized request argument supplied: best_of"),
    "generate_missing_image": ("/generate", {"prompt": "<|vision_start|><|image_pad|><|vision_end|> what?"},
                               "placeholder"),
    "generate_bad_image": ("/generate", {"prompt": "<|vision_start|><|image_pad|><|vision_end|>",
                                         "images": ["%%%"]}, "not valid base64"),
    # two images whose placeholders touch: one run of tokens the model would take for one picture
    # (a 500 from the engine before; a chat can do it with images in messages the template does not
    # render and placeholders typed in its text)
    "generate_adjacent_images": ("/generate", {"prompt": "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>",
                                               "images": [png_base64(random_image(2)), png_base64(random_image(3))]},
                                 "placeholders are next to each other"),
    "generate_unknown_sampling_field": ("/generate", {"prompt": "hi", "sampling_params": {"temprature": 0}},
                                        "unknown sampling field"),
    # SamplingParams has vLLM's n (offline); the native endpoint answers one sequence (a 500 from
    # the engine otherwise)
    "generate_n": ("/generate", {"prompt": "hi", "sampling_params": {"n": 2}}, "ask /v1/completions for n"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_request_is_a_400_that_changes_nothing(server, auth, name):
    path, body, reason = BAD[name]
    before = request("GET", f"{server.url}/health")[1]
    raw = body if isinstance(body, bytes) else None
    status, answer = request("POST", f"{server.url}{path}", None if raw else body, auth, raw=raw)
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert reason in error["message"]
    after = request("GET", f"{server.url}/health")[1]
    assert (after["free_pages"], after["running"], after["waiting"]) == (before["free_pages"], 0, 0)


def test_server_serves_after_malformed_requests(client, server, auth):
    for path, body, _ in BAD.values():
        request("POST", f"{server.url}{path}", None if isinstance(body, bytes) else body, auth,
                raw=body if isinstance(body, bytes) else None)
    image = {"type": "image_url", "image_url": {"url": png_data_url(random_image(1))}}
    got = client.chat.completions.create(model=MODEL_NAME, max_tokens=3, temperature=0,
                                         messages=[{"role": "user", "content": [image, {"type": "text", "text": "?"}]}])
    assert got.choices[0].finish_reason in ("length", "stop")
    metrics = request("GET", f"{server.url}/metrics")[1]
    assert 'mmserve_requests_total{endpoint="chat",outcome="rejected"}' in metrics
