"""The unmodified ``openai`` client against ``serve.py --role colocated``: greedy answers equal the
offline ``LLM`` on the same checkpoint, token for token, streaming or not, with and without images."""

import asyncio

import openai
import pytest

from chats import CHATS, openai_messages
from served_model import API_KEY, ENGINE_ARGS, MODEL_NAME
from mmserve import SamplingParams
from server_process import health_once_idle, png_base64, prometheus_value, request, stream_then_hang_up

pytestmark = pytest.mark.slow
MAX_TOKENS = 10
TOKEN_IDS = {"return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def expected(offline):
    """Offline greedy answers, computed once per (chat, stop)."""
    cache = {}

    def answer(name: str, stop: tuple[str, ...] = ()):
        if (name, stop) not in cache:
            params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=stop, logprobs=0)
            cache[name, stop] = offline.chat(CHATS[name], params)[0]
        return cache[name, stop]
    return answer


def _token_ids(logprobs_content) -> list[int]:
    return [int(entry.token.removeprefix("token_id:")) for entry in logprobs_content]


@pytest.mark.parametrize("name", list(CHATS))
def test_chat_equals_offline_token_for_token(client, expected, name):
    want = expected(name)
    got = client.chat.completions.create(model=MODEL_NAME, messages=openai_messages(CHATS[name]), temperature=0,
                                         max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=2, extra_body=TOKEN_IDS)
    choice = got.choices[0]
    assert _token_ids(choice.logprobs.content) == want.outputs[0].token_ids
    for entry, offline_entry in zip(choice.logprobs.content, want.outputs[0].logprobs):
        assert entry.logprob == pytest.approx(offline_entry.logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 2
    assert choice.message.content == want.outputs[0].text
    assert choice.finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)


@pytest.mark.parametrize("name", list(CHATS))
def test_streamed_chat_equals_offline(client, expected, name):
    want = expected(name)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=openai_messages(CHATS[name]), temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == want.outputs[0].text
    assert finish == [want.outputs[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client, expected):
    """vLLM's ``stream_options.continuous_usage_stats``: each chunk's usage counts the tokens sent
    up to it, and the last (choice-less) chunk the whole answer's."""
    want = expected("text")
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=openai_messages(CHATS["text"]), temperature=0, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body={"stream_options": {"include_usage": True,
                                                                                "continuous_usage_stats": True}}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == len(want.outputs[0].token_ids)
    assert {c.usage.prompt_tokens for c in chunks} == {len(want.prompt_token_ids)}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.outputs[0].text


def test_a_null_stream_option_is_left_out_as_a_null_field_is(client, expected):
    """``include_usage: null`` was a 400 where a null top-level field means "absent" (vLLM takes both)."""
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=openai_messages(CHATS["text"]), temperature=0, max_tokens=MAX_TOKENS, stream=True,
        extra_body={"stream_options": {"include_usage": None}, "user": None}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected("text").outputs[0].text
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_is_cut_as_offline(client, expected, stream):
    full = expected("text").outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = expected("text", (stop,)).outputs[0]
    kwargs = dict(model=MODEL_NAME, messages=CHATS["text"], temperature=0, max_tokens=MAX_TOKENS, stop=[stop])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert (text, finish) == (want.text, "stop")


def test_generate_returns_offline_token_ids(server, auth, offline, expected):
    """The native endpoint takes the rendered prompt with its own placeholders and base64 images."""
    want = expected("two_images")
    images = [part["image"] for part in CHATS["two_images"][0]["content"] if part["type"] == "image"]
    prompt = offline.model.tokenizer.apply_chat_template(CHATS["two_images"])
    status, body = request("POST", f"{server.url}/generate", {
        "prompt": prompt, "images": [png_base64(image) for image in images],
        "sampling_params": {"temperature": 0, "max_tokens": MAX_TOKENS, "logprobs": 1}}, auth)
    assert status == 200, body
    assert body["token_ids"] == want.outputs[0].token_ids
    assert body["text"] == want.outputs[0].text
    assert body["finish_reason"] == want.outputs[0].finish_reason
    assert body["meta"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert [entry["token_id"] for entry in body["meta"]["logprobs"]] == want.outputs[0].token_ids


@pytest.mark.parametrize("prompt", ["The train to the northern mountains", [5, 17, 240, 31, 99]])
def test_completions_equal_offline(client, offline, prompt):
    key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
    want = offline.generate({key: prompt}, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0].outputs[0]
    got = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                    logprobs=1, extra_body=TOKEN_IDS)
    assert [int(t.removeprefix("token_id:")) for t in got.choices[0].logprobs.tokens] == want.token_ids
    assert got.choices[0].text == want.text
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == want.text


def test_local_image_paths_inside_the_allowed_directory(client, media_dir, expected):
    """one.png is random_image(1), the image of the one_image chat."""
    want = expected("one_image").outputs[0].text
    text = CHATS["one_image"][0]["content"][1]
    for url in (str(media_dir / "one.png"), (media_dir / "one.png").as_uri()):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, text]}]
        got = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0,
                                             max_tokens=MAX_TOKENS)
        assert got.choices[0].message.content == want


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == ENGINE_ARGS["max_model_len"]


