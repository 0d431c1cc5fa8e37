"""``n > 1``: n choices, each its own request; with a seed, choice i is the offline answer seeded
seed + i (as vLLM seeds them), whole or streamed, chat and completions; every page is freed."""

import openai
import pytest

from chats import CHATS, openai_messages
from mmserve import SamplingParams
from mmserve.serving.backend import GenerateRequest
from mmserve.serving.router.siblings import sibling_requests
from served_model import API_KEY, MODEL_NAME
from server_process import health_once_idle, request, stream_then_hang_up


def test_siblings_differ_only_in_id_and_seed():
    params = SamplingParams(temperature=0.8, seed=10, max_tokens=4)
    base = GenerateRequest("chat-1", None, params)
    assert sibling_requests(base, 1) == [base]
    siblings = sibling_requests(base, 3)
    assert [s.request_id for s in siblings] == ["chat-1-0", "chat-1-1", "chat-1-2"]
    assert [s.params.seed for s in siblings] == [10, 11, 12]
    assert {s.params.temperature for s in siblings} == {0.8}
    unseeded = sibling_requests(GenerateRequest("c", None, SamplingParams()), 2)
    assert [s.params.seed for s in unseeded] == [None, None]
    top = sibling_requests(GenerateRequest("c", None, SamplingParams(seed=2**64 - 1)), 2)
    assert len({s.params.seed for s in top}) == 2
    below_no_seed = sibling_requests(GenerateRequest("c", None, SamplingParams(seed=-3)), 4)
    assert [s.params.seed for s in below_no_seed] == [-3, -2, -5, 0]  # never -1, which is no seed


SEEDED = {"temperature": 1.0, "top_p": 0.95, "seed": 321, "max_tokens": 8}


def _offline_choices(offline, n: int, chat: bool):
    outs = []
    for i in range(n):
        params = SamplingParams(**(SEEDED | {"seed": SEEDED["seed"] + i}))
        if chat:
            outs.append(offline.chat(CHATS["one_image"], params)[0].outputs[0])
        else:
            outs.append(offline.generate({"prompt": "Once upon a time"}, params)[0].outputs[0])
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_n_choices_equal_offline_seeds(server, offline, stream):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    want = _offline_choices(offline, 3, chat=True)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=openai_messages(CHATS["one_image"]), n=3,
                                           stream=stream, **({"stream_options": {"include_usage": True}}
                                                             if stream else {}), **SEEDED)
    if stream:
        chunks = list(reply)
        texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                 for i in range(3)]
        finishes = [[c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == i
                     and c.choices[0].finish_reason] for i in range(3)]
        usage = chunks[-1].usage
    else:
        assert [c.index for c in reply.choices] == [0, 1, 2]
        texts = [c.message.content for c in reply.choices]
        finishes = [[c.finish_reason] for c in reply.choices]
        usage = reply.usage
    assert texts == [w.text for w in want]
    assert finishes == [[w.finish_reason] for w in want]
    assert usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert len(set(texts)) > 1, "three seeds drew three identical answers: the seeds were not used"


@pytest.mark.slow
def test_completions_n_choices_equal_offline_seeds_and_free_every_page(server, offline):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    want = _offline_choices(offline, 4, chat=False)
    reply = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", n=4, **SEEDED)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == [w.text for w in want]
    health = request("GET", f"{server.url}/health")[1]
    assert (health["free_pages"], health["running"], health["waiting"]) == (health["total_pages"], 0, 0)


@pytest.mark.slow
def test_a_client_leaving_an_n_stream_aborts_every_choice(server, auth):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell a long story."}], "n": 3,
            "max_tokens": 400, "ignore_eos": True, "temperature": 0.5, "stream": True}
    stream_then_hang_up(server, body, auth, lines=12)  # the role chunks and a few tokens: decoding
    health = health_once_idle(server)
    assert (health["running"], health["free_pages"]) == (0, health["total_pages"])


@pytest.mark.slow
def test_completions_best_of_answers_the_most_likely_candidates(server, offline):
    """best_of=4, n=2: the offline answers of seeds 321..324, ranked by the sum of their tokens'
    logprobs; the two best come back best first, with no logprobs (none were asked for), and the
    usage counts all four."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    candidates = []
    for i in range(4):
        params = SamplingParams(**(SEEDED | {"seed": SEEDED["seed"] + i, "logprobs": 0}))
        candidates.append(offline.generate({"prompt": "Once upon a time"}, params)[0].outputs[0])
    scores = [sum(entry.logprob for entry in c.logprobs) for c in candidates]
    assert len({round(score, 3) for score in scores}) == 4, "two candidates (nearly) tie: the ranking is not tested"
    ranked = [candidates[i] for i in sorted(range(4), key=lambda i: -scores[i])]
    assert ranked[:2] != candidates[:2], "the two best are the first two seeds: the ranking is not tested"
    reply = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", n=2, best_of=4, **SEEDED)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [c.text for c in ranked[:2]]
    assert all(c.logprobs is None for c in reply.choices)
    assert reply.usage.completion_tokens == sum(len(c.token_ids) for c in candidates)
    health = request("GET", f"{server.url}/health")[1]
    assert (health["free_pages"], health["running"], health["waiting"]) == (health["total_pages"], 0, 0)