def test_api_key_is_required_on_the_api_only(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, answer = request("POST", f"{server.url}/v1/chat/completions", body, headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert request("POST", f"{server.url}/generate", {"prompt": "hi"})[0] == 401
    assert request("GET", f"{server.url}/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert request("GET", f"{server.url}/health")[0] == 200
    assert request("GET", f"{server.url}/metrics")[0] == 200


def test_health_is_deep(server):
    status, body = request("GET", f"{server.url}/health")
    assert status == 200
    assert body["healthy"] is True and body["engine"] == "running"
    assert body["total_pages"] == ENGINE_ARGS["num_pages"] - 1


def test_sixteen_concurrent_requests_complete_and_free_every_page(server, expected):
    names = [list(CHATS)[i % len(CHATS)] for i in range(16)]
    wanted = {name: expected(name).outputs[0].text for name in CHATS}

    async def one(client, i: int, name: str) -> str:
        kwargs = dict(model=MODEL_NAME, messages=openai_messages(CHATS[name]), temperature=0, max_tokens=MAX_TOKENS)
        if i % 2:
            stream = await client.chat.completions.create(stream=True, **kwargs)
            return "".join([c.choices[0].delta.content or "" async for c in stream])
        return (await client.chat.completions.create(**kwargs)).choices[0].message.content

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=180) as client:
            return await asyncio.gather(*(one(client, i, name) for i, name in enumerate(names)))

    assert asyncio.run(all_of_them()) == [wanted[name] for name in names]
    status, body = request("GET", f"{server.url}/health")
    assert (body["free_pages"], body["running"], body["waiting"]) == (body["total_pages"], 0, 0)
    metrics = request("GET", f"{server.url}/metrics")[1]
    assert prometheus_value(metrics, "mmserve_backend_free_pages") == body["total_pages"]
    assert prometheus_value(metrics, "mmserve_requests_in_flight") == 0


def test_client_disconnect_aborts_and_frees_pages(server, auth):
    """A client that hangs up mid-stream: the request leaves the engine and its pages come back."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    stream_then_hang_up(server, body, auth, lines=6)  # the role chunk and a few tokens: decoding
    health = health_once_idle(server)
    assert (health["running"], health["free_pages"]) == (0, health["total_pages"])
    metrics = request("GET", f"{server.url}/metrics")[1]
    assert 'mmserve_requests_total{endpoint="chat",outcome="aborted"}' in metrics


def test_metrics_expose_requests_latencies_and_pages(server, client):
    for _ in range(2):  # the second finds the first's prompt pages in the prefix cache
        client.chat.completions.create(model=MODEL_NAME, messages=CHATS["text"], temperature=0, max_tokens=3)
    text = request("GET", f"{server.url}/metrics")[1]
    assert 'mmserve_requests_total{endpoint="chat",outcome="finished"}' in text
    for name in ("mmserve_time_to_first_token_seconds_count", "mmserve_inter_token_latency_seconds_count",
                 "mmserve_generation_tokens_total", "mmserve_prompt_tokens_total"):
        assert prometheus_value(text, name) > 0, name
    for name in ("mmserve_backend_free_pages", "mmserve_backend_total_pages", "mmserve_backend_running",
                 "mmserve_backend_waiting", "mmserve_requests_in_flight"):
        prometheus_value(text, name)
    for name in ("mmserve_backend_prefix_cache_queries", "mmserve_backend_prefix_cache_hits",
                 "mmserve_backend_cached_pages"):
        assert prometheus_value(text, name) > 0, name
    health = request("GET", f"{server.url}/health")[1]
    assert {"prefix_cache_queries", "prefix_cache_hits", "cached_pages"} <= set(health)


def test_a_cache_salt_shares_cached_pages_only_with_the_same_salt(server, client, expected):
    """vLLM's ``cache_salt``: a chat (with its picture) finds the cached pages of an earlier one only
    when both carry the same salt; every answer is the offline one."""
    want = expected("one_image").outputs[0].text
    seen = []
    for salt in ("tenant a", "tenant a", "tenant b", "tenant b"):
        before = request("GET", f"{server.url}/health")[1]["prefix_cache_hits"]
        got = client.chat.completions.create(model=MODEL_NAME, messages=openai_messages(CHATS["one_image"]),
                                             temperature=0, max_tokens=MAX_TOKENS, extra_body={"cache_salt": salt})
        seen.append(request("GET", f"{server.url}/health")[1]["prefix_cache_hits"] > before)
        assert got.choices[0].message.content == want
    assert seen == [False, True, False, True]


def test_continue_final_message_and_template_kwargs_equal_offline(client, offline):
    """vLLM's chat options: the answer continues the assistant's start written for it, and
    ``chat_template_kwargs`` reach the template (Qwen3-VL's add_vision_id labels the picture),
    token for token as the offline ``LLM.chat`` with the same arguments."""
    start = [{"role": "assistant", "content": "The picture shows"}]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for options in ({"continue_final_message": True, "add_generation_prompt": False},
                    {"chat_template_kwargs": {"add_vision_id": True}}):
        messages = CHATS["one_image"] + (start if "continue_final_message" in options else [])
        want = offline.chat(messages, params, **options)[0]
        got = client.chat.completions.create(model=MODEL_NAME, messages=openai_messages(messages), temperature=0,
                                             max_tokens=MAX_TOKENS, extra_body=options)
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.choices[0].message.content == want.outputs[0].text
    plain = offline.chat(CHATS["one_image"], params)[0]
    assert len(plain.prompt_token_ids) < len(want.prompt_token_ids)  # "Picture 1: " was rendered
